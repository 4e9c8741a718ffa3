"""Does the fast path train like the plain one? Mean loss over the last 20 of 200 steps, both ways.

    python -m trainer.tools.parity --scale 16M --method baseline,softcap      # on a GPU
    python -m trainer.tools.parity                                            # a tiny model (CPU, tests)

plain: eager PyTorch, micro-batch 16, the loss as the textbook logsumexp - target logit under
autograd. fast: torch.compile, the "auto" micro-batch, the Triton loss kernels (on CUDA). Both
start from the same weights and read the same synthetic token stream, a random bigram process
(each token has 4 equally likely successors, entropy ln 4 = 1.386) that a model learns within
200 steps, so the loss falls and the two paths have room to drift apart.
Exit status 1 if the two means differ by more than --tolerance (default 0.01).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from trainer.config import RunConfig, config_from_dict
from trainer.contract import example_params
from trainer.distributed import process_group
from trainer.ops.fast_path import plain_pytorch
from trainer.schedules import learning_rate
from trainer.shards import write_shard
from trainer.tools.bench import GPT2_VOCAB, paper_config

STEPS_AHEAD = np.array([1, 2, 3, 5])


def bigram_stream(directory: Path, vocab: int, tokens: int = 4_000_000, seed: int = 0) -> None:
    """Token i is perm[s_i], s_i = s_(i-1) + one of STEPS_AHEAD (mod vocab): 4 successors each."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.choice(STEPS_AHEAD, size=tokens)) % vocab
    write_shard(directory / "synthetic_train_000001.bin", rng.permutation(vocab)[walk])


def tiny_config(data_dir: str, method: str) -> RunConfig:
    return config_from_dict(
        {
            "run": f"parity-tiny-{method}",
            "data": {"dir": data_dir, "train_pattern": "synthetic_train_*.bin"},
            "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 512, "seq_len": 64},
            "method": {"name": method, **example_params(method)},
            "train": {"batch_size": 32, "checkpoint_every": 0, "checkpoint_minutes": 0},
            "optim": {"lr": 3e-3},
        }
    )


def train_losses(cfg: RunConfig, steps: int, out: Path) -> list[float]:
    from trainer.train import Run  # imported late, like bench

    with process_group() as d:
        run = Run(cfg, out, d)
        losses = []
        while run.step < steps:
            loss, _ = run.train_step(learning_rate(cfg.optim, run.step, steps))
            run.step += 1
            losses.append(loss.item())
        return losses


def variant(cfg: RunConfig, steps: int, **train) -> RunConfig:
    """cfg for a `steps`-step run (warmup a tenth of it) with these train keys changed."""
    values = cfg.to_dict()
    values["train"].update(train, steps=steps)
    values["optim"]["warmup"] = steps // 10
    return config_from_dict(values)


def compare(cfg: RunConfig, steps: int, tmp: Path) -> tuple[float, float]:
    """(plain, fast) mean loss over the last 20 steps."""
    plain_cfg = variant(cfg, steps, compile=False, micro_batch=16)
    fast_cfg = variant(cfg, steps, compile=True, micro_batch="auto")
    with plain_pytorch():
        plain = train_losses(plain_cfg, steps, tmp / "plain")
    fast = train_losses(fast_cfg, steps, tmp / "fast")
    return float(np.mean(plain[-20:])), float(np.mean(fast[-20:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", help="a paper scale (default: a tiny model)")
    parser.add_argument("--method", default="baseline", help="comma-separated methods")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--tolerance", type=float, default=0.01)
    args = parser.parse_args(argv)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bigram_stream(tmp, GPT2_VOCAB if args.scale else 512)
        for method in args.method.split(","):
            cfg = paper_config(args.scale, method, str(tmp)) if args.scale else tiny_config(str(tmp), method)
            plain, fast = compare(cfg, args.steps, tmp / method)
            diff = abs(plain - fast)
            failed |= diff > args.tolerance
            print(
                f"{cfg.run}: mean loss over steps {args.steps - 19}-{args.steps}: plain {plain:.4f} "
                f"fast {fast:.4f} |difference| {diff:.4f} ({'ok' if diff <= args.tolerance else 'TOO LARGE'})",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
