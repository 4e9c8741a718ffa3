"""The loss kernels: per-row logsumexp and target logit, and their gradient, against the textbook
definition (F.cross_entropy, torch.logsumexp under autograd), with and without the soft cap."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.cross_entropy import lse_and_target, plain_pytorch, softcap

ROOT = Path(__file__).resolve().parent.parent


def logits_and_targets(rows=37, vocab=1000, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = scale * torch.randn(rows, vocab, generator=g)
    raw[5] *= 1e3  # a diverging row: |logits| in the thousands
    return raw, torch.randint(0, vocab, (rows,), generator=g)


@pytest.mark.parametrize("cap", [None, 2.0, 30.0])
def test_values_and_gradient_match_the_definition(cap):
    raw, targets = logits_and_targets()
    raw.requires_grad_()
    lse, target = lse_and_target(raw, targets, cap)
    loss = (lse - target).mean() + 0.3 * lse.square().mean()  # cross-entropy + z-loss
    (grad,) = torch.autograd.grad(loss, raw)

    ref_raw = raw.detach().clone().requires_grad_()
    x = softcap(ref_raw, cap)
    ref = F.cross_entropy(x, targets) + 0.3 * torch.logsumexp(x, dim=-1).square().mean()
    (ref_grad,) = torch.autograd.grad(ref, ref_raw)
    assert torch.allclose(loss, ref, rtol=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-9)
    assert torch.isfinite(grad).all()


def test_shapes_follow_the_targets_and_plain_mode_is_the_same_function():
    raw, targets = logits_and_targets(rows=12)
    raw, targets = raw.view(3, 4, -1), targets.view(3, 4)
    lse, target = lse_and_target(raw, targets, 2.0)
    assert lse.shape == target.shape == (3, 4) and lse.dtype == torch.float32
    with plain_pytorch():
        plain_lse, plain_target = lse_and_target(raw, targets, 2.0)
    assert torch.allclose(lse, plain_lse) and torch.allclose(target, plain_target)


def test_non_positive_cap_is_refused():
    raw, targets = logits_and_targets(rows=8)
    with pytest.raises(ValueError, match="cap must be positive"):
        lse_and_target(raw, targets, 0.0)


def test_compiled_loss_matches_eager():
    raw, targets = logits_and_targets(rows=16, vocab=300)
    f = lambda r: (lambda lse, t: (lse - t).mean())(*lse_and_target(r, targets, 2.0))  # noqa: E731
    eager_raw = raw.clone().requires_grad_()
    compiled_raw = raw.clone().requires_grad_()
    f(eager_raw).backward()
    torch.compile(f)(compiled_raw).backward()
    assert torch.allclose(eager_raw.grad, compiled_raw.grad, rtol=1e-5, atol=1e-9)


KERNEL_CHECK = """
import sys
import torch
from trainer import cross_entropy as ce
device = sys.argv[1]
g = torch.Generator().manual_seed(0)
for cap in (None, 2.0):
    # tanh.approx on CUDA: relative error below 2^-10.9 (bf16 logits carry 2^-8)
    tol = 1e-3 if cap and device == "cuda" else 1e-6
    raw = (3 * torch.randn(9, 5000, generator=g)).to(device)  # 5000: not a multiple of the block
    raw[3] *= 1e3
    t = torch.randint(0, 5000, (9,), generator=g).to(device)
    lse, target = ce.triton_forward(raw, t, cap)
    ref_lse, ref_target = ce.lse_and_target_reference(raw.double(), t, cap)
    assert torch.allclose(lse.double(), ref_lse, rtol=tol), (cap, lse, ref_lse)
    assert torch.allclose(target.double(), ref_target, rtol=tol, atol=tol), (cap, target, ref_target)
    g_lse, g_target = torch.randn(9, generator=g).to(device), torch.randn(9, generator=g).to(device)
    grad = ce.triton_backward(raw, t, lse, g_lse, g_target, cap)
    ref = ce.lse_and_target_grad_reference(raw.double(), t, ref_lse, g_lse.double(), g_target.double(), cap)
    error = (grad.double() - ref).norm() / ref.norm()
    assert error < tol, (cap, error)
print("kernels ok")
"""


def test_triton_kernels_against_the_definition():
    """The kernels on a GPU, or else in Triton's CPU interpreter (CI has no GPU; the interpreter
    needs Triton >= 3.9 with NumPy >= 2.4, which .ci/run installs)."""
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
    assert "kernels ok" in result.stdout
