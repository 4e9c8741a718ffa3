"""Analysis steps: the paper's numbers from its own CSVs, hand-made cases, figure content."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from conftest import run_module
from trainer.contract import RUNS_EVAL_METRICS
from workflow.scripts.aggregate import aggregate
from workflow.scripts.analysis import MissingMembers, compute_tables, label_divergence, lr_sensitivity
from workflow.scripts.experiment import Experiment
from workflow.scripts.figures import make_figure, use_style
from workflow.scripts.import_published import PublishedFormatError, decode_name, import_published
from workflow.scripts.runids import RunKey, parse_member, parse_run_id
from workflow.scripts.runscsv import COLUMNS, read_runs, write_runs

SOURCES = {  # comparison -> published file that feeds it (docs/protocol.md "Published result files")
    "main": "v1/loss_overview_all.csv",
    "muloss_lambda": "v1/loss_overview_all.csv",
    "zloss_lambda": "v1/loss_overview_all.csv",
    "main_v2": "v2/loss_overview_all.csv",
    "tied": "v2/loss_overview_all.wt.csv",
    "centering_ratio": "v1/loss_overview.csv",
}


@pytest.fixture(scope="module")
def experiment(paper_experiment):
    return Experiment.load(paper_experiment)


@pytest.fixture(scope="module")
def published_runs(published_dir, experiment, tmp_path_factory):
    """Each published file imported through the CLI into a runs.csv, then read back."""
    out = {}
    folder = tmp_path_factory.mktemp("imported")
    for name in sorted(set(SOURCES.values())):
        path = folder / (name.replace("/", "_") + ".runs.csv")
        run_module("workflow.scripts.import_published", "--csv", str(published_dir / name),
                   "--experiment", str(experiment_path(experiment, folder)), "--out", str(path))  # fmt: skip
        out[name] = read_runs(path)
    return out


def experiment_path(experiment, folder):
    path = folder / "experiment.yaml"
    if not path.exists():
        import yaml

        path.write_text(yaml.safe_dump(experiment.raw))
    return path


def table(published_runs, experiment, comparison, name):
    runs = published_runs[SOURCES[comparison]]
    return compute_tables(runs, experiment, experiment.comparison(comparison))[name][0].set_index("scale")


def test_main_lr_sensitivity_matches_the_paper(published_runs, experiment):
    lrs = table(published_runs, experiment, "main", "lr_sensitivity")
    assert list(lrs.columns[1:]) == ["baseline", "zloss:1e-4", "muloss:1e-4", "mucentering"]
    for scale, expected in {"16M": [0.306, 0.054, 0.031, 0.028], "29M": [0.391, 0.033, 0.027, 0.029]}.items():
        assert lrs.loc[scale].iloc[1:].tolist() == pytest.approx(expected, abs=5e-4)


def test_best_lr_tie_rule_and_best_loss(published_runs, experiment):
    assert table(published_runs, experiment, "main", "best_lr").loc["221M", "baseline"] == pytest.approx(1e-3)
    best = table(published_runs, experiment, "main", "best_loss")
    assert [round(x, 2) for x in best.loc["16M"].iloc[1:]] == [3.84, 3.84, 3.84, 3.84]


def test_relative_time_pools_all_lambdas(published_runs, experiment):
    rel = table(published_runs, experiment, "main", "rel_time")
    assert (100 * rel.loc["16M"].iloc[1:]).tolist() == pytest.approx([0.0, 6.4, 0.4, 0.6], abs=0.05)


def test_paper_tex_rows(published_runs, experiment, paper_experiment, published_dir, tmp_path):
    runs_csv = tmp_path / "runs.csv"
    write_runs(published_runs["v1/loss_overview_all.csv"], runs_csv)
    run_module("workflow.scripts.tables", "--runs", str(runs_csv), "--experiment", str(paper_experiment),
               "--comparison", "main", "--out-dir", str(tmp_path / "main"))  # fmt: skip
    first = {
        t: (tmp_path / "main" / f"{t}.tex").read_text().splitlines()[0]
        for t in ("best_loss", "best_lr", "lr_sensitivity", "rel_time")
    }
    assert first["best_loss"] == "16000000 & 3.84 & 3.84 & 3.84 & 3.84 \\\\"
    assert first["best_lr"] == "16000000 & 1e-2 & 1e-2 & 1e-2 & 1e-2 \\\\"
    assert first["lr_sensitivity"] == "16000000 & 0.306 & 0.054 & 0.031 & 0.028 \\\\"
    assert first["rel_time"] == "16000000 & 0.0\\% & 6.4\\% & 0.4\\% & 0.6\\% \\\\"
    csv = pd.read_csv(tmp_path / "main" / "lr_sensitivity.csv")
    assert list(csv.columns) == ["scale", "params", "baseline", "zloss:1e-4", "muloss:1e-4", "mucentering"]
    assert "| 16M | 16000000 | 0.306 |" in (tmp_path / "main" / "lr_sensitivity.md").read_text()


@pytest.mark.parametrize("comparison", list(SOURCES))
def test_every_assigned_comparison_builds_tables_and_figures(published_runs, experiment, comparison):
    use_style()
    runs = published_runs[SOURCES[comparison]]
    spec = experiment.comparison(comparison)
    tables = compute_tables(runs, experiment, spec)
    assert all(len(mean) == 5 for mean, _ in tables.values())
    assert not tables["lr_sensitivity"][0].iloc[:, 2:].isna().any().any()
    fig = make_figure("test_loss", runs, experiment, spec)
    ax = fig.axes[0]
    assert len(ax.lines) == len(spec.members) * 5  # one line per member and scale
    assert all(len(line.get_xdata()) == 7 for line in ax.lines)  # seven learning rates each
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "learning rate" and ax.get_ylabel() == "test loss"


def test_lrs_figure_is_log_log_with_one_line_per_member(published_runs, experiment):
    use_style()
    fig = make_figure(
        "lr_sensitivity", published_runs[SOURCES["main"]], experiment, experiment.comparison("main")
    )
    ax = fig.axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert len(ax.lines) == 4 and all(len(line.get_xdata()) == 5 for line in ax.lines)
    assert ax.get_ylabel() == "LR sensitivity"


def test_b_ratio_histogram_only_where_the_data_has_it(published_runs, experiment):
    use_style()
    runs = published_runs["v1/loss_overview.csv"]
    fig = make_figure("b_ratio_hist", runs, experiment, experiment.comparison("centering_ratio"))
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert sum(heights) == 35  # the 35 baseline runs
    with pytest.raises(Exception, match="no b_ratio"):
        make_figure(
            "b_ratio_hist",
            published_runs["v1/loss_overview_all.csv"],
            experiment,
            experiment.comparison("main"),
        )


def test_diverged_points_are_filled(published_runs, experiment):
    use_style()
    runs = published_runs[SOURCES["main"]]
    labels = label_divergence(runs, experiment.comparison("main"))
    fig = make_figure("test_loss", runs, experiment, experiment.comparison("main"))
    filled = sum(len(c.get_offsets()) for c in fig.axes[0].collections)
    assert filled == int(labels["diverged_1pct"].sum()) > 0


def test_absent_members_are_named(published_runs, experiment, paper_experiment, tmp_path):
    runs = published_runs["v1/loss_overview_all.csv"]
    with pytest.raises(MissingMembers, match=r"softcap:30@tied.*in runs\.csv"):
        compute_tables(runs, experiment, experiment.comparison("tied"))
    runs_csv = tmp_path / "runs.csv"
    write_runs(runs, runs_csv)
    result = run_module("workflow.scripts.figures", "--runs", str(runs_csv), "--experiment", str(paper_experiment),
                        "--comparison", "tied", "--out-dir", str(tmp_path / "fig"), "--only", "test_loss", check=False)  # fmt: skip
    assert result.returncode == 2 and "baseline@tied" in result.stderr and str(runs_csv) in result.stderr
    assert not (tmp_path / "fig" / "test_loss.pdf").exists()


# --- hand-made numbers ------------------------------------------------------------------------


def hand_runs(losses: dict, seed: int = 1, times=None) -> pd.DataFrame:
    """{(method, value): [loss per lr]} at scale 16M, lrs 1e-3, 1e-2, 1e-1."""
    rows = []
    for (method, value), curve in losses.items():
        for lr, loss in zip([1e-3, 1e-2, 1e-1], curve, strict=True):
            key = RunKey("16M", method, value, lr, seed, False)
            status = "completed" if math.isfinite(loss) else "diverged"
            rows.append({"run": key.run_id, "scale": "16M", "params": 16e6, "method": method, "value": value, "lr": lr,
                         "seed": seed, "tied": False, "status": status, "test_loss": loss,
                         "train_time_s": (times or {}).get(method, 100.0)})  # fmt: skip
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def hand_experiment():
    return Experiment(
        {"scales": {"16M": {"params": 16e6, "L0": 10.0}}, "comparisons": {"c": ["baseline", "zloss:1e-4"]}}
    )


def test_lrs_counts_a_non_finite_run_as_L0_and_best_loss_skips_it():
    runs = hand_runs({("baseline", None): [4.0, 3.0, math.nan], ("zloss", 1e-4): [4.0, 3.5, 12.0]})
    exp = hand_experiment()
    tables = compute_tables(runs, exp, exp.comparison("c"))
    lrs = tables["lr_sensitivity"][0].iloc[0]
    assert lrs["baseline"] == pytest.approx(((4 - 3) + 0 + (10 - 3)) / 2)  # NaN -> L0 = 10
    assert lrs["zloss:1e-4"] == pytest.approx(((4 - 3.5) + 0 + (10 - 3.5)) / 2)  # 12 capped at L0
    assert tables["best_loss"][0].iloc[0]["baseline"] == 3.0
    assert tables["best_lr"][0].iloc[0]["baseline"] == 1e-2
    assert lr_sensitivity(pd.Series([math.nan, math.nan], index=[1e-3, 1e-2]), 10.0) != lr_sensitivity(
        pd.Series([1.0, 1.0]), 10.0
    )


def test_ties_go_to_the_smaller_lr_and_relative_time():
    runs = hand_runs(
        {("baseline", None): [3.0, 3.0, 3.0], ("zloss", 1e-4): [3.2, 3.1, 3.1]},
        times={"baseline": 100.0, "zloss": 110.0},
    )
    exp = hand_experiment()
    tables = compute_tables(runs, exp, exp.comparison("c"))
    assert tables["best_lr"][0].iloc[0]["baseline"] == 1e-3
    assert tables["best_lr"][0].iloc[0]["zloss:1e-4"] == 1e-2
    assert tables["rel_time"][0].iloc[0].tolist()[2:] == pytest.approx([0.0, 0.10])


def test_one_percent_label():
    runs = hand_runs({("baseline", None): [3.00, 3.00, 3.50], ("zloss", 1e-4): [3.02, 3.04, 3.50]})
    labels = label_divergence(runs, hand_experiment().comparison("c")).set_index(["member", "lr"])
    assert not labels.loc[("zloss:1e-4", 1e-3), "diverged_1pct"]  # 0.67% above the best
    assert labels.loc[("zloss:1e-4", 1e-2), "diverged_1pct"]  # 1.3% above
    assert not labels.loc[("baseline", 1e-1), "diverged_1pct"]


def test_two_seeds_give_mean_and_std(tmp_path):
    runs = pd.concat([
        hand_runs({("baseline", None): [4.0, 3.0, 3.5], ("zloss", 1e-4): [4.0, 3.2, 3.3]}, seed=1),
        hand_runs({("baseline", None): [4.0, 3.2, 3.1], ("zloss", 1e-4): [4.0, 3.4, 3.1]}, seed=2),
    ])  # fmt: skip
    exp = hand_experiment()
    tables = compute_tables(runs, exp, exp.comparison("c"))
    mean, std = tables["best_loss"]
    assert mean.iloc[0]["baseline"] == pytest.approx(3.05) and std.iloc[0]["baseline"] == pytest.approx(0.05)
    # best lr from the seed-mean curve: baseline mean (4.0, 3.1, 3.3) -> 1e-2; zloss (4.0, 3.3, 3.2) -> 1e-1
    assert tables["best_lr"][0].iloc[0].tolist()[2:] == [1e-2, 1e-1]
    from workflow.scripts.tables import to_tex

    assert to_tex("best_loss", mean, std).startswith("16000000 & 3.05 $\\pm$ 0.05 & ")


# --- ids, import and aggregate ---------------------------------------------------------------


@pytest.mark.parametrize("key", [
    RunKey("16M", "muloss", 1e-4, 1e-3, 1, False), RunKey("221M", "softcap", 30.0, 0.3, 1, True),
    RunKey("16M", "baseline", None, 3e-4, 1, False), RunKey("1.5B", "zloss", 1e-7, 1e-5, 12, False),
])  # fmt: skip
def test_run_ids_round_trip(key):
    assert parse_run_id(key.run_id) == key


def test_run_id_spellings():
    assert RunKey("16M", "muloss", 1e-4, 1e-3, 1, False).run_id == "16M-muloss-g0.0001-lr0.001-s1"
    assert RunKey("221M", "softcap", 30.0, 0.3, 1, True).run_id == "221M-softcap-c30-lr0.3-s1-tied"
    assert RunKey("16M", "baseline", None, 3e-4, 1, False).run_id == "16M-baseline-lr0.0003-s1"
    for bad in ["16M-baseline-lr3e-4-s1", "16M-muloss-lr0.001-s1", "16M-baseline-g1-lr0.1-s1", "x"]:
        with pytest.raises(ValueError):
            parse_run_id(bad)
    assert parse_member("zloss:1e-4").matches("zloss", 0.0001, False)
    assert not parse_member("zloss:1e-4").matches("zloss", 0.0001, True)
    assert parse_member("softcap:30@tied").matches("softcap", 30.0, True)
    with pytest.raises(ValueError, match="needs a value"):
        parse_member("zloss")


def test_published_names_decode_to_our_ids():
    assert (
        decode_name("wor40A-16M-13p1B-100k-bs64-lr10-baseline-g0e+00-s1", "f").run_id
        == "16M-baseline-lr0.001-s1"
    )
    assert (
        decode_name("wor40Z-16M-13p1B-100k-bs64-lr3-zloss-g1e-04-s1", "f").run_id
        == "16M-zloss-g0.0001-lr0.0003-s1"
    )
    assert (decode_name("worC0s-221M-13p1B-100k-bs64-lr3000-softcappingwt-g3e+01-s1", "f").run_id
            == "221M-softcap-c30-lr0.3-s1-tied")  # fmt: skip
    with pytest.raises(PublishedFormatError, match="cannot decode"):
        decode_name("16M-baseline", "f")


def test_import_maps_columns_and_keeps_units(published_dir, experiment):
    runs = import_published([published_dir / "v1/loss_overview.csv"], experiment).set_index("run")
    row = runs.loc["16M-baseline-lr0.001-s1"]
    assert (row["test_loss"], row["mu_norm"], row["smax"], row["b_ratio"]) == (3.881, 2.212, 522.03, 0.818)
    assert (row["logit_mean"], row["logit_std"], row["logit_mean_std"], row["lse2"], row["train_time_s"]) == (
        -1.3906, 2.8594, 8.4375, 328.0, 4879.6)  # fmt: skip
    assert len(runs) == 140 and set(runs["method"]) == {"baseline", "zloss", "muloss", "mucentering"}


# A few rows in the published files' format (their header, values made up), so the import and the
# formulas are pinned on a fresh clone without the paper's CSVs.
PUBLISHED_HEADER = ("name,test_loss (~),test_loss,O.mu norm,O.max norm,O.avg norm,O.min norm,O.Smin,O.Smax,"
                    "O.logits_mean_mean,O.logits_mean_std,O.logits_std_mean,O.logits_std_std,"
                    "O.logits_mean_absmean,O.logits_mean_absmax,H.mean_logsqZ,time")  # fmt: skip
PUBLISHED_ROWS = {  # name: (test_loss, O.mu norm, time)
    "wor40A-16M-13p1B-100k-bs64-lr10-baseline-g0e+00-s1": (3.90, 2.2, 4000.0),
    "wor40A-16M-13p1B-100k-bs64-lr100-baseline-g0e+00-s1": (3.80, 20.0, 4000.0),
    "wor40A-16M-13p1B-100k-bs64-lr1000-baseline-g0e+00-s1": (4.30, 180.0, 4000.0),
    "wor40M-16M-13p1B-100k-bs64-lr10-mucentering-g0e+00-s1": (3.91, 0.0, 4040.0),
    "wor40M-16M-13p1B-100k-bs64-lr100-mucentering-g0e+00-s1": (3.81, 0.0, 4040.0),
    "wor40M-16M-13p1B-100k-bs64-lr1000-mucentering-g0e+00-s1": (3.85, 0.0, 4040.0),
}


def test_hand_made_published_rows_import_and_give_hand_computed_tables(tmp_path):
    csv = tmp_path / "loss_overview_all.csv"
    lines = [PUBLISHED_HEADER]
    for name, (loss, mu, time) in PUBLISHED_ROWS.items():
        lines.append(f"{name},{loss},{loss},{mu},1,1,1,1,1,0.5,2.5,8,0.3,7,20,300,{time}")
    csv.write_text("\n".join(lines) + "\n")
    exp = Experiment({"scales": {"16M": {"params": 16e6, "L0": 10.83}},
                      "comparisons": {"c": ["baseline", "mucentering"]}})  # fmt: skip
    runs = import_published([csv], exp).set_index("run")
    assert runs.loc["16M-baseline-lr0.01-s1", ["test_loss", "mu_norm", "train_time_s"]].tolist() == [
        3.8,
        20.0,
        4000.0,
    ]
    assert runs.loc["16M-mucentering-lr0.1-s1", "lr"] == 0.1 and runs["status"].eq("published").all()
    tables = compute_tables(runs.reset_index(), exp, exp.comparison("c"))
    lrs = tables["lr_sensitivity"][0].iloc[0]
    assert lrs["baseline"] == pytest.approx(((3.90 - 3.80) + 0 + (4.30 - 3.80)) / 2)  # 0.30
    assert lrs["mucentering"] == pytest.approx(((3.91 - 3.81) + 0 + (3.85 - 3.81)) / 2)  # 0.07
    assert tables["best_lr"][0].iloc[0][["baseline", "mucentering"]].tolist() == [1e-2, 1e-2]
    assert tables["rel_time"][0].iloc[0]["mucentering"] == pytest.approx(0.01)  # 4040 / 4000 - 1


def test_aggregate_lists_missing_runs(tmp_path):
    exp = hand_experiment()
    done = tmp_path / "16M-baseline-lr0.001-s1"
    done.mkdir()
    metrics = {**dict.fromkeys(RUNS_EVAL_METRICS, 1.0), "test_loss": 3.5}  # a complete evaluation
    (done / "eval.json").write_text(json.dumps({"status": "completed", **metrics}))
    (done / "train.json").write_text(
        json.dumps({"status": "completed", "train_time_s": 12.0, "tokens_per_s": 99.0})
    )
    frame = aggregate([done, tmp_path / "16M-zloss-g0.0001-lr0.001-s1"], exp).set_index("run")
    assert frame.loc["16M-baseline-lr0.001-s1", "test_loss"] == 3.5
    assert frame.loc["16M-baseline-lr0.001-s1", "train_time_s"] == 12.0
    assert frame.loc["16M-zloss-g0.0001-lr0.001-s1", "status"] == "missing"
    assert np.isnan(frame.loc["16M-zloss-g0.0001-lr0.001-s1", "test_loss"])


def test_training_curves_and_overlay(tmp_path):
    use_style()
    runs = hand_runs({("baseline", None): [4.0, 3.0, 3.5], ("zloss", 1e-4): [4.0, 3.2, 3.1]})
    exp = hand_experiment()
    for run_id in runs["run"]:
        (tmp_path / run_id).mkdir()
        rows = [{"step": s, "loss": 5.0 - s / 10} for s in (1, 2, 3, 4)]
        (tmp_path / run_id / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = make_figure("train_loss", runs, exp, exp.comparison("c"), runs_dir=tmp_path)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and all(len(line.get_xdata()) == 4 for line in ax.lines)
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == [
        "baseline (lr 0.01)",
        "zloss:1e-4 (lr 0.1)",
    ]
    reference = hand_runs({("baseline", None): [4.1, 3.1, 3.6], ("zloss", 1e-4): [4.1, 3.3, 3.2]})
    fig = make_figure("overlay", runs, exp, exp.comparison("c"), reference=reference)
    styles = sorted(line.get_linestyle() for line in fig.axes[0].lines)
    assert styles == ["-", "-", "--", "--"]  # ours solid, the reference dashed


# --- degenerate grids ------------------------------------------------------------------------

DEGENERATE = {  # a grid the schema allows: every figure and table is still written
    "one lr": lambda runs: runs[runs["lr"] == 1e-2],
    "one member": lambda runs: runs[runs["method"] == "baseline"],
    "one run": lambda runs: runs[(runs["lr"] == 1e-2) & (runs["method"] == "baseline")],
}


@pytest.mark.parametrize("case", DEGENERATE)
def test_degenerate_grids_give_every_figure_and_table(tmp_path, capsys, case):
    import yaml

    from workflow.scripts import figures, tables

    runs = DEGENERATE[case](
        hand_runs({("baseline", None): [4.0, 3.0, 3.5], ("zloss", 1e-4): [4.0, 3.2, 3.1]})
    )
    runs = runs.assign(mu_norm=1.0, logit_mean=0.1, logit_std=1.0, logit_absmax=5.0)
    write_runs(runs, tmp_path / "runs.csv")
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(hand_experiment().raw))
    common = ["--runs", str(tmp_path / "runs.csv"), "--experiment", str(tmp_path / "experiment.yaml"),
              "--comparison", "c"]  # fmt: skip
    assert tables.main([*common, "--out-dir", str(tmp_path / "tables")]) == 0
    assert len(list((tmp_path / "tables").glob("*.md"))) == len(tables.TABLES)
    names = [n for n in figures.FIGURES if n not in (*figures.RUN_CURVES, "overlay")]
    assert figures.main([*common, "--out-dir", str(tmp_path / "fig"), "--only", *names, "--placeholder"]) == 0
    written = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert written == sorted(f"{n}.{ext}" for n in names for ext in ("pdf", "png"))
    one_lr = runs["lr"].nunique() == 1
    reason = "lr_sensitivity: LR sensitivity needs at least two learning rates per scale"
    assert (f"placeholder: c/{reason}" in capsys.readouterr().err) == one_lr
    if one_lr:  # without --placeholder, a figure that cannot be drawn is an error that says why
        assert figures.main([*common, "--out-dir", str(tmp_path / "strict"), "--only", "lr_sensitivity"]) == 2
        assert f"error: c/{reason}" in capsys.readouterr().err
        assert not (tmp_path / "strict").exists()
