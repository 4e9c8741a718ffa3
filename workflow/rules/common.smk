# The grid, run ids and targets, computed once from the validated experiment file.
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # the repo root: trainer/, data/, workflow/scripts/

from workflow.scripts.grid import ExperimentError, Grid, coerce_numbers
from workflow.scripts.plan import plan, report as plan_text

coerce_numbers(config)
validate(config, "../schemas/experiment.schema.yaml")
try:
    GRID = Grid(config)
except ExperimentError as err:
    raise WorkflowError(f"experiment file: {err}") from None

R = f"results/{config['experiment']}"
PUBLISHED = bool(config.get("published"))
if not PUBLISHED and not GRID.runs:
    raise WorkflowError("experiment file: grids: empty (no runs to train and nothing `published`)")
if not PUBLISHED and "data" not in config:
    raise WorkflowError("experiment file: data: missing (where the shards are, and how to prepare them)")
for _name in GRID.comparisons:
    _absent = GRID.absent_members(_name) if not PUBLISHED else []
    if _absent:
        raise WorkflowError(f"experiment file: comparisons.{_name}: no run of the grids is {', '.join(_absent)}")

TABLES = config["tables"]


wildcard_constraints:
    run=r"[A-Za-z0-9.]+-[a-z]+(-[gc][0-9.e+-]+)?-lr[0-9.e+-]+-s\d+(-tied)?",
    comparison="|".join(GRID.comparisons) or "none",
    table="|".join(TABLES),
    figure="[a-z_]+",


def figures_of(comparison):
    """The experiment's figures that make sense for this comparison."""
    names = []
    for name in config["figures"]:
        if name == "b_ratio_hist" and not any(m.method == "baseline" for m in GRID.comparisons[comparison]):
            continue  # the histogram is of the baseline member
        if name == "train_loss" and PUBLISHED:
            continue  # published runs have no training curves
        names.append(name)
    return names


def figure_targets():
    return [f"{R}/figures/{c}/{f}.{ext}" for c in GRID.comparisons for f in figures_of(c) for ext in ("pdf", "png")]


def table_targets():
    return [f"{R}/tables/{c}/{t}.{ext}" for c in GRID.comparisons for t in TABLES for ext in ("csv", "md", "tex")]


def run_dir(run):
    return f"{R}/runs/{run}"


def scale_of(wildcards):
    return GRID.runs[wildcards.run].key.scale


def plan_report():
    return plan_text(GRID, plan(GRID))
