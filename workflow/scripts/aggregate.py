"""Collect finished runs into runs.csv.

    python -m workflow.scripts.aggregate --experiment config/demo.yaml --runs-dir results/demo/runs \
        --runs RUN_ID ... --out results/demo/runs.csv

Each run's eval.json and train.json give the metrics; the run id gives the coordinates. A run
that is asked for but has no eval.json is listed with status `missing`, never dropped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from workflow.scripts.experiment import Experiment
from workflow.scripts.runids import parse_run_id
from workflow.scripts.runscsv import METRICS, write_runs


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def run_row(run_dir: Path, experiment: Experiment) -> dict:
    key = parse_run_id(run_dir.name)
    row = {
        "run": key.run_id,
        "scale": key.scale,
        "params": experiment.params(key.scale),
        "method": key.method,
        "value": key.value,
        "lr": key.lr,
        "seed": key.seed,
        "tied": key.tied,
    }
    evaluation = read_json(run_dir / "eval.json")
    train = read_json(run_dir / "train.json") or {}
    if evaluation is None:
        return {**row, "status": "missing", **dict.fromkeys(METRICS, math.nan), "tokens_per_s": math.nan}
    row["status"] = evaluation.get("status", train.get("status", "completed"))
    for metric in METRICS:
        row[metric] = evaluation.get(metric, math.nan)
    row["train_time_s"] = train.get("train_time_s", math.nan)
    row["tokens_per_s"] = train.get("tokens_per_s", math.nan)
    return row


def aggregate(run_dirs: list[Path], experiment: Experiment) -> pd.DataFrame:
    return pd.DataFrame([run_row(d, experiment) for d in run_dirs])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--runs-dir", required=True, help="folder of the run directories")
    parser.add_argument("--runs", nargs="*", help="run ids (default: every run directory in --runs-dir)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    runs_dir = Path(args.runs_dir)
    ids = args.runs if args.runs else sorted(p.name for p in runs_dir.iterdir() if p.is_dir())
    try:
        frame = aggregate([runs_dir / i for i in ids], Experiment.load(args.experiment))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_runs(frame, args.out)
    missing = int((frame["status"] == "missing").sum()) if len(frame) else 0
    print(f"{args.out}: {len(frame)} runs ({missing} missing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
