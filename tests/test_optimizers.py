"""Every optimizer of the registry: its defining update on a tiny problem (a written-out reference,
or the library's own function), which parameters it updates how, and a run interrupted and
resumed from a checkpoint that ends bit-identical to the uninterrupted one. Also the hooks the
training loop calls: schedule-free's evaluation weights, Sophia's Hessian estimate, and that
mu-centering sees the parameters after both parts of Muon's composite step."""

import json
import math

import pytest
import torch
from torch import nn

from conftest import TINY_EVAL, tiny_config, write_config
from trainer import checkpoint
from trainer import train as train_module
from trainer.config import ConfigError, ModelConfig, OptimConfig, config_from_dict
from trainer.contract import OPTIMIZERS
from trainer.distributed import process_group
from trainer.evaluate import evaluate
from trainer.model import GPT
from trainer.optim import (
    STATE_FLOATS,
    Composite,
    RunShape,
    build_optimizer,
    optimizer_hooks,
    run_shape,
    set_learning_rate,
)
from trainer.shards import ValidationSet
from trainer.sophia import sample_from_softmax
from trainer.validation import validation_loss

CPU = torch.device("cpu")
LR, B1, B2, EPS, WD = 0.1, 0.9, 0.95, 1e-8, 0.1


class Toy(nn.Module):
    """One hidden matrix `w` (role matrix) and one vector `b` (role vector)."""

    def __init__(self, rows: int = 6, cols: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(rows, cols, generator=g))
        self.b = nn.Parameter(torch.randn(cols, generator=g))


def gradients(model: nn.Module, seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}


def step(opt, model: nn.Module, grads: dict[str, torch.Tensor]) -> None:
    """One optimizer step with the given gradients (copies: some optimizers change .grad)."""
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    opt.step()
    opt.zero_grad(set_to_none=True)


def start(name: str, model: nn.Module, shape: RunShape | None = None, **optim):
    """(the optimizer on model, model's initial parameters by name)."""
    cfg = OptimConfig(
        **{"name": name, "lr": LR, "beta1": B1, "beta2": B2, "eps": EPS, "weight_decay": WD, **optim}
    )
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    return build_optimizer(model, cfg, CPU, shape or RunShape()), initial


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-5, atol=1e-6) -> None:
    torch.testing.assert_close(actual.detach(), expected, rtol=rtol, atol=atol)


def adam(p0, grads, lr=LR, wd=0.0, b1=B1, b2=B2, eps=EPS):
    """AdamW (torch's order: decay, then the bias-corrected step)."""
    p, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
    for t, g in enumerate(grads, 1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return p


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The library's orthogonalisation (torch.optim.Muon's own function)."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz(g, (3.4445, -4.775, 2.0315), steps, 1e-7).float()


def assert_orthogonalised(update: torch.Tensor, direction: torch.Tensor) -> None:
    """Newton-Schulz's 5 quintic steps leave singular values in about [0.7, 1.1] (not exactly 1),
    and the result close to the polar factor U V^T of the momentum."""
    s = torch.linalg.svdvals(update)
    assert 0.6 < s.min() and s.max() < 1.2, s
    u, _, vh = torch.linalg.svd(direction, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(update.flatten(), (u @ vh).flatten(), dim=0)
    assert cos > 0.95


# --- (a) the defining update of each optimizer --------------------------------------------------


def update_adamw():
    model = Toy()
    opt, p0 = start("adamw", model)
    g1, g2 = gradients(model, 1), gradients(model, 2)
    step(opt, model, g1)
    step(opt, model, g2)
    assert_close(model.w, adam(p0["w"], [g1["w"], g2["w"]], wd=WD))
    assert_close(model.b, adam(p0["b"], [g1["b"], g2["b"]]))  # vectors never decay


def muon_update(name: str, model: Toy):
    """(orthogonalised update O of the hidden matrix, its p0, the gradient) after one step."""
    opt, p0 = start(name, model)
    assert isinstance(opt, Composite) and [type(p).__name__ for p in opt.parts] == ["Muon", "AdamW"]
    g = gradients(model, 1)
    step(opt, model, g)
    rows, cols = model.w.shape
    if name == "muon":  # Keller Jordan's scale, no decay on the matrices
        scale, decayed = math.sqrt(max(1, rows / cols)), p0["w"]
    else:  # AdamW-matched RMS, decoupled decay
        scale, decayed = 0.2 * math.sqrt(max(rows, cols)), p0["w"] * (1 - LR * WD)
    update = (decayed - model.w.detach()) / (LR * scale)
    assert_close(model.b, adam(p0["b"], [g["b"]]))  # the vector: AdamW
    return update, g["w"]


def update_muon():
    update, g = muon_update("muon", Toy())
    momentum = 0.95
    nesterov = (1 - momentum**2) * g  # g.lerp(buf, mu) with buf = (1 - mu) g
    assert_close(update, newton_schulz(nesterov), rtol=1e-4, atol=1e-5)
    assert_orthogonalised(update, g)


def update_dmuon():
    update, g = muon_update("dmuon", Toy())
    assert_close(update, muon_update("muon", Toy())[0], rtol=1e-4, atol=1e-5)  # the same O
    assert_orthogonalised(update, g)


def update_lion():
    model = Toy()
    opt, p0 = start("lion", model)
    g1 = gradients(model, 1)
    g2 = {n: -0.05 * g + 1e-3 * e for (n, g), e in zip(g1.items(), gradients(model, 2).values())}
    step(opt, model, g1)
    step(opt, model, g2)
    for name, wd in (("w", WD), ("b", 0.0)):
        m, p = torch.zeros_like(p0[name]), p0[name]
        for g in (g1[name], g2[name]):
            p = p * (1 - LR * wd) - LR * torch.sign(B1 * m + (1 - B1) * g)
            m = B2 * m + (1 - B2) * g
        assert_close(getattr(model, name), p)
    # The second step follows the interpolated momentum, against the sign of its own gradient.
    assert torch.equal(torch.sign(p0["b"] - LR * torch.sign(g1["b"]) - model.b), torch.sign(g1["b"]))


def update_signum():
    model = Toy()
    opt, p0 = start("signum", model)
    g1 = gradients(model, 1)
    g2 = {n: -0.01 * g for n, g in g1.items()}  # momentum outweighs it
    step(opt, model, g1)
    step(opt, model, g2)
    mu = 0.95  # the registry's default momentum
    for name, wd in (("w", WD), ("b", 0.0)):
        m, p = torch.zeros_like(p0[name]), p0[name]
        for g in (g1[name], g2[name]):
            m = mu * m + (1 - mu) * g
            p = p * (1 - LR * wd) - LR * torch.sign(m)
        assert_close(getattr(model, name), p)
    assert_close(model.b, p0["b"] - 2 * LR * torch.sign(g1["b"]))  # sign of the momentum, twice


def update_ademamix():
    model, steps = Toy(), 4
    opt, p0 = start("ademamix", model, RunShape(steps=steps))
    grads = [gradients(model, s) for s in (1, 2, 3)]
    for g in grads:
        step(opt, model, g)
    alpha, beta3 = 8.0, 0.9999  # the registry's defaults
    for name, wd in (("w", WD), ("b", 0.0)):
        p, m, v, slow = p0[name], 0, 0, 0
        for t, g in enumerate(g[name] for g in grads):
            t += 1
            alpha_t = min(t * alpha / steps, alpha)  # both warmed up over the run
            f = t / steps
            beta3_t = min(
                math.exp(math.log(B1) * math.log(beta3) / ((1 - f) * math.log(beta3) + f * math.log(B1))),
                beta3,
            )
            p = p * (1 - LR * wd)
            m = B1 * m + (1 - B1) * g
            v = B2 * v + (1 - B2) * g * g
            slow = beta3_t * slow + (1 - beta3_t) * g  # the slow EMA
            p = p - LR * (m / (1 - B1**t) + alpha_t * slow) / ((v / (1 - B2**t)).sqrt() + EPS)
        assert_close(getattr(model, name), p)


def update_adopt():
    model = Toy()
    opt, p0 = start("adopt", model)
    g1, g2 = gradients(model, 1), gradients(model, 2)
    g2["w"][0] = 3 * g1["w"][0]  # beyond the clip of step 2 (2^0.25)
    step(opt, model, g1)
    assert_close(model.w, p0["w"] * (1 - LR * WD))  # the first step only records g^2 (and decays)
    assert torch.equal(model.b, p0["b"])
    step(opt, model, g2)
    for name, wd in (("w", WD), ("b", 0.0)):
        v = g1[name] ** 2  # the second moment of the previous step normalises
        normed = (g2[name] / v.sqrt().clamp(min=EPS)).clamp(-(2**0.25), 2**0.25)
        expected = p0[name] * (1 - LR * wd) ** 2 - LR * (1 - B1) * normed
        assert_close(getattr(model, name), expected)
    assert (g2["w"][0] / g1["w"][0].abs()).abs().min() > 2**0.25  # the clipped row is clipped


def update_mars():
    model = Toy()
    opt, p0 = start("mars", model)
    g1, g2 = gradients(model, 1, scale=0.1), gradients(model, 2, scale=0.1)
    step(opt, model, g1)
    step(opt, model, g2)
    gamma = 0.025  # the registry's default
    p, m, v, last = p0["w"], 0, 0, torch.zeros_like(p0["w"])
    for t, g in enumerate((g1["w"], g2["w"]), 1):
        c = g + gamma * B1 / (1 - B1) * (g - last)  # the variance-reduced gradient
        c = c / max(1.0, c.norm().item())
        m = B1 * m + (1 - B1) * c
        v = B2 * v + (1 - B2) * c * c
        update = (m / (1 - B1**t)) / (((v + 1e-15).sqrt() + EPS) / math.sqrt(1 - B2**t))
        p = p * (1 - LR * WD) - LR * update
        last = g
    assert_close(model.w, p)
    assert_close(model.b, adam(p0["b"], [g1["b"], g2["b"]]), rtol=1e-4)  # vectors: AdamW


def update_soap():
    model = Toy(4, 4)  # square: both preconditioners have full rank after one gradient
    opt, p0 = start("soap", model)
    g1, g2 = gradients(model, 1), gradients(model, 2)
    step(opt, model, g1)
    assert torch.equal(model.w, p0["w"]) and torch.equal(model.b, p0["b"])  # records only
    step(opt, model, g2)
    sb = B2  # shampoo_beta unset: optim.beta2

    def eigenbasis(gg):
        return torch.linalg.eigh(gg)[1]

    left = eigenbasis((1 - sb) * g1["w"] @ g1["w"].T)
    right = eigenbasis((1 - sb) * g1["w"].T @ g1["w"])
    rotated = left.T @ g2["w"] @ right  # Adam in the eigenbasis
    m, v = (1 - B1) * rotated, (1 - B2) * rotated**2
    step_size = LR * math.sqrt(1 - B2) / (1 - B1)
    expected = (p0["w"] - step_size * left @ (m / (v.sqrt() + EPS)) @ right.T) * (1 - LR * WD)
    assert_close(model.w, expected, rtol=1e-4, atol=1e-5)
    adam_b = (1 - B1) * g2["b"] / ((1 - B2) ** 0.5 * g2["b"].abs() + EPS)
    assert_close(model.b, p0["b"] - step_size * adam_b)  # vectors: plain Adam


def update_prodigy():
    model = Toy()
    opt, p0 = start("prodigy", model)
    g = gradients(model, 1)
    step(opt, model, g)
    d0 = 1e-6
    for name, wd in (("w", WD), ("b", 0.0)):
        m, v = d0 * (1 - B1) * g[name], d0 * d0 * (1 - B2) * g[name] ** 2
        expected = p0[name] * (1 - d0 * LR * wd) - d0 * LR * m / (v.sqrt() + d0 * EPS)
        assert_close(getattr(model, name), expected, rtol=1e-6, atol=1e-12)
    # On a quadratic, the step size d grows from d0 (monotonically) and the loss falls.
    model = Toy()
    opt = build_optimizer(model, OptimConfig(name="prodigy", lr=1.0), CPU)
    ds, losses = [], []
    for _ in range(40):
        loss = sum(((p - 3.0) ** 2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
        opt.zero_grad()
        ds.append(opt.param_groups[0]["d"])
        losses.append(loss.item())
    assert all(a <= b for a, b in zip(ds, ds[1:])) and ds[-1] > 1e4 * d0
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ConfigError, match="one step size"):
        build_optimizer(Toy(), OptimConfig(name="prodigy", lr=1.0, matrix_lr_scale=2.0), CPU)


def update_sfadamw():
    model = Toy()
    opt, p0 = start("sfadamw", model, weight_decay=0.0)
    grads = [gradients(model, s) for s in (1, 2, 3, 4)]
    for g in grads:
        step(opt, model, g)
    hooks = optimizer_hooks(opt_config("sfadamw"))
    training = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name in ("w", "b"):
        z, v, zs = p0[name], 0, []
        for t, g in enumerate((g[name] for g in grads), 1):
            v = B2 * v + (1 - B2) * g * g
            z = z - LR * g / ((v / (1 - B2**t)).sqrt() + EPS)
            zs.append(z)
        x = torch.stack(zs).mean(0)  # constant lr: the uniform average of the iterates
        assert_close(training[name], (1 - B1) * z + B1 * x)  # training happens at y
        with hooks.evaluation_weights(opt):
            assert_close(getattr(model, name), x)  # evaluation at x
        assert torch.equal(getattr(model, name), training[name])  # and back to y, exactly


def update_sophia():
    model, tokens, rho = Toy(), 10, 0.04
    opt, p0 = start("sophia", model, RunShape(batch_tokens=tokens), hessian_interval=2)
    hooks = optimizer_hooks(opt_config("sophia"))
    g1, g2 = gradients(model, 1), gradients(model, 2)
    sampled = {n: g * torch.logspace(-1, 2, g.numel()).view_as(g) for n, g in gradients(model, 3).items()}
    calls = []

    def drawn_backward(draw):
        calls.append(draw)
        for n, p in model.named_parameters():
            p.grad = sampled[n].clone()  # as if from the sampled-label cross-entropy

    step(opt, model, g1)
    hooks.after_step(opt, 1, drawn_backward)
    assert calls == []  # every hessian_interval (2) steps
    for name, wd in (("w", WD), ("b", 0.0)):  # no estimate yet: h = 0 clips to lr sign(m)
        assert_close(getattr(model, name), p0[name] * (1 - LR * wd) - LR * torch.sign(g1[name]))
    p1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(opt, model, g1)
    hooks.after_step(opt, 2, drawn_backward)
    assert calls == [sample_from_softmax] and all(p.grad is None for p in model.parameters())
    p2 = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(opt, model, g2)
    for name, wd in (("w", WD), ("b", 0.0)):
        m1 = (1 - B1) * g1[name]
        m2 = B1 * m1 + (1 - B1) * g1[name]
        assert_close(p2[name], p1[name] * (1 - LR * wd) - LR * torch.sign(m2))
        m3 = B1 * m2 + (1 - B1) * g2[name]
        h = (1 - B2) * tokens * sampled[name] ** 2  # the GNB estimate: B g_s^2
        ratio = (m3.abs() / (rho * h + 1e-15)).clamp(max=1)
        assert (ratio < 1).any() and (ratio == 1).any()  # some coordinates clipped at rho, some not
        expected = p2[name] * (1 - LR * wd) - LR * torch.sign(m3) * ratio
        assert_close(getattr(model, name), expected)


UPDATES = {
    "adamw": update_adamw,
    "muon": update_muon,
    "dmuon": update_dmuon,
    "lion": update_lion,
    "signum": update_signum,
    "ademamix": update_ademamix,
    "adopt": update_adopt,
    "mars": update_mars,
    "soap": update_soap,
    "prodigy": update_prodigy,
    "sfadamw": update_sfadamw,
    "sophia": update_sophia,
}


def opt_config(name: str) -> OptimConfig:
    return OptimConfig(name=name)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_defining_update(name):
    torch.manual_seed(0)
    UPDATES[name]()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_floats_never_overstate_the_optimizer_state(name):
    """The memory estimate counts STATE_FLOATS fp32 values per parameter: measured after a step,
    the state holds that many (more for Muon's AdamW part and SOAP's preconditioners, never fewer)."""
    model = Toy()
    opt, _ = start(name, model, RunShape(steps=10, batch_tokens=10))
    step(opt, model, gradients(model, 1))
    if name == "sophia":
        opt.update_hessian()
    parts = opt.parts if isinstance(opt, Composite) else [opt]
    values = sum(
        v.numel()
        for part in parts
        for state in part.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )
    per_parameter = values / sum(p.numel() for p in model.parameters())
    assert per_parameter >= STATE_FLOATS[name]
    if name not in ("muon", "dmuon"):  # one momentum for the matrix, two moments for the vector
        assert per_parameter < STATE_FLOATS[name] + 0.5


def test_sample_from_softmax_draws_labels_by_their_probability():
    peaks = torch.randint(0, 7, (15,))
    peaked = torch.full((15, 7), -30.0).scatter_(-1, peaks[:, None], 30.0)
    assert torch.equal(sample_from_softmax(peaked), peaks)  # every label is the peak
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(60_000, 3)
    counts = torch.bincount(sample_from_softmax(logits), minlength=3) / 60_000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.01, rtol=0)


def test_muon_orthogonalises_the_fused_qkv_matrix_whole():
    """Attention.qkv (3H x H) is one Muon parameter: its update has H singular values ~1 (split
    into q, k, v, the stacked update's would be ~sqrt(3)), at lr x sqrt(3)."""
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, seq_len=8))
    qkv = model.blocks[0].attn.qkv.weight
    opt = build_optimizer(model, OptimConfig(name="muon", lr=LR), CPU)
    assert any(p is qkv for p in opt.parts[0].param_groups[0]["params"])
    qkv.grad = torch.randn(qkv.shape, generator=torch.Generator().manual_seed(1))
    before = qkv.detach().clone()
    opt.step()
    update = (before - qkv.detach()) / (LR * math.sqrt(3))
    assert_orthogonalised(update, qkv.grad)


# --- (c) which parameters each optimizer updates how -----------------------------------------------

SINGLE = {
    "adamw": "AdamW",
    "lion": "Lion",
    "signum": "SignSGD",
    "ademamix": "AdEMAMix",
    "adopt": "ADOPT",
    "mars": "MARS",
    "soap": "SOAP",
    "prodigy": "Prodigy",
    "sfadamw": "AdamWScheduleFree",
    "sophia": "SophiaG",
}
MUON_RULE = {"embedding": "AdamW", "head": "AdamW", "vector": "AdamW", "matrix": "Muon"}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_parameter_group_rule(name, tied):
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, seq_len=8, tied=tied))
    cfg = OptimConfig(name=name, lr=1.0 if name == "prodigy" else 1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg, CPU, RunShape(steps=10, batch_tokens=16))
    parts = opt.parts if isinstance(opt, Composite) else (opt,)
    where = {}  # role -> optimizer class
    placed = []
    for part in parts:
        for group in part.param_groups:
            assert {"lr", "lr_scale", "weight_decay", "role"} <= set(group)
            where.setdefault(group["role"], set()).add(type(part).__name__)
            placed += [id(p) for p in group["params"]]
    assert sorted(placed) == sorted({id(p) for p in model.parameters()})  # each exactly once
    expected = MUON_RULE if name in ("muon", "dmuon") else dict.fromkeys(MUON_RULE, SINGLE[name])
    roles = {"head", "matrix", "vector"} | (set() if tied else {"embedding"})
    assert where == {role: {expected[role]} for role in roles}
    for group in opt.param_groups:
        matrices = group["params"][0].dim() >= 2
        decays = matrices and not (name == "muon" and group["role"] == "matrix")  # Muon's: none
        assert group["weight_decay"] == (0.1 if decays else 0.0), group["role"]
    set_learning_rate(opt, 0.5)
    assert all(group["lr"] == 0.5 * group["lr_scale"] for group in opt.param_groups)


# --- (b) checkpoints resume bit-exactly --------------------------------------------------------

OVERRIDES = {
    "sfadamw": {"schedule": "constant"},
    "prodigy": {"lr": 1.0},
    "sophia": {"hessian_interval": 3},  # estimates at steps 3, 6, 9 and 12: before and after 4
}


def train_config(tiny_data, name: str, **train) -> dict:
    return tiny_config(
        tiny_data,
        run=name,
        optim={"name": name, **OVERRIDES.get(name, {})},
        train={"eval_every": 6, "eval_batches": 2, **train},
        eval={"micro_batch": 4},
    )


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, tiny_data, in_process, name, capsys):
    run = tmp_path / name
    cfg = config_from_dict(train_config(tiny_data, name))
    assert train_module.train(cfg, run) == 0
    uninterrupted = checkpoint.load(run / "final.pt")
    assert uninterrupted["status"] == "completed"
    val = (run / "val.jsonl").read_text()
    (run / "final.pt").unlink()
    (run / "train.json").unlink()
    checkpoint.checkpoint_path(run / "checkpoints", 8).unlink()
    capsys.readouterr()
    assert train_module.train(cfg, run) == 0  # from step 4
    assert "at step 4" in capsys.readouterr().out
    resumed = checkpoint.load(run / "final.pt")["model"]
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed[key], value), key
    assert (run / "val.jsonl").read_text() == val


def test_schedule_free_validates_and_saves_the_average(tmp_path, tiny_data, in_process):
    """val.jsonl and final.pt have the average x; training goes on at y; a kept checkpoint is
    evaluated at its x too (trainer.evaluate --step)."""
    run = tmp_path / "sf"
    raw = train_config(tiny_data, "sfadamw")
    raw["eval"] = TINY_EVAL
    write_config(run / "config.yaml", raw)
    cfg = config_from_dict(raw)
    with process_group() as d:
        trainer = train_module.Run(cfg, run, d)
        assert trainer.fit() == 0
        final = checkpoint.load(run / "final.pt")["model"]
        y = trainer.model.state_dict()
        assert not torch.equal(final["lm_head.weight"], y["lm_head.weight"])
        with trainer.optimizer_hooks.evaluation_weights(trainer.optimizer):
            for key, value in trainer.model.state_dict().items():
                assert torch.equal(value, final[key]), key
        windows = ValidationSet(sorted(tiny_data.glob("tiny_val_*.bin")), cfg.model.seq_len)
        model = GPT(cfg.model)
        model.load_state_dict(final)
        expected, _ = validation_loss(model, windows, cfg.train.eval_batches, cfg.eval.micro_batch, d, None)
    rows = [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 12 and rows[-1]["val_loss"] == expected

    kept = checkpoint.load(checkpoint.checkpoint_path(run / "checkpoints", 8))
    model = GPT(cfg.model)
    model.load_state_dict(kept["model"])
    optimizer = build_optimizer(model, cfg.optim, CPU, run_shape(cfg))
    optimizer.load_state_dict(kept["optimizer"])
    with optimizer_hooks(cfg.optim).evaluation_weights(optimizer):
        x = {key: value.clone() for key, value in model.state_dict().items()}
    evaluated = GPT(cfg.model)
    evaluated.load_state_dict(kept["model"])
    optimizer_hooks(cfg.optim).use_evaluation_weights(
        evaluated, lambda: build_optimizer(evaluated, cfg.optim, CPU, run_shape(cfg)), kept["optimizer"]
    )
    for key, value in evaluated.state_dict().items():
        assert torch.equal(value, x[key]), key
    assert not torch.equal(x["lm_head.weight"], kept["model"]["lm_head.weight"])
    with process_group() as d:
        expected, _ = validation_loss(evaluated, windows, cfg.eval.batches, cfg.eval.micro_batch, d, None)
    assert evaluate(run, 8)["test_loss"] == expected


@pytest.mark.parametrize("name", ["muon", "dmuon"])
def test_mu_centering_sees_the_parameters_after_both_parts_of_the_step(tmp_path, tiny_data, in_process, name):
    raw = train_config(tiny_data, name, steps=2)
    raw["method"] = {"name": "mucentering"}
    cfg = config_from_dict(raw)
    order, after_part = [], {}
    with process_group() as d:
        trainer = train_module.Run(cfg, tmp_path / "run", d)
        embedding = trainer.model.output_embedding  # in the AdamW part

        def logged(part):
            name, original = type(part).__name__, part.step

            def step(*args, **kwargs):
                order.append(name)
                result = original(*args, **kwargs)
                after_part[name] = embedding.detach().clone()
                return result

            return step

        for part in trainer.optimizer.parts:
            part.step = logged(part)
        centre = trainer.model.method.after_step

        def after_step(e):
            order.append("after_step")
            assert torch.equal(e, after_part["AdamW"])  # E as the whole step left it
            centre(e)

        trainer.model.method.after_step = after_step
        before = embedding.detach().clone()
        trainer.train_step(1e-2)
    assert order == ["Muon", "AdamW", "after_step"]
    assert not torch.equal(before, embedding.detach())
    assert embedding.detach().mean(0).abs().max() < 1e-6


def test_mu_centering_centres_the_weights_schedule_free_evaluates(tmp_path, tiny_data, in_process):
    """Centering y alone would leave x = (y - (1 - beta1) z) / beta1 uncentred: z is centred too."""
    raw = train_config(tiny_data, "sfadamw")
    raw["method"] = {"name": "mucentering"}
    assert train_module.train(config_from_dict(raw), tmp_path / "run") == 0
    final = checkpoint.load(tmp_path / "run" / "final.pt")["model"]["lm_head.weight"]
    assert final.mean(0).abs().max() < 1e-6
