"""The paper's analysis formulas (docs/protocol.md "Analysis formulas"), on a runs.csv data frame.

For one scale and one member, L(eta) is test_loss at each learning rate.
  best loss = min over eta; best lr = argmin (ties: the smaller lr); runs without a finite loss
  are left out of both.
  LRS = 1/(n-1) sum_eta [min(L(eta), L0) - min L], a run without a finite loss counting as L0.
  relative time = (mean time of the method - mean time of baseline) / mean time of baseline,
  pooling every run of the method at that scale (all its values, lrs and seeds; same tying).
  diverged_1pct: loss more than 1% above the lowest loss of the comparison at that scale and lr.
Several seeds: each table per seed, then mean and std over seeds; best lr and the 1% label come
from the seed-mean curves.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd

from workflow.scripts.experiment import Experiment
from workflow.scripts.runids import Member

TABLES = ("best_loss", "best_lr", "lr_sensitivity", "rel_time")


class MissingMembers(ValueError):
    """Members of a comparison that have no runs in the data."""


def member_rows(runs: pd.DataFrame, member: Member) -> pd.DataFrame:
    mask = [
        member.matches(m, v, t) for m, v, t in zip(runs["method"], runs["value"], runs["tied"], strict=True)
    ]
    return runs[np.array(mask, dtype=bool)]


def select(runs: pd.DataFrame, members: list[Member], source: str = "runs.csv") -> dict[str, pd.DataFrame]:
    """Rows per member; absent members are reported, and all absent is an error."""
    rows = {m.text: member_rows(runs, m) for m in members}
    absent = [name for name, r in rows.items() if r.empty]
    if len(absent) == len(members):
        raise MissingMembers(f"none of the members {', '.join(absent)} has runs in {source}")
    if absent:
        print(f"warning: members {', '.join(absent)} have no runs in {source}; left out", file=sys.stderr)
    return {name: r for name, r in rows.items() if not r.empty}


def finite_loss(rows: pd.DataFrame) -> pd.Series:
    loss = pd.to_numeric(rows["test_loss"], errors="coerce")
    ok = rows["status"].isin(["completed", "published"]) & np.isfinite(loss)
    return loss.where(ok)


def curve(rows: pd.DataFrame, scale: str, seed: int | None) -> pd.Series:
    """L(eta) of one scale (and seed), indexed by lr, NaN where no finite loss."""
    part = rows[rows["scale"] == scale]
    if seed is not None:
        part = part[part["seed"] == seed]
    return finite_loss(part).groupby(part["lr"]).mean().sort_index()


def best_loss(L: pd.Series) -> float:
    return float(L.min()) if L.notna().any() else math.nan


def best_lr(L: pd.Series) -> float:
    """argmin; ties go to the smaller lr (the index is sorted, idxmin takes the first)."""
    return float(L.idxmin()) if L.notna().any() else math.nan


def lr_sensitivity(L: pd.Series, L0: float) -> float:
    if len(L) < 2 or not L.notna().any():
        return math.nan
    capped = L.fillna(L0).clip(upper=L0)
    return float((capped - L.min()).sum() / (len(L) - 1))


def relative_time(runs: pd.DataFrame, member: Member, scale: str, seed: int | None) -> float:
    """Pooled over every run of the member's method at this scale (all values), same tying."""

    def mean_time(method: str) -> float:
        part = runs[(runs["method"] == method) & (runs["scale"] == scale) & (runs["tied"] == member.tied)]
        if seed is not None:
            part = part[part["seed"] == seed]
        times = pd.to_numeric(part["train_time_s"], errors="coerce")
        return float(times[np.isfinite(times)].mean()) if np.isfinite(times).any() else math.nan

    base = mean_time("baseline")
    return (mean_time(member.method) - base) / base if base > 0 else math.nan


def scales_of(runs: pd.DataFrame, experiment: Experiment) -> list[str]:
    """Scales present in the data, ordered by nominal parameters."""
    present = runs["scale"].unique().tolist()

    def params(scale):
        p = experiment.params(scale)
        if p is None:
            p = runs.loc[runs["scale"] == scale, "params"].astype(float).max()
        return p

    return sorted(present, key=params)


def params_of(runs: pd.DataFrame, experiment: Experiment, scale: str) -> float:
    p = experiment.params(scale)
    return p if p is not None else float(runs.loc[runs["scale"] == scale, "params"].astype(float).max())


def compute_tables(
    runs: pd.DataFrame, experiment: Experiment, members: list[Member], source: str = "runs.csv"
):
    """{table: (mean frame, std frame or None)}; frames have columns scale, params, then members."""
    chosen = select(runs, members, source)
    present = [m for m in members if m.text in chosen]
    seeds = sorted(runs["seed"].unique().tolist())
    scales = scales_of(pd.concat(chosen.values()), experiment)
    per_seed = {t: [] for t in TABLES if t != "best_lr"}
    for seed in seeds:
        values = {t: {} for t in per_seed}
        for m in present:
            rows = chosen[m.text]
            for scale in scales:
                L = curve(rows, scale, seed)
                values["best_loss"][(scale, m.text)] = best_loss(L)
                values["lr_sensitivity"][(scale, m.text)] = lr_sensitivity(L, experiment.L0(scale))
                values["rel_time"][(scale, m.text)] = relative_time(runs, m, scale, seed)
        for t in per_seed:
            per_seed[t].append(values[t])
    result = {}

    def frame(get):
        data = [
            {"scale": s, "params": params_of(runs, experiment, s), **{m.text: get(s, m) for m in present}}
            for s in scales
        ]
        return pd.DataFrame(data)

    for t, seed_values in per_seed.items():
        stack = lambda s, m, vs=seed_values: np.array([v[(s, m.text)] for v in vs], dtype=float)  # noqa: E731
        mean = frame(
            lambda s, m, st=stack: float(np.nanmean(st(s, m))) if np.isfinite(st(s, m)).any() else math.nan
        )
        std = frame(
            lambda s, m, st=stack: float(np.nanstd(st(s, m))) if np.isfinite(st(s, m)).any() else math.nan
        )
        result[t] = (mean, std if len(seeds) > 1 else None)
    # best lr from the seed-mean curves
    result["best_lr"] = (frame(lambda s, m: best_lr(curve(chosen[m.text], s, None))), None)
    return {t: result[t] for t in TABLES}


def label_divergence(runs: pd.DataFrame, members: list[Member], source: str = "runs.csv") -> pd.DataFrame:
    """Seed-mean loss per (member, scale, lr) with the v2 `diverged_1pct` label."""
    chosen = select(runs, members, source)
    frames = []
    for name, rows in chosen.items():
        loss = finite_loss(rows)
        g = rows.assign(loss=loss).groupby(["scale", "lr"], as_index=False)["loss"].mean()
        frames.append(g.assign(member=name))
    curves = pd.concat(frames, ignore_index=True)
    lowest = curves.groupby(["scale", "lr"])["loss"].transform("min")
    curves["diverged_1pct"] = ~(curves["loss"] <= 1.01 * lowest)  # non-finite counts as diverged
    return curves
