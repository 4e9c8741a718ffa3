"""The runs.csv schema (docs/design.md "Metric names"): one row per run, ours or imported."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from trainer.files import write_atomic

KEYS = ["run", "scale", "params", "method", "value", "lr", "seed", "tied", "status"]
METRICS = [
    "test_loss",
    "mu_norm",
    "emb_norm_max",
    "emb_norm_mean",
    "emb_norm_min",
    "smin",
    "smax",
    "b_ratio",
    "logit_mean",
    "logit_std",
    "logit_mean_std",
    "logit_std_std",
    "logit_absmean",
    "logit_absmax",
    "lse2",
    "train_time_s",
]
COLUMNS = [*KEYS, *METRICS, "tokens_per_s"]


def write_runs(frame: pd.DataFrame, path: str | Path) -> None:
    """Write with exactly the schema's columns, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, frame.reindex(columns=COLUMNS).to_csv(index=False))


def read_runs(path: str | Path) -> pd.DataFrame:
    frame = pd.read_csv(path)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a runs.csv (missing columns: {', '.join(missing)})")
    frame["tied"] = frame["tied"].astype(str).str.lower().isin(["true", "1"])
    frame["seed"] = frame["seed"].astype(int)
    frame["lr"] = frame["lr"].astype(float)
    frame["value"] = pd.to_numeric(frame["value"], errors="coerce")
    frame["scale"] = frame["scale"].astype(str)
    return frame
