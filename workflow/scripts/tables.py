"""Paper tables for one comparison: best_loss, best_lr, lr_sensitivity, rel_time as .csv, .md, .tex.

    python -m workflow.scripts.tables --runs runs.csv --experiment config/paper.yaml \
        --comparison main --out-dir results/paper/tables/main [--only lr_sensitivity]

Rows are scales (by nominal N), or the values of the comparison's rows axis; columns the members
as the experiment file writes them. best_lr is the best value of the over axis (lr by default).
LaTeX rows follow the paper: `16000000 & 0.306 & 0.054 & 0.031 & 0.028`, joined by ` \\\\ `
(a rows axis other than scale: its value first).
With several seeds the cells are mean +- std (the .csv holds the mean; <table>.std.csv the std).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from trainer.files import write_atomic
from workflow.scripts.analysis import TABLES, MissingMembers, axis_text, compute_tables, row_columns
from workflow.scripts.experiment import Experiment, comparison_arguments
from workflow.scripts.runscsv import read_runs


def format_lr(x: float) -> str:
    """1e-2, 3e-3: the paper's spelling of learning rates."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


FORMATS = {
    "best_loss": lambda x: f"{x:.2f}",
    "best_lr": format_lr,
    "lr_sensitivity": lambda x: f"{x:.3f}",
    "rel_time": lambda x: f"{100 * x:.1f}%",
    "ranking": lambda x: f"{x:.0f}",
}


def formatter(table: str, over: str = "lr"):
    """best_lr holds the best value of the over axis: an lr in the paper's spelling, else plain."""
    return (lambda x: f"{x:g}") if table == "best_lr" and over != "lr" else FORMATS[table]


def cell(form, mean: float, std: float | None, tex: bool) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = form(mean)
    if std is not None and not math.isnan(std):
        text += (" $\\pm$ " if tex else " ± ") + form(std).rstrip("%")
    return text.replace("%", "\\%") if tex else text


def params_text(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def leading_cells(r: pd.Series, axis: str) -> list[str]:
    """A row's first cells: its scale and nominal N, or its value of the rows axis."""
    return [r["scale"], params_text(r["params"])] if axis == "scale" else [axis_text(axis, r[axis])]


def body(table: str, mean: pd.DataFrame, std: pd.DataFrame | None, over: str, tex: bool):
    """(leading cells, member cells) per row."""
    axis = mean.columns[0]
    members = list(mean.columns[len(row_columns(axis)) :])
    form = formatter(table, over)
    for i, r in mean.iterrows():
        cells = [cell(form, r[m], None if std is None else std.loc[i, m], tex=tex) for m in members]
        yield leading_cells(r, axis), cells


def to_tex(table: str, mean: pd.DataFrame, std: pd.DataFrame | None, over: str = "lr") -> str:
    # the paper's rows start with N, not the scale's name
    rows = [" & ".join([lead[-1], *cells]) for lead, cells in body(table, mean, std, over, tex=True)]
    return " \\\\\n".join(rows) + "\n"


def to_markdown(table: str, mean: pd.DataFrame, std: pd.DataFrame | None, over: str = "lr") -> str:
    lines = ["| " + " | ".join(mean.columns) + " |", "|" + "---|" * len(mean.columns)]
    lines += [
        "| " + " | ".join([*lead, *cells]) + " |" for lead, cells in body(table, mean, std, over, tex=False)
    ]
    return "\n".join(lines) + "\n"


def write_table(
    out_dir: Path, table: str, mean: pd.DataFrame, std: pd.DataFrame | None, over: str = "lr"
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{table}.{ext}" for ext in ("csv", "md", "tex")]
    write_atomic(paths[0], mean.to_csv(index=False))
    write_atomic(paths[1], to_markdown(table, mean, std, over))
    write_atomic(paths[2], to_tex(table, mean, std, over))
    if std is not None:
        write_atomic(out_dir / f"{table}.std.csv", std.to_csv(index=False))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = comparison_arguments(__doc__.splitlines()[0])
    parser.add_argument("--only", choices=TABLES, nargs="*", help="write only these tables")
    args = parser.parse_args(argv)
    experiment = Experiment.load(args.experiment)
    try:
        comparison = experiment.comparison(args.comparison)
        tables = compute_tables(read_runs(args.runs), experiment, comparison, args.runs)
    except (MissingMembers, KeyError, ValueError) as err:
        print(f"error: comparison {args.comparison}: {err}", file=sys.stderr)
        return 2
    for table in args.only or TABLES:
        mean, std = tables[table]
        write_table(Path(args.out_dir), table, mean, std, comparison.over)
    print(f"{args.out_dir}: {', '.join(args.only or TABLES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
