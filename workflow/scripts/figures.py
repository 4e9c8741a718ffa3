"""Paper figures for one comparison, each as PDF and PNG (scienceplots' `science` style, no LaTeX).

    python -m workflow.scripts.figures --runs runs.csv --experiment config/paper.yaml \
        --comparison main --out-dir results/paper/figures/main [--only test_loss mu_norm] \
        [--runs-dir results/paper/runs] [--reference published_runs.csv]

Figures: test_loss, logit_mean, logit_std, logit_absmax, mu_norm (each vs the comparison's over
axis, lr by default, log x; one colour per member, one marker per row value (scale by default);
points with the `diverged_1pct` label filled, others hollow), lr_sensitivity (LRS vs N, log-log;
per row value for another rows axis), b_ratio_hist (baseline, where the data has B_ratio),
train_loss, val_curves and schedules (per row value, each member's run at its best over value:
training loss per step from train.jsonl, validation loss per token count from val.jsonl, the lr
as its config.yaml sets it; need --runs-dir) and overlay (test loss of these runs over the
--reference runs, per scale).

A figure the data cannot give (LR sensitivity of a one-lr grid, B_ratio of data without it) is
an error under --only, or with --placeholder (the workflow's choice) a page that says why.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.contract import RUN_FIGURES, RunDir  # noqa: E402
from trainer.files import read_log  # noqa: E402
from trainer.schedules import learning_rate  # noqa: E402
from workflow.scripts.analysis import (  # noqa: E402
    at,
    axis_text,
    best_lr,
    compute_tables,
    curve,
    finite_loss,
    label_divergence,
    point_means,
    row_columns,
    row_values,
    select,
)
from workflow.scripts.experiment import Comparison, Experiment, comparison_arguments  # noqa: E402
from workflow.scripts.runscsv import read_runs  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
LR_METRICS = {  # name: (metric, y label, y scale)
    "test_loss": ("test_loss", "test loss", "linear"),
    "logit_mean": ("logit_mean", "mean logit", "linear"),
    "logit_std": ("logit_std", "logit std", "linear"),
    "logit_absmax": ("logit_absmax", r"max $|$logit$|$", "log"),
    "mu_norm": ("mu_norm", r"$\|\mu\|$", "symlog"),
}
FIGURES = (*LR_METRICS, "lr_sensitivity", "b_ratio_hist", "train_loss", "val_curves", "schedules", "overlay")


class NoData(ValueError):
    """A figure whose data is absent: the message says what is missing and where."""


def use_style() -> None:
    import scienceplots  # noqa: F401  (registers the styles)

    plt.style.use(["science", "no-latex"])


def colours(members: list[str]) -> dict[str, str]:
    """The style's colours; more members than it has get tab20's, so no two share a colour."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(members) > len(cycle):
        cycle = [matplotlib.colors.to_hex(c) for c in plt.get_cmap("tab20").colors]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(members)}


def legend(ax, members: list[str], rows: list[str], colour: dict[str, str]) -> None:
    handles = [Line2D([], [], color=colour[m], label=m) for m in members]
    handles += [
        Line2D([], [], color="grey", marker=MARKERS[i % len(MARKERS)], ls="", mfc="none", label=r)
        for i, r in enumerate(rows)
    ]
    handles.append(
        Line2D([], [], color="grey", marker="o", ls="", label="filled: > 1% above the best member")
    )
    ax.legend(handles=handles, fontsize=5, ncol=2)


def plain(value: float, _=None) -> str:
    """A tick label as a plain number (0.3, 2,000, 3e+06), never 3x10^-1."""
    return f"{value:,.0f}" if 1e3 <= abs(value) < 1e6 else f"{value:.3g}"


def plain_log_axis(axis) -> None:
    """Plain-number labels on a log axis. Minor ticks get labels only where matplotlib would label
    them (an axis spanning about a decade or less), and then only at 2, 3 and 5 x 10^k, so that
    neighbouring labels never run into each other."""
    axis.set_major_formatter(FuncFormatter(plain))
    default_minor = axis.get_minor_formatter()  # a LogFormatter that knows when minors need labels

    def minor(value, pos):
        leading = round(value / 10 ** math.floor(math.log10(value)))
        return plain(value) if leading in (2, 3, 5) and default_minor(value, pos) else ""

    axis.set_minor_formatter(FuncFormatter(minor))


def compact(n: float) -> str:
    """A parameter count as people write it: 67.8k, 16M, 1.2B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def metric_points(runs: pd.DataFrame, comparison: Comparison, metric: str, source: str) -> pd.DataFrame:
    """Seed-mean metric per (member, row value, over value) with the diverged_1pct label of its test
    loss."""
    labels = label_divergence(runs, comparison, source)

    def values(rows):
        return finite_loss(rows) if metric == "test_loss" else pd.to_numeric(rows[metric], errors="coerce")

    points = point_means(select(runs, comparison, source), comparison, values)
    keys = ["member", comparison.rows, comparison.over]
    return points.merge(labels[[*keys, "diverged_1pct"]], on=keys)


def over_axis(ax, over: str, values) -> None:
    """The x axis: lr on a log axis as in the paper; another axis log only where its values are
    positive and span more than a decade, else linear."""
    values = np.asarray(values, dtype=float)
    if over == "lr" or (values.min() > 0 and values.max() > 10 * values.min()):
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(plain))
    ax.set_xlabel("learning rate" if over == "lr" else over)


def metric_vs_over(runs, experiment, comparison, name, source="runs.csv"):
    metric, ylabel, yscale = LR_METRICS[name]
    axis, over = comparison.rows, comparison.over
    points = metric_points(runs, comparison, metric, source)
    if not np.isfinite(points["y"]).any():
        raise NoData(f"no finite {metric} for any member in {source}")
    present = [m.text for m in comparison.members if m.text in set(points["member"])]
    rows = row_values(runs[runs[axis].isin(points[axis])], comparison, experiment)
    colour = colours(present)
    fig, ax = plt.subplots(figsize=(3.5, 2.6))
    for member in present:
        for i, row in enumerate(rows):
            p = points[(points["member"] == member) & (points[axis] == row)].sort_values(over)
            if p.empty:
                continue
            marker = MARKERS[i % len(MARKERS)]
            ax.plot(p[over], p["y"], color=colour[member], marker=marker, mfc="none", ms=3, lw=0.8)
            filled = p[p["diverged_1pct"]]
            if not filled.empty:
                ax.scatter(filled[over], filled["y"], color=colour[member], marker=marker, s=9, zorder=3)
    over_axis(ax, over, points[over])
    if yscale == "symlog":  # a norm: zero (mu-centering) and decades above it, nothing below
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_ylim(bottom=0)
    else:
        ax.set_yscale(yscale)
        if yscale == "log":
            plain_log_axis(ax.yaxis)
    ax.set_ylabel(ylabel)
    legend(ax, present, [axis_text(axis, r) for r in rows], colour)
    return fig


def lrs_figure(runs, experiment, comparison, source="runs.csv"):
    """LRS vs N, log-log (a power law in N), for rows = scale; else LRS at each row value, as
    categories on a linear axis."""
    axis, over = comparison.rows, comparison.over
    by_scale = axis == "scale"
    mean, _ = compute_tables(runs, experiment, comparison, source)["lr_sensitivity"]
    present = list(mean.columns[len(row_columns(axis)) :])
    drawable = {m: np.isfinite(mean[m]) & ((mean[m] > 0) | (not by_scale)) for m in present}
    if not any(ok.any() for ok in drawable.values()):
        values = "learning rates" if over == "lr" else f"values of {over}"
        if runs.groupby(axis)[over].nunique().max() < 2:
            raise NoData(f"LR sensitivity needs at least two {values} per {axis}")
        if by_scale:
            raise NoData("no member has a positive, finite LR sensitivity (nothing to draw on a log scale)")
        raise NoData("no member has a finite LR sensitivity")
    x = mean["params"] if by_scale else pd.Series(range(len(mean)), index=mean.index)
    colour = colours(present)
    fig, ax = plt.subplots(figsize=(3.5, 2.6))
    for member, ok in drawable.items():
        ax.plot(x[ok], mean[member][ok], color=colour[member], marker="o", ms=3, lw=0.8, label=member)
    if by_scale:
        ax.set_xscale("log")
        ax.set_yscale("log")
        # one labelled tick per scale (its nominal N); no minor labels crowding each other
        ax.xaxis.set_major_locator(FixedLocator(x.tolist()))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: compact(v)))
        ax.xaxis.set_minor_locator(NullLocator())
        plain_log_axis(ax.yaxis)
        ax.set_xlabel("parameters N")
    else:
        ax.set_xticks(x.tolist(), [axis_text(axis, v) for v in mean[axis]])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_ylim(bottom=0)
        ax.set_xlabel(axis)
    ax.set_ylabel("LR sensitivity")
    ax.legend(fontsize=5)
    return fig


def b_ratio_hist(runs, experiment, comparison, source="runs.csv"):
    baseline = tuple(m for m in comparison.members if m.method == "baseline")
    if not baseline:
        raise NoData("the comparison has no baseline member")
    rows = select(runs, replace(comparison, members=baseline), source)
    values = pd.to_numeric(pd.concat(rows.values())["b_ratio"], errors="coerce")
    values = values[np.isfinite(values)]
    if values.empty:
        raise NoData(
            f"{source} has no b_ratio for {baseline[0].text} (of the published files only the 65-column ones do)"
        )
    fig, ax = plt.subplots(figsize=(3.5, 2.6))
    ax.hist(values, bins=20, color="grey")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of runs
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(r"$B_\mathrm{ratio}$")
    ax.set_ylabel(f"runs ({baseline[0].text})")
    return fig


def read_train_log(path: Path) -> pd.DataFrame:
    return pd.DataFrame([row for _, row in read_log(path)])


def log_series(log_file: str, x: str, y: str):
    """(x, y) of one run from a log (a RunDir attribute); None without that log or column."""

    def series(run: RunDir):
        path = Path(getattr(run, log_file))
        frame = read_train_log(path) if path.exists() else pd.DataFrame()
        return (frame[x], frame[y]) if x in frame else None

    return series


def schedule_series(run: RunDir):
    """The lr of each step as the run's config sets it (warmup, schedule, decay), in units of optim.lr."""
    path = Path(run.config)
    if not path.exists():
        return None
    cfg = load_config(path)
    steps = np.arange(cfg.train.steps + 1)
    return steps, [learning_rate(cfg.optim, int(t), cfg.train.steps) / cfg.optim.lr for t in steps]


# Curves of each member's run at its best over value: series, x label, y label.
RUN_CURVES = {
    "train_loss": (log_series("train_log", "step", "loss"), "step", "training loss"),
    "val_curves": (log_series("val_log", "tokens", "val_loss"), "tokens", "validation loss"),
    "schedules": (schedule_series, "step", "lr / optim.lr"),
}
assert tuple(RUN_CURVES) == RUN_FIGURES, "trainer.contract.RUN_FIGURES names the run-directory figures"


def run_curves(name, runs, experiment, comparison, runs_dir: Path | None, source="runs.csv"):
    """One panel per row value: a curve per member from its run at its best over value (train_loss:
    training loss per step; val_curves: validation loss per token count (train.eval_every);
    schedules: the learning rate as configured)."""
    series, xlabel, ylabel = RUN_CURVES[name]
    if runs_dir is None:
        raise NoData(f"{name} needs --runs-dir (the run directories)")
    axis, over = comparison.rows, comparison.over
    chosen = select(runs, comparison, source)
    rows = row_values(pd.concat(chosen.values()), comparison, experiment)
    colour = colours(list(chosen))
    fig, axes = plt.subplots(1, len(rows), figsize=(2.2 * len(rows), 2.2), squeeze=False)
    drawn = 0
    for ax, row in zip(axes[0], rows, strict=True):
        for member, member_runs in chosen.items():
            part = at(member_runs, axis, row)
            best = best_lr(curve(part, over))
            if math.isnan(best):
                continue
            pick = part[np.isclose(part[over], best)].sort_values("seed")
            xy = series(RunDir(runs_dir / pick["run"].iloc[0]))
            if xy is None:
                continue
            ax.plot(*xy, color=colour[member], lw=0.8, label=f"{member} ({over} {best:g})")
            drawn += 1
        ax.set_title(axis_text(axis, row))
        ax.set_xlabel(xlabel)
        ax.legend(fontsize=4)
    axes[0][0].set_ylabel(ylabel)
    if not drawn:
        plt.close(fig)
        raise NoData(f"no run of this comparison under {runs_dir} has the data of {name}")
    return fig


def overlay(
    runs,
    experiment,
    comparison,
    reference: pd.DataFrame | None,
    source="runs.csv",
    reference_source="reference",
):
    if reference is None:
        raise NoData("the overlay needs --reference runs.csv")
    if comparison.rows != "scale":  # the reference (the published runs) is a grid of scales
        raise NoData(f"the overlay is per scale; the rows of this comparison are {comparison.rows}")
    over = comparison.over
    ours = metric_points(runs, comparison, "test_loss", source)
    theirs = metric_points(reference, comparison, "test_loss", reference_source)
    both = sorted(
        set(zip(ours["member"], ours["scale"], strict=True))
        & set(zip(theirs["member"], theirs["scale"], strict=True))
    )
    if not both:
        raise NoData(f"no member and scale is in both {source} and {reference_source}")
    colour = colours([m.text for m in comparison.members])
    fig, ax = plt.subplots(figsize=(3.5, 2.6))
    for member, scale in both:
        for frame, style in ((ours, "-"), (theirs, "--")):
            p = frame[(frame["member"] == member) & (frame["scale"] == scale)].sort_values(over)
            ax.plot(p[over], p["y"], ls=style, color=colour[member], marker="o", ms=2, lw=0.8)
    handles = [Line2D([], [], color=colour[m], label=m) for m in sorted({m for m, _ in both})]
    handles += [
        Line2D([], [], color="grey", ls="-", label="ours"),
        Line2D([], [], color="grey", ls="--", label="reference"),
    ]
    ax.legend(handles=handles, fontsize=5)
    over_axis(ax, over, pd.concat([ours[over], theirs[over]]))
    ax.set_ylabel("test loss")
    return fig


def make_figure(
    name,
    runs,
    experiment,
    comparison,
    source="runs.csv",
    runs_dir=None,
    reference=None,
    reference_source=None,
):
    if name in LR_METRICS:
        return metric_vs_over(runs, experiment, comparison, name, source)
    if name == "lr_sensitivity":
        return lrs_figure(runs, experiment, comparison, source)
    if name == "b_ratio_hist":
        return b_ratio_hist(runs, experiment, comparison, source)
    if name in RUN_CURVES:
        return run_curves(name, runs, experiment, comparison, runs_dir, source)
    return overlay(runs, experiment, comparison, reference, source, reference_source or "reference")


def placeholder(name: str, reason: str):
    """A page in place of a figure that cannot be drawn, saying why."""
    fig, ax = plt.subplots(figsize=(3.5, 2.6))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{name}: not drawn\n{reason}", ha="center", va="center", fontsize=6, wrap=True)
    return fig


def save(fig, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for ext in ("pdf", "png"):
        path = out_dir / f"{name}.{ext}"
        tmp = out_dir / f".{name}.tmp.{ext}"
        fig.savefig(tmp, dpi=200)
        os.replace(tmp, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = comparison_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="*", choices=FIGURES, help="draw only these (an absent one is an error)"
    )
    parser.add_argument("--runs-dir", help="run directories, for the training curves")
    parser.add_argument("--reference", help="a second runs.csv (e.g. the published runs) to overlay")
    parser.add_argument(
        "--placeholder",
        action="store_true",
        help="a figure the data cannot give becomes a page that says why (exit 0), not an error",
    )
    args = parser.parse_args(argv)
    use_style()
    experiment = Experiment.load(args.experiment)
    runs = read_runs(args.runs)
    reference = read_runs(args.reference) if args.reference else None
    names = args.only or [
        n for n in FIGURES if (n not in RUN_CURVES or args.runs_dir) and (n != "overlay" or args.reference)
    ]
    failed = False
    for name in names:
        try:
            comparison = experiment.comparison(args.comparison)
            fig = make_figure(
                name,
                runs,
                experiment,
                comparison,
                args.runs,
                Path(args.runs_dir) if args.runs_dir else None,
                reference,
                args.reference,
            )
        except (ValueError, KeyError) as err:  # NoData, MissingMembers, a comparison the data cannot give
            drawn_instead = args.placeholder and isinstance(err, NoData)
            verdict = "placeholder" if drawn_instead else "error" if args.only else "skipped"
            print(f"{verdict}: {args.comparison}/{name}: {err}", file=sys.stderr)
            if not drawn_instead:
                failed = failed or bool(args.only)
                continue
            fig = placeholder(name, str(err))
        save(fig, Path(args.out_dir), name)
        print(f"{args.out_dir}/{name}.pdf")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
