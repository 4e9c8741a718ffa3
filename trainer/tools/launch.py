"""Submit one run outside the DAG: `python -m trainer.tools.launch --config RUN/config.yaml --out RUN`.

For debugging a single configuration. submitit submits it to SLURM when `sbatch` is there and
runs it as a local process otherwise. The trainer runs as a child process; on a timeout or a
preemption SLURM signals both, the trainer saves a checkpoint, and the job requeues itself
(submitit's checkpointing hook) and resumes from it, up to --max-requeues times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

from trainer.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
INTERRUPTED = {128 + signal.SIGUSR1, 128 + signal.SIGUSR2, 128 + signal.SIGTERM}
REQUEUE_GRACE_S = 60
CHECKPOINT_WAIT_S = 60  # checkpoints are atomic: a requeue after this resumes from the newest whole one


def trainer_command(config: str, out: str, gpus: int) -> list[str]:
    if gpus > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    else:
        launcher = [sys.executable]
    return [*launcher, "-m", "trainer.train", "--config", config, "--out", out]


class TrainJob(submitit.helpers.Checkpointable):
    """The submitted callable: runs the trainer; on a requeue signal, lets it checkpoint first."""

    def __init__(self, config: str, out: str, gpus: int):
        self.config, self.out, self.gpus = config, out, gpus
        self.child: subprocess.Popen | None = None

    def __call__(self) -> int:
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        )
        self.child = subprocess.Popen(trainer_command(self.config, self.out, self.gpus), cwd=REPO, env=env)
        # Poll rather than wait(): a signal handler that runs inside Popen.wait() and waits on the
        # same child would deadlock on Popen's internal lock.
        while (code := self.child.poll()) is None:
            time.sleep(0.5)
        if code in INTERRUPTED:
            # The trainer saw SLURM's signal first and saved a checkpoint; submitit's own handler
            # of the same signal is about to requeue this job (and end this process).
            time.sleep(REQUEUE_GRACE_S)
        if code != 0:
            raise RuntimeError(f"trainer exited with {code}; its output is in the job's log")
        return code

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # SLURM's warning before the time limit (or a preemption): the trainer saves a
        # checkpoint on SIGUSR2 and exits; the requeued job resumes from it.
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + CHECKPOINT_WAIT_S
            while self.child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.out, self.gpus))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run config (YAML)")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs for the run (0: CPU)")
    parser.add_argument("--time", type=int, default=240, help="time limit per attempt, minutes")
    parser.add_argument("--cpus", type=int, default=8, help="CPUs per task")
    parser.add_argument("--mem-gb", type=int, default=64)
    parser.add_argument("--max-requeues", type=int, default=10, help="timeouts/preemptions to resume from")
    parser.add_argument("--signal-delay", type=int, default=90, help="seconds before the limit to checkpoint")
    parser.add_argument("--wait", action="store_true", help="wait for the run to finish")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cluster = "slurm" if shutil.which("sbatch") else "local"
    executor = submitit.AutoExecutor(
        folder=out / "submitit" / "%j", cluster=cluster, slurm_max_num_timeout=args.max_requeues
    )
    parameters = {
        "name": cfg.run,
        "timeout_min": args.time,
        "cpus_per_task": args.cpus,
        "mem_gb": args.mem_gb,
    }
    if cluster == "slurm":
        parameters.update(slurm_signal_delay_s=args.signal_delay)
        parameters.update(
            {k: v for k, v in (("slurm_partition", args.partition), ("slurm_account", args.account)) if v}
        )
        if args.gpus:
            parameters["gpus_per_node"] = args.gpus
    executor.update_parameters(**parameters)
    job = executor.submit(TrainJob(str(Path(args.config).resolve()), str(out), args.gpus))
    print(f"{cfg.run}: submitted job {job.job_id} ({cluster}); logs in {out / 'submitit'}", flush=True)
    if args.wait:
        job.result()
        print(f"{cfg.run}: job {job.job_id} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
