"""Import the paper's per-run CSVs into the runs.csv schema.

    python -m workflow.scripts.import_published --csv published/v1/loss_overview_all.csv [...] \
        --experiment config/published.yaml --out results/published/runs.csv

Run names (docs/protocol.md "Published result files"): wor{scale}0{variant}-{size}-13p1B-100k-bs64-lr{lr / 1e-4}-{method}-g{value:.0e}-s{seed};
a `wt` suffix on the method means tied embeddings. Columns map as docs/design.md "Metric names"; units are kept.
Several files may be given: a run present in more than one keeps its first row.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from trainer.contract import PUBLISHED
from workflow.scripts.experiment import Experiment
from workflow.scripts.runids import RunKey, method_param
from workflow.scripts.runscsv import write_runs

NAME = re.compile(
    r"^wor(?P<code>.)0(?P<variant>.)-(?P<size>[^-]+)-13p1B-100k-bs64-lr(?P<lr>\d+)-(?P<method>[a-z]+?)(?P<wt>wt)?"
    r"-g(?P<value>[0-9.e+-]+)-s(?P<seed>\d+)$"
)
METHODS = {  # the paper's method names -> ours (a test checks these against the registry)
    "baseline": "baseline",
    "zloss": "zloss",
    "muloss": "muloss",
    "mucentering": "mucentering",
    "softcapping": "softcap",
}
COLUMN_MAP = {
    "test_loss": "test_loss",
    "O.mu norm": "mu_norm",
    "O.max norm": "emb_norm_max",
    "O.avg norm": "emb_norm_mean",
    "O.min norm": "emb_norm_min",
    "O.Smin": "smin",
    "O.Smax": "smax",
    "O.centering_ratio": "b_ratio",
    "O.logits_mean_mean": "logit_mean",
    "O.logits_mean_std": "logit_std",
    "O.logits_std_mean": "logit_mean_std",
    "O.logits_std_std": "logit_std_std",
    "O.logits_mean_absmean": "logit_absmean",
    "O.logits_mean_absmax": "logit_absmax",
    "H.mean_logsqZ": "lse2",
    "time": "train_time_s",
}
TOKENS_PER_RUN = 100_000 * 64 * 2048  # 13.1B tokens: 100k steps of 64 x 2048


class PublishedFormatError(ValueError):
    """A file that is not in the paper's format: the message names the file and the row."""


def decode_name(name: str, source: str) -> RunKey:
    m = NAME.match(name)
    if not m or m["method"] not in METHODS:
        raise PublishedFormatError(f"{source}: cannot decode run name {name!r}")
    method = METHODS[m["method"]]
    value = float(m["value"]) if method_param(method) else None
    lr = float(
        f"{int(m['lr'])}e-4"
    )  # lr in units of 1e-4, without binary noise (3e-4, not 3.0000000000000003e-4)
    return RunKey(m["size"], method, value, lr, int(m["seed"]), m["wt"] == "wt")


def import_file(path: Path, experiment: Experiment) -> pd.DataFrame:
    table = pd.read_csv(path)
    if "name" not in table.columns or "test_loss" not in table.columns:
        raise PublishedFormatError(f"{path}: no 'name' and 'test_loss' columns; not a published result file")
    rows = []
    for _, row in table.iterrows():
        key = decode_name(str(row["name"]), str(path))
        params = experiment.params(key.scale)
        if params is None:  # the size in the name is the nominal N, e.g. 16M
            params = float(key.scale.rstrip("M")) * 1e6
        out = {
            "run": key.run_id,
            "scale": key.scale,
            "params": params,
            "method": key.method,
            "value": key.value,
            "lr": key.lr,
            "seed": key.seed,
            "tied": key.tied,
            "status": PUBLISHED,
        }
        for column, metric in COLUMN_MAP.items():
            out[metric] = (
                pd.to_numeric(row[column], errors="coerce") if column in table.columns else float("nan")
            )
        out["tokens_per_s"] = (
            TOKENS_PER_RUN / out["train_time_s"] if out["train_time_s"] > 0 else float("nan")
        )
        rows.append(out)
    return pd.DataFrame(rows)


def import_published(paths: list[Path], experiment: Experiment) -> pd.DataFrame:
    frames = [import_file(p, experiment) for p in paths]
    return pd.concat(frames, ignore_index=True).drop_duplicates(subset="run", keep="first")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", nargs="+", required=True, help="published result files")
    parser.add_argument("--experiment", required=True, help="experiment file (scales: params)")
    parser.add_argument("--out", required=True, help="runs.csv to write")
    args = parser.parse_args(argv)
    try:
        frame = import_published([Path(p) for p in args.csv], Experiment.load(args.experiment))
    except (PublishedFormatError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_runs(frame, args.out)
    print(f"{args.out}: {len(frame)} runs from {len(args.csv)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
