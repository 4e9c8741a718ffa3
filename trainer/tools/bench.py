"""Throughput benchmark of the training step: step time, tokens/s, MFU and peak memory.

    python -m trainer.tools.bench --scale 16M --method baseline,zloss --steps 50 --compile
    python -m trainer.tools.bench --config RUN/config.yaml --steps 30
    python -m trainer.tools.bench --config RUN/config.yaml --synthetic --optimizer adamw,muon --compile

With --scale the paper protocol is used (batch 64 x 2048, bf16) on synthetic tokens, so no data
is needed; --synthetic does the same for a --config. --optimizer times the config once per
optimizer (each at its registry defaults; schedule-free on its constant schedule). MFU follows docs/protocol.md "Throughput and MFU": (6 N_eff + 12 L H T) * tokens/s / peak, N_eff = every
parameter except the input embedding.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trainer.config import OPTIM_PARAMS, RunConfig, config_from_dict, load_config
from trainer.contract import example_params
from trainer.distributed import process_group
from trainer.shards import write_shard

# The paper's five scales: layers and width (docs/protocol.md "Model"); heads are 4 throughout.
PAPER_SCALES = {"16M": (6, 224), "29M": (9, 320), "57M": (12, 480), "109M": (15, 640), "221M": (21, 832)}
PEAK_FLOPS = 790e12  # bf16 dense matmul peak measured on an H200 (docs/protocol.md)
GPT2_VOCAB = 50257
# Untimed steps below this may still hold compilation: the first steps compile, and the second one
# recompiles once (measured at 16M: --warmup 1 gave 537 ms per step, --warmup 5 20 ms).
MIN_WARMUP = 3


def paper_config(scale: str, method: str, data_dir: str, tied: bool = False) -> RunConfig:
    n_layer, n_embd = PAPER_SCALES[scale]
    return config_from_dict(
        {
            "run": f"bench-{scale}-{method}",
            "data": {"dir": data_dir, "train_pattern": "synthetic_train_*.bin"},
            "model": {"n_layer": n_layer, "n_embd": n_embd, "tied": tied},
            "method": {"name": method, **example_params(method)},
            "train": {"checkpoint_every": 0, "checkpoint_minutes": 0},
        }
    )


def with_optimizer(cfg: RunConfig, name: str) -> RunConfig:
    """cfg with another optimizer: its hyper-parameters at their defaults (the others' unset)."""
    raw = cfg.to_dict()
    raw["run"] = f"{cfg.run}-{name}"
    raw["optim"] = {k: v for k, v in raw["optim"].items() if k not in OPTIM_PARAMS} | {"name": name}
    if name == "sfadamw":
        raw["optim"]["schedule"] = "constant"
    return config_from_dict(raw)


def synthetic_shards(directory: Path, tokens: int = 20_000_000, vocab: int = GPT2_VOCAB) -> None:
    """Uniformly random token ids (GPT-2's, or below a smaller vocabulary): the step time does not
    depend on the text."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(vocab, GPT2_VOCAB), size=tokens)
    write_shard(directory / "synthetic_train_000001.bin", ids)


def model_flops_per_token(run) -> float:
    cfg = run.cfg.model
    n_eff = sum(p.numel() for p in run.model.parameters())  # shared storage counted once
    if not cfg.tied:
        n_eff -= run.model.wte.weight.numel()
    return 6 * n_eff + 12 * cfg.n_layer * cfg.n_embd * cfg.seq_len


def train_steps(run, cfg: RunConfig, steps: int):
    """`steps` optimizer steps at the peak lr; the last step's loss (a device tensor)."""
    loss = None
    for _ in range(steps):
        loss, _ = run.train_step(cfg.optim.lr)
        run.step += 1  # the next batch, and the step count an optimizer's hooks go by (Sophia)
    return loss


def print_profile(run, cfg: RunConfig, steps: int, show: bool = True, rows: int = 25) -> None:
    """The GPU kernels of `steps` more steps, by total time per step (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_steps(run, cfg, steps)
        torch.cuda.synchronize()
    if not show:
        return
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    print(f"profile of {steps} steps: {total / 1000 / steps:.1f} ms of kernels per step")
    for e in events[:rows]:
        share = 100 * e.device_time_total / total
        print(
            f"  {e.device_time_total / 1000 / steps:8.2f} ms {share:5.1f}% x{e.count // steps:<4d} {e.key[:110]}"
        )


def print_fallbacks(cfg: RunConfig) -> None:
    """Which parts of this model ran in plain PyTorch instead of a hand-written kernel, and why."""
    from trainer.model import fast_path_coverage
    from trainer.ops.fast_path import triton

    if triton is None or not torch.cuda.is_available():
        print(f"  fallback: {cfg.run}: no CUDA or no Triton: every kernel ran as plain PyTorch", flush=True)
        return
    for reason in fast_path_coverage(cfg.model):
        print(f"  fallback: {cfg.run}: {reason}", flush=True)


def bench(cfg: RunConfig, steps: int, warmup: int, out: Path, profile_steps: int = 0) -> dict:
    from trainer.train import Run  # imported late: bench --help needs no trainer setup

    with process_group() as d:
        run = Run(cfg, out, d)
        sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        t_compile = time.perf_counter()
        train_steps(run, cfg, warmup)
        sync()
        t0 = time.perf_counter()
        loss = train_steps(run, cfg, steps)
        sync()
        elapsed = time.perf_counter() - t0
        tokens_per_s = steps * cfg.tokens_per_step / elapsed  # the global batch, over all ranks
        peak = torch.cuda.max_memory_allocated(d.device) / 1e9 if d.device.type == "cuda" else float("nan")
        if profile_steps and d.device.type == "cuda":  # every rank trains (DDP), the first prints
            print_profile(run, cfg, profile_steps, show=d.is_main)
        return {
            "run": cfg.run,
            "micro_batch": run.micro,
            "warmup_s": t0 - t_compile,
            "step_ms": 1000 * elapsed / steps,
            "tokens_per_s": tokens_per_s,
            "mfu": model_flops_per_token(run) * tokens_per_s / d.world_size / PEAK_FLOPS,
            "peak_mem_gb": peak,
            "loss": loss.item(),
            "world_size": d.world_size,
            "is_main": d.is_main,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a run config; its data directory is used as is")
    parser.add_argument("--scale", choices=list(PAPER_SCALES), help="a paper scale on synthetic tokens")
    parser.add_argument("--method", default="baseline", help="comma-separated methods (with --scale)")
    parser.add_argument("--tied", action="store_true", help="tied embeddings (with --scale)")
    parser.add_argument("--optimizer", help="comma-separated optimizers, one timing each (with --config)")
    parser.add_argument("--synthetic", action="store_true", help="random tokens instead of the config's data")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    parser.add_argument("--micro-batch", type=int, help="sequences per forward pass (default: auto)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="then list the GPU kernels of N steps"
    )
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.scale):
        parser.error("give exactly one of --config and --scale")
    if args.scale and not torch.cuda.is_available():
        parser.error(
            f"--scale {args.scale} times the paper's protocol (batch 64 x 2048, bf16) and needs a GPU; "
            "on a CPU, time a small run config with --config RUN/config.yaml"
        )
    if args.warmup < MIN_WARMUP:
        print(f"warning: --warmup {args.warmup} may time compilation too (use >= {MIN_WARMUP})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.config:
            configs = [load_config(args.config)]
            if args.optimizer:
                configs = [with_optimizer(configs[0], name) for name in args.optimizer.split(",")]
            if args.synthetic:  # and no in-training validation: there are no validation shards
                synthetic_shards(tmp, vocab=configs[0].model.vocab_size)
                for cfg in configs:
                    cfg.data.dir, cfg.data.train_pattern = str(tmp), "synthetic_train_*.bin"
                    cfg.train.eval_every = 0
        else:
            synthetic_shards(tmp)
            configs = [paper_config(args.scale, m, str(tmp), args.tied) for m in args.method.split(",")]
        print("run | micro | compile+warmup s | step ms | tokens/s | MFU | peak GB | loss", flush=True)
        for cfg in configs:
            cfg.train.compile = cfg.train.compile or args.compile
            if args.micro_batch:
                cfg.train.micro_batch = args.micro_batch
            r = bench(cfg, args.steps, args.warmup, tmp / cfg.run, args.profile)
            if r["is_main"]:
                print(
                    f"{r['run']} | {r['micro_batch']} | {r['warmup_s']:.1f} | {r['step_ms']:.1f} | "
                    f"{r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {r['peak_mem_gb']:.1f} | {r['loss']:.3f}",
                    flush=True,
                )
                print_fallbacks(cfg)


if __name__ == "__main__":
    main()
