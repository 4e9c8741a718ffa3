import math

import pytest

from trainer.config import OptimConfig
from trainer.contract import DECAY_SHAPES, SCHEDULES
from trainer.schedules import EXP_FLOOR, learning_rate

LR, MIN_LR = 1e-3, 1e-5


def old_learning_rate(lr, m, warmup, schedule, step, T):
    """The schedules as they were before final_lr_factor, decay_fraction and decay_shape."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, T - warmup))
    if schedule == "cosine":
        return m + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - m)
    if schedule == "linear":
        return m + (1.0 - progress) * (lr - m)
    if schedule == "constant":
        return lr
    decay_start = max(warmup, T - int(0.2 * T))  # wsd
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, T - decay_start))
    return lr + progress * (m - lr)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize(
    "lr, min_lr, warmup, T",
    [(1e-3, 1e-5, 5000, 100_000), (3e-3, 1e-5, 10, 100), (7e-4, 0.0, 0, 997), (1e-2, 3e-4, 37, 1234)],
)
def test_defaults_reproduce_the_old_curves_bit_for_bit(schedule, lr, min_lr, warmup, T):
    cfg = OptimConfig(lr=lr, min_lr=min_lr, warmup=warmup, schedule=schedule)
    steps = range(0, T + 2, max(1, T // 2000))
    for step in [*steps, T - 1, T, T + 1]:
        assert learning_rate(cfg, step, T) == old_learning_rate(lr, min_lr, warmup, schedule, step, T), step


@pytest.mark.parametrize(
    "step, expected",
    [(0, 1.9996e-7), (4999, 9.998e-4), (5000, 1e-3), (52_500, 5.05e-4), (100_000, 1e-5)],
)
def test_paper_schedule_values(step, expected):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup=5000, schedule="cosine")
    assert learning_rate(cfg, step, 100_000) == pytest.approx(expected, rel=1e-4)


def test_linear_midpoint_and_end():
    cfg = OptimConfig(lr=LR, min_lr=MIN_LR, warmup=10, schedule="linear")
    assert learning_rate(cfg, 60, 110) == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)
    assert learning_rate(cfg, 35, 110) == pytest.approx(MIN_LR + 0.75 * (LR - MIN_LR), rel=1e-12)
    assert learning_rate(cfg, 110, 110) == pytest.approx(MIN_LR, rel=1e-12)


@pytest.mark.parametrize("factor", [0.1, 0.0])
def test_final_lr_factor_replaces_min_lr(factor):
    final = factor * LR
    cos = OptimConfig(lr=LR, min_lr=MIN_LR, warmup=10, schedule="cosine", final_lr_factor=factor)
    lin = OptimConfig(lr=LR, min_lr=MIN_LR, warmup=10, schedule="linear", final_lr_factor=factor)
    wsd = OptimConfig(lr=LR, min_lr=MIN_LR, warmup=10, schedule="wsd", final_lr_factor=factor)
    const = OptimConfig(lr=LR, min_lr=MIN_LR, warmup=10, schedule="constant", final_lr_factor=factor)
    for cfg in (cos, lin, wsd):
        assert learning_rate(cfg, 110, 110) == pytest.approx(final, rel=1e-12, abs=1e-18)
        assert learning_rate(cfg, 500, 110) == pytest.approx(final, rel=1e-12, abs=1e-18)  # past T
    assert learning_rate(cos, 60, 110) == pytest.approx((LR + final) / 2, rel=1e-12)
    assert learning_rate(cos, 35, 110) == pytest.approx(
        final + (1 + math.cos(math.pi / 4)) / 2 * (LR - final)
    )
    assert learning_rate(lin, 35, 110) == pytest.approx(final + 0.75 * (LR - final), rel=1e-12)
    assert learning_rate(wsd, 99, 110) == pytest.approx((LR + final) / 2, rel=1e-12)  # decay from 88
    assert learning_rate(const, 110, 110) == LR


# The shape s(p) of each decay, from 1 at p = 0 to 0 at p = 1: lr at p is f + s(p) (lr - f);
# exp is geometric instead: lr (f / lr)^p.
SHAPES = {
    "linear": lambda p: 1 - p,
    "cosine": lambda p: (1 + math.cos(math.pi * p)) / 2,
    "1-sqrt": lambda p: 1 - math.sqrt(p),
    "square": lambda p: 1 - p**2,
    "mirrored-cosine": lambda p: 2 * (1 - p) - (1 + math.cos(math.pi * p)) / 2,
}
W, T, START = 10, 200, 160  # wsd with decay_fraction 0.2 decays from step 160 to 200


def expected_decay(shape, lr, final, p):
    if shape == "exp":
        return lr * (final / lr) ** p
    return final + SHAPES[shape](p) * (lr - final)


def test_shapes_cover_the_registry():
    assert set(SHAPES) | {"exp"} == set(DECAY_SHAPES)


@pytest.mark.parametrize("shape", list(DECAY_SHAPES))
def test_decay_shape(shape):
    cfg = OptimConfig(lr=LR, min_lr=MIN_LR, warmup=W, schedule="wsd", decay_shape=shape)
    lrs = [learning_rate(cfg, t, T) for t in range(W, T + 1)]
    assert lrs[: START - W] == [LR] * (START - W)  # stable until the decay starts
    assert learning_rate(cfg, START, T) == pytest.approx(LR, rel=1e-12)
    assert learning_rate(cfg, T, T) == pytest.approx(MIN_LR, rel=1e-12)
    assert learning_rate(cfg, START + 1, T) < LR
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    for p in (0.25, 0.5, 0.75):
        step = START + round(p * (T - START))
        assert learning_rate(cfg, step, T) == pytest.approx(expected_decay(shape, LR, MIN_LR, p), rel=1e-12)


def test_shapes_differ():
    at_quarter = {
        shape: learning_rate(
            OptimConfig(lr=LR, min_lr=MIN_LR, warmup=W, schedule="wsd", decay_shape=shape), START + 10, T
        )
        for shape in DECAY_SHAPES
    }
    assert len(set(at_quarter.values())) == len(DECAY_SHAPES)
    # mirrored cosine: below the linear in the first half of the decay, above it in the second
    linear, mirrored = at_quarter["linear"], at_quarter["mirrored-cosine"]
    assert mirrored < linear
    late = {s: OptimConfig(lr=LR, min_lr=MIN_LR, warmup=W, schedule="wsd", decay_shape=s) for s in SHAPES}
    assert learning_rate(late["mirrored-cosine"], START + 30, T) > learning_rate(
        late["linear"], START + 30, T
    )


def test_exp_with_a_final_lr_of_zero_ends_at_the_floor():
    cfg = OptimConfig(lr=LR, warmup=W, schedule="wsd", decay_shape="exp", final_lr_factor=0.0)
    lrs = [learning_rate(cfg, t, T) for t in range(START, T + 1)]
    assert all(lr > 0 for lr in lrs)
    assert lrs[-1] == pytest.approx(EXP_FLOOR * LR, rel=1e-12)
    assert learning_rate(cfg, START + 20, T) == pytest.approx(LR * math.sqrt(EXP_FLOOR), rel=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize(
    "fraction, T_, start",
    [(0.5, 200, 100), (1.0, 200, W), (0.3, 105, 74), (0.99, 100, W)],  # int() truncates; never before W
)
def test_decay_fraction_moves_the_decay_start(fraction, T_, start):
    cfg = OptimConfig(lr=LR, min_lr=MIN_LR, warmup=W, schedule="wsd", decay_fraction=fraction)
    if start > W:
        assert learning_rate(cfg, start - 1, T_) == LR
    assert learning_rate(cfg, start, T_) == LR  # p = 0
    assert learning_rate(cfg, start + 1, T_) < LR
    middle = start + (T_ - start) / 2
    if middle == int(middle):
        assert learning_rate(cfg, int(middle), T_) == pytest.approx((LR + MIN_LR) / 2, rel=1e-12)
    assert learning_rate(cfg, T_, T_) == pytest.approx(MIN_LR, rel=1e-12)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("shape", list(DECAY_SHAPES))
@pytest.mark.parametrize("factor, fraction", [(None, 0.2), (0.0, 1.0), (0.5, 0.05)])
def test_warmup_unchanged(schedule, shape, factor, fraction):
    cfg = OptimConfig(
        lr=LR,
        min_lr=MIN_LR,
        warmup=W,
        schedule=schedule,
        decay_shape=shape,
        final_lr_factor=factor,
        decay_fraction=fraction,
    )
    assert [learning_rate(cfg, t, 30) for t in range(W)] == [LR * (t + 1) / (W + 1) for t in range(W)]
    assert learning_rate(cfg, W, 30) == pytest.approx(LR, rel=1e-12)  # the peak right after warmup
