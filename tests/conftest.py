"""Shared fixtures: tiny token shards and tiny run configs that train in seconds on a CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainer.shards import write_shard
from trainer.train import STOP_SIGNALS

REPO = Path(__file__).resolve().parent.parent
TINY_VOCAB = 64


def token_stream(n: int, seed: int = 0) -> np.ndarray:
    """A learnable stream: a random walk over the vocabulary (the next token is near the last)."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.integers(-2, 3, size=n)) % TINY_VOCAB


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_data")
    write_shard(directory / "tiny_val_000000.bin", token_stream(20_000, seed=0))
    for i in (1, 2, 3):
        write_shard(directory / f"tiny_train_{i:06d}.bin", token_stream(50_000 + 1000 * i, seed=i))
    return directory


def tiny_config(data_dir: Path, run: str = "tiny", **sections) -> dict:
    """A run config dict for a 2-layer model; `sections` override keys per section."""
    cfg = {
        "run": run,
        "seed": 1,
        "data": {"dir": str(data_dir), "train_pattern": "tiny_train_*.bin", "val_pattern": "tiny_val_*.bin"},
        "model": {"n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": TINY_VOCAB, "seq_len": 16},
        "method": {"name": "baseline"},
        "optim": {"lr": 1e-2, "min_lr": 1e-4, "warmup": 2},
        "train": {
            "steps": 12,
            "batch_size": 8,
            "micro_batch": "auto",
            "dtype": "float32",
            "compile": False,
            "checkpoint_every": 4,
            "checkpoint_minutes": 0,
            "log_every": 1,
        },
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def child_env() -> dict:
    """One thread per process: deterministic, and light on a 2-core CI machine."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def run_trainer(config: Path, out: Path, *, nproc: int = 1, check: bool = True, cpu: bool = False):
    args = ("--config", str(config), "--out", str(out))
    return run_module("trainer.train", *args, nproc=nproc, check=check, cpu=cpu)


def run_module(module: str, *args: str, nproc: int = 1, check: bool = True, cpu: bool = False):
    """`python -m module args` (or under torchrun with nproc processes) from the repo root.

    cpu=True hides any GPU, so that a run compares exactly with a multi-process (gloo) one."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
        ]
        cmd = [*launcher, "-m", module, *args]
    env = child_env()
    if cpu or nproc > 1:  # several processes run on gloo, on the CPU, whatever GPUs there are
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def in_process():
    """Training in this process: one thread (as the subprocess runs; fast on a busy CI machine),
    and pytest gets its signal handlers back from the trainer's."""
    threads = torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


TINY_EVAL = {"batches": 6, "micro_batch": 4, "logit_batches": 3}


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, tiny_data) -> dict[str, Path]:
    """Tiny finished runs: baseline (untied), mucentering (tied), kept checkpoints at 4 and 8."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, method, tied in [
        ("baseline", {"name": "baseline"}, False),
        ("mucentering", {"name": "mucentering"}, True),
    ]:
        run = root / name
        cfg = tiny_config(tiny_data, run=name, method=method, model={"tied": tied}, eval=TINY_EVAL)
        run_trainer(write_config(run / "config.yaml", cfg), run)
        runs[name] = run
    return runs


PUBLISHED_FILES = ("v1/loss_overview.csv", "v1/loss_overview_all.csv", "v2/loss_overview_all.csv",
                   "v2/loss_overview_all.wt.csv")  # fmt: skip
PUBLISHED_DOWNLOAD = REPO / "resources" / "published"  # where the published experiment downloads them


@pytest.fixture(scope="session")
def published_dir() -> Path:
    """The paper's own per-run CSVs: third-party data that the repository does not ship. Read from
    $PUBLISHED_DIR (CI sets it), else from the pinned download of the published experiment; the
    tests that replay them are skipped, saying how to get them, where neither is there."""
    if "PUBLISHED_DIR" in os.environ:
        path = Path(os.environ["PUBLISHED_DIR"])
        missing = [f for f in PUBLISHED_FILES if not (path / f).exists()]
        if missing:  # asked for explicitly: a wrong folder is an error, not a skip
            pytest.fail(f"PUBLISHED_DIR={path} lacks {', '.join(missing)}")
        return path
    if all((PUBLISHED_DOWNLOAD / f).exists() for f in PUBLISHED_FILES):
        return PUBLISHED_DOWNLOAD
    pytest.skip(
        "the paper's published CSVs are not here (third-party data, not shipped): set "
        "PUBLISHED_DIR=/path/to/published (with v1/, v2/), or download them once with "
        "`snakemake --cores 1 --configfile config/published.yaml`"
    )


PAPER_SCALES_YAML = """
experiment: published
scales:
  16M: {params: 16000000, L0: 10.83}
  29M: {params: 29000000, L0: 10.83}
  57M: {params: 57000000, L0: 10.83}
  109M: {params: 109000000, L0: 10.83}
  221M: {params: 221000000, L0: 10.85}
comparisons:
  main: [baseline, "zloss:1e-4", "muloss:1e-4", mucentering]
  main_v2: [baseline, "softcap:30", "zloss:1e-4", "muloss:1e-4", mucentering]
  muloss_lambda: ["muloss:1e-7", "muloss:1e-4", "muloss:1e-1", "muloss:1e2"]
  zloss_lambda: ["zloss:1e-7", "zloss:1e-4", "zloss:1e-1", "zloss:1e2"]
  tied: [baseline@tied, "softcap:30@tied", "zloss:1e-4@tied", "muloss:1e-4@tied", mucentering@tied]
  centering_ratio: [baseline, "muloss:1e-1", mucentering]
"""


@pytest.fixture(scope="session")
def paper_experiment(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("experiment") / "published.yaml"
    path.write_text(PAPER_SCALES_YAML)
    return path
