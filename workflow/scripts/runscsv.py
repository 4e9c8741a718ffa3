"""The runs.csv schema (docs/design.md "Metric names"): one row per run, ours or imported.

Columns: the run's coordinates (KEYS), one column per axis the experiment sweeps (named by its
run-config key, e.g. `optim.schedule`, between `tied` and `status`), the metrics.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from trainer.config import AXES, axis_type
from trainer.contract import RUNS_EVAL_METRICS
from trainer.files import write_atomic

KEYS = ["run", "scale", "params", "method", "value", "lr", "seed", "tied", "status"]
METRICS = [*RUNS_EVAL_METRICS, "train_time_s"]
COLUMNS = [*KEYS, *METRICS, "tokens_per_s"]


def columns(axes=()) -> list[str]:
    """The columns of a runs.csv whose experiment sweeps these run-config keys."""
    return [*KEYS[:-1], *axes, *COLUMNS[len(KEYS) - 1 :]]


def write_runs(frame: pd.DataFrame, path: str | Path, axes=()) -> None:
    """Write with exactly the schema's columns, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, frame.reindex(columns=columns(axes)).to_csv(index=False))


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
    for key in (c for c in frame.columns if c in AXES):
        kind = axis_type(key)
        if kind == "bool":
            frame[key] = frame[key].astype(str).str.lower().isin(["true", "1"])
        else:
            frame[key] = frame[key].astype({"int": int, "float": float, "str": str}[kind])
    return frame
