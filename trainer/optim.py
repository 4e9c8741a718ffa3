"""Optimizers and learning-rate schedules (their names and descriptions: trainer/contract.py).

Parameters are grouped by role (contract.PARAM_ROLES): `embedding` (the input embedding of an
untied model), `head` (the output embedding E; with tying the shared matrix), `matrix` (every
other tensor of dim >= 2), `vector` (norm weights). Each role's peak lr is optim.lr x
optim.<role>_lr_scale; the schedule gives the lr of optim.lr at each step and every group
follows it in proportion, so optimizers and parametrisations with per-group rates need no
special case. Weight decay applies to tensors of dim >= 2.
"""

from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig
from trainer.contract import OPTIMIZERS, PARAM_ROLES, SCHEDULES, check_implements

WSD_DECAY_FRACTION = 0.2  # wsd: linear decay to min_lr over the last 20% of the steps


def param_role(model: torch.nn.Module, name: str, p: torch.nn.Parameter) -> str:
    if p is getattr(model, "output_embedding", None):
        return "head"
    if name.startswith("wte."):
        return "embedding"
    return "matrix" if p.dim() >= 2 else "vector"


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """One group per role that has parameters: params, lr_scale, weight_decay, role.

    With independent_wd the configured decay is divided by the group's peak lr, so that the
    decay applied per step is weight_decay * lr_t / lr (it follows the schedule but not the lr's size).
    """
    by_role: dict[str, list] = {role: [] for role in PARAM_ROLES}
    seen = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:  # a tied matrix once
            seen.add(id(p))
            by_role[param_role(model, name, p)].append(p)
    groups = []
    for role, params in by_role.items():
        if not params:
            continue
        scale = getattr(cfg, f"{role}_lr_scale")
        wd = cfg.weight_decay if params[0].dim() >= 2 else 0.0
        if cfg.independent_wd:
            wd = wd / (cfg.lr * scale)
        groups.append(
            {"params": params, "lr": cfg.lr * scale, "lr_scale": scale, "weight_decay": wd, "role": role}
        )
    return groups


def adamw(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch.optim.AdamW, fused on CUDA."""
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type == "cuda",
    )


BUILDERS = {"adamw": adamw}
check_implements("optimizers", BUILDERS, OPTIMIZERS)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return BUILDERS[cfg.name](model, cfg, device)


def cosine(lr: float, m: float, step: int, W: int, T: int) -> float:
    progress = min(1.0, (step - W) / max(1, T - W))
    return m + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - m)


def constant(lr: float, m: float, step: int, W: int, T: int) -> float:
    return lr


def wsd(lr: float, m: float, step: int, W: int, T: int) -> float:
    decay_start = max(W, T - int(WSD_DECAY_FRACTION * T))
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, T - decay_start))
    return lr + progress * (m - lr)


SCHEDULE_FUNCTIONS = {"cosine": cosine, "constant": constant, "wsd": wsd}  # after warmup
check_implements("schedules", SCHEDULE_FUNCTIONS, SCHEDULES)


def learning_rate(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """The lr of step t (0-based). Warmup lr*(t+1)/(W+1) for t < W, then the schedule."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    return SCHEDULE_FUNCTIONS[cfg.schedule](cfg.lr, cfg.min_lr, step, cfg.warmup, total_steps)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """lr is the schedule's lr of optim.lr; each group gets its share (a scale of 1.0 gives lr
    itself, bit for bit)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
