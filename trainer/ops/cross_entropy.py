"""The output layer and its loss inputs: logsumexp and target logit of each position's logits.

    lse, target = output_lse_and_target(h, E, targets, cap)      # logits = h E^T
    cross-entropy = mean(lse - target);  z-loss = lambda * mean(lse^2)

Every method's loss is built from these two per-row numbers. With `cap` the logits are first
soft-capped, x = cap * tanh(raw / cap). The gradient with respect to the raw logits is

    d raw_j = (g_lse * p_j + g_target * [j == t]) * s_j,   p = softmax(x),  s_j = dx_j / draw_j
            = g_lse * q_j + (g_lse + g_target) * s_t * [j == t],   q_j = (p_j - [j == t]) * s_j

and q does not depend on the incoming gradients (g_lse, g_target). So the forward pass turns the
(tokens x 50304) logits into q in place, in one kernel, and the backward pass needs no pass over
them of its own: d h = g_lse * (q E) + (g_lse + g_target) s_t E_t and d E = q^T (g_lse * h) + the
same target term. (The second term vanishes for plain cross-entropy, g_target = -g_lse, so for
every method but z-loss q alone carries the gradient, the target's p_t - 1 computed in fp32.)
On CUDA a Triton kernel reads each row of logits twice (logsumexp, then q; the second read
starts from the row's end, which is likelier to still be in the L2 cache) and writes q over it;
elsewhere the op is plain PyTorch. Tests pin both to F.cross_entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.ops.fast_path import is_plain, tl, triton, use_triton

# Logits per block and warps per row (python -m trainer.tools.bench_loss --sweep): 2.18 ms for 32768 x
# 50304 bf16 logits on an H200. Walking over rows with fewer programs (so that the rows in flight
# fit the L2 cache), software pipelining and a whole row in registers were all slower.
BLOCK, WARPS = 4096, 8


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def lse_and_target_reference(raw: torch.Tensor, targets: torch.Tensor, cap: float | None):
    """The definition, in fp32 (or fp64) PyTorch: (logsumexp_j x_j, x_target) per row."""
    x = softcap(_at_least_fp32(raw), cap)
    return torch.logsumexp(x, dim=-1), x.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def softmax_grad_reference(raw: torch.Tensor, targets: torch.Tensor, cap: float | None):
    """(lse, target logit, q) of raw logits (rows x vocab), q = (softmax - onehot) * dx/draw."""
    x = softcap(_at_least_fp32(raw), cap)
    lse = torch.logsumexp(x, dim=-1)
    q = torch.exp(x - lse.unsqueeze(-1))
    q.scatter_add_(-1, targets.unsqueeze(-1), -torch.ones_like(lse).unsqueeze(-1))
    if cap is not None:
        q = q * (1 - (x / cap).square())
    return lse, x.gather(-1, targets.unsqueeze(-1)).squeeze(-1), q.to(raw.dtype)


if triton is not None:

    @triton.jit
    def _capped(raw, cap, HAS_CAP: tl.constexpr, FAST_TANH: tl.constexpr):
        if HAS_CAP:
            y = raw * (1.0 / cap)  # a multiply per logit, not a division
            if FAST_TANH:  # one special-function op (max relative error 2^-11, below bf16's 2^-8)
                t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [y], tl.float32, True, 1)
            else:  # exact limits +-1 for large |y|; the CPU interpreter has no inline assembly
                t = 1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0)
            raw = cap * t
        return raw

    @triton.jit
    def _q(x, lse, cols, target, cap, HAS_CAP: tl.constexpr):
        """q = (softmax - onehot) * dx/draw of capped logits x."""
        q = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        if HAS_CAP:
            t = x * (1.0 / cap)
            q = q * (1.0 - t * t)
        return q

    @triton.jit
    def _softmax_grad_kernel(
        logits, targets, lse_out, target_out, n_cols, row_stride, cap,
        HAS_CAP: tl.constexpr, FAST_TANH: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        start = logits + row * row_stride
        target = tl.load(targets + row)
        target_x = _capped(tl.load(start + target).to(tl.float32), cap, HAS_CAP, FAST_TANH)
        # Online logsumexp: running max m and sum s of exp(x - m), one exp per logit.
        m = -1e30
        s = 0.0
        for offset in range(0, n_cols, BLOCK):
            cols = offset + tl.arange(0, BLOCK)
            inside = cols < n_cols
            x = tl.load(start + cols, mask=inside, other=0.0, eviction_policy="evict_last")
            x = tl.where(inside, _capped(x.to(tl.float32), cap, HAS_CAP, FAST_TANH), float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        # Second read of the row, q written over it; last block first, the likeliest to still be
        # in the L2 cache (2.33 instead of 2.63 ms).
        n_blocks = tl.cdiv(n_cols, BLOCK)
        for i in range(0, n_blocks):
            cols = (n_blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
            inside = cols < n_cols
            x = tl.load(start + cols, mask=inside, other=0.0, eviction_policy="evict_first")
            q = _q(_capped(x.to(tl.float32), cap, HAS_CAP, FAST_TANH), lse, cols, target, cap, HAS_CAP)
            tl.store(start + cols, q.to(logits.dtype.element_ty), mask=inside)
        tl.store(lse_out + row, lse)
        tl.store(target_out + row, target_x)


def triton_softmax_grad(logits: torch.Tensor, targets: torch.Tensor, cap: float | None):
    """The kernel (any device Triton runs on, its CPU interpreter included): returns (lse, target
    logit) and overwrites `logits` (rows x vocab, rows contiguous) with q."""
    assert logits.dim() == 2 and logits.stride(-1) == 1, "logits: (rows, vocab) with contiguous rows"
    rows = logits.shape[0]
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    target = torch.empty_like(lse)
    _softmax_grad_kernel[(rows,)](
        logits, targets, lse, target, logits.shape[1], logits.stride(0), cap or 0.0,
        HAS_CAP=cap is not None, FAST_TANH=logits.is_cuda, BLOCK=BLOCK, num_warps=WARPS,
    )  # fmt: skip
    return lse, target


@torch.library.custom_op("trainer::output_lse_and_target", mutates_args=())
def _output_op(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (rows x H), weight (V x H), targets (rows,) -> lse, target logit, q (rows x V).
    cap <= 0 means no cap (a custom op takes no Optional float in every torch version)."""
    cap_or_none = cap if cap > 0 else None
    logits = h @ weight.t()
    if not use_triton(logits):
        return softmax_grad_reference(logits, targets, cap_or_none)
    lse, target = triton_softmax_grad(logits, targets, cap_or_none)
    return lse, target, logits


@_output_op.register_fake
def _(h, weight, targets, cap):
    lse = h.new_empty(targets.shape, dtype=torch.float32)
    return lse, torch.empty_like(lse), h.new_empty(h.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    h, weight, targets, cap = inputs
    lse, target, q = output
    ctx.save_for_backward(h, weight, targets, target, q)
    ctx.mark_non_differentiable(q)
    ctx.cap = cap


def _backward(ctx, grad_lse, grad_target, _grad_q):
    h, weight, targets, target, q = ctx.saved_tensors
    grad_lse = torch.zeros_like(target) if grad_lse is None else grad_lse
    grad_target = torch.zeros_like(target) if grad_target is None else grad_target
    slope = 1 - (target / ctx.cap).square() if ctx.cap > 0 else 1.0  # dx/draw at the target
    at_target = ((grad_lse + grad_target) * slope).unsqueeze(-1)  # zero for plain cross-entropy
    g = grad_lse.unsqueeze(-1)
    grad_h = (q @ weight).float() * g + at_target * weight[targets].float()
    grad_weight = (q.t() @ (h.float() * g).to(q.dtype)).float()
    grad_weight = grad_weight.index_add(0, targets, at_target * h.float())
    return grad_h.to(h.dtype), grad_weight.to(weight.dtype), None, None


_output_op.register_autograd(_backward, setup_context=_setup_context)


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What F.linear would compute in: the autocast dtype where autocast is on."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(h.dtype, weight.dtype)


def output_lse_and_target(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float | None = None
):
    """(logsumexp of the (capped) logits h weight^T, the target's (capped) logit), fp32, one per
    position; h: (..., H), weight: (V, H), targets: h's leading shape."""
    if cap is not None and cap <= 0:
        raise ValueError(f"softcap: cap must be positive, got {cap}")
    if is_plain():
        return lse_and_target_reference(F.linear(h, weight), targets, cap)
    dtype = _compute_dtype(h, weight)
    lse, target, _ = _output_op(
        h.reshape(-1, h.shape[-1]).to(dtype),
        weight.to(dtype),
        targets.reshape(-1),
        0.0 if cap is None else float(cap),
    )
    return lse.view(targets.shape), target.view(targets.shape)
