"""Comparisons with pinned members, a rows axis, an over axis and a reference member, on hand-made
runs.csv frames (the paper's own comparisons are pinned in test_analysis.py)."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from workflow.scripts import figures, tables
from workflow.scripts.analysis import compute_tables, label_divergence, member_rows, ranking
from workflow.scripts.experiment import Experiment
from workflow.scripts.figures import NoData, make_figure, use_style
from workflow.scripts.runids import RunKey, parse_member
from workflow.scripts.runscsv import read_runs, write_runs

AXES = ["model.mlp", "optim.schedule", "optim.warmup"]
SCALES = {"tiny": {"params": 100000, "L0": 10.0}, "small": {"params": 400000, "L0": 8.0}}
LRS = [1e-3, 1e-2, 1e-1]


def run(scale, method, lr, loss, *, value=None, seed=1, tied=False, time=100.0, mlp="swiglu", sched="cosine",
        warmup=5000):  # fmt: skip
    axes = {"model.mlp": mlp, "optim.schedule": sched, "optim.warmup": warmup}
    key = RunKey(scale, method, value, lr, seed, tied, RunKey.axes_of(axes))
    status = "completed" if math.isfinite(loss) else "diverged"
    return {"run": key.run_id, "scale": scale, "params": SCALES[scale]["params"], "method": method,
            "value": value, "lr": lr, "seed": seed, "tied": tied, **axes, "status": status, "test_loss": loss,
            "train_time_s": time, "mu_norm": 1.0, "logit_mean": 0.1, "logit_std": 1.0, "logit_absmax": 5.0}  # fmt: skip


def sweep(scale, method, losses, xs=LRS, axis="lr", **kw):
    """One run per x of the over axis (lr, or warmup at lr 1e-2)."""
    if axis == "lr":
        return [run(scale, method, x, loss, **kw) for x, loss in zip(xs, losses, strict=True)]
    return [run(scale, method, 1e-2, loss, warmup=x, **kw) for x, loss in zip(xs, losses, strict=True)]


def runs_csv(rows, path):
    """Through the runs.csv file, as the analysis steps read it (axis columns typed)."""
    write_runs(pd.DataFrame(rows), path, AXES)
    return read_runs(path)


def experiment(**comparisons):
    return Experiment({"scales": SCALES, "axes": AXES, "comparisons": comparisons})


def cells(tables_, name, member):
    return tables_[name][0][member].tolist()


# --- pinned members ------------------------------------------------------------------------


def test_pinned_members_select_their_rows(tmp_path):
    runs = runs_csv(
        [*sweep("tiny", "baseline", [4.0, 3.0, 3.5]), *sweep("tiny", "baseline", [3.8, 3.2, 3.1], sched="wsd"),
         *sweep("small", "baseline", [3.5, 2.5, 3.0])],
        tmp_path / "runs.csv",
    )  # fmt: skip
    cosine, wsd, tiny = (
        "baseline,optim.schedule=cosine",
        "baseline,optim.schedule=wsd",
        "baseline,scale=small",
    )
    assert set(member_rows(runs, parse_member(wsd))["optim.schedule"]) == {"wsd"}
    assert (
        len(member_rows(runs, parse_member(cosine))) == 6 and len(member_rows(runs, parse_member(tiny))) == 3
    )
    exp = experiment(c=[cosine, wsd])
    result = compute_tables(runs, exp, exp.comparison("c"))
    mean = result["best_loss"][0]
    assert list(mean.columns) == ["scale", "params", cosine, wsd]
    assert mean["scale"].tolist() == ["tiny", "small"]
    assert mean[cosine].tolist() == [3.0, 2.5]
    assert mean[wsd].iloc[0] == 3.1 and math.isnan(mean[wsd].iloc[1])  # no wsd run at small
    assert cells(result, "best_lr", wsd)[0] == 1e-1
    assert cells(result, "lr_sensitivity", cosine) == pytest.approx([(1 + 0.5) / 2, (1 + 0.5) / 2])


# --- rows = a swept axis ---------------------------------------------------------------------

SCHEDULE_RUNS = [  # at scale tiny (L0 = 10)
    *sweep("tiny", "baseline", [4.0, 3.0, 3.5]),
    *sweep("tiny", "baseline", [3.8, 3.2, 3.1], sched="wsd"),
    *sweep("tiny", "zloss", [3.9, 3.1, 3.3], value=1e-4),
    *sweep("tiny", "zloss", [3.6, 3.3, 3.4], value=1e-4, sched="wsd"),
]


def test_rows_axis_gives_one_row_per_value(tmp_path):
    runs = runs_csv(SCHEDULE_RUNS, tmp_path / "runs.csv")
    exp = experiment(c={"members": ["baseline", "zloss:1e-4"], "rows": "optim.schedule"})
    result = compute_tables(runs, exp, exp.comparison("c"))
    lrs = result["lr_sensitivity"][0]
    assert list(lrs.columns) == ["optim.schedule", "baseline", "zloss:1e-4"]  # no params column
    assert lrs["optim.schedule"].tolist() == ["cosine", "wsd"]
    assert lrs["baseline"].tolist() == pytest.approx([(1.0 + 0.5) / 2, (0.7 + 0.1) / 2])
    assert lrs["zloss:1e-4"].tolist() == pytest.approx([(0.8 + 0.2) / 2, (0.3 + 0.1) / 2])
    assert cells(result, "best_loss", "zloss:1e-4") == [3.1, 3.3]
    assert cells(result, "best_lr", "baseline") == [1e-2, 1e-1]
    assert cells(result, "best_lr", "zloss:1e-4") == [1e-2, 1e-2]
    assert tables.to_markdown("lr_sensitivity", lrs, None).splitlines() == [
        "| optim.schedule | baseline | zloss:1e-4 |",
        "|---|---|---|",
        "| cosine | 0.750 | 0.500 |",
        "| wsd | 0.400 | 0.200 |",
    ]
    assert (
        tables.to_tex("best_lr", result["best_lr"][0], None)
        == "cosine & 1e-2 & 1e-2 \\\\\nwsd & 1e-1 & 1e-2\n"
    )


def test_ranking_places_members_by_best_loss_within_each_row(tmp_path):
    runs = runs_csv(SCHEDULE_RUNS, tmp_path / "runs.csv")
    exp = experiment(c={"members": ["baseline", "zloss:1e-4"], "rows": "optim.schedule"})
    result = compute_tables(runs, exp, exp.comparison("c"))
    best = result["best_loss"][0]
    expected = [
        [1, 2] if b < z else [2, 1] for b, z in zip(best["baseline"], best["zloss:1e-4"], strict=True)
    ]
    assert result["ranking"][0][["baseline", "zloss:1e-4"]].values.tolist() == expected
    best = pd.DataFrame({"scale": ["a", "b", "c"], "x": [3.0, 2.0, 1.0], "y": [2.0, 2.0, float("nan")]})
    places = ranking(best, ["x", "y"])
    assert places[["x", "y"]].values.tolist()[:2] == [[2, 1], [1, 1]]  # ties share the better place
    assert places["x"].iloc[2] == 1 and np.isnan(places["y"].iloc[2])  # no loss, no place


def test_where_pins_every_member_and_keeps_the_labels(tmp_path):
    runs = runs_csv(SCHEDULE_RUNS, tmp_path / "runs.csv")
    exp = experiment(c={"members": ["baseline", "zloss:1e-4"], "where": {"optim.schedule": "wsd"}})
    comparison = exp.comparison("c")
    assert [m.text for m in comparison.members] == ["baseline", "zloss:1e-4"]
    assert all(("optim.schedule", "wsd") in m.pins for m in comparison.members)
    chosen = member_rows(runs, comparison.members[0])
    assert len(chosen) and set(chosen["optim.schedule"]) == {"wsd"} and set(chosen["method"]) == {"baseline"}


def test_labelled_members_head_the_columns(tmp_path):
    runs = runs_csv(SCHEDULE_RUNS, tmp_path / "runs.csv")
    labelled = experiment(c={"members": {"plain": "baseline", "z": "zloss:1e-4"}, "rows": "optim.schedule"})
    written = experiment(c={"members": ["baseline", "zloss:1e-4"], "rows": "optim.schedule"})
    assert [m.text for m in labelled.comparison("c").members] == ["plain", "z"]
    a = compute_tables(runs, labelled, labelled.comparison("c"))["best_loss"][0]
    b = compute_tables(runs, written, written.comparison("c"))["best_loss"][0]
    assert list(a.columns) == ["optim.schedule", "plain", "z"]
    assert a[["plain", "z"]].values.tolist() == b[["baseline", "zloss:1e-4"]].values.tolist()
    for bad in ({"scale": "baseline"}, {" ": "baseline"}, {"a\nb": "baseline"}):
        with pytest.raises(ValueError, match="cannot label a member"):
            experiment(c={"members": bad})


def test_one_percent_label_per_row_value(tmp_path):
    runs = runs_csv(SCHEDULE_RUNS, tmp_path / "runs.csv")
    exp = experiment(c={"members": ["baseline", "zloss:1e-4"], "rows": "optim.schedule"})
    labels = label_divergence(runs, exp.comparison("c")).set_index(["member", "optim.schedule", "lr"])
    # wsd at 1e-2: baseline 3.2 is the lowest of its row value (cosine's 3.0 is another row)
    assert not labels.loc[("baseline", "wsd", 1e-2), "diverged_1pct"]
    assert labels.loc[("zloss:1e-4", "wsd", 1e-2), "diverged_1pct"]  # 3.3: 3% above 3.2
    assert labels.loc[("baseline", "cosine", 1e-1), "diverged_1pct"]  # 3.5 against 3.3


def test_rows_axis_figures(tmp_path):
    use_style()
    runs = runs_csv(SCHEDULE_RUNS, tmp_path / "runs.csv")
    exp = experiment(c={"members": ["baseline", "zloss:1e-4"], "rows": "optim.schedule"})
    comparison = exp.comparison("c")
    ax = make_figure("test_loss", runs, exp, comparison).axes[0]
    assert len(ax.lines) == 4 and ax.get_xscale() == "log"  # one line per member and row value
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:4] == ["baseline", "zloss:1e-4", "cosine", "wsd"]
    ax = make_figure("lr_sensitivity", runs, exp, comparison).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cosine", "wsd"]
    assert ax.get_xlabel() == "optim.schedule" and ax.get_yscale() == "linear" and len(ax.lines) == 2
    assert ax.lines[0].get_ydata().tolist() == pytest.approx([0.75, 0.4])  # baseline at cosine, wsd
    for run_id in runs["run"]:
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / "train.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    fig = make_figure("train_loss", runs, exp, comparison, runs_dir=tmp_path)
    assert [ax.get_title() for ax in fig.axes] == ["cosine", "wsd"]
    assert sorted(t.get_text() for t in fig.axes[1].get_legend().get_texts()) == [
        "baseline (lr 0.1)",
        "zloss:1e-4 (lr 0.01)",
    ]
    with pytest.raises(NoData, match="per scale"):
        make_figure("overlay", runs, exp, comparison, reference=runs)


# --- over = a swept axis ---------------------------------------------------------------------


def test_over_axis_takes_the_best_value_of_that_axis(tmp_path):
    use_style()
    warmups = [100, 1000, 5000]
    runs = runs_csv(
        [*sweep("tiny", "baseline", [3.4, 3.1, 3.2], warmups, "warmup"),
         *sweep("small", "baseline", [3.0, 2.95, 2.9], warmups, "warmup")],
        tmp_path / "runs.csv",
    )  # fmt: skip
    exp = experiment(c={"members": ["baseline"], "over": "optim.warmup"})
    result = compute_tables(runs, exp, exp.comparison("c"))
    assert cells(result, "best_lr", "baseline") == [1000, 5000]
    assert cells(result, "lr_sensitivity", "baseline") == pytest.approx([(0.3 + 0.1) / 2, (0.1 + 0.05) / 2])
    md = tables.to_markdown("best_lr", result["best_lr"][0], None, over="optim.warmup")
    assert "| tiny | 100000 | 1000 |" in md  # the value plainly, not as an lr (1e+3)
    ax = make_figure("test_loss", runs, exp, exp.comparison("c")).axes[0]
    assert ax.get_xlabel() == "optim.warmup" and ax.get_xscale() == "log"  # 100 to 5000: log
    assert ax.lines[0].get_xdata().tolist() == warmups
    narrow = runs.assign(**{"optim.warmup": runs["optim.warmup"].map({100: 1000, 1000: 2000, 5000: 4000})})
    assert make_figure("test_loss", narrow, exp, exp.comparison("c")).axes[0].get_xscale() == "linear"


def test_rows_lr_over_an_axis(tmp_path):
    warmups = [100, 1000]
    runs = runs_csv(
        [*sweep("tiny", "baseline", [3.4, 3.1], warmups, "warmup"),
         *[run("tiny", "baseline", 1e-3, loss, warmup=w) for w, loss in zip(warmups, [3.3, 3.6], strict=True)]],
        tmp_path / "runs.csv",
    )  # fmt: skip
    exp = experiment(c={"members": ["baseline"], "rows": "lr", "over": "optim.warmup"})
    best = compute_tables(runs, exp, exp.comparison("c"))["best_lr"][0]
    assert best.to_dict("list") == {"lr": [1e-3, 1e-2], "baseline": [100, 1000]}
    assert tables.to_markdown("best_lr", best, None, over="optim.warmup").splitlines()[2:] == [
        "| 0.001 | 100 |",
        "| 0.01 | 1000 |",
    ]


def test_string_over_axis_is_an_error(tmp_path):
    runs = runs_csv(SCHEDULE_RUNS, tmp_path / "runs.csv")
    exp = experiment(c={"members": ["baseline"], "over": "optim.schedule"})
    with pytest.raises(ValueError, match="over: 'optim.schedule' is not a numeric axis"):
        compute_tables(runs, exp, exp.comparison("c"))


# --- rel_time against the reference member ------------------------------------------------


def test_rel_time_is_relative_to_the_reference_member(tmp_path):
    runs = runs_csv(
        [run("tiny", "baseline", 1e-2, 3.0, time=100.0),
         run("tiny", "baseline", 1e-2, 3.0, sched="wsd", time=125.0),
         run("tiny", "zloss", 1e-2, 3.0, value=1e-4, time=110.0),
         run("tiny", "zloss", 1e-2, 3.0, value=1e-3, time=130.0),  # not a member, but pooled
         run("tiny", "zloss", 1e-2, 3.0, value=1e-4, sched="wsd", time=150.0),
         run("tiny", "mucentering", 1e-2, 3.0, time=90.0),
         run("tiny", "baseline", 1e-2, 3.0, tied=True, time=200.0),
         run("tiny", "softcap", 1e-2, 3.0, value=30.0, tied=True, time=220.0)],
        tmp_path / "runs.csv",
    )  # fmt: skip
    members = [
        "baseline,optim.schedule=cosine",
        "zloss:1e-4,optim.schedule=cosine",
        "zloss:1e-4,optim.schedule=wsd",
    ]
    base, cosine, wsd = 100.0, 120.0, 150.0  # each member's pool: its method, pins and tying, all values
    nan = float("nan")

    def rel_time(comparison):
        exp = experiment(c=comparison)
        return compute_tables(runs, exp, exp.comparison("c"))["rel_time"][0].iloc[0, 2:].tolist()

    # the reference takes each member's pins: zloss at wsd against baseline at wsd
    assert rel_time(members) == pytest.approx([0.0, cosine / base - 1, wsd / 125 - 1])
    mucentering = {"members": members, "reference": "mucentering"}  # no mucentering run at wsd
    assert rel_time(mucentering) == pytest.approx([base / 90 - 1, cosine / 90 - 1, nan], nan_ok=True)
    tied = {"members": members, "reference": "baseline@tied"}
    assert rel_time(tied) == pytest.approx([base / 200 - 1, cosine / 200 - 1, nan], nan_ok=True)
    pinned = {"members": members, "reference": "zloss:1e-4,optim.schedule=wsd"}  # its own pin wins
    assert rel_time(pinned) == pytest.approx([base / wsd - 1, cosine / wsd - 1, 0.0])
    labelled = {"members": dict(zip(["b", "zc", "zw"], members, strict=True)), "reference": "zw"}
    assert rel_time(labelled) == rel_time(pinned)  # a label names a member
    # the default reference takes each member's tying: softcap@tied against baseline@tied
    assert rel_time(["softcap:30@tied"]) == pytest.approx([220 / 200 - 1])


# --- the mixing guard ----------------------------------------------------------------------


def command_line(tmp_path, exp) -> list[str]:
    """The arguments tables and figures share, for comparison c of exp over tmp_path/runs.csv."""
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp.raw))
    return [
        "--runs",
        str(tmp_path / "runs.csv"),
        "--experiment",
        str(tmp_path / "exp.yaml"),
        "--comparison",
        "c",
    ]


def test_a_member_mixing_an_axis_is_an_error_naming_it(tmp_path, capsys):
    runs = runs_csv(
        [*sweep("tiny", "baseline", [4.0, 3.0, 3.5]), *sweep("tiny", "baseline", [3.9, 3.1, 3.3], mlp="gelu")],
        tmp_path / "runs.csv",
    )  # fmt: skip
    exp = experiment(
        c=["baseline"],
        pinned=["baseline,model.mlp=gelu"],
        rows={"members": ["baseline"], "rows": "model.mlp"},
    )
    message = r"member 'baseline' mixes runs with model.mlp = gelu, swiglu: pin it \(baseline,model.mlp=\.\.\.\) or make it the rows axis"  # noqa: E501
    with pytest.raises(ValueError, match=message):
        compute_tables(runs, exp, exp.comparison("c"))
    with pytest.raises(ValueError, match=message):
        label_divergence(runs, exp.comparison("c"))
    pinned = compute_tables(runs, exp, exp.comparison("pinned"))
    assert cells(pinned, "best_loss", "baseline,model.mlp=gelu") == [3.1]
    assert cells(compute_tables(runs, exp, exp.comparison("rows")), "best_loss", "baseline") == [3.1, 3.0]
    common = command_line(tmp_path, exp)
    assert tables.main([*common, "--out-dir", str(tmp_path / "tables")]) == 2
    assert (
        figures.main([*common, "--out-dir", str(tmp_path / "fig"), "--only", "test_loss", "--placeholder"])
        == 2
    )
    assert "mixes runs with model.mlp" in capsys.readouterr().err


def test_scale_is_an_axis_unless_it_is_the_rows(tmp_path):
    exp = experiment(c={"members": ["baseline"], "rows": "model.mlp"}, pinned={"members": ["baseline,scale=tiny"], "rows": "model.mlp"})  # fmt: skip
    both = runs_csv([*sweep("tiny", "baseline", [4.0, 3.0, 3.5]), *sweep("small", "baseline", [3.5, 2.5, 3.0])],
                    tmp_path / "both.csv")  # fmt: skip
    with pytest.raises(ValueError, match="mixes runs with scale = small, tiny"):
        compute_tables(both, exp, exp.comparison("c"))
    assert cells(compute_tables(both, exp, exp.comparison("pinned")), "best_loss", "baseline,scale=tiny") == [
        3.0
    ]
    # scales at different lrs pass the guard, but LRS needs one L0 per member and row value
    split = runs_csv(
        [run("tiny", "baseline", 1e-3, 4.0), run("small", "baseline", 1e-2, 3.0)], tmp_path / "split.csv"
    )
    with pytest.raises(
        ValueError, match=r"scales small, tiny at model.mlp = swiglu.*\(baseline,scale=small\)"
    ):
        compute_tables(split, exp, exp.comparison("c"))


def test_lr_must_be_the_rows_or_over_axis(tmp_path):
    runs = runs_csv(
        [*sweep("tiny", "baseline", [3.4, 3.1], [100, 1000], "warmup"), run("tiny", "baseline", 1e-3, 3.3, warmup=100)],
        tmp_path / "runs.csv",
    )  # fmt: skip
    exp = experiment(c={"members": ["baseline"], "over": "optim.warmup"})
    with pytest.raises(ValueError, match="mixes runs with lr = 0.001, 0.01: make it the rows or over axis"):
        compute_tables(runs, exp, exp.comparison("c"))


# --- the command lines -----------------------------------------------------------------------


def test_tables_and_figures_of_a_rows_comparison_from_the_command_line(tmp_path):
    write_runs(pd.DataFrame(SCHEDULE_RUNS), tmp_path / "runs.csv", AXES)
    exp = experiment(c={"members": ["baseline", "zloss:1e-4"], "rows": "optim.schedule"})
    common = command_line(tmp_path, exp)
    assert tables.main([*common, "--out-dir", str(tmp_path / "tables")]) == 0
    assert (tmp_path / "tables" / "best_loss.md").read_text().splitlines()[2] == "| cosine | 3.00 | 3.10 |"
    assert pd.read_csv(tmp_path / "tables" / "best_loss.csv").columns[0] == "optim.schedule"
    names = [n for n in figures.FIGURES if n not in (*figures.RUN_CURVES, "overlay")]
    assert figures.main([*common, "--out-dir", str(tmp_path / "fig"), "--only", *names, "--placeholder"]) == 0
    assert sorted(p.name for p in (tmp_path / "fig").glob("*.png")) == sorted(f"{n}.png" for n in names)
