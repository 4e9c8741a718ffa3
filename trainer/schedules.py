"""Learning-rate schedules (names: trainer/contract.py SCHEDULES, DECAY_SHAPES): the lr of optim.lr at each step.

Warmup lr*(t+1)/(W+1) for t < W, then the schedule, from lr to the final lr f: optim.min_lr, or
optim.final_lr_factor x lr if set (constant stays at lr). wsd holds lr, then decays over the last
optim.decay_fraction of the T steps with optim.decay_shape: a function of the progress p through
the decay, lr at p = 0 and f at p = 1. Each parameter group follows in proportion to its peak lr
(trainer/optim.py set_learning_rate).

The default settings give the earlier curves bit for bit (tests/test_schedules.py): keep the
floating-point expressions of cosine, linear and the linear decay as they are.
"""

from __future__ import annotations

import math

from trainer.config import OptimConfig
from trainer.contract import DECAY_SHAPES, SCHEDULES, check_implements

# A geometric decay never reaches 0: exp decays to the final lr, floored at EXP_FLOOR x lr.
EXP_FLOOR = 1e-4

# --- wsd's decay shapes: lr at p = 0 to f at p = 1, non-increasing ---------------------------------


def linear_decay(lr: float, f: float, p: float) -> float:
    """lr + p (f - lr)."""
    return lr + p * (f - lr)


def cosine_decay(lr: float, f: float, p: float) -> float:
    """f + (1 + cos(pi p)) / 2 (lr - f)."""
    return f + 0.5 * (1.0 + math.cos(math.pi * p)) * (lr - f)


def one_minus_sqrt_decay(lr: float, f: float, p: float) -> float:
    """f + (1 - sqrt(p)) (lr - f)."""
    return f + (1.0 - math.sqrt(p)) * (lr - f)


def square_decay(lr: float, f: float, p: float) -> float:
    """f + (1 - p^2) (lr - f)."""
    return f + (1.0 - p * p) * (lr - f)


def exp_decay(lr: float, f: float, p: float) -> float:
    """lr (g / lr)^p with g = max(f, EXP_FLOOR lr): geometric."""
    return lr * (max(f, EXP_FLOOR * lr) / lr) ** p


def mirrored_cosine_decay(lr: float, f: float, p: float) -> float:
    """f + (2 (1 - p) - (1 + cos(pi p)) / 2) (lr - f): the cosine reflected about the linear."""
    return f + (2.0 * (1.0 - p) - 0.5 * (1.0 + math.cos(math.pi * p))) * (lr - f)


DECAY_FUNCTIONS = {
    "linear": linear_decay,
    "cosine": cosine_decay,
    "1-sqrt": one_minus_sqrt_decay,
    "square": square_decay,
    "exp": exp_decay,
    "mirrored-cosine": mirrored_cosine_decay,
}
check_implements("decay shapes", DECAY_FUNCTIONS, DECAY_SHAPES)

# --- schedules, after warmup: t the step, W the warmup, T the steps ---------------------------------


def final_lr(cfg: OptimConfig) -> float:
    """f = optim.min_lr, or optim.final_lr_factor x optim.lr if set."""
    return cfg.min_lr if cfg.final_lr_factor is None else cfg.final_lr_factor * cfg.lr


def progress(step: int, start: int, T: int) -> float:
    """p = min(1, (t - start) / max(1, T - start))."""
    return min(1.0, (step - start) / max(1, T - start))


def cosine(cfg: OptimConfig, step: int, T: int) -> float:
    """f + (1 + cos(pi p)) / 2 (lr - f), p = (t - W) / (T - W)."""
    return cosine_decay(cfg.lr, final_lr(cfg), progress(step, cfg.warmup, T))


def linear(cfg: OptimConfig, step: int, T: int) -> float:
    """f + (1 - p) (lr - f), p = (t - W) / (T - W)."""
    f = final_lr(cfg)
    return f + (1.0 - progress(step, cfg.warmup, T)) * (cfg.lr - f)


def constant(cfg: OptimConfig, step: int, T: int) -> float:
    """lr."""
    return cfg.lr


def wsd(cfg: OptimConfig, step: int, T: int) -> float:
    """lr for t < D = max(W, T - int(decay_fraction T)), then decay_shape(p), p = (t - D) / (T - D)."""
    start = max(cfg.warmup, T - int(cfg.decay_fraction * T))
    if step < start:
        return cfg.lr
    return DECAY_FUNCTIONS[cfg.decay_shape](cfg.lr, final_lr(cfg), progress(step, start, T))


SCHEDULE_FUNCTIONS = {"cosine": cosine, "linear": linear, "constant": constant, "wsd": wsd}
check_implements("schedules", SCHEDULE_FUNCTIONS, SCHEDULES)


def learning_rate(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """The lr of step t (0-based). Warmup lr*(t+1)/(W+1) for t < W, then the schedule."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / (cfg.warmup + 1)
    return SCHEDULE_FUNCTIONS[cfg.schedule](cfg, step, total_steps)
