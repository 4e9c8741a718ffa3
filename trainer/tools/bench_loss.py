"""Benchmark of the output-layer loss kernel (trainer.ops.cross_entropy) on a CUDA GPU:

    python -m trainer.tools.bench_loss [--rows 32768] [--vocab 50304] [--sweep]

prints the kernel's time and memory throughput (bytes of bf16 logits read + written per second)
for the configured tuning, or with --sweep for a grid of settings, with and without the soft cap.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from trainer.ops import cross_entropy as ce

SETTINGS = ("BLOCK", "WARPS")
SWEEP = list(itertools.product([2048, 4096, 8192, 16384], [4, 8, 16]))


def time_kernel(raw: torch.Tensor, targets: torch.Tensor, cap: float | None) -> float:
    """Milliseconds per call. The kernel overwrites its input with q; calls after the first read
    q as logits, which costs the same (no step of the kernel depends on the values)."""
    from triton.testing import do_bench

    buffer = raw.clone()
    return do_bench(lambda: ce.triton_softmax_grad(buffer, targets, cap))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--sweep", action="store_true", help="time a grid of kernel settings")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_loss needs a CUDA GPU")
    torch.manual_seed(0)
    raw = (3 * torch.randn(args.rows, args.vocab, device="cuda")).bfloat16()
    targets = torch.randint(0, args.vocab, (args.rows,), device="cuda")
    gigabytes = 2 * raw.numel() * raw.element_size() / 1e9  # one read and one write of the logits
    configured = tuple(getattr(ce, name) for name in SETTINGS)
    print(f"{args.rows} x {args.vocab} bf16 logits | {' '.join(SETTINGS)} | cap | ms | TB/s (read + write)")
    for setting in [configured, *SWEEP] if args.sweep else [configured]:
        for name, value in zip(SETTINGS, setting):
            setattr(ce, name, value)
        for cap in (None, 30.0):
            ms = time_kernel(raw, targets, cap)
            print(f"{' '.join(map(str, setting))} | {cap} | {ms:.3f} | {gigabytes / ms:.2f}", flush=True)
    for name, value in zip(SETTINGS, configured):
        setattr(ce, name, value)


if __name__ == "__main__":
    main()
