import pytest
import torch

from trainer.config import ModelConfig, OptimConfig
from trainer.model import GPT
from trainer.optim import build_optimizer, learning_rate


@pytest.mark.parametrize(
    "step, expected",
    [(0, 1.9996e-7), (4999, 9.998e-4), (5000, 1e-3), (52_500, 5.05e-4), (100_000, 1e-5)],
)
def test_paper_schedule_values(step, expected):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup=5000, schedule="cosine")
    assert learning_rate(cfg, step, 100_000) == pytest.approx(expected, rel=1e-4)


def test_warmup_formula_and_monotone_cosine():
    cfg = OptimConfig(lr=3e-3, min_lr=1e-5, warmup=10, schedule="cosine")
    assert learning_rate(cfg, 3, 100) == pytest.approx(3e-3 * 4 / 11)
    values = [learning_rate(cfg, t, 100) for t in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_and_wsd_schedules():
    const = OptimConfig(lr=1e-3, min_lr=1e-5, warmup=10, schedule="constant")
    assert learning_rate(const, 10, 100) == learning_rate(const, 99, 100) == 1e-3
    wsd = OptimConfig(lr=1e-3, min_lr=1e-5, warmup=10, schedule="wsd")
    assert learning_rate(wsd, 79, 100) == 1e-3  # stable until the last 20%
    assert learning_rate(wsd, 90, 100) == pytest.approx(1e-3 + 0.5 * (1e-5 - 1e-3))
    assert learning_rate(wsd, 100, 100) == pytest.approx(1e-5)


def test_weight_decay_only_for_matrices_and_independent_decay():
    model = GPT(ModelConfig(n_layer=1, n_embd=32, vocab_size=64, seq_len=8, tied=True))
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n_params = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_params  # the tied matrix once
    assert (opt.defaults["betas"], opt.defaults["eps"]) == ((0.9, 0.95), 1e-8)
    independent = build_optimizer(
        model, OptimConfig(lr=1e-2, weight_decay=0.1, independent_wd=True), torch.device("cpu")
    )
    assert independent.param_groups[0]["weight_decay"] == pytest.approx(0.1 / 1e-2)
