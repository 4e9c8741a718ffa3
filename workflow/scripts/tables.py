"""Paper tables for one comparison: best_loss, best_lr, lr_sensitivity, rel_time as .csv, .md, .tex.

    python -m workflow.scripts.tables --runs runs.csv --experiment config/paper.yaml \
        --comparison main --out-dir results/paper/tables/main [--only lr_sensitivity]

Rows are scales (by nominal N), columns the members as the experiment file writes them.
LaTeX rows follow the paper: `16000000 & 0.306 & 0.054 & 0.031 & 0.028`, joined by ` \\\\ `.
With several seeds the cells are mean +- std (the .csv holds the mean; <table>.std.csv the std).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from trainer.files import write_atomic
from workflow.scripts.analysis import TABLES, MissingMembers, compute_tables
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
}


def cell(table: str, mean: float, std: float | None, tex: bool) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    text = FORMATS[table](mean)
    if std is not None and not math.isnan(std):
        text += (" $\\pm$ " if tex else " ± ") + FORMATS[table](std).rstrip("%")
    return text.replace("%", "\\%") if tex else text


def params_text(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def to_tex(table: str, mean: pd.DataFrame, std: pd.DataFrame | None) -> str:
    members = list(mean.columns[2:])
    rows = []
    for i, r in mean.iterrows():
        cells = [cell(table, r[m], None if std is None else std.loc[i, m], tex=True) for m in members]
        rows.append(" & ".join([params_text(r["params"]), *cells]))
    return " \\\\\n".join(rows) + "\n"


def to_markdown(table: str, mean: pd.DataFrame, std: pd.DataFrame | None) -> str:
    members = list(mean.columns[2:])
    lines = ["| scale | params | " + " | ".join(members) + " |", "|" + "---|" * (len(members) + 2)]
    for i, r in mean.iterrows():
        cells = [cell(table, r[m], None if std is None else std.loc[i, m], tex=False) for m in members]
        lines.append(f"| {r['scale']} | {params_text(r['params'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(out_dir: Path, table: str, mean: pd.DataFrame, std: pd.DataFrame | None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{table}.{ext}" for ext in ("csv", "md", "tex")]
    write_atomic(paths[0], mean.to_csv(index=False))
    write_atomic(paths[1], to_markdown(table, mean, std))
    write_atomic(paths[2], to_tex(table, mean, std))
    if std is not None:
        write_atomic(out_dir / f"{table}.std.csv", std.to_csv(index=False))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = comparison_arguments(__doc__.splitlines()[0])
    parser.add_argument("--only", choices=TABLES, nargs="*", help="write only these tables")
    args = parser.parse_args(argv)
    experiment = Experiment.load(args.experiment)
    try:
        tables = compute_tables(
            read_runs(args.runs), experiment, experiment.comparison(args.comparison), args.runs
        )
    except (MissingMembers, KeyError, ValueError) as err:
        print(f"error: comparison {args.comparison}: {err}", file=sys.stderr)
        return 2
    for table in args.only or TABLES:
        mean, std = tables[table]
        write_table(Path(args.out_dir), table, mean, std)
    print(f"{args.out_dir}: {', '.join(args.only or TABLES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
