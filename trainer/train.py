"""Train one run: `python -m trainer.train --config RUN/config.yaml --out RUN` (also under torchrun).

Re-running the same command resumes from the newest complete checkpoint; a finished run exits
at once. SIGUSR1, SIGUSR2, SIGTERM and SIGINT save a checkpoint and exit non-zero. A non-finite loss,
or a learning rate that overflows the weights' dtype, ends the run with status `diverged` and exit
code 0. A model that cannot fit the device's memory is refused before anything is allocated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import checkpoint
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, RunConfig, load_config, micro_batch_size
from trainer.contract import FINISHED, RunDir
from trainer.distributed import Dist, process_group
from trainer.files import read_log, write_atomic, write_json
from trainer.methods import build_method
from trainer.model import GPT, parameter_count
from trainer.optim import build_optimizer, bytes_per_parameter, optimizer_hooks, run_shape, set_learning_rate
from trainer.schedules import learning_rate
from trainer.shards import (
    ShardError,
    TrainBatches,
    ValidationSet,
    find_shards,
    rank_rows,
    to_device,
    verify_shards,
)
from trainer.validation import validation_loss

MICRO_BATCH_TOKENS = 32768  # "auto" micro-batch off CUDA: at most this many tokens per forward pass
# "auto" on CUDA: the largest micro-batch whose estimated memory fits in this share of the GPU.
# Bytes per token: 44 per (layer x width) of saved activations (bf16, compiled) plus the bf16
# logits, which the loss kernel turns into their gradient in place (2 per vocabulary entry);
# bytes per parameter: weights, gradients and optimizer state (optim.bytes_per_parameter: 16 for
# AdamW, 12 to 24 for the others). Measured peaks on an H200 (AdamW): 60.6 GB
# at 221M x 32 sequences and 115.1 GB at 221M x 64 (42 bytes per layer x width), 22.0 GB at
# 16M x 64. 221M x 64 on an H200 (77% of its memory) trains 1.3% faster than 32 x 2 steps.
GPU_MEMORY_SHARE = 0.8
ACTIVATION_BYTES = 44
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)  # INT: Ctrl-C


def seconds(value) -> float:
    """A duration read back from a log or file; anything else counts as 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else 0.0


def autocast_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA; the CPU always trains in fp32."""
    if device.type == "cuda" and cfg.train.dtype == "bfloat16":
        return torch.bfloat16
    return None


def activation_bytes_per_token(cfg: RunConfig) -> int:
    m = cfg.model
    return ACTIVATION_BYTES * m.n_layer * m.n_embd + 2 * m.vocab_size


def micro_tokens_for_memory(cfg: RunConfig, gpu_memory: int, n_params: int) -> int:
    """The token cap of micro_batch "auto" on a GPU of gpu_memory bytes (see GPU_MEMORY_SHARE)."""
    budget = GPU_MEMORY_SHARE * gpu_memory - bytes_per_parameter(cfg.optim.name) * n_params
    return max(cfg.model.seq_len, int(budget // activation_bytes_per_token(cfg)))


def device_memory(device: torch.device) -> int:
    """Bytes of the GPU, or of the machine's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: RunConfig, n_params: int, micro: int, available: int, where: str) -> None:
    """Refuse, before allocating, a run that cannot fit: weights, gradients and the optimizer's
    state (optim.bytes_per_parameter) and the activations of one micro-batch (ACTIVATION_BYTES).
    An estimate from below (bf16, compiled): what it refuses surely does not fit."""
    weights = bytes_per_parameter(cfg.optim.name) * n_params
    activations = micro * cfg.model.seq_len * activation_bytes_per_token(cfg)
    if weights + activations > available:
        raise ConfigError(
            f"model: needs about {(weights + activations) / 1e9:,.1f} GB ({n_params:,} parameters: "
            f"{weights / 1e9:,.1f} GB; activations of {micro} x {cfg.model.seq_len} tokens: "
            f"{activations / 1e9:,.1f} GB), more than the {available / 1e9:,.1f} GB of {where}"
        )


def auto_micro_tokens(cfg: RunConfig, device: torch.device, n_params: int) -> int:
    if device.type != "cuda":
        return MICRO_BATCH_TOKENS
    return micro_tokens_for_memory(cfg, torch.cuda.get_device_properties(device).total_memory, n_params)


def git_revision() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions(device: torch.device) -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
    }


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kB


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def verified_shards(cfg: RunConfig, d: Dist, pattern: str) -> list[Path]:
    """The shards of data.dir matching pattern, checked by verify_shards on the main rank while the
    others wait (the first check of a dataset reads every byte: once, not once per rank)."""
    paths = find_shards(cfg.data.dir, pattern)
    problem = None
    if d.is_main:
        try:
            verify_shards(paths, cfg.model.vocab_size)
        except ShardError as err:
            problem = err
    (refused,) = d.all_agree(problem is not None)
    if problem is not None:
        raise problem
    if refused:
        raise ShardError(f"{cfg.data.dir}: rank 0 refused the shards (its log says why)")
    return paths


class Run:
    """The state of one training attempt: model, optimizer, data and bookkeeping."""

    def __init__(self, cfg: RunConfig, out: Path, d: Dist, restart_on_change: bool = False):
        self.cfg, self.out, self.d = cfg, out, d
        self.restart_on_change = restart_on_change
        self.files = RunDir(out)  # the run directory's layout (trainer/contract.py)
        self.ckpt_dir = Path(self.files.checkpoints)
        out.mkdir(parents=True, exist_ok=True)  # bench and parity start runs in fresh folders too
        train_shards = verified_shards(cfg, d, cfg.data.train_pattern)
        n_params = parameter_count(cfg.model)
        self.micro = micro_batch_size(cfg, d.world_size, auto_micro_tokens(cfg, d.device, n_params))
        check_memory(cfg, n_params, self.micro, device_memory(d.device), f"device {d.device}")
        torch.manual_seed(cfg.seed)
        self.model = GPT(cfg.model, build_method(cfg.method)).to(d.device)
        self.optimizer = build_optimizer(self.model, cfg.optim, d.device, run_shape(cfg))
        self.optimizer_hooks = optimizer_hooks(cfg.optim)  # what the optimizer asks of the loop
        self.step = 0  # steps completed
        self.time_before = 0.0  # training seconds of earlier attempts
        self.resume()
        self.amp = autocast_dtype(cfg, d.device)
        net = torch.compile(self.model) if cfg.train.compile else self.model
        self.net = (
            DDP(net, device_ids=[d.device] if d.device.type == "cuda" else None) if d.world_size > 1 else net
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = TrainBatches(
            train_shards,
            cfg.model.seq_len,
            cfg.train.batch_size,
            cfg.seed if cfg.data.seed is None else cfg.data.seed,  # data.seed: the order alone
        )
        self.per_rank = cfg.train.batch_size // d.world_size
        self.val_windows = None
        if cfg.train.eval_every:
            val = ValidationSet(verified_shards(cfg, d, cfg.data.val_pattern), cfg.model.seq_len)
            val.require(cfg.train.eval_batches * cfg.eval.micro_batch, "train.eval_batches")
            self.val_windows = val
        self.stop_signal: int | None = None
        self.wandb = None

    # --- checkpoints -------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the newest usable checkpoint, or start afresh; either way the logs keep
        the rows of the steps trained so far only, and no training time is lost."""
        found = checkpoint.newest(self.ckpt_dir)
        if found is not None and not self.same_config(*found):
            found = None  # discarded: a fresh start
        if found is not None:
            self.restore(*found)
        if self.d.is_main:
            self.continue_logs(seconds(found[0].get("train_time_s")) if found else 0.0)

    def same_config(self, state: dict, path: Path) -> bool:
        """Whether the checkpoint belongs to this config (today's or the legacy hash); a changed
        config is refused, or its checkpoints and logs discarded with restart_on_change."""
        if state.get("config_hash") in self.cfg.resume_hashes():
            return True
        if not self.restart_on_change:
            raise CheckpointError(
                f"{path}: made with a different run config (hash {state.get('config_hash')}, now "
                f"{self.cfg.resume_hash()}); delete {self.ckpt_dir} to start this run afresh"
            )
        if self.d.is_main:
            print(f"{path}: made with a different run config; starting afresh", flush=True)
            self.discard_attempts()
        self.d.barrier()
        return False

    def restore(self, state: dict, path: Path) -> None:
        with checkpoint.misfit_is_an_error(path):
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            torch.set_rng_state(state["rng"]["torch"])
            if torch.cuda.is_available() and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.d.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def discard_attempts(self) -> None:
        """Remove the checkpoints, logs and time of a run whose config has changed since."""
        for _, path in checkpoint.list_checkpoints(self.ckpt_dir):
            path.unlink()
        for path in (self.files.train_log, self.files.val_log, self.files.attempts):
            Path(path).unlink(missing_ok=True)

    def continue_logs(self, checkpoint_time: float) -> None:
        """Count the training time of every earlier attempt, then drop the log rows of steps
        after self.step (all of them on a fresh start): they will be trained, and logged, again.

        An attempt killed after its last checkpoint (or before its first) has its time only in
        its log rows, so that time is saved to RUN/attempts.json before the rows go.
        """
        try:
            saved = seconds(json.loads(Path(self.files.attempts).read_text()).get("train_time_s"))
        except (OSError, ValueError, AttributeError):
            saved = 0.0  # none yet, or damaged: the logs and the checkpoint still count
        logged = (seconds(row.get("elapsed_s")) for _, row in read_log(Path(self.files.train_log)))
        self.time_before = max(checkpoint_time, saved, *logged)
        write_json(Path(self.files.attempts), {"train_time_s": self.time_before})
        for name in (self.files.train_log, self.files.val_log):
            path = Path(name)
            kept = [line for line, row in read_log(path) if row["step"] <= self.step]
            if kept:
                write_atomic(path, "".join(line + "\n" for line in kept))
            else:
                path.unlink(missing_ok=True)

    def lr_overflows(self, lr: float) -> bool:
        """Whether AdamW's largest multipliers of lr, the step size of its first step
        lr / (1 - beta1) and the decay lr * weight_decay, overflow the weights' dtype: torch
        raises there instead of giving inf, so it is caught here as a divergence (any rank alike)."""
        groups = self.optimizer.param_groups
        largest = max(
            lr * g["lr_scale"] * max(1 / (1 - self.cfg.optim.beta1), g["weight_decay"]) for g in groups
        )
        return largest > torch.finfo(self.params[0].dtype).max

    def weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)

    def save_checkpoint(self, elapsed: float) -> None:
        if self.d.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "config_hash": self.cfg.resume_hash(),
                "config": self.cfg.to_dict(),
                "train_time_s": self.time_before + elapsed,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
            }
            checkpoint.save(state, checkpoint.checkpoint_path(self.ckpt_dir, self.step))
            checkpoint.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        self.d.barrier()  # other ranks wait until the file exists

    # --- signals -----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop_signal = signum

        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)

    # --- one optimizer step ------------------------------------------------------------------

    def backward(self, loss_of, *batch: torch.Tensor) -> torch.Tensor:
        """Forward and backward of loss_of(*micro-batch) -> (value, loss) over this rank's rows of
        batch, one micro-batch at a time: the gradients are those of the batch mean of loss (synced
        across ranks at the last micro-batch). Returns the batch mean of value."""
        accum = self.per_rank // self.micro
        mean = torch.zeros((), device=self.d.device)
        for k in range(accum):
            part = slice(k * self.micro, (k + 1) * self.micro)
            last = k == accum - 1
            sync = nullcontext() if last or self.d.world_size == 1 else self.net.no_sync()
            with sync, torch.autocast(self.d.device.type, dtype=self.amp, enabled=self.amp is not None):
                value, loss = loss_of(*(rows[part] for rows in batch))
            # Equal-length sequences: the mean of the micro-batch means is the batch mean.
            (loss / accum).backward()
            mean += value.detach() / accum
        return mean

    def drawn_backward(self, inputs: torch.Tensor, draw) -> None:
        """For an optimizer's hook: backward of the batch-mean cross-entropy against labels
        draw(logits) drawn from the model's logits (OptimizerHooks.after_step). Through self.net,
        as a training step: the fused loss (no full logits) and, with several ranks, all-reduced
        gradients; the drawing pass is one more forward without gradients."""

        def loss_of(x):
            cross_entropy, _ = self.net(x, self.model.draw_labels(x, draw))
            return cross_entropy, cross_entropy

        self.backward(loss_of, inputs)

    def train_step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over this rank's share of the global batch, the optimizer's step, the
        method's after_step (on E and on the optimizer's copies of E's weights), then the
        optimizer's after_step hook; returns (loss, grad norm)."""
        cfg = self.cfg
        set_learning_rate(self.optimizer, lr)
        rows = rank_rows(cfg.train.batch_size, self.d.rank, self.d.world_size)
        inputs, targets = to_device(self.batches.read(self.step, rows), self.d.device)
        loss = self.backward(self.net, inputs, targets)  # net(x, y) -> (cross-entropy, loss)
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        self.optimizer.step()  # every part of a composite optimizer
        self.optimizer.zero_grad(set_to_none=True)
        embedding = self.model.output_embedding
        for weights in (embedding, *self.optimizer_hooks.weight_copies(self.optimizer, embedding)):
            self.model.method.after_step(weights)
        self.optimizer_hooks.after_step(self.optimizer, self.step + 1, partial(self.drawn_backward, inputs))
        return loss, grad_norm

    # --- the loop ----------------------------------------------------------------------------

    def log(self, row: dict, path: str | None = None) -> None:
        if self.d.is_main:
            with open(path or self.files.train_log, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.wandb is not None:
                self.wandb.log(row, step=row["step"])

    def start_wandb(self) -> None:
        if self.cfg.wandb.enabled and self.d.is_main:
            import wandb  # optional: only imported when asked for

            self.wandb = wandb.init(
                project=self.cfg.wandb.project,
                name=self.cfg.run,
                id=self.cfg.run,
                resume="allow",
                config=self.cfg.to_dict(),
            )

    def fit(self) -> int:
        """Train to the end; returns the process exit code."""
        cfg, d = self.cfg, self.d
        self.install_signal_handlers()
        self.start_wandb()
        start = time.perf_counter()
        last_ckpt = last_log_time = start
        last_log_step = self.step
        rates: list[float] = []
        nonfinite = torch.zeros((), dtype=torch.bool, device=d.device)
        status = "completed"
        if d.is_main:
            print(
                f"{cfg.run}: steps {self.step}->{cfg.train.steps}, world {d.world_size}, "
                f"micro-batch {self.micro} x {self.per_rank // self.micro} accumulation, device {d.device}",
                flush=True,
            )
        while self.step < cfg.train.steps:
            lr = learning_rate(cfg.optim, self.step, cfg.train.steps)
            if self.lr_overflows(lr):
                if d.is_main:
                    print(f"step {self.step + 1}: lr {lr:.3e} overflows AdamW's step: diverged", flush=True)
                status = "diverged"
                break
            loss, grad_norm = self.train_step(lr)
            self.step += 1
            nonfinite |= ~torch.isfinite(loss)  # stays on the device until the next sync point
            now = time.perf_counter()
            last = self.step == cfg.train.steps
            if self.step % cfg.train.log_every == 0 or last:
                loss_value = d.mean(loss.clone()).item()
                rate = (self.step - last_log_step) * cfg.tokens_per_step / max(now - last_log_time, 1e-9)
                if last_log_step > 0 or self.step - last_log_step > 1:
                    rates.append(rate)
                mu_norm = self.model.output_embedding.float().mean(dim=0).norm().item()
                row = {
                    "step": self.step,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "mu_norm": mu_norm,
                    "tokens_per_s": rate,
                    "elapsed_s": self.time_before + now - start,
                }
                self.log(row)
                if d.is_main:
                    eta = (cfg.train.steps - self.step) * (now - last_log_time) / (self.step - last_log_step)
                    print(
                        f"step {self.step}/{cfg.train.steps} loss {loss_value:.4f} lr {lr:.3e} "
                        f"{rate:,.0f} tok/s eta {format_eta(eta)}",
                        flush=True,
                    )
                last_log_step, last_log_time = self.step, time.perf_counter()
            if self.val_windows is not None and (self.step % cfg.train.eval_every == 0 or last):
                with self.optimizer_hooks.evaluation_weights(self.optimizer):
                    val, _ = validation_loss(
                        self.net, self.val_windows, cfg.train.eval_batches, cfg.eval.micro_batch, d, self.amp
                    )
                tokens = self.step * cfg.tokens_per_step
                self.log({"step": self.step, "tokens": tokens, "val_loss": val}, self.files.val_log)
            by_time = (
                cfg.train.checkpoint_minutes > 0 and now - last_ckpt >= 60 * cfg.train.checkpoint_minutes
            )
            stop, by_time = d.all_agree(self.stop_signal is not None, by_time)
            by_steps = cfg.train.checkpoint_every > 0 and self.step % cfg.train.checkpoint_every == 0
            if stop or by_time or by_steps or last:
                # A sync point: never let a non-finite model reach a checkpoint.
                (bad,) = d.all_agree(bool(nonfinite.item()) or not self.weights_finite())
                if bad:
                    status = "diverged"
                    break
                if not last or stop:
                    self.save_checkpoint(time.perf_counter() - start)
                    last_ckpt = time.perf_counter()
                if stop:
                    signum = self.stop_signal or signal.SIGTERM
                    if d.is_main:
                        print(f"signal {signum}: checkpoint at step {self.step} saved, exiting", flush=True)
                    return 128 + int(signum)
        train_time = self.time_before + time.perf_counter() - start
        self.finish(status, train_time, rates)
        return 0

    def finish(self, status: str, train_time: float, rates: list[float]) -> None:
        """final.pt (weights only; none for a diverged run), then train.json, both atomic."""
        if not self.d.is_main:
            return
        cfg = self.cfg
        tokens = self.step * cfg.tokens_per_step
        with self.optimizer_hooks.evaluation_weights(self.optimizer):  # schedule-free: the average
            weights = self.model.state_dict() if status == "completed" else None
            checkpoint.save(
                {"model": weights, "status": status, "step": self.step, "config": cfg.to_dict()},
                Path(self.files.final),
            )
        steady = sorted(rates)[len(rates) // 2] if rates else tokens / max(train_time, 1e-9)
        write_json(
            Path(self.files.train_info),
            {
                "status": status,
                "steps": self.step,
                "tokens": tokens,
                "train_time_s": train_time,
                "tokens_per_s": steady,
                "peak_mem_gb": peak_memory_gb(self.d.device),
                "versions": versions(self.d.device),
                "git": git_revision(),
            },
        )
        print(f"{cfg.run}: {status} after {self.step} steps, {train_time:.1f} s of training", flush=True)
        if self.wandb is not None:
            self.wandb.finish()


def train(cfg: RunConfig, out: Path, restart_on_change: bool = False) -> int:
    out.mkdir(parents=True, exist_ok=True)
    status = RunDir(out).status()
    if status in FINISHED and Path(RunDir(out).final).exists():
        print(f"{cfg.run}: already {status}, nothing to do", flush=True)
        return 0
    with process_group() as d:
        return Run(cfg, out, d, restart_on_change).fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument(
        "--on-config-change",
        choices=["refuse", "restart"],
        default="refuse",
        help="checkpoints made with another config: refuse (default) or discard them and start afresh",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        return train(cfg, Path(args.out), restart_on_change=args.on_config_change == "restart")
    except (ConfigError, ShardError, CheckpointError, OSError) as err:  # OSError: e.g. a full disk
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
