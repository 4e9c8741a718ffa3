"""Collect finished runs into runs.csv.

    python -m workflow.scripts.aggregate --experiment config/demo.yaml --runs-dir results/demo/runs \
        --runs RUN_ID ... --out results/demo/runs.csv

Each run's eval.json and train.json give the metrics; the run id gives the coordinates and its
config.yaml the value of each axis the experiment sweeps. A run that is asked for but has no
eval.json is listed with status `missing`, never dropped; a completed run without a metric of
runs.csv is an error that names the run and the metric.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd
import yaml

from trainer.config import axis_default, check_axis_value
from trainer.contract import COMPLETED, MISSING, RUNS_EVAL_METRICS, TRAIN_METRICS, RunDir
from workflow.scripts.experiment import Experiment
from workflow.scripts.runids import RunKey, parse_run_id
from workflow.scripts.runscsv import METRICS, write_runs


def read_json(path: str) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def axis_values(run: RunDir, key: RunKey, axes: list[str]) -> dict:
    """The run's value of each swept key, from its resolved config (a default where it has none);
    from the run id for a run never configured."""
    if not axes:
        return {}
    if not Path(run.config).exists():
        return {k: key.axis_value(k) for k in axes}
    config = yaml.safe_load(Path(run.config).read_text())
    values = {}
    for key in axes:
        section, _, name = key.partition(".")
        raw = (config.get(section) or {}).get(name)
        values[key] = axis_default(key) if raw is None else check_axis_value(key, raw)
    return values


def run_row(run_dir: Path, experiment: Experiment) -> dict:
    key = parse_run_id(run_dir.name)
    run = RunDir(run_dir)
    row = {
        "run": key.run_id,
        "scale": key.scale,
        "params": experiment.params(key.scale),
        "method": key.method,
        "value": key.value,
        "lr": key.lr,
        "seed": key.seed,
        "tied": key.tied,
        **axis_values(run, key, experiment.axes),
    }
    evaluation = read_json(run.evaluation)
    train = read_json(run.train_info) or {}
    if evaluation is None:
        return {**row, "status": MISSING, **dict.fromkeys([*METRICS, *TRAIN_METRICS], math.nan)}
    row["status"] = evaluation.get("status", train.get("status", COMPLETED))
    for metric in RUNS_EVAL_METRICS:
        if row["status"] == COMPLETED and metric not in evaluation:
            raise ValueError(
                f"run {key.run_id}: {run.evaluation} has no {metric} (evaluated by an older trainer?)"
            )
        row[metric] = evaluation.get(metric, math.nan)
    for metric in TRAIN_METRICS:
        row[metric] = train.get(metric, math.nan)
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
    experiment = Experiment.load(args.experiment)
    try:
        frame = aggregate([runs_dir / i for i in ids], experiment)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_runs(frame, args.out, experiment.axes)
    missing = int((frame["status"] == MISSING).sum()) if len(frame) else 0
    print(f"{args.out}: {len(frame)} runs ({missing} missing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
