"""The output layer's loss inputs: per-row logsumexp and target logit of h E^T, and their
gradients, against the textbook definition (F.linear + F.cross_entropy under autograd), with and
without the soft cap; and the Triton kernel behind them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainer.ops.cross_entropy import output_lse_and_target, softcap
from trainer.ops.fast_path import plain_pytorch

ROOT = Path(__file__).resolve().parent.parent


def hidden_weight_targets(rows=37, width=16, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, width, generator=g)
    h[5] *= 1e3  # a diverging row: |logits| in the thousands
    weight = torch.randn(vocab, width, generator=g)
    return h, weight, torch.randint(0, vocab, (rows,), generator=g)


def loss_of(lse, target):
    return (lse - target).mean() + 0.3 * lse.square().mean()  # cross-entropy + z-loss


@pytest.mark.parametrize("cap", [None, 2.0, 30.0])
def test_values_and_gradients_match_the_definition(cap):
    h, weight, targets = hidden_weight_targets()
    inputs = (h.requires_grad_(), weight.requires_grad_())
    loss = loss_of(*output_lse_and_target(*inputs, targets, cap))
    grads = torch.autograd.grad(loss, inputs)

    ref_inputs = tuple(t.detach().double().requires_grad_() for t in inputs)  # fp64 reference
    x = softcap(F.linear(*ref_inputs), cap)
    ref = F.cross_entropy(x, targets) + 0.3 * torch.logsumexp(x, dim=-1).square().mean()
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    assert torch.allclose(loss.double(), ref, rtol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads):
        # fp32 F.cross_entropy itself is 1.4e-5 away from fp64 here (cap 2, the weight)
        assert (grad.double() - ref_grad).norm() / ref_grad.norm() < 1e-4


def test_shapes_follow_the_targets_and_plain_mode_is_the_same_function():
    h, weight, targets = hidden_weight_targets(rows=12)
    h, targets = h.view(3, 4, -1), targets.view(3, 4)
    lse, target = output_lse_and_target(h, weight, targets, 2.0)
    assert lse.shape == target.shape == (3, 4) and lse.dtype == torch.float32
    with plain_pytorch():
        plain_lse, plain_target = output_lse_and_target(h, weight, targets, 2.0)
    assert torch.allclose(lse, plain_lse) and torch.allclose(target, plain_target)


def test_autocast_computes_the_logits_in_its_dtype_like_f_linear():
    h, weight, targets = hidden_weight_targets(rows=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lse, target = output_lse_and_target(h, weight, targets)
        logits = F.linear(h, weight)
    assert logits.dtype == torch.bfloat16
    assert torch.equal(target, logits.float().gather(1, targets[:, None]).squeeze(1))
    assert torch.allclose(lse, torch.logsumexp(logits.float(), dim=-1), rtol=1e-6)


def test_non_positive_cap_is_refused():
    h, weight, targets = hidden_weight_targets(rows=8)
    with pytest.raises(ValueError, match="cap must be positive"):
        output_lse_and_target(h, weight, targets, 0.0)


def test_compiled_loss_matches_eager():
    h, weight, targets = hidden_weight_targets(rows=16, vocab=300)

    def f(h, weight):
        return loss_of(*output_lse_and_target(h, weight, targets, 2.0))

    eager = (h.clone().requires_grad_(), weight.clone().requires_grad_())
    compiled = (h.clone().requires_grad_(), weight.clone().requires_grad_())
    f(*eager).backward()
    torch.compile(f)(*compiled).backward()
    for a, b in zip(eager, compiled):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)


KERNEL_CHECK = """
import sys
import torch
from trainer.ops import cross_entropy as ce
device = sys.argv[1]
g = torch.Generator().manual_seed(0)
for cap in (None, 2.0):
    # tanh.approx on CUDA: relative error below 2^-10.9 (bf16 logits carry 2^-8)
    tol = 1e-3 if cap and device == "cuda" else 1e-6
    raw = (3 * torch.randn(9, 5000, generator=g)).to(device)  # 5000: not a multiple of the block
    raw[3] *= 1e3
    t = torch.randint(0, 5000, (9,), generator=g).to(device)
    ref_lse, ref_target, ref_q = ce.softmax_grad_reference(raw.double(), t, cap)
    logits = raw.clone()
    lse, target = ce.triton_softmax_grad(logits, t, cap)  # q written over the logits
    assert torch.allclose(lse.double(), ref_lse, rtol=tol), (cap, lse, ref_lse)
    assert torch.allclose(target.double(), ref_target, rtol=tol, atol=tol), (cap, target, ref_target)
    error = (logits.double() - ref_q).norm() / ref_q.norm()
    assert error < tol, (cap, error)
    assert (logits.gather(1, t[:, None]) <= 0).all()  # p_t - 1 at each target
print("kernel ok")
"""


def test_triton_kernel_against_the_definition():
    """The kernel on a GPU, or else in Triton's CPU interpreter (CI has no GPU; the interpreter
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
    assert "kernel ok" in result.stdout


def test_kernel_benchmark_runs_on_a_gpu_and_says_why_not_without(capsys):
    from trainer.tools import bench_loss

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bench_loss.main(["--rows", "64"])
        return
    bench_loss.main(["--rows", "64", "--vocab", "5000"])
    rows = [line for line in capsys.readouterr().out.splitlines() if " | " in line][1:]
    assert len(rows) == 2 and all(float(row.split(" | ")[-1]) > 0 for row in rows)  # cap off, on
