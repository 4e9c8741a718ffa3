"""AdamW with the paper's parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig

WSD_DECAY_FRACTION = 0.2  # wsd: linear decay to min_lr over the last 20% of the steps


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """Weight decay only for tensors with dim >= 2; fused AdamW on CUDA.

    With independent_wd the configured decay is divided by the peak lr, so that the decay
    applied per step is weight_decay * lr_t / lr (it follows the schedule but not the lr's size).
    """
    params = list(dict((id(p), p) for p in model.parameters() if p.requires_grad).values())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    wd = cfg.weight_decay / cfg.lr if cfg.independent_wd else cfg.weight_decay
    groups = [
        {"params": decay, "weight_decay": wd},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type == "cuda",
    )


def learning_rate(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """The lr of step t (0-based). Warmup lr*(t+1)/(W+1) for t < W, then the schedule."""
    lr, m, W, T = cfg.lr, cfg.min_lr, cfg.warmup, total_steps
    if step < W:
        return lr * (step + 1) / (W + 1)
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "wsd":
        decay_start = max(W, T - int(WSD_DECAY_FRACTION * T))
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, T - decay_start))
        return lr + progress * (m - lr)
    progress = min(1.0, (step - W) / max(1, T - W))
    return m + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - m)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
