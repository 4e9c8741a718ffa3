"""Give a local GPU job its own devices: `python -m workflow.scripts.gpu_slots --gpus N -- CMD ...`.

Snakemake's `--resources gpu=N` limits how many GPUs jobs use at once but does not say which;
this picks N free devices (one lock file per device, held while CMD runs) and sets
CUDA_VISIBLE_DEVICES. Under SLURM (which sets the devices itself) or for N = 0 it just runs CMD.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

LOCK_DIR = Path(os.environ.get("OEC_GPU_LOCK_DIR", "/tmp/oec-gpu-slots"))


def device_count() -> int:
    if os.environ.get("OEC_GPUS"):
        return int(os.environ["OEC_GPUS"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def acquire(n: int, total: int, wait_s: float = 600.0) -> tuple[list[int], list]:
    """Lock n device slots; returns (devices, open lock files)."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        held, handles = [], []
        for device in range(total):
            f = open(LOCK_DIR / f"gpu{device}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            held.append(device)
            handles.append(f)
            if len(held) == n:
                return held, handles
        for f in handles:
            f.close()
        if time.monotonic() > deadline:
            raise SystemExit(f"gpu_slots: {n} of {total} GPUs not free within {wait_s:.0f} s")
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.gpus == 0 or "SLURM_JOB_ID" in os.environ:
        return subprocess.call(command)
    total = device_count()
    if total < args.gpus:
        raise SystemExit(f"gpu_slots: {args.gpus} GPUs asked for, {total} on this machine")
    devices, handles = acquire(args.gpus, total)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, devices)))
    try:
        return subprocess.call(command, env=env)
    finally:
        for f in handles:
            f.close()


if __name__ == "__main__":
    sys.exit(main())
