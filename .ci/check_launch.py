"""CI: a run given too short a time limit still completes through SLURM requeues (trainer.tools.launch),
and its final weights equal those of an uninterrupted run. Needs the CI cluster and data/demo."""

import subprocess
import sys
from pathlib import Path

import torch
import yaml

RUN = {
    "run": "launch-check",
    "data": {
        "dir": str(Path("data/demo").resolve()),
        "train_pattern": "demo_train_*.bin",
        "val_pattern": "demo_val_*.bin",
    },
    "model": {"n_layer": 2, "n_embd": 64, "vocab_size": 320, "seq_len": 64},
    "optim": {"lr": 3.0e-3, "warmup": 20},
    "train": {
        "steps": 4000,
        "batch_size": 16,
        "dtype": "float32",
        "checkpoint_every": 0,
        "checkpoint_minutes": 0,
        "log_every": 50,
    },
}


def prepare(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(RUN))
    return directory / "config.yaml"


def main() -> int:
    root = Path(sys.argv[1]).resolve()
    reference, launched = root / "reference", root / "launched"
    subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(prepare(reference)), "--out", str(reference)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run([sys.executable, "-m", "trainer.tools.launch", "--config", str(prepare(launched)), "--out", str(launched),
                    "--gpus", "0", "--time", "1", "--signal-delay", "30", "--max-requeues", "30", "--cpus", "1",
                    "--mem-gb", "2", "--partition", "debug", "--account", "root", "--wait"], check=True)  # fmt: skip
    logs = sorted((launched / "submitit").rglob("*_log.out"))
    resumed = sum(path.read_text().count("resumed from") for path in logs)
    a = torch.load(reference / "final.pt", weights_only=True)["model"]
    b = torch.load(launched / "final.pt", weights_only=True)["model"]
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(
        f"launch check: {resumed} resumes after requeues, final weights {'identical' if same else 'DIFFERENT'}"
    )
    return 0 if same and resumed >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
