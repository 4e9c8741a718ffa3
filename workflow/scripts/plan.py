"""What is left to do: jobs per rule and scale, GPU-hours from the scales' throughput, finished runs.

    snakemake plan [--configfile config/paper.yaml]
    python -m workflow.scripts.plan --configfile config/paper.yaml

Reads only the experiment file and the run directories (no DAG), so it takes well under a
second for the 560-run paper grid.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path

from trainer.contract import RunDir
from workflow.scripts.grid import ExperimentError, Grid, load

RULES = ("configure_run", "train_run", "evaluate")


def plan(grid: Grid, root: Path = Path(".")) -> dict:
    jobs = defaultdict(Counter)  # rule -> scale -> jobs left
    hours = Counter()  # scale -> GPU-hours left
    finished = Counter()
    states = {}
    for run_id, run in grid.runs.items():
        state = RunDir(root / grid.run_dir(run_id)).state()
        states[run_id] = state
        scale = run.key.scale
        if state == "finished":
            finished[scale] += 1
            continue
        if state == "new":
            jobs["configure_run"][scale] += 1
        if state in ("new", "configured", "started"):
            jobs["train_run"][scale] += 1
            hours[scale] += grid.gpu_hours(run_id)  # a started run is counted whole: an upper bound
        jobs["evaluate"][scale] += 1
    comparisons = {}
    for name in grid.comparisons:
        ids = grid.members_runs(name)
        left = [i for i in ids if states[i] in ("new", "configured", "started")]
        comparisons[name] = {
            "runs": len(ids),
            "to_train": len(left),
            "gpu_hours": sum(grid.gpu_hours(i) for i in left),
        }
    return {
        "jobs": jobs,
        "gpu_hours": hours,
        "finished": finished,
        "comparisons": comparisons,
        "runs": len(grid.runs),
    }


def report(grid: Grid, result: dict) -> str:
    scales = list(grid.scales)
    width = max(14, *(len(s) + 2 for s in scales))
    lines = [
        f"experiment {grid.experiment}: {result['runs']} runs, {sum(result['finished'].values())} finished"
    ]
    lines.append("jobs left".ljust(16) + "".join(s.rjust(width) for s in scales) + "total".rjust(width))
    for rule in RULES:
        counts = result["jobs"][rule]
        lines.append(
            rule.ljust(16)
            + "".join(str(counts[s]).rjust(width) for s in scales)
            + str(sum(counts.values())).rjust(width)
        )
    finished = result["finished"]
    lines.append(
        "finished runs".ljust(16)
        + "".join(str(finished[s]).rjust(width) for s in scales)
        + str(sum(finished.values())).rjust(width)
    )
    hours = result["gpu_hours"]

    def h(x):
        return "?" if math.isnan(x) else f"{x:,.1f}"

    gpu = grid.config.get("throughput_gpu")
    if gpu:
        lines.append(f"GPU-hours at the scales' throughput, measured on {gpu}:")
    lines.append(
        "GPU-hours left".ljust(16)
        + "".join(h(hours[s]).rjust(width) for s in scales)
        + h(sum(hours.values())).rjust(width)
    )
    for name, c in result["comparisons"].items():
        lines.append(
            f"comparison {name}: {c['runs']} runs, {c['to_train']} to train, {h(c['gpu_hours'])} GPU-hours"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configfile", default="config/demo.yaml")
    args = parser.parse_args(argv)
    try:
        grid = load(args.configfile)
    except ExperimentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report(grid, plan(grid)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
