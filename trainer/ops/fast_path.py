"""The switch between the hand-written GPU kernels and plain PyTorch.

The Triton kernels (trainer.ops.cross_entropy, trainer.ops.rope) run on CUDA tensors when Triton is
installed; `plain_pytorch()` turns them off for a block of code (trainer.tools.parity's plain path).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

try:  # Triton ships with PyTorch's CUDA wheels; without it the CUDA path is plain PyTorch too
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = tl = None

_plain = False


@contextmanager
def plain_pytorch():
    """Within: every fused operation is its textbook definition under autograd."""
    global _plain
    before, _plain = _plain, True
    try:
        yield
    finally:
        _plain = before


def is_plain() -> bool:
    return _plain


def use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda
