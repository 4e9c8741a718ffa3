"""RoPE, and QK-norm (LayerNorm or RMSNorm) + RoPE of q and k with v as one operation
(qkv_norm_rope) and its Triton kernels, against the definition under autograd."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.ops import rope
from trainer.ops.fast_path import plain_pytorch
from trainer.ops.rope import apply_rope, fusion_blocker, qkv_norm_rope, rope_tables

ROOT = Path(__file__).resolve().parent.parent


def test_rope_rotates_adjacent_pairs_of_the_first_half_only():
    head_dim, seq = 8, 5
    tables = rope_tables(head_dim, 0.5, seq)
    d_rot = 4
    assert tables.shape == (3, seq, head_dim)
    x = torch.randn(1, seq, 1, head_dim)
    y = apply_rope(x, tables)
    assert torch.equal(y[..., d_rot:], x[..., d_rot:])  # second half passes through
    for t in range(seq):
        for i in range(d_rot // 2):
            a = t * 10000.0 ** (-2 * i / d_rot)
            x0, x1 = x[0, t, 0, 2 * i], x[0, t, 0, 2 * i + 1]
            expect = torch.stack([x0 * math.cos(a) - x1 * math.sin(a), x0 * math.sin(a) + x1 * math.cos(a)])
            assert torch.allclose(y[0, t, 0, 2 * i : 2 * i + 2], expect, atol=1e-6)


@pytest.mark.parametrize("base", [None, 500.0, 1e6])
def test_rope_base_sets_the_angle_of_each_pair(base):
    head_dim, d_rot = 16, 8  # rope_fraction 0.5
    tables = rope_tables(head_dim, 0.5, 5) if base is None else rope_tables(head_dim, 0.5, 5, base)
    base = base or 10000.0  # the default
    for i in range(d_rot // 2):
        angle = base ** (-2 * i / d_rot)  # at position 1; t times that at position t
        for t in (1, 4):
            cos, sin = math.cos(t * angle), math.sin(t * angle)
            assert (
                tables[0, t, 2 * i].item() == tables[0, t, 2 * i + 1].item() == pytest.approx(cos, abs=1e-7)
            )
            assert tables[1, t, 2 * i].item() == pytest.approx(-sin, abs=1e-7)
            assert tables[2, t, 2 * i + 1].item() == pytest.approx(sin, abs=1e-7)
    assert torch.equal(tables[0, :, d_rot:], torch.ones(5, head_dim - d_rot))
    assert not torch.equal(rope_tables(head_dim, 0.5, 5, 500.0), rope_tables(head_dim, 0.5, 5))


def test_rope_with_an_odd_head_dim_leaves_the_last_dims_alone():
    x = torch.randn(1, 6, 2, 7)
    y = apply_rope(x, rope_tables(7, 0.6, 6))  # d_rot = 4 of 7
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert torch.equal(y[:, 0], x[:, 0])  # position 0 is not turned


def test_rope_makes_attention_scores_depend_on_relative_position_only():
    tables = rope_tables(8, 0.5, 12)
    q, k = torch.randn(8), torch.randn(8)

    def score(tq, tk):
        qs = apply_rope(q.expand(1, 12, 1, 8).clone(), tables)[0, tq, 0]
        ks = apply_rope(k.expand(1, 12, 1, 8).clone(), tables)[0, tk, 0]
        return (qs * ks).sum()

    assert torch.allclose(score(5, 3), score(9, 7), atol=1e-5)


def make_norm(kind: str, head_dim: int) -> nn.Module:
    return nn.LayerNorm(head_dim, bias=False) if kind == "layernorm" else nn.RMSNorm(head_dim, eps=1e-5)


def qkv_inputs(B=2, T=5, heads=3, head_dim=12, seed=0, dtype=torch.float32, kind="layernorm"):
    """qkv as the model sees it, (B, T, 3, heads, head_dim); norms (LayerNorm or RMSNorm) whose
    weights are not all ones and differ between q and k; tables longer than T (the model's are
    cfg.seq_len long)."""
    g = torch.Generator().manual_seed(seed)
    qkv = (3 + 2 * torch.randn(B, T, 3, heads, head_dim, generator=g)).to(dtype)
    norms = make_norm(kind, head_dim), make_norm(kind, head_dim)
    with torch.no_grad():
        for norm in norms:
            norm.weight.mul_(1 + 0.3 * torch.randn(head_dim, generator=g))
    return qkv, *norms, rope_tables(head_dim, 0.5, T + 3)


def plain_qkv_norm_rope(qkv, q_weight, k_weight, tables, eps=1e-5, kind="layernorm"):
    q, k, v = qkv.unbind(2)
    d = qkv.shape[-1]
    norm = F.layer_norm if kind == "layernorm" else F.rms_norm
    q = apply_rope(norm(q, (d,), q_weight, eps=eps), tables)
    return q, apply_rope(norm(k, (d,), k_weight, eps=eps), tables), v


def sdpa_layout_gradients(qkv, seed=1):
    """Incoming gradients as SDPA hands them back: (B, heads, T, head_dim) memory, viewed."""
    g = torch.Generator().manual_seed(seed)
    B, T, _, H, D = qkv.shape
    return [torch.randn(B, H, T, D, generator=g, dtype=qkv.dtype).transpose(1, 2) for _ in range(3)]


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_qkv_norm_rope_values_and_gradients_match_the_definition(kind):
    qkv, q_norm, k_norm, tables = qkv_inputs(kind=kind)
    qkv = qkv.detach().requires_grad_()
    out = qkv_norm_rope(qkv, q_norm, k_norm, tables)
    assert all(t.shape == (2, 5, 3, 12) and t.is_contiguous() for t in out)
    grads = sdpa_layout_gradients(qkv)
    got = torch.autograd.grad(out, (qkv, q_norm.weight, k_norm.weight), grads)

    wide = [t.detach().double().requires_grad_() for t in (qkv, q_norm.weight, k_norm.weight)]
    ref = plain_qkv_norm_rope(*wide, tables.double(), kind=kind)
    want = torch.autograd.grad(ref, wide, [g.double() for g in grads])
    for a, b in [*zip(out, ref), *zip(got, want)]:
        assert (a.double() - b).norm() / b.norm() < 1e-6
    assert torch.equal(out[2], qkv[:, :, 2]) and torch.equal(got[0][:, :, 2], grads[2])  # v as it is


def test_qkv_norm_rope_of_a_single_position():
    # There v is a contiguous view of qkv; the operation still returns a tensor of its own.
    qkv, q_norm, k_norm, tables = qkv_inputs(B=1, T=1)
    qkv = qkv.requires_grad_()
    q, k, v = qkv_norm_rope(qkv, q_norm, k_norm, tables)
    assert v.data_ptr() != qkv.data_ptr() and torch.equal(v, qkv[:, :, 2])
    (q.sum() + k.sum() + v.sum()).backward()
    assert torch.equal(qkv.grad[:, :, 2], torch.ones_like(v))


def test_qkv_norm_rope_is_the_plain_expression_where_it_cannot_fuse():
    qkv, q_norm, k_norm, tables = qkv_inputs(head_dim=8)
    with plain_pytorch():
        plain = qkv_norm_rope(qkv, q_norm, k_norm, tables)
    for fused, want in zip(qkv_norm_rope(qkv, q_norm, k_norm, tables), plain):
        assert torch.allclose(fused, want, atol=1e-6)
    q, k, v = qkv.unbind(2)
    biased = nn.LayerNorm(8)  # with a bias: not the fused operation, the same function
    out = qkv_norm_rope(qkv, biased, k_norm, tables)
    assert torch.equal(out[0], apply_rope(biased(q), tables)) and out[2] is not None
    out = qkv_norm_rope(qkv, nn.Identity(), nn.Identity(), tables)  # no QK-norm
    assert torch.equal(out[0], apply_rope(q, tables)) and torch.equal(out[1], apply_rope(k, tables))
    machine_eps = nn.RMSNorm(8)  # eps None: the dtype's epsilon, which the kernel does not take
    out = qkv_norm_rope(qkv, machine_eps, machine_eps, tables)
    assert torch.equal(out[0], apply_rope(machine_eps(q), tables))
    rms = nn.RMSNorm(8, eps=1e-5)  # of two kinds: q's norm is not k's
    out = qkv_norm_rope(qkv, rms, k_norm, tables)
    assert torch.equal(out[0], apply_rope(rms(q), tables)) and torch.equal(
        out[1], apply_rope(k_norm(k), tables)
    )


def test_fusion_blocker_names_what_the_kernels_do_not_cover():
    ln, rms = nn.LayerNorm(8, bias=False), nn.RMSNorm(8, eps=1e-5)
    assert fusion_blocker(ln, ln, 8) is None and fusion_blocker(rms, rms, 8) is None  # both fuse
    assert "no QK-norm" in fusion_blocker(nn.Identity(), nn.Identity(), 8)
    assert "LayerNorm/Identity" in fusion_blocker(ln, nn.Identity(), 8)
    assert "RMSNorm/RMSNorm" in fusion_blocker(nn.RMSNorm(8), nn.RMSNorm(8), 8)  # eps None
    assert "LayerNorm/LayerNorm" in fusion_blocker(nn.LayerNorm(8), nn.LayerNorm(8), 8)  # a bias
    assert "differ in kind or eps" in fusion_blocker(ln, rms, 8)
    assert "differ in kind or eps" in fusion_blocker(rms, nn.RMSNorm(8, eps=1e-6), 8)
    assert "head_dim 7 is odd" in fusion_blocker(nn.RMSNorm(7, eps=1e-5), nn.RMSNorm(7, eps=1e-5), 7)


def test_qkv_norm_rope_keeps_the_dtype_of_its_input_under_autocast():
    qkv, q_norm, k_norm, tables = qkv_inputs(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = qkv_norm_rope(qkv, q_norm, k_norm, tables)
    want = apply_rope(F.layer_norm(qkv[:, :, 0].float(), (12,), q_norm.weight, None, q_norm.eps), tables)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    assert torch.equal(q, want.bfloat16())  # fp32 math, one rounding


def test_compiled_qkv_norm_rope_matches_eager():
    qkv, q_norm, k_norm, tables = qkv_inputs()

    def f(qkv):
        q, k, v = qkv_norm_rope(qkv, q_norm, k_norm, tables)
        return (q * k).sum() + (k * v).square().sum()

    grads = []
    for fn in (f, torch.compile(f)):
        q_norm.weight.grad = k_norm.weight.grad = None
        x = qkv.detach().requires_grad_()
        fn(x).backward()
        grads.append([x.grad, q_norm.weight.grad.clone(), k_norm.weight.grad.clone()])
    for eager, compiled in zip(*grads):
        assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-5)


KERNEL_CHECK = """
import sys
import torch
import torch.nn.functional as F
from trainer.ops import rope
device = sys.argv[1]
g = torch.Generator().manual_seed(0)
# head_dim 12 (6 pairs in a block of 16), 2 x 5 x 3 x 3 = 90 rows: neither a multiple of a block
cases = [(rms, dtype, tol) for rms in (False, True) for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]]
for rms, dtype, tol in cases:
    norm = F.rms_norm if rms else F.layer_norm
    B, T, H, D = 2, 5, 3, 12
    tables = rope.rope_tables(D, 0.5, 7).to(device)
    qkv = (3 + 2 * torch.randn(B, T, 3, H, D, generator=g)).to(device, dtype)
    wq, wk = ((1 + 0.3 * torch.randn(D, generator=g)).to(device) for _ in range(2))
    grads = [torch.randn(B, H, T, D, generator=g).to(device, dtype).transpose(1, 2) for _ in range(3)]
    wide = [t.double().requires_grad_() for t in (qkv, wq, wk)]
    q, k, v = wide[0].unbind(2)
    ref = (
        rope.apply_rope(norm(q, (D,), wide[1], eps=1e-5), tables.double()),
        rope.apply_rope(norm(k, (D,), wide[2], eps=1e-5), tables.double()),
        v,
    )
    ref_grads = torch.autograd.grad(ref, wide, [t.double() for t in grads])
    out = rope.triton_qkv_norm_rope(qkv, wq, wk, tables, 1e-5, rms)
    got_grads = rope.triton_qkv_norm_rope_backward(*grads, qkv, wq, wk, tables, 1e-5, rms)
    assert all(t.dtype == dtype for t in (*out, got_grads[0]))
    assert got_grads[1].dtype == got_grads[2].dtype == torch.float32
    names = ["q", "k", "v", "dqkv", "dq_weight", "dk_weight"]
    for name, got, want in zip(names, [*out, *got_grads], [*ref, *ref_grads]):
        error = ((got.double() - want).norm() / want.norm()).item()
        assert error < tol, ("rmsnorm" if rms else "layernorm", dtype, name, error)
    assert torch.equal(out[2], qkv[:, :, 2]) and torch.equal(got_grads[0][:, :, 2], grads[2])
print("kernel ok")
"""


def test_triton_kernels_against_the_definition():
    """On a GPU, or else in Triton's CPU interpreter (as test_cross_entropy's kernel test)."""
    triton = pytest.importorskip("triton", reason="Triton not installed (.ci/run installs it)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        major, minor = (int(part) for part in triton.__version__.split(".")[:2])
        if (major, minor) < (3, 9):
            pytest.skip(f"Triton {triton.__version__}: its CPU interpreter needs >= 3.9")
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK, device], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kernel ok" in result.stdout


def test_more_positions_than_the_tables_are_refused_on_every_path():
    qkv, q_norm, k_norm, _ = qkv_inputs(T=5)
    short = rope_tables(12, 0.5, 4)
    message = r"^5 positions: longer than the RoPE tables \(4, model.seq_len\)$"
    with pytest.raises(ValueError, match=message):
        apply_rope(qkv[:, :, 0], short)
    with pytest.raises(ValueError, match=message):
        qkv_norm_rope(qkv, q_norm, k_norm, short)  # the fused operation
    with plain_pytorch(), pytest.raises(ValueError, match=message):
        qkv_norm_rope(qkv, q_norm, k_norm, short)
    if rope.triton is not None:  # the kernels' own launch: refused before any launch, on any device
        grads = sdpa_layout_gradients(qkv)
        with pytest.raises(ValueError, match=message):
            rope.triton_qkv_norm_rope(qkv, q_norm.weight, k_norm.weight, short, 1e-5)
        with pytest.raises(ValueError, match=message):
            rope.triton_qkv_norm_rope_backward(*grads, qkv, q_norm.weight, k_norm.weight, short, 1e-5)


def test_layernorm_backward_keeps_its_evaluation_order():
    """Runs trained before RMSNorm came keep their last bits: LayerNorm's backward is evaluated as
    it always was, (dn - mean(dn) - normed mean(dn normed)) rstd; an equal reordering changed
    every CPU demo run's weights after one step."""
    torch.manual_seed(0)
    x, dy, w = torch.randn(2, 8, 3, 16), torch.randn(2, 8, 3, 16), torch.rand(16) + 0.5
    tables = rope.rope_tables(16, 0.5, 8)
    dx, _ = rope.norm_rope_backward_reference(dy, x, w, tables, 1e-5)
    centred = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + 1e-5)
    normed = centred * rstd
    cos, sin_next, sin_prev = tables[:, :8, None]
    dz = dy * cos + (dy * sin_next).roll(1, dims=-1) + (dy * sin_prev).roll(-1, dims=-1)
    dn = dz * w
    expected = (dn - dn.mean(-1, keepdim=True) - normed * (dn * normed).mean(-1, keepdim=True)) * rstd
    assert torch.equal(dx, expected)
