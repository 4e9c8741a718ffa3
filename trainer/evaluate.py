"""Evaluate a finished run: `python -m trainer.evaluate --run RUN [--step N]` writes RUN/eval.json.

test_loss is the mean cross-entropy of the model's output logits (capped for softcap) over
fixed validation windows; the geometry of E and the logit statistics follow docs/protocol.md (see
trainer/metrics.py). Under torchrun every rank evaluates a disjoint share and the results are
reduced. A diverged run gets an eval.json with status `diverged` and NaN metrics.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, RunConfig, load_config
from trainer.contract import EVAL_METRICS as METRICS
from trainer.contract import RunDir
from trainer.distributed import Dist, process_group
from trainer.files import write_json
from trainer.methods import build_method
from trainer.metrics import LogitStatistics, embedding_geometry
from trainer.model import GPT
from trainer.optim import build_optimizer, optimizer_hooks, run_shape
from trainer.shards import ShardError, ValidationSet, to_device
from trainer.train import autocast_dtype, verified_shards
from trainer.validation import my_micro_batches, validation_loss

INPUT_PREFIX = "in_"  # geometry of the input embedding, where it is a different matrix


def eval_path(run_dir: Path, step: int | None) -> Path:
    return Path(RunDir(run_dir).evaluation) if step is None else run_dir / f"eval_step{step}.json"


def load_weights(run_dir: Path, step: int | None) -> tuple[dict | None, int, str, Path, dict | None]:
    """(state dict or None for a diverged run, step, status, file, optimizer state) of final.pt
    (no optimizer state: it holds the weights to evaluate) or a kept checkpoint, verified by
    checkpoint.load (never unpickles code, checks the checksum)."""
    if step is None:
        path = Path(RunDir(run_dir).final)
        state = checkpoint.load(path)
        with checkpoint.misfit_is_an_error(path):
            return state["model"], int(state["step"]), state.get("status", "completed"), path, None
    kept = dict(checkpoint.list_checkpoints(Path(RunDir(run_dir).checkpoints)))
    if step not in kept:
        listing = ", ".join(str(s) for s in sorted(kept)) or "none"
        raise CheckpointError(f"{run_dir}: no checkpoint of step {step} is kept (kept steps: {listing})")
    state = checkpoint.load(kept[step])
    with checkpoint.misfit_is_an_error(kept[step]):
        return state["model"], step, "completed", kept[step], state["optimizer"]


@torch.no_grad()
def logit_statistics(model: GPT, windows: ValidationSet, cfg: RunConfig, d: Dist, amp) -> dict[str, float]:
    stats = LogitStatistics(d.device)
    for rows in my_micro_batches(cfg.eval.logit_batches, cfg.eval.micro_batch, d):
        x, _ = to_device(windows.read(rows), d.device)
        with torch.autocast(d.device.type, dtype=amp, enabled=amp is not None):
            h = model.hidden(x)
        stats.update(h, model.output_embedding)
    if d.world_size > 1:
        stats.all_reduce()
    return stats.result(model.output_embedding)


def evaluate(run_dir: Path, step: int | None = None) -> dict:
    """Compute every metric of one run; returns the eval.json content (written by rank 0)."""
    cfg = load_config(RunDir(run_dir).config)
    weights, evaluated_step, status, path, optimizer_state = load_weights(run_dir, step)
    started = time.perf_counter()
    provenance = {"run": cfg.run, "step": evaluated_step, "status": status}
    if weights is None:  # diverged: nothing to evaluate, but the run still gets its row
        nan_metrics = dict.fromkeys(METRICS, math.nan)
        main_rank = int(os.environ.get("RANK", "0")) == 0
        return {**provenance, **nan_metrics, "tokens_evaluated": 0, "wall_s": 0.0, "is_main": main_rank}
    with process_group() as d:
        model = GPT(cfg.model, build_method(cfg.method)).to(d.device)
        with checkpoint.misfit_is_an_error(path):
            model.load_state_dict(weights)
            # A checkpoint holds the training weights; schedule-free AdamW evaluates its average.
            optimizer_hooks(cfg.optim).use_evaluation_weights(
                model, lambda: build_optimizer(model, cfg.optim, d.device, run_shape(cfg)), optimizer_state
            )
        model.eval()
        amp = autocast_dtype(cfg, d.device)
        windows = ValidationSet(verified_shards(cfg, d, cfg.data.val_pattern), cfg.model.seq_len)
        windows.require(cfg.eval.batches * cfg.eval.micro_batch, "eval.batches x eval.micro_batch")
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        test_loss, tokens = validation_loss(model, windows, cfg.eval.batches, cfg.eval.micro_batch, d, amp)
        result = {**provenance, "test_loss": test_loss}
        result.update(embedding_geometry(model.output_embedding))
        result.update(logit_statistics(model, windows, cfg, d, amp))
        if not cfg.model.tied:
            result.update({INPUT_PREFIX + k: v for k, v in embedding_geometry(model.wte.weight).items()})
        result.update(
            {
                "tokens_evaluated": tokens,
                "validation_data": windows.identity(),
                "wall_s": time.perf_counter() - started,
                "peak_mem_gb": torch.cuda.max_memory_allocated(d.device) / 1e9
                if d.device.type == "cuda"
                else None,
                "world_size": d.world_size,
                "is_main": d.is_main,
            }
        )
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # --run-dir is the spelling to use under torchrun, whose own parser takes --run for --run-path.
    parser.add_argument(
        "--run", "--run-dir", dest="run", required=True, help="run directory (holds config.yaml and final.pt)"
    )
    parser.add_argument("--step", type=int, help="evaluate the kept checkpoint of this step instead")
    args = parser.parse_args(argv)
    run_dir = Path(args.run)
    try:
        result = evaluate(run_dir, args.step)
    except (ConfigError, ShardError, CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if result.pop("is_main", True):
        path = eval_path(run_dir, args.step)
        write_json(path, result)
        print(
            f"{result['run']}: test_loss {result['test_loss']:.4f} ({result['status']}) -> {path}", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
