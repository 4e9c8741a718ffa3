"""The few lines Snakemake prints after a successful run: how the runs ended, where the results are,
and the first comparison's LR-sensitivity table (the experiment's headline) in Markdown."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from trainer.contract import ExperimentDir

HEADLINE = "lr_sensitivity"


def summary(layout: ExperimentDir, comparisons: list[str]) -> str:
    results = Path(layout.path)
    lines = []
    runs_csv = Path(layout.runs_csv)
    if runs_csv.exists():
        counts = pd.read_csv(runs_csv)["status"].value_counts()
        ended = ", ".join(f"{n} {status}" for status, n in counts.items())
        lines.append(f"runs: {ended}  ->  {runs_csv}")
    for kind in ("tables", "figures"):
        folder = results / kind
        if folder.is_dir():
            n = sum(1 for p in folder.rglob("*") if p.suffix in (".md", ".png"))
            lines.append(f"{kind}: {n} in {folder}/<comparison>/")
    if comparisons:
        headline = Path(layout.table(comparisons[0], HEADLINE, "md"))
        if headline.exists():
            lines += [
                "",
                f"{HEADLINE} of comparison {comparisons[0]} ({headline}):",
                headline.read_text().rstrip(),
            ]
    return "\n".join(lines)
