"""RoPE, and QK-LayerNorm + RoPE as one operation (norm_rope) and its Triton kernels, against
the definition under autograd."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.fast_path import plain_pytorch
from trainer.rope import apply_rope, norm_rope, rope_tables

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


def qk_norm_inputs(B=2, T=5, heads=3, head_dim=12, seed=0, dtype=torch.float32):
    """k as the model sees it: a strided (B, T, heads, head_dim) view into qkv; a LayerNorm whose
    weight is not all ones; tables longer than T (the model's are cfg.seq_len long)."""
    g = torch.Generator().manual_seed(seed)
    qkv = (3 + 2 * torch.randn(B, T, 3, heads, head_dim, generator=g)).to(dtype)
    norm = nn.LayerNorm(head_dim, bias=False)
    with torch.no_grad():
        norm.weight.mul_(1 + 0.3 * torch.randn(head_dim, generator=g))
    return qkv[:, :, 1], norm, rope_tables(head_dim, 0.5, T + 3)


def test_norm_rope_values_and_gradients_match_the_definition():
    x, norm, tables = qk_norm_inputs()
    x = x.detach().requires_grad_()
    y = norm_rope(x, norm, tables)
    assert y.shape == x.shape and y.is_contiguous()
    dy = torch.randn(x.shape[0], x.shape[2], x.shape[1], x.shape[3]).transpose(1, 2)  # SDPA's layout
    dx, dw = torch.autograd.grad(y, (x, norm.weight), dy)

    xd, wd = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    ref = apply_rope(F.layer_norm(xd, xd.shape[-1:], wd, None, norm.eps), tables.double())
    ref_dx, ref_dw = torch.autograd.grad(ref, (xd, wd), dy.double())
    for got, want in [(y, ref), (dx, ref_dx), (dw, ref_dw)]:
        assert (got.double() - want).norm() / want.norm() < 1e-6


def test_norm_rope_is_the_plain_expression_where_it_cannot_fuse():
    x, norm, tables = qk_norm_inputs(head_dim=8)
    with plain_pytorch():
        plain = norm_rope(x, norm, tables)
    assert torch.allclose(norm_rope(x, norm, tables), plain, atol=1e-6)
    biased = nn.LayerNorm(8)  # with a bias: not the fused operation, the same function
    assert torch.equal(norm_rope(x, biased, tables), apply_rope(biased(x), tables))
    assert torch.equal(norm_rope(x, nn.Identity(), tables), apply_rope(x, tables))  # no QK-norm


def test_norm_rope_keeps_the_dtype_of_its_input_under_autocast():
    x, norm, tables = qk_norm_inputs(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm_rope(x, norm, tables)
    want = apply_rope(F.layer_norm(x.float(), (12,), norm.weight, None, norm.eps), tables)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want.bfloat16())  # fp32 math, one rounding


def test_compiled_norm_rope_matches_eager():
    x, norm, tables = qk_norm_inputs()

    def f(x):
        return norm_rope(x, norm, tables).square().sum()

    grads = []
    for fn in (f, torch.compile(f)):
        norm.weight.grad = None
        xi = x.detach().requires_grad_()
        fn(xi).backward()
        grads += [xi.grad, norm.weight.grad.clone()]
    assert torch.allclose(grads[0], grads[2], rtol=1e-5, atol=1e-6)
    assert torch.allclose(grads[1], grads[3], rtol=1e-5, atol=1e-5)


KERNEL_CHECK = """
import sys
import torch
import torch.nn.functional as F
from trainer import rope
device = sys.argv[1]
g = torch.Generator().manual_seed(0)
# head_dim 12 (6 pairs in a block of 8), 2 x 5 x 3 = 30 rows: neither a multiple of its block
for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
    B, T, H, D = 2, 5, 3, 12
    tables = rope.rope_tables(D, 0.5, 7).to(device)
    qkv = (3 + 2 * torch.randn(B, T, 3, H, D, generator=g)).to(device, dtype)
    x = qkv[:, :, 1]  # k: a strided view
    w = (1 + 0.3 * torch.randn(D, generator=g)).to(device)
    dy = torch.randn(B, H, T, D, generator=g).to(device, dtype).transpose(1, 2)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    ref = rope.apply_rope(F.layer_norm(xd, (D,), wd, None, 1e-5), tables.double())
    ref_dx, ref_dw = torch.autograd.grad(ref, (xd, wd), dy.double())
    y = rope.triton_norm_rope(x, w, tables, 1e-5)
    dx, dw = rope.triton_norm_rope_backward(dy, x, w, tables, 1e-5)
    assert y.dtype == dx.dtype == dtype and dw.dtype == torch.float32
    for name, got, want in [("y", y, ref), ("dx", dx, ref_dx), ("dw", dw, ref_dw)]:
        error = ((got.double() - want).norm() / want.norm()).item()
        assert error < tol, (dtype, name, error)
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
