"""The boundary between trainer and workflow: run-directory layout and states, metric names."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.contract import RUNS_EVAL_METRICS, ExperimentDir, RunDir
from workflow.scripts import analysis, figures
from workflow.scripts.aggregate import aggregate
from workflow.scripts.experiment import Experiment

REPO = Path(__file__).resolve().parents[1]


def test_run_dir_states_follow_the_files(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.state() == "new"
    Path(run.path).mkdir()
    Path(run.config).write_text("run: r\n")
    assert run.state() == "configured"
    Path(run.checkpoints).mkdir()
    (Path(run.checkpoints) / "step_00000004.pt").write_bytes(b"")
    assert run.state() == "started"
    Path(run.train_info).write_text(json.dumps({"status": "diverged"}))
    assert (run.state(), run.status()) == ("trained", "diverged")
    Path(run.evaluation).write_text("{}")
    assert run.state() == "finished"


def test_experiment_layout_keeps_wildcards():
    layout = ExperimentDir("demo")
    assert layout.run("{run}").final == "results/demo/runs/{run}/final.pt"
    assert layout.table("{comparison}", "{table}", "md") == "results/demo/tables/{comparison}/{table}.md"


def finished_run(runs_dir: Path, run_id: str, metrics: dict) -> None:
    run = RunDir(runs_dir / run_id)
    Path(run.path).mkdir(parents=True)
    Path(run.config).write_text(yaml.safe_dump({"run": run_id, "optim": {"schedule": "wsd"}}))
    Path(run.evaluation).write_text(json.dumps({"status": "completed", **metrics}))
    Path(run.train_info).write_text(json.dumps({"status": "completed", "train_time_s": 3.0}))


def test_aggregate_refuses_a_completed_run_without_a_metric(tmp_path):
    experiment = Experiment({"experiment": "x", "scales": {"tiny": {}}, "axes": ["optim.schedule"]})
    metrics = dict.fromkeys(RUNS_EVAL_METRICS, 1.0)
    finished_run(tmp_path, "tiny-baseline-lr0.01-s1-sched_wsd", metrics)
    frame = aggregate([tmp_path / "tiny-baseline-lr0.01-s1-sched_wsd"], experiment)
    assert frame.loc[0, "optim.schedule"] == "wsd" and frame.loc[0, "train_time_s"] == 3.0
    del metrics["lse2"]  # a renamed or dropped metric must not become a column of NaN
    finished_run(tmp_path, "tiny-baseline-lr0.1-s1", metrics)
    with pytest.raises(ValueError, match=r"run tiny-baseline-lr0.1-s1: .*eval.json has no lse2"):
        aggregate([tmp_path / "tiny-baseline-lr0.1-s1"], experiment)


def test_a_run_never_evaluated_is_missing_with_its_axis_values(tmp_path):
    experiment = Experiment({"experiment": "x", "scales": {"tiny": {}}, "axes": ["model.mlp"]})
    frame = aggregate([tmp_path / "tiny-baseline-lr0.01-s1-mlp_gelu"], experiment)
    assert frame.loc[0, "status"] == "missing" and frame.loc[0, "model.mlp"] == "gelu"
    assert math.isnan(frame.loc[0, "test_loss"])


def test_library_modules_import_no_tool():
    """trainer/tools/ may import the library, never the other way round."""
    code = (
        "import sys, pkgutil, importlib, trainer, trainer.ops;"
        "[importlib.import_module('trainer.' + m.name) for m in pkgutil.iter_modules(trainer.__path__)"
        " if m.name != 'tools'];"
        "assert not [m for m in sys.modules if m.startswith('trainer.tools')], sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_the_schema_lists_exactly_the_tables_and_figures_that_exist():
    """An experiment file may name only tables and figures the scripts make, and every one of them
    (the overlay is drawn for `published` only, on request)."""
    schema = yaml.safe_load((REPO / "workflow/schemas/experiment.schema.yaml").read_text())["properties"]
    assert schema["tables"]["items"]["enum"] == list(analysis.TABLES)
    assert schema["figures"]["items"]["enum"] == [f for f in figures.FIGURES if f != "overlay"]
