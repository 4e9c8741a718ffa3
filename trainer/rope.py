"""Rotary position embedding (RoPE) of queries and keys, and the QK-LayerNorm before it.

    tables = rope_tables(head_dim, rope_fraction, seq_len)
    q = apply_rope(q, tables)                  # q: (B, T, heads, head_dim)
    q = norm_rope(q, q_norm, tables)           # = apply_rope(q_norm(q), tables), one operation

RoPE turns each pair of dims (2i, 2i+1) of the first d_rot by an angle that grows with the
position; the rest pass through. The norm before it is a LayerNorm with a weight and no bias.
Compiled, norm and RoPE of q and k took ~1.3 ms of a 221M layer's forward and backward (B 32):
Inductor reduces the weight's gradient in kernels of their own and reads the pair partners
through shifted loads. `norm_rope` is one operation: on CUDA one Triton kernel each way that
reads a row of head_dim numbers once (normalise, weight, turn; backward: turn back, LayerNorm's
backward, the weight's gradient summed per program), ~0.5 ms for q and k; elsewhere the same
function in PyTorch. Tests pin both to apply_rope(F.layer_norm(x)) under autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.fast_path import is_plain, tl, triton, use_triton

# (rows per block, warps) of the forward kernel, and (rows per block, warps, blocks per program)
# of the backward one, whose programs each sum the weight's gradient over their blocks. A row is
# one head at one position. Measured at the 221M shape (B 32, k a view into qkv) on an H200:
# 0.094 ms forward, 0.165 ms backward; the backward took 0.27-0.72 ms with more warps per program.
FORWARD_ROWS, FORWARD_WARPS = 8, 2
BACKWARD_ROWS, BACKWARD_WARPS, BACKWARD_BLOCKS = 4, 1, 16


def rope_tables(head_dim: int, rope_fraction: float, seq_len: int) -> torch.Tensor:
    """(3, seq_len, head_dim): cos, sin_next, sin_prev for apply_rope.

    Pair i, dims (2i, 2i+1) of the first d_rot, turns at 10000^(-2i/d_rot) rad per position:
    y[2i] = x[2i] cos - x[2i+1] sin and y[2i+1] = x[2i+1] cos + x[2i] sin. So sin_next (the
    factor of x[j+1]) holds -sin at even j, sin_prev (of x[j-1]) +sin at odd j; past d_rot cos is
    1 and both sins 0, and those dims pass through.
    """
    d_rot = int(head_dim * rope_fraction)
    inv_freq = 10000.0 ** (-torch.arange(0, d_rot, 2, dtype=torch.float64) / d_rot)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    tables = torch.zeros(3, seq_len, head_dim, dtype=torch.float64)
    tables[0] = 1.0
    tables[0, :, 0:d_rot:2] = tables[0, :, 1:d_rot:2] = angles.cos()
    tables[1, :, 0:d_rot:2] = -angles.sin()
    tables[2, :, 1:d_rot:2] = angles.sin()
    return tables.float()


def apply_rope(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, head_dim). One elementwise expression (no slicing, stacking or
    concatenation of the pairs, which costs extra passes over q and k on the GPU)."""
    cos, sin_next, sin_prev = tables[:, : x.shape[-3], None]
    x32 = x.float()
    return (x32 * cos + x32.roll(-1, dims=-1) * sin_next + x32.roll(1, dims=-1) * sin_prev).type_as(x)


def norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, tables: torch.Tensor, eps: float):
    """The definition in fp32 (or fp64) PyTorch, rounded to x's dtype once at the end."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    y = apply_rope(F.layer_norm(x32, x.shape[-1:], weight.to(x32.dtype), None, eps), tables)
    return y.to(x.dtype)


def norm_rope_backward_reference(dy, x, weight, tables, eps: float):
    """(dx, dweight) of norm_rope_reference by the formulas the kernel uses, in fp32 (or fp64)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    centred = x.to(wide) - x.to(wide).mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    normed = centred * rstd
    # The turn back: the transpose of y[j] = x[j] cos[j] + x[j+1] sin_next[j] + x[j-1] sin_prev[j].
    cos, sin_next, sin_prev = tables[:, : x.shape[-3], None].to(wide)
    dy = dy.to(wide)
    dz = dy * cos + (dy * sin_next).roll(1, dims=-1) + (dy * sin_prev).roll(-1, dims=-1)
    dweight = (dz * normed).reshape(-1, x.shape[-1]).sum(0)
    dn = dz * weight.to(wide)
    dx = (dn - dn.mean(-1, keepdim=True) - normed * (dn * normed).mean(-1, keepdim=True)) * rstd
    return dx.to(x.dtype).contiguous(), dweight.to(weight.dtype)


def norm_rope(x: torch.Tensor, norm: nn.Module, tables: torch.Tensor) -> torch.Tensor:
    """apply_rope(norm(x), tables), x: (B, T, heads, head_dim). A LayerNorm with a weight and no
    bias over an even head_dim makes it one operation (the dtype of x out, computed in fp32)."""
    fusable = isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is None
    if is_plain() or not fusable or x.shape[-1] % 2:
        return apply_rope(norm(x), tables)
    return _norm_rope_op(x, norm.weight, tables, norm.eps)


if triton is not None:

    @triton.jit
    def _row_starts(rows, seq_len, n_heads, stride_b, stride_t, stride_h):
        """Offset of each row's first element; rows count (b, t, head) in that order."""
        bt = rows // n_heads
        return (bt // seq_len) * stride_b + (bt % seq_len) * stride_t + (rows % n_heads) * stride_h

    @triton.jit
    def _load_rows(ptr, starts, cols, mask):
        return tl.load(ptr + starts[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _normalized(x, starts, cols, mask, eps, D: tl.constexpr):
        """LayerNorm without its weight (fp32, masked elements 0), and 1/std per row."""
        x = _load_rows(x, starts, cols, mask)
        centred = tl.where(mask, x - (tl.sum(x, axis=1) / D)[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / D + eps)
        return centred * rstd[:, None], rstd

    @triton.jit
    def _turn(tables, positions, cols, mask, table_len, D: tl.constexpr):
        """cos and signed sin of each element: rope(z) = z cos + swap_pairs(z) sin, where sin is
        sin_next + sin_prev of the tables (-sin at even, +sin at odd dims)."""
        at = tables + positions[:, None] * D + cols[None, :]
        cos = tl.load(at, mask=mask, other=1.0)
        sin = tl.load(at + table_len * D, mask=mask, other=0.0)
        return cos, sin + tl.load(at + 2 * table_len * D, mask=mask, other=0.0)

    @triton.jit
    def _swap_pairs(z, ROWS: tl.constexpr, COLS: tl.constexpr):
        """z[2i] <-> z[2i+1] in every row, in registers."""
        even, odd = tl.split(tl.reshape(z, [ROWS, COLS // 2, 2]))
        return tl.reshape(tl.join(odd, even), [ROWS, COLS])

    @triton.jit
    def _norm_rope_forward_kernel(
        x, weight, tables, y, n_rows, seq_len, n_heads, stride_b, stride_t, stride_h, table_len, eps,
        D: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, COLS)
        mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
        normed, _ = _normalized(
            x, _row_starts(rows, seq_len, n_heads, stride_b, stride_t, stride_h), cols, mask, eps, D
        )
        z = normed * tl.load(weight + cols, mask=cols < D, other=0.0)[None, :]
        cos, sin = _turn(tables, rows // n_heads % seq_len, cols, mask, table_len, D)
        out = z * cos + _swap_pairs(z, ROWS, COLS) * sin
        tl.store(y + rows[:, None] * D + cols[None, :], out.to(y.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rope_backward_kernel(
        x, weight, tables, dy, dx, dw_partial, n_rows, seq_len, n_heads,
        stride_b, stride_t, stride_h, dy_stride_b, dy_stride_t, dy_stride_h, table_len, eps,
        D: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr,
    ):  # fmt: skip
        program = tl.program_id(0)
        cols = tl.arange(0, COLS)
        w = tl.load(weight + cols, mask=cols < D, other=0.0)[None, :]
        dw = tl.zeros([COLS], dtype=tl.float32)
        for i in range(BLOCKS):
            rows = (program * BLOCKS + i).to(tl.int64) * ROWS + tl.arange(0, ROWS)
            mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
            starts = _row_starts(rows, seq_len, n_heads, stride_b, stride_t, stride_h)
            normed, rstd = _normalized(x, starts, cols, mask, eps, D)
            cos, sin = _turn(tables, rows // n_heads % seq_len, cols, mask, table_len, D)
            g = _load_rows(
                dy, _row_starts(rows, seq_len, n_heads, dy_stride_b, dy_stride_t, dy_stride_h), cols, mask
            )
            dz = g * cos + _swap_pairs(g * sin, ROWS, COLS)  # the turn back (its transpose)
            dw += tl.sum(dz * normed, axis=0)
            dn = dz * w
            mean_dn = tl.sum(dn, axis=1) / D
            mean_dn_n = tl.sum(dn * normed, axis=1) / D
            out = (dn - mean_dn[:, None] - normed * mean_dn_n[:, None]) * rstd[:, None]
            tl.store(dx + rows[:, None] * D + cols[None, :], out.to(dx.dtype.element_ty), mask=mask)
        tl.store(dw_partial + program * D + cols, dw, mask=cols < D)


def _launch_shape(x: torch.Tensor, tables: torch.Tensor, rows: int, warps: int) -> dict:
    B, T, heads, head_dim = x.shape
    assert tables.is_contiguous() and tables.shape[0] == 3 and tables.shape[2] == head_dim
    return dict(
        n_rows=B * T * heads, seq_len=T, n_heads=heads, table_len=tables.shape[1],
        D=head_dim, COLS=triton.next_power_of_2(head_dim), ROWS=rows, num_warps=warps,
    )  # fmt: skip


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_norm_rope(x: torch.Tensor, weight: torch.Tensor, tables: torch.Tensor, eps: float):
    """The forward kernel (any device Triton runs on): y (B, T, heads, head_dim), contiguous."""
    x = _last_dim_contiguous(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    shape = _launch_shape(x, tables, FORWARD_ROWS, FORWARD_WARPS)
    grid = (triton.cdiv(shape["n_rows"], FORWARD_ROWS),)
    strides = dict(zip(("stride_b", "stride_t", "stride_h"), x.stride()))
    _norm_rope_forward_kernel[grid](x, weight, tables, y, eps=eps, **strides, **shape)
    return y


def triton_norm_rope_backward(dy, x, weight, tables, eps: float):
    """The backward kernel: (dx, dweight). Each program sums its share of the weight's gradient;
    the shares are added up here."""
    x, dy = _last_dim_contiguous(x), _last_dim_contiguous(dy)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    shape = _launch_shape(x, tables, BACKWARD_ROWS, BACKWARD_WARPS)
    programs = triton.cdiv(shape["n_rows"], BACKWARD_ROWS * BACKWARD_BLOCKS)
    dw_partial = torch.empty(programs, x.shape[-1], dtype=torch.float32, device=x.device)
    strides = dict(zip(("stride_b", "stride_t", "stride_h"), x.stride()))
    strides.update(zip(("dy_stride_b", "dy_stride_t", "dy_stride_h"), dy.stride()))
    _norm_rope_backward_kernel[(programs,)](
        x, weight, tables, dy, dx, dw_partial, eps=eps, BLOCKS=BACKWARD_BLOCKS, **strides, **shape
    )
    return dx, dw_partial.sum(0).to(weight.dtype)


@torch.library.custom_op("trainer::norm_rope", mutates_args=())
def _norm_rope_op(x: torch.Tensor, weight: torch.Tensor, tables: torch.Tensor, eps: float) -> torch.Tensor:
    if x.numel() and use_triton(x):
        return triton_norm_rope(x, weight, tables, eps)
    return norm_rope_reference(x, weight, tables, eps).contiguous()


@_norm_rope_op.register_fake
def _(x, weight, tables, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("trainer::norm_rope_backward", mutates_args=())
def _norm_rope_backward_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, tables: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.numel() and use_triton(x):
        return triton_norm_rope_backward(dy, x, weight, tables, eps)
    return norm_rope_backward_reference(dy, x, weight, tables, eps)


@_norm_rope_backward_op.register_fake
def _(dy, x, weight, tables, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, tables, eps = inputs
    ctx.save_for_backward(x, weight, tables)
    ctx.eps = eps


def _backward(ctx, dy):
    x, weight, tables = ctx.saved_tensors
    dx, dweight = _norm_rope_backward_op(dy, x, weight, tables, ctx.eps)
    return dx, dweight, None, None


_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)
