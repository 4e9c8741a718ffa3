"""Rotary position embedding (RoPE) of queries and keys, and the QK-norm before it.

    tables = rope_tables(head_dim, rope_fraction, seq_len, base)
    q = apply_rope(q, tables)                                # q: (B, T, heads, head_dim)
    q, k, v = qkv_norm_rope(qkv, q_norm, k_norm, tables)     # qkv: (B, T, 3, heads, head_dim)

RoPE turns each pair of dims (2i, 2i+1) of the first d_rot by an angle that grows with the
position; the rest pass through. The norm before it is a LayerNorm with a weight and no bias
(the paper's), an RMSNorm with a weight (Llama's), or none (nn.Identity).
`qkv_norm_rope` is the attention's whole input step as one operation: q and k through their
norm and RoPE, v as it is, each out as a contiguous (B, T, heads, head_dim) tensor. On CUDA it
is one Triton kernel each way that reads a row of head_dim numbers once; the backward writes
the gradient of qkv in one pass (q and k through the turn back and the norm's backward, v's
gradient copied), so nothing assembles it from three pieces afterwards. Elsewhere the same
function in PyTorch. Tests pin both to the plain expression under autograd.

The kernels cover LayerNorm and RMSNorm (one constexpr switch: RMSNorm skips the centring).
Anything else (no QK-norm, a bias, norms of two kinds or eps, an odd head_dim) is the plain
expression on every device: `fusion_blocker` says why, and bench prints it
(trainer.model.fast_path_coverage).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.ops.fast_path import is_plain, tl, triton, use_triton

# (rows per block, warps) of the forward kernel, and (rows per block, warps, blocks per program)
# of the backward one, whose programs each sum their weight's gradient over their blocks. A row
# is one head of q, k or v at one position. Swept at the 221M shape (B 32) on an H200: forward
# 0.218 ms (3.0 TB/s; 0.22-0.25 ms over rows 2-16 x warps 1-4), backward 0.42 ms in a step.
FORWARD_ROWS, FORWARD_WARPS = 8, 2
BACKWARD_ROWS, BACKWARD_WARPS, BACKWARD_BLOCKS = 8, 1, 16


def rope_tables(head_dim: int, rope_fraction: float, seq_len: int, base: float = 10000.0) -> torch.Tensor:
    """(3, seq_len, head_dim): cos, sin_next, sin_prev for apply_rope.

    Pair i, dims (2i, 2i+1) of the first d_rot, turns at base^(-2i/d_rot) rad per position:
    y[2i] = x[2i] cos - x[2i+1] sin and y[2i+1] = x[2i+1] cos + x[2i] sin. So sin_next (the
    factor of x[j+1]) holds -sin at even j, sin_prev (of x[j-1]) +sin at odd j; past d_rot cos is
    1 and both sins 0, and those dims pass through.
    """
    d_rot = int(head_dim * rope_fraction)
    inv_freq = float(base) ** (-torch.arange(0, d_rot, 2, dtype=torch.float64) / d_rot)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    tables = torch.zeros(3, seq_len, head_dim, dtype=torch.float64)
    tables[0] = 1.0
    tables[0, :, 0:d_rot:2] = tables[0, :, 1:d_rot:2] = angles.cos()
    tables[1, :, 0:d_rot:2] = -angles.sin()
    tables[2, :, 1:d_rot:2] = angles.sin()
    return tables.float()


def check_positions(positions: int, tables: torch.Tensor) -> None:
    """Refuse more positions than the tables have: slicing would silently shorten them, and the
    kernels would read past their end. A check on shapes only (no device sync)."""
    if positions > tables.shape[1]:
        raise ValueError(
            f"{positions} positions: longer than the RoPE tables ({tables.shape[1]}, model.seq_len)"
        )


def apply_rope(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, head_dim). One elementwise expression (no slicing, stacking or
    concatenation of the pairs, which costs extra passes over q and k on the GPU)."""
    check_positions(x.shape[-3], tables)
    cos, sin_next, sin_prev = tables[:, : x.shape[-3], None]
    x32 = x.float()
    return (x32 * cos + x32.roll(-1, dims=-1) * sin_next + x32.roll(1, dims=-1) * sin_prev).type_as(x)


def norm_rope_reference(
    x: torch.Tensor, weight: torch.Tensor, tables: torch.Tensor, eps: float, rms: bool = False
):
    """apply_rope(LayerNorm(x)), or of RMSNorm(x) with rms, in fp32 (or fp64), rounded to x's
    dtype once at the end."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    norm = F.rms_norm if rms else F.layer_norm
    y = apply_rope(norm(x32, x.shape[-1:], weight.to(x32.dtype), eps=eps), tables)
    return y.to(x.dtype)


def norm_rope_backward_reference(dy, x, weight, tables, eps: float, rms: bool = False):
    """(dx, dweight) of norm_rope_reference by the formulas the kernel uses, in fp32 (or fp64).
    RMSNorm is LayerNorm without the centring: the same formulas less the mean terms."""
    wide = torch.promote_types(x.dtype, torch.float32)
    centred = x.to(wide) if rms else x.to(wide) - x.to(wide).mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
    normed = centred * rstd
    # The turn back: the transpose of y[j] = x[j] cos[j] + x[j+1] sin_next[j] + x[j-1] sin_prev[j].
    cos, sin_next, sin_prev = tables[:, : x.shape[-3], None].to(wide)
    dy = dy.to(wide)
    dz = dy * cos + (dy * sin_next).roll(1, dims=-1) + (dy * sin_prev).roll(-1, dims=-1)
    dweight = (dz * normed).reshape(-1, x.shape[-1]).sum(0)
    dn = dz * weight.to(wide)
    projection = normed * (dn * normed).mean(-1, keepdim=True)
    # LayerNorm's in the order it has always been evaluated (a reordering changes the last bits)
    dx = dn - projection if rms else dn - dn.mean(-1, keepdim=True) - projection
    return (dx * rstd).to(x.dtype), dweight.to(weight.dtype)


def _norm_kind(norm: nn.Module) -> str | None:
    """'layernorm' or 'rmsnorm' where the fused operation computes the norm: a weight over the
    last dim, no bias, an explicit eps; else None."""
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is None:
        return "layernorm" if len(norm.normalized_shape) == 1 else None
    if isinstance(norm, nn.RMSNorm) and norm.weight is not None and norm.eps is not None:
        return "rmsnorm" if len(norm.normalized_shape) == 1 else None
    return None


def fusion_blocker(q_norm: nn.Module, k_norm: nn.Module, head_dim: int) -> str | None:
    """Why qkv_norm_rope of these norms is the plain expression even where the kernels run
    (CUDA, Triton, not plain_pytorch()); None where it is the fused operation. The one rule
    qkv_norm_rope dispatches on."""
    if isinstance(q_norm, nn.Identity) and isinstance(k_norm, nn.Identity):
        return "no QK-norm (model.qk_norm false): no kernel for RoPE alone; apply_rope in PyTorch"
    kinds = _norm_kind(q_norm), _norm_kind(k_norm)
    if None in kinds:
        return (
            f"QK-norm {type(q_norm).__name__}/{type(k_norm).__name__}: the fused kernel takes "
            "LayerNorm without bias or RMSNorm, each with a weight and an explicit eps"
        )
    if kinds[0] != kinds[1] or q_norm.eps != k_norm.eps:
        return "q and k norms differ in kind or eps: the fused kernel takes one of each"
    if head_dim % 2:
        return f"head_dim {head_dim} is odd: the fused kernel turns pairs of a row in registers"
    return None


def qkv_norm_rope(qkv: torch.Tensor, q_norm: nn.Module, k_norm: nn.Module, tables: torch.Tensor):
    """(apply_rope(q_norm(q)), apply_rope(k_norm(k)), v) of qkv (B, T, 3, heads, head_dim), each
    (B, T, heads, head_dim) in qkv's dtype. LayerNorms (no bias) or RMSNorms with a weight and one
    eps over an even head_dim make it one operation (computed in fp32); otherwise
    (fusion_blocker) it is that expression."""
    if is_plain() or fusion_blocker(q_norm, k_norm, qkv.shape[-1]) is not None:
        q, k, v = qkv.unbind(2)
        return apply_rope(q_norm(q), tables), apply_rope(k_norm(k), tables), v
    rms = isinstance(q_norm, nn.RMSNorm)
    return _qkv_norm_rope_op(qkv, q_norm.weight, k_norm.weight, tables, q_norm.eps, rms)


def qkv_norm_rope_reference(qkv, q_weight, k_weight, tables, eps: float, rms: bool = False):
    q, k, v = qkv.unbind(2)
    return (
        norm_rope_reference(q, q_weight, tables, eps, rms),
        norm_rope_reference(k, k_weight, tables, eps, rms),
        v.clone(memory_format=torch.contiguous_format),  # a new tensor even where v is contiguous
    )


def qkv_norm_rope_backward_reference(
    dq, dk, dv, qkv, q_weight, k_weight, tables, eps: float, rms: bool = False
):
    """(dqkv, dq_weight, dk_weight) of qkv_norm_rope_reference, by the kernel's formulas."""
    q, k, _ = qkv.unbind(2)
    dxq, dwq = norm_rope_backward_reference(dq, q, q_weight, tables, eps, rms)
    dxk, dwk = norm_rope_backward_reference(dk, k, k_weight, tables, eps, rms)
    return torch.stack([dxq, dxk, dv.to(dxq.dtype)], dim=2), dwq, dwk


if triton is not None:

    @triton.jit
    def _block_of(part, block, n_rows, n_heads, D: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr):
        """A block of rows of one part of qkv (0 q, 1 k, 2 v). Rows count (position, head); a
        position holds 3 x heads rows of qkv, q's first. Returns the rows' positions, the
        elements' offsets in qkv and in the part's own (B, T, heads, head_dim) tensor, and their
        mask."""
        rows = block * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, COLS)
        position = rows // n_heads
        in_qkv = ((position * 3 + part) * n_heads + rows % n_heads).to(tl.int64) * D
        mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
        return (
            cols,
            position,
            in_qkv[:, None] + cols[None, :],
            rows.to(tl.int64)[:, None] * D + cols[None, :],
            mask,
        )

    @triton.jit
    def _normalized(x, mask, eps, D: tl.constexpr, RMS: tl.constexpr):
        """LayerNorm (RMSNorm with RMS: no centring) without its weight of rows x (fp32, masked
        elements 0), and 1/std (1/rms) per row."""
        if RMS:
            centred = x
        else:
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
    def _qkv_norm_rope_forward_kernel(
        qkv, q_weight, k_weight, tables, q, k, v, n_rows, seq_len, n_heads, table_len, eps,
        D: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr, RMS: tl.constexpr,
    ):  # fmt: skip
        part = tl.program_id(1)
        cols, position, at_qkv, at_part, mask = _block_of(
            part, tl.program_id(0), n_rows, n_heads, D, COLS, ROWS
        )
        x = tl.load(qkv + at_qkv, mask=mask, other=0.0)
        if part == 2:
            tl.store(v + at_part, x, mask=mask)
        else:
            normed, _ = _normalized(x.to(tl.float32), mask, eps, D, RMS)
            w = tl.load(tl.where(part == 0, q_weight, k_weight) + cols, mask=cols < D, other=0.0)
            z = normed * w[None, :]
            cos, sin = _turn(tables, position % seq_len, cols, mask, table_len, D)
            out = (z * cos + _swap_pairs(z, ROWS, COLS) * sin).to(q.dtype.element_ty)
            tl.store(tl.where(part == 0, q, k) + at_part, out, mask=mask)

    @triton.jit
    def _qkv_norm_rope_backward_kernel(
        qkv, q_weight, k_weight, tables, dq, dk, dv, dqkv, dw_partial, n_rows, seq_len, n_heads, table_len, eps,
        D: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr, BLOCKS: tl.constexpr, RMS: tl.constexpr,
    ):  # fmt: skip
        program, part = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, COLS)
        w = tl.load(tl.where(part == 0, q_weight, k_weight) + cols, mask=cols < D, other=0.0)[None, :]
        dw = tl.zeros([COLS], dtype=tl.float32)
        for i in range(BLOCKS):
            cols, position, at_qkv, at_part, mask = _block_of(
                part, program * BLOCKS + i, n_rows, n_heads, D, COLS, ROWS
            )
            if part == 2:  # v's gradient as it is
                tl.store(dqkv + at_qkv, tl.load(dv + at_part, mask=mask), mask=mask)
            else:
                g = tl.load(tl.where(part == 0, dq, dk) + at_part, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(qkv + at_qkv, mask=mask, other=0.0).to(tl.float32)
                normed, rstd = _normalized(x, mask, eps, D, RMS)
                cos, sin = _turn(tables, position % seq_len, cols, mask, table_len, D)
                dz = g * cos + _swap_pairs(g * sin, ROWS, COLS)  # the turn back (its transpose)
                dw += tl.sum(dz * normed, axis=0)
                dn = dz * w
                mean_dn_n = tl.sum(dn * normed, axis=1) / D
                if RMS:
                    dx = (dn - normed * mean_dn_n[:, None]) * rstd[:, None]
                else:  # LayerNorm's, in the order it has always been evaluated (the same last bits)
                    mean_dn = tl.sum(dn, axis=1) / D
                    dx = (dn - mean_dn[:, None] - normed * mean_dn_n[:, None]) * rstd[:, None]
                tl.store(dqkv + at_qkv, dx.to(dqkv.dtype.element_ty), mask=mask)
        if part < 2:
            tl.store(dw_partial + (part * tl.num_programs(0) + program) * D + cols, dw, mask=cols < D)


def _launch_shape(qkv: torch.Tensor, tables: torch.Tensor, rows: int, warps: int) -> dict:
    B, T, three, heads, head_dim = qkv.shape
    assert three == 3 and tables.is_contiguous() and tables.shape[0] == 3 and tables.shape[2] == head_dim
    check_positions(T, tables)  # every launch: the kernels read table rows 0..T-1, unbounded
    return dict(
        n_rows=B * T * heads, seq_len=T, n_heads=heads, table_len=tables.shape[1],
        D=head_dim, COLS=triton.next_power_of_2(head_dim), ROWS=rows, num_warps=warps,
    )  # fmt: skip


def triton_qkv_norm_rope(qkv, q_weight, k_weight, tables, eps: float, rms: bool = False):
    """The forward kernel (any device Triton runs on): q, k, v, each (B, T, heads, head_dim).
    One launch; a program takes rows of one part. rms: RMSNorm instead of LayerNorm."""
    qkv = qkv.contiguous()
    B, T, _, heads, head_dim = qkv.shape
    q, k, v = (qkv.new_empty(B, T, heads, head_dim) for _ in range(3))
    shape = _launch_shape(qkv, tables, FORWARD_ROWS, FORWARD_WARPS)
    grid = (triton.cdiv(shape["n_rows"], FORWARD_ROWS), 3)
    _qkv_norm_rope_forward_kernel[grid](qkv, q_weight, k_weight, tables, q, k, v, eps=eps, RMS=rms, **shape)
    return q, k, v


def triton_qkv_norm_rope_backward(dq, dk, dv, qkv, q_weight, k_weight, tables, eps: float, rms: bool = False):
    """The backward kernel: (dqkv, dq_weight, dk_weight), dq, dk and dv (B, T, heads, head_dim)
    contiguous. Each program sums its share of its weight's gradient; the shares are added here."""
    qkv, dq, dk, dv = (t.contiguous() for t in (qkv, dq, dk, dv))
    dqkv = torch.empty_like(qkv)
    shape = _launch_shape(qkv, tables, BACKWARD_ROWS, BACKWARD_WARPS)
    programs = triton.cdiv(shape["n_rows"], BACKWARD_ROWS * BACKWARD_BLOCKS)
    dw_partial = torch.empty(2, programs, qkv.shape[-1], dtype=torch.float32, device=qkv.device)
    _qkv_norm_rope_backward_kernel[(programs, 3)](
        qkv,
        q_weight,
        k_weight,
        tables,
        dq,
        dk,
        dv,
        dqkv,
        dw_partial,
        eps=eps,
        BLOCKS=BACKWARD_BLOCKS,
        RMS=rms,
        **shape,
    )
    return dqkv, dw_partial[0].sum(0).to(q_weight.dtype), dw_partial[1].sum(0).to(k_weight.dtype)


@torch.library.custom_op("trainer::qkv_norm_rope", mutates_args=())
def _qkv_norm_rope_op(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    tables: torch.Tensor,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if qkv.numel() and use_triton(qkv):
        return triton_qkv_norm_rope(qkv, q_weight, k_weight, tables, eps, rms)
    return qkv_norm_rope_reference(qkv, q_weight, k_weight, tables, eps, rms)


@_qkv_norm_rope_op.register_fake
def _(qkv, q_weight, k_weight, tables, eps, rms):
    B, T, _, heads, head_dim = qkv.shape
    return tuple(qkv.new_empty(B, T, heads, head_dim) for _ in range(3))


@torch.library.custom_op("trainer::qkv_norm_rope_backward", mutates_args=())
def _qkv_norm_rope_backward_op(
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor,
    q_weight: torch.Tensor, k_weight: torch.Tensor, tables: torch.Tensor, eps: float, rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    if qkv.numel() and use_triton(qkv):
        return triton_qkv_norm_rope_backward(dq, dk, dv, qkv, q_weight, k_weight, tables, eps, rms)
    return qkv_norm_rope_backward_reference(dq, dk, dv, qkv, q_weight, k_weight, tables, eps, rms)


@_qkv_norm_rope_backward_op.register_fake
def _(dq, dk, dv, qkv, q_weight, k_weight, tables, eps, rms):
    return torch.empty_like(qkv), torch.empty_like(q_weight), torch.empty_like(k_weight)


def _setup_context(ctx, inputs, output):
    qkv, q_weight, k_weight, tables, eps, rms = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight, tables)
    ctx.eps, ctx.rms = eps, rms


def _backward(ctx, dq, dk, dv):
    qkv, q_weight, k_weight, tables = ctx.saved_tensors
    dqkv, dwq, dwk = _qkv_norm_rope_backward_op(dq, dk, dv, qkv, q_weight, k_weight, tables, ctx.eps, ctx.rms)
    return dqkv, dwq, dwk, None, None, None


_qkv_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)
