import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO
from trainer import model as model_module
from trainer.config import MethodConfig, ModelConfig
from trainer.methods import build_method
from trainer.model import GPT, NORM_EPS, fast_path_coverage, parameter_count, swiglu_hidden
from trainer.ops import rope
from trainer.ops.fast_path import plain_pytorch
from trainer.ops.rope import apply_rope, rope_tables

PAPER_SCALES = {  # layers, width, SwiGLU hidden, exact non-embedding parameters (docs/protocol.md "Model")
    "16M": (6, 224, 768, 4_304_384),
    "29M": (9, 320, 1024, 12_541_280),
    "57M": (12, 480, 1280, 33_192_480),
    "109M": (15, 640, 1792, 76_210_240),
    "221M": (21, 832, 2304, 178_957_792),
}


@pytest.mark.parametrize("scale", PAPER_SCALES)
def test_paper_scales_have_the_exact_parameter_counts(scale):
    n_layer, n_embd, hidden, non_embedding = PAPER_SCALES[scale]
    assert swiglu_hidden(n_embd) == hidden
    with torch.device("meta"):
        model = GPT(ModelConfig(n_layer=n_layer, n_embd=n_embd))
    assert model.non_embedding_params() == non_embedding
    assert model.lm_head.weight.shape == (50304, n_embd)
    nominal = {"16M": 16e6, "29M": 29e6, "57M": 57e6, "109M": 109e6, "221M": 221e6}[scale]
    assert abs(non_embedding + 50304 * n_embd - nominal) / nominal < 0.03  # nominal N of the tables


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 64, "seq_len": 16, **kw})


def test_initialisation_follows_the_paper():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=4, n_embd=256, vocab_size=4096, seq_len=32)
    model = GPT(cfg)
    H = 256
    assert abs(model.wte.weight.std().item() - 1 / math.sqrt(H)) < 0.002
    xavier = math.sqrt(2 / (H + 3 * H))
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - xavier) < 0.002
    proj = 0.02 / math.sqrt(2 * 4)
    assert abs(model.blocks[0].attn.proj.weight.std().item() - proj) < 0.0005
    assert abs(model.lm_head.weight.std().item() - math.sqrt(2 / (4096 + H))) < 0.001
    assert all(not (isinstance(m, torch.nn.LayerNorm) and m.bias is not None) for m in model.modules())
    assert all(not (isinstance(m, torch.nn.Linear) and m.bias is not None) for m in model.modules())


def test_tied_embeddings_share_storage_and_end_xavier_normal():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_embd=256, vocab_size=4096, seq_len=8, tied=True))
    assert model.wte.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert abs(model.wte.weight.std().item() - math.sqrt(2 / (4096 + 256))) < 0.001
    untied = GPT(ModelConfig(n_layer=1, n_embd=256, vocab_size=4096, seq_len=8))
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - sum(p.numel() for p in model.parameters()) == 4096 * 256


def test_model_is_causal():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 64, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    a, b = model(idx), model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tied": True},
        {"mlp": "gelu"},
        {"mlp": "gelu", "tied": True, "qk_norm": False},
        {"n_layer": 3, "n_embd": 48, "n_head": 6, "vocab_size": 100, "qk_norm": False},
        {"norm": "rmsnorm"},
        {"qk_norm_kind": "rmsnorm"},
        {"norm": "rmsnorm", "qk_norm_kind": "rmsnorm", "tied": True},
        {"mlp_multiple": 64},
        {"mlp_multiple": 1, "n_embd": 48, "n_head": 6},
        {"mlp": "gelu", "mlp_multiple": 64},  # GELU's 4H ignores it
    ],
)
def test_parameter_count_from_the_config_is_the_built_model_s(kw):
    cfg = tiny(**kw)
    with torch.device("meta"):
        model = GPT(cfg)
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scale", PAPER_SCALES)
def test_parameter_count_of_the_paper_scales(scale):
    n_layer, n_embd, _, non_embedding = PAPER_SCALES[scale]
    assert parameter_count(ModelConfig(n_layer=n_layer, n_embd=n_embd)) == non_embedding + 2 * 50304 * n_embd


def test_a_sequence_longer_than_seq_len_is_refused():
    model = GPT(tiny())
    model(torch.zeros(1, 16, dtype=torch.long))  # seq_len itself is fine
    with pytest.raises(ValueError, match=r"^17 tokens per sequence: longer than model.seq_len=16$"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "method", [MethodConfig(), MethodConfig(name="softcap", cap=2.0)], ids=["baseline", "softcap"]
)
def test_drawn_labels_come_from_the_output_logits_a_slice_at_a_time(monkeypatch, method):
    """Sophia's Hessian pass: labels drawn from the model's own (capped) logits, DRAW_POSITIONS
    positions at a time; the cross-entropy against them is the one of the full logits."""
    torch.manual_seed(0)
    model = GPT(tiny(), build_method(method))
    x = torch.randint(0, 64, (3, 16))
    monkeypatch.setattr(model_module, "DRAW_POSITIONS", 5)  # 48 positions: 10 slices, the last short
    slices = []

    def argmax(logits):
        slices.append(len(logits))
        return logits.argmax(-1)

    labels = model.draw_labels(x, argmax)
    logits = model(x)
    assert slices == [5] * 9 + [3] and torch.equal(labels, logits.argmax(-1))
    cross_entropy, _ = model(x, labels)
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(cross_entropy, expected)


# --- Llama-style switches ---------------------------------------------------------------------

TINY_KEYS = (  # GPT(tiny()): every parameter's name and shape, as the paper's model has them
    [("wte.weight", (64, 32))]
    + [
        (f"blocks.{i}.{name}", shape)
        for i in range(2)
        for name, shape in [
            ("ln1.weight", (32,)),
            ("attn.qkv.weight", (96, 32)),
            ("attn.proj.weight", (32, 32)),
            ("attn.q_norm.weight", (8,)),
            ("attn.k_norm.weight", (8,)),
            ("ln2.weight", (32,)),
            ("mlp.w.weight", (256, 32)),
            ("mlp.v.weight", (256, 32)),
            ("mlp.w2.weight", (32, 256)),
        ]
    ]
    + [("ln_f.weight", (32,)), ("lm_head.weight", (64, 32))]
)
# Sum of squares of matrices of GPT(tiny()) after torch.manual_seed(0), recorded from the model
# as it was before the switches existed: the same draws in the same order.
TINY_INIT = {
    "wte.weight": 61.758467670155454,
    "blocks.0.attn.qkv.weight": 47.29716303595037,
    "blocks.0.attn.proj.weight": 0.10805874244461033,
    "blocks.0.mlp.w.weight": 57.751353424618074,
    "blocks.1.mlp.w2.weight": 56.150433255084764,
    "lm_head.weight": 42.98272396790628,
}


def paper_logits(sd: dict, cfg: ModelConfig, idx: torch.Tensor) -> torch.Tensor:
    """The paper's model spelled out from its state_dict: pre-LayerNorm without bias, QK-LayerNorm
    (one weight per head_dim), RoPE of base 10000 on rope_fraction of each head, SwiGLU."""
    H, heads = cfg.n_embd, cfg.n_head
    D = H // heads
    tables = rope_tables(D, cfg.rope_fraction, cfg.seq_len)

    def ln(x, w):
        return F.layer_norm(x, x.shape[-1:], w, None, 1e-5)

    x = F.embedding(idx, sd["wte.weight"])
    B, T, _ = x.shape
    for i in range(cfg.n_layer):
        w = {k.removeprefix(f"blocks.{i}."): v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        q, k, v = F.linear(ln(x, w["ln1.weight"]), w["attn.qkv.weight"]).view(B, T, 3, heads, D).unbind(2)
        q = apply_rope(ln(q, w["attn.q_norm.weight"]), tables)
        k = apply_rope(ln(k, w["attn.k_norm.weight"]), tables)
        y = F.scaled_dot_product_attention(
            *(t.contiguous().transpose(1, 2) for t in (q, k, v)), is_causal=True
        )
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, H), w["attn.proj.weight"])
        h = ln(x, w["ln2.weight"])
        x = x + F.linear(
            F.silu(F.linear(h, w["mlp.w.weight"])) * F.linear(h, w["mlp.v.weight"]), w["mlp.w2.weight"]
        )
    return F.linear(ln(x, sd["ln_f.weight"]), sd["lm_head.weight"]).float()


def test_default_switches_are_the_paper_model_exactly():
    defaults = tiny()
    spelled = tiny(
        norm="layernorm", qk_norm=True, qk_norm_kind="layernorm", rope_base=10000.0, mlp_multiple=256
    )
    assert defaults == spelled
    torch.manual_seed(0)
    model = GPT(defaults)
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == TINY_KEYS
    for key, square_sum in TINY_INIT.items():
        assert sd[key].double().square().sum().item() == pytest.approx(square_sum, rel=1e-9)
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    assert len(norms) == 2 * 2 + 2 * 2 + 1  # ln1, ln2, q_norm, k_norm per block; ln_f
    assert all(type(m) is nn.LayerNorm and m.bias is None and m.eps == 1e-5 for m in norms)
    assert torch.equal(model.rope, rope_tables(8, 0.5, 16))
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(idx), paper_logits(sd, defaults, idx))  # bit for bit


def train_a_few_steps(cfg: ModelConfig, steps: int = 10) -> list[float]:
    """Cross-entropies of AdamW steps on one fixed random batch (a tiny problem any working model
    fits). One thread: on a shared CI core, threads that spin for each other take 10x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(2)
        idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
        targets = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
        losses = []
        for _ in range(steps):
            ce, loss = model(idx, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(ce.item())
        return losses
    finally:
        torch.set_num_threads(threads)


def test_rmsnorm_blocks_are_rmsnorm_modules_and_train():
    cfg = tiny(norm="rmsnorm")
    model = GPT(cfg)
    for norm in [model.ln_f, *(m for b in model.blocks for m in (b.ln1, b.ln2))]:
        assert type(norm) is nn.RMSNorm and norm.eps == NORM_EPS and norm.normalized_shape == (32,)
    assert type(model.blocks[0].attn.q_norm) is nn.LayerNorm  # qk_norm_kind is its own switch
    assert [k for k in model.state_dict()] == [k for k, _ in TINY_KEYS]  # the same names
    assert parameter_count(cfg) == parameter_count(tiny())  # one weight per dim, as LayerNorm
    x = torch.randn(3, 32)
    norm = model.blocks[0].ln1
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        want = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + NORM_EPS) * norm.weight
        assert torch.allclose(norm(x), want, atol=1e-6)  # no centring, unlike LayerNorm
    losses = train_a_few_steps(cfg)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize(
    "kw",
    [
        {"qk_norm_kind": "rmsnorm"},
        {"norm": "rmsnorm", "qk_norm_kind": "rmsnorm", "rope_base": 500.0, "mlp_multiple": 64},
        {"norm": "rmsnorm", "qk_norm": False, "tied": True},
    ],
)
def test_llama_style_models_train(kw):
    losses = train_a_few_steps(tiny(**kw))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("plain", [False, True], ids=["dispatched", "plain_pytorch"])
def test_qk_rmsnorm_gives_q_and_k_unit_rms_times_their_weight(plain):
    cfg = tiny(qk_norm_kind="rmsnorm", rope_fraction=0.0)  # no turn: q and k as normalised
    model = GPT(cfg)
    attn = model.blocks[0].attn
    assert type(attn.q_norm) is type(attn.k_norm) is nn.RMSNorm and attn.q_norm.eps == NORM_EPS
    assert attn.q_norm.normalized_shape == (8,)  # one weight of head_dim, shared by the heads
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(3)
    qkv = (3 + 2 * torch.randn(2, 16, 3, 4, 8, generator=g)).requires_grad_()  # a mean RMSNorm keeps
    with plain_pytorch() if plain else nullcontext():
        q, k, v = rope.qkv_norm_rope(qkv, attn.q_norm, attn.k_norm, model.rope)
    for out, norm in [(q, attn.q_norm), (k, attn.k_norm)]:
        unit = out / norm.weight
        rms = unit.square().mean(-1).sqrt()
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-4)
    assert torch.equal(v, qkv[:, :, 2])
    q_in = qkv[:, :, 0]
    assert q.mean(-1).abs().min() > 0.1  # not centred: the mean of qkv (3) survives, unlike LayerNorm
    assert torch.allclose(
        q, q_in * torch.rsqrt(q_in.square().mean(-1, keepdim=True) + NORM_EPS) * attn.q_norm.weight, atol=1e-5
    )
    (q.sum() + k.square().sum()).backward()
    assert attn.q_norm.weight.grad is not None and torch.isfinite(qkv.grad).all()


def test_rope_base_sets_the_tables_of_the_model():
    cfg = tiny(rope_base=500.0, rope_fraction=1.0)
    tables = GPT(cfg).rope
    assert torch.equal(tables, rope_tables(8, 1.0, 16, 500.0))
    assert not torch.equal(tables, GPT(tiny(rope_fraction=1.0)).rope)
    for i in range(4):  # pair i turns by 500^(-2i/8) at position 1
        angle = 500.0 ** (-2 * i / 8)
        assert tables[0, 1, 2 * i].item() == pytest.approx(math.cos(angle), abs=1e-7)
        assert tables[2, 1, 2 * i + 1].item() == pytest.approx(math.sin(angle), abs=1e-7)


@pytest.mark.parametrize(("multiple", "hidden"), [(256, 256), (64, 128), (32, 96), (1, 85)])
def test_mlp_multiple_sets_the_swiglu_width(multiple, hidden):
    # H = 32: int(8 * 32 / 3) = 85, rounded up to a multiple
    assert swiglu_hidden(32, multiple) == hidden
    mlp = GPT(tiny(mlp_multiple=multiple)).blocks[0].mlp
    assert mlp.w.weight.shape == mlp.v.weight.shape == (hidden, 32) and mlp.w2.weight.shape == (32, hidden)


@pytest.mark.parametrize(
    ("kw", "falls_back"),
    [
        ({}, None),
        ({"qk_norm_kind": "rmsnorm", "norm": "rmsnorm"}, None),
        ({"rope_base": 500.0, "mlp_multiple": 64, "tied": True}, None),
        ({"qk_norm": False}, "no QK-norm"),
        ({"n_head": 8, "n_embd": 24}, "head_dim 3 is odd"),
    ],
)
def test_fast_path_coverage_says_which_configs_leave_the_fused_qk_kernel(monkeypatch, kw, falls_back):
    cfg = tiny(**kw)
    coverage = fast_path_coverage(cfg)
    if falls_back is None:
        assert coverage == []
    else:
        assert len(coverage) == 1 and falls_back in coverage[0]
    # The truth of it: the fused operation is called exactly where coverage is empty.
    calls = []
    fused = rope._qkv_norm_rope_op
    monkeypatch.setattr(rope, "_qkv_norm_rope_op", lambda *a: calls.append(a[-1]) or fused(*a))
    GPT(cfg)(torch.zeros(1, 4, dtype=torch.long))
    assert bool(calls) == (coverage == [])
    assert all(rms == (cfg.qk_norm_kind == "rmsnorm") for rms in calls)


def test_optimizer_benchmark_scales_have_their_parameter_counts():
    """config/optimizers.yaml's three Llama scales as the benchmark names them (123.59M, 210M, 720M)."""
    from workflow.scripts.grid import load

    grid = load(REPO / "config" / "optimizers.yaml")
    counts = {}
    for run_id, run in grid.runs.items():
        config = grid.run_config(run_id)["model"]
        counts[run.key.scale] = parameter_count(ModelConfig(**{k: v for k, v in config.items()}))
    assert counts["124M"] == 123_587_328  # "123.59M parameters" in the benchmark's README
    assert round(counts["210M"], -7) == 210_000_000 and round(counts["720M"], -7) == 720_000_000
