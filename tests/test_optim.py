import pytest
import torch

from trainer.config import ModelConfig, OptimConfig
from trainer.model import GPT
from trainer.optim import build_optimizer, set_learning_rate
from trainer.schedules import learning_rate


def test_weight_decay_only_for_matrices_and_independent_decay():
    model = GPT(ModelConfig(n_layer=1, n_embd=32, vocab_size=64, seq_len=8, tied=True))
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    groups = {g["role"]: g for g in opt.param_groups}
    assert set(groups) == {"head", "matrix", "vector"}  # tied: the shared matrix is the head
    assert groups["head"]["params"] == [model.lm_head.weight]
    for role in ("head", "matrix"):
        assert all(p.dim() >= 2 for p in groups[role]["params"]) and groups[role]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in groups["vector"]["params"]) and groups["vector"]["weight_decay"] == 0.0
    n_params = len({id(p) for p in model.parameters()})
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params  # the tied matrix once
    assert (opt.defaults["betas"], opt.defaults["eps"]) == ((0.9, 0.95), 1e-8)
    independent = build_optimizer(
        model, OptimConfig(lr=1e-2, weight_decay=0.1, independent_wd=True), torch.device("cpu")
    )
    assert independent.param_groups[0]["weight_decay"] == pytest.approx(0.1 / 1e-2)


def test_roles_get_their_peak_lr():
    model = GPT(ModelConfig(n_layer=1, n_embd=32, vocab_size=64, seq_len=8, tied=False))
    cfg = OptimConfig(lr=1e-2, matrix_lr_scale=0.5, embedding_lr_scale=2.0, vector_lr_scale=0.25)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    groups = {g["role"]: g for g in opt.param_groups}
    assert groups["embedding"]["params"] == [model.wte.weight]
    assert groups["head"]["params"] == [model.lm_head.weight]
    set_learning_rate(opt, 4e-3)  # the schedule's lr of optim.lr at some step
    lrs = {role: g["lr"] for role, g in groups.items()}
    assert lrs == pytest.approx({"embedding": 8e-3, "head": 4e-3, "matrix": 2e-3, "vector": 1e-3})


def test_role_groups_train_bit_identically_to_the_two_group_adamw():
    """The paper's runs: per-role groups at scale 1 change nothing, bit for bit, against the
    previous code path (one decay group of matrices, one without decay)."""
    torch.manual_seed(0)
    cfg_model = ModelConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=64, seq_len=16, tied=False)
    cfg = OptimConfig(lr=3e-3, weight_decay=0.1, independent_wd=True, warmup=2)
    ours, old = GPT(cfg_model), GPT(cfg_model)
    old.load_state_dict(ours.state_dict())
    new_opt = build_optimizer(ours, cfg, torch.device("cpu"))
    params = list(dict((id(p), p) for p in old.parameters()).values())
    old_opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay / cfg.lr},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    data = torch.randint(0, 64, (6, 4, 17))
    for step, batch in enumerate(data):
        lr = learning_rate(cfg, step, len(data))
        set_learning_rate(new_opt, lr)
        for group in old_opt.param_groups:
            group["lr"] = lr
        for model, opt in ((ours, new_opt), (old, old_opt)):
            opt.zero_grad()
            model(batch[:, :-1], batch[:, 1:])[1].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    for (name, a), b in zip(ours.state_dict().items(), old.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
