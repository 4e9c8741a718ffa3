"""The paper's analysis formulas (docs/protocol.md "Analysis formulas"), on a runs.csv data frame.

A comparison's tables have one row per value of its rows axis (scale by default) and one column
per member. For one row value and one member, L(x) is test_loss at each value x of the over axis
(the learning rate eta by default).
  best loss = min over x; best lr = argmin (ties: the smaller x); runs without a finite loss
  are left out of both.
  LRS = 1/(n-1) sum_x [min(L(x), L0) - min L], a run without a finite loss counting as L0 (the
  L0 of the member's scale at that row value).
  relative time = (mean time of the member's pool - mean time of the reference's) / the latter.
  A pool is every run of the method at that row value with the member's pins (all its values,
  lrs and seeds), same tying; the reference (default baseline: a member's label, else a member
  as written) takes the member's tying and pinned axes where it sets none of its own.
  diverged_1pct: loss more than 1% above the lowest loss of the comparison at that row value
  and over value.
  ranking: each member's place by best loss within a row (1 = lowest).
Several seeds: each table per seed, then mean and std over seeds; best lr and the 1% label come
from the seed-mean curves.
A curve point must not average runs of different configurations: within one row value, over
value and seed, a member's runs may differ in no other axis (ValueError otherwise).
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd

from trainer.config import AXES, axis_type
from trainer.contract import COMPLETED, PUBLISHED
from workflow.scripts.experiment import Comparison, Experiment
from workflow.scripts.runids import Member, fmt, format_axis_value

TABLES = ("best_loss", "best_lr", "lr_sensitivity", "rel_time", "ranking")


class MissingMembers(ValueError):
    """Members of a comparison that have no runs in the data."""


def member_rows(runs: pd.DataFrame, member: Member) -> pd.DataFrame:
    pinned = {key: runs[key].tolist() for key, _ in member.pins}  # a pin on `scale` reads its column
    mask = [
        member.matches(m, v, t, lambda key, i=i: pinned[key][i])
        for i, (m, v, t) in enumerate(zip(runs["method"], runs["value"], runs["tied"], strict=True))
    ]
    return runs[np.array(mask, dtype=bool)]


def check_over(comparison: Comparison) -> None:
    """The best value is a minimum over numbers, and the figures draw them on an x axis."""
    over = comparison.over
    if over != "lr" and (over not in AXES or axis_type(over) not in ("int", "float")):
        raise ValueError(f"over: {over!r} is not a numeric axis (lr, or an int or float run-config key)")


def check_columns(runs: pd.DataFrame, comparison: Comparison, source: str) -> None:
    pinned = [key for m in (*comparison.members, comparison.reference_member()) for key, _ in m.pins]
    missing = sorted({comparison.rows, comparison.over, *pinned} - set(runs.columns))
    if missing:
        raise ValueError(f"{source} has no column {', '.join(missing)} (the comparison needs it)")


def fixed_axes(runs: pd.DataFrame, comparison: Comparison) -> list[str]:
    """The axes a curve point must not average over: scale, lr and every swept run-config key
    (the runs.csv has one column per axis the experiment sweeps), but the rows and over axes."""
    swept = [c for c in runs.columns if c in AXES]
    return [a for a in ("scale", "lr", *swept) if a not in (comparison.rows, comparison.over)]


def check_unmixed(name: str, rows: pd.DataFrame, comparison: Comparison) -> None:
    """Within one (row value, over value, seed) the member's runs share every other axis, else
    its curve would average different configurations."""
    groups = rows.groupby([comparison.rows, comparison.over, "seed"])
    for axis in fixed_axes(rows, comparison):
        values = groups[axis].unique()
        mixed = values[values.map(len) > 1]
        if mixed.empty:
            continue
        shown = ", ".join(str(v) for v in sorted(mixed.iloc[0]))
        fix = (
            "make it the rows or over axis"
            if axis == "lr"
            else f"pin it ({name},{axis}=...) or make it the rows axis"
        )
        raise ValueError(f"member {name!r} mixes runs with {axis} = {shown}: {fix}")


def select(runs: pd.DataFrame, comparison: Comparison, source: str = "runs.csv") -> dict[str, pd.DataFrame]:
    """Rows per member, checked (see check_unmixed); absent members are reported, and all absent is
    an error."""
    check_over(comparison)
    check_columns(runs, comparison, source)
    rows = {m.text: member_rows(runs, m) for m in comparison.members}
    absent = [name for name, r in rows.items() if r.empty]
    if len(absent) == len(rows):
        raise MissingMembers(f"none of the members {', '.join(absent)} has runs in {source}")
    if absent:
        print(f"warning: members {', '.join(absent)} have no runs in {source}; left out", file=sys.stderr)
    chosen = {name: r for name, r in rows.items() if not r.empty}
    for name, r in chosen.items():
        check_unmixed(name, r, comparison)
    return chosen


def finite_loss(rows: pd.DataFrame) -> pd.Series:
    loss = pd.to_numeric(rows["test_loss"], errors="coerce")
    ok = rows["status"].isin([COMPLETED, PUBLISHED]) & np.isfinite(loss)
    return loss.where(ok)


def at(rows: pd.DataFrame, axis: str, value) -> pd.DataFrame:
    """The rows at one value of an axis (a table row)."""
    return rows[rows[axis] == value]


def curve(rows: pd.DataFrame, over: str = "lr", seed: int | None = None) -> pd.Series:
    """L(x) of the runs of one row value (and seed), indexed by the over axis, NaN where no finite
    loss; with seed None the seed-mean curve."""
    if seed is not None:
        rows = rows[rows["seed"] == seed]
    return finite_loss(rows).groupby(rows[over]).mean().sort_index()


def best_loss(L: pd.Series) -> float:
    return float(L.min()) if L.notna().any() else math.nan


def best_lr(L: pd.Series) -> float:
    """argmin over the over axis; ties go to the smaller value (the index is sorted, idxmin takes
    the first)."""
    return float(L.idxmin()) if L.notna().any() else math.nan


def lr_sensitivity(L: pd.Series, L0: float) -> float:
    if len(L) < 2 or not L.notna().any():
        return math.nan
    capped = L.fillna(L0).clip(upper=L0)
    return float((capped - L.min()).sum() / (len(L) - 1))


def member_L0(rows: pd.DataFrame, experiment: Experiment, name: str, where: str) -> float:
    """L0 of the one scale of a member's runs at one row value (LRS caps losses at it)."""
    scales = sorted(rows["scale"].unique().tolist())
    if len(scales) > 1:
        raise ValueError(
            f"member {name!r} has runs of scales {', '.join(scales)} at {where}: LR sensitivity "
            f"needs one L0; pin the scale ({name},scale={scales[0]})"
        )
    return experiment.L0(scales[0]) if scales else math.nan


def time_pool(runs: pd.DataFrame, method: str, tied: bool, pins, seed: int | None) -> pd.DataFrame:
    """Every run of the method (all its values and lrs) with this tying and pins."""
    part = runs[(runs["method"] == method) & (runs["tied"] == tied)]
    for key, value in pins:
        part = part[part[key] == value]
    return part if seed is None else part[part["seed"] == seed]


def mean_time(part: pd.DataFrame) -> float:
    times = pd.to_numeric(part["train_time_s"], errors="coerce")
    return float(times[np.isfinite(times)].mean()) if np.isfinite(times).any() else math.nan


def relative_time(runs: pd.DataFrame, member: Member, reference: Member, row, seed: int | None) -> float:
    """The member's pool against the reference's at one row value (`row`: (axis, value)). The
    reference takes the member's tying and pins where it sets none of its own: the reference
    `baseline` of a member pinned to wsd is baseline at wsd, not the mean of every schedule."""
    pins = {**dict(member.pins), **dict(reference.pins), row[0]: row[1]}
    base = mean_time(time_pool(runs, reference.method, reference.tied or member.tied, pins.items(), seed))
    time = mean_time(time_pool(runs, member.method, member.tied, (*member.pins, row), seed))
    return (time - base) / base if base > 0 else math.nan


def params_of(runs: pd.DataFrame, experiment: Experiment, scale: str) -> float:
    p = experiment.params(scale)
    return p if p is not None else float(runs.loc[runs["scale"] == scale, "params"].astype(float).max())


def scales_of(runs: pd.DataFrame, experiment: Experiment) -> list[str]:
    """Scales present in the data, ordered by nominal parameters."""
    return sorted(runs["scale"].unique().tolist(), key=lambda s: params_of(runs, experiment, s))


def row_values(runs: pd.DataFrame, comparison: Comparison, experiment: Experiment) -> list:
    """The table rows present in the data: scales by nominal parameters, else the values sorted."""
    if comparison.rows == "scale":
        return scales_of(runs, experiment)
    return sorted(runs[comparison.rows].unique().tolist())


def row_columns(axis: str) -> list[str]:
    """A table's leading columns: scale and its nominal N, or the rows axis."""
    return ["scale", "params"] if axis == "scale" else [axis]


def axis_text(axis: str, value) -> str:
    """An axis value as run ids and member pins spell it (tiny, 0.001, wsd, true)."""
    if axis in AXES:
        return format_axis_value(axis, value)
    return fmt(value) if axis == "lr" else str(value)


def seed_stat(stat, seed_values: list[dict], key) -> float:
    x = np.array([v[key] for v in seed_values], dtype=float)
    return float(stat(x)) if np.isfinite(x).any() else math.nan


def compute_tables(
    runs: pd.DataFrame, experiment: Experiment, comparison: Comparison, source: str = "runs.csv"
):
    """{table: (mean frame, std frame or None)}; frames have the row_columns, then the members."""
    chosen = select(runs, comparison, source)
    present = [m for m in comparison.members if m.text in chosen]
    reference = comparison.reference_member()
    axis, over = comparison.rows, comparison.over
    values = row_values(pd.concat(chosen.values()), comparison, experiment)
    parts = {(v, m.text): at(chosen[m.text], axis, v) for v in values for m in present}
    seeds = sorted(runs["seed"].unique().tolist())
    per_seed = {t: [] for t in ("best_loss", "lr_sensitivity", "rel_time")}  # the others: below
    for seed in seeds:
        cells = {t: {} for t in per_seed}
        for m in present:
            for v in values:
                part, key = parts[v, m.text], (v, m.text)
                L = curve(part, over, seed)
                L0 = member_L0(part, experiment, m.text, f"{axis} = {axis_text(axis, v)}")
                cells["best_loss"][key] = best_loss(L)
                cells["lr_sensitivity"][key] = lr_sensitivity(L, L0)
                cells["rel_time"][key] = relative_time(runs, m, reference, (axis, v), seed)
        for t in per_seed:
            per_seed[t].append(cells[t])

    def frame(get):
        def lead(v):
            return {"scale": v, "params": params_of(runs, experiment, v)} if axis == "scale" else {axis: v}

        return pd.DataFrame([{**lead(v), **{m.text: get(v, m) for m in present}} for v in values])

    result = {}
    for t, seed_values in per_seed.items():
        mean = frame(lambda v, m, vs=seed_values: seed_stat(np.nanmean, vs, (v, m.text)))
        std = frame(lambda v, m, vs=seed_values: seed_stat(np.nanstd, vs, (v, m.text)))
        result[t] = (mean, std if len(seeds) > 1 else None)
    # best lr from the seed-mean curves
    result["best_lr"] = (frame(lambda v, m: best_lr(curve(parts[v, m.text], over))), None)
    result["ranking"] = (ranking(result["best_loss"][0], [m.text for m in present]), None)
    return {t: result[t] for t in TABLES}


def ranking(best: pd.DataFrame, members: list[str]) -> pd.DataFrame:
    """Each member's place by seed-mean best loss within a row (1 = lowest; ties share the better
    place; a member without a finite loss gets none)."""
    ranks = best.copy()
    ranks[members] = best[members].rank(axis=1, method="min")
    return ranks


def point_means(chosen: dict[str, pd.DataFrame], comparison: Comparison, value) -> pd.DataFrame:
    """Seed-mean of value(rows), column y, per (row value, over value, member)."""
    keys = [comparison.rows, comparison.over]
    frames = [
        rows.assign(y=value(rows)).groupby(keys, as_index=False)["y"].mean().assign(member=name)
        for name, rows in chosen.items()
    ]
    return pd.concat(frames, ignore_index=True)


def label_divergence(runs: pd.DataFrame, comparison: Comparison, source: str = "runs.csv") -> pd.DataFrame:
    """Seed-mean loss per (member, row value, over value) with the v2 `diverged_1pct` label."""
    curves = point_means(select(runs, comparison, source), comparison, finite_loss).rename(
        columns={"y": "loss"}
    )
    lowest = curves.groupby([comparison.rows, comparison.over])["loss"].transform("min")
    curves["diverged_1pct"] = ~(curves["loss"] <= 1.01 * lowest)  # non-finite counts as diverged
    return curves
