"""Axes: any run-config key as a sweep axis, its run-id codec, member pins, the registries."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.config import AXES, MethodConfig, axis_code
from trainer.contract import METHODS, example_params
from workflow.scripts.grid import ExperimentError, Grid, load
from workflow.scripts.import_published import METHODS as PUBLISHED_METHODS
from workflow.scripts.runids import RUN_WILDCARD, RunKey, parse_member, parse_run_id

REPO = Path(__file__).resolve().parents[1]
# sha256 of the paper's 560 run ids (sorted, one per line) as the code before axes made them.
PAPER_IDS_SHA256 = "ae285664d98f400c"


def test_paper_run_ids_are_unchanged():
    ids = sorted(load(REPO / "config/paper.yaml").runs)
    assert len(ids) == 560
    assert hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16] == PAPER_IDS_SHA256


def axes_experiment(**grid_extra) -> dict:
    config = yaml.safe_load((REPO / "config/axes_demo.yaml").read_text())
    config["grids"][0].update(grid_extra)
    if "axes" in grid_extra or "zip" in grid_extra:  # the comparisons pin the file's own axes
        config["comparisons"] = {"all": ["baseline"]}
    return config


def test_axes_expand_as_a_product_and_name_only_non_defaults():
    grid = Grid(axes_experiment())
    assert len(grid.runs) == 3 * 2 * 2
    assert "tiny-baseline-lr0.01-s1" in grid.runs  # cosine + swiglu: the defaults, no part
    run = grid.runs["tiny-baseline-lr0.01-s1-mlp_gelu-sched_wsd"]
    config = grid.run_config(run.id)
    assert (config["optim"]["schedule"], config["model"]["mlp"]) == ("wsd", "gelu")
    assert grid.axes == ["optim.schedule", "model.mlp"]


def test_zip_pairs_values_and_run_ids_round_trip():
    grid = Grid(axes_experiment(axes={}, zip=[{"train.steps": [60, 120], "optim.warmup": [5, 10]}]))
    ids = sorted(grid.runs)
    assert len(ids) == 3 * 2  # paired, not 3 x 2 x 2
    assert "tiny-baseline-lr0.01-s1-T_60-wu_5" in ids and "tiny-baseline-lr0.01-s1-T_120-wu_10" in ids
    for run_id, run in grid.runs.items():
        assert re.fullmatch(RUN_WILDCARD, run_id)
        assert parse_run_id(run_id) == run.key
        config = grid.run_config(run_id)
        assert (config["train"]["steps"], config["optim"]["warmup"]) in ((60, 5), (120, 10))


@pytest.mark.parametrize(
    "axes",
    [
        {"optim.weight_decay": [0, 0.1]},  # an int in YAML is a float key: 0 is the default
        {"optim.beta2": ["9.9e-1"]},  # YAML 1.1 reads 9.9e-1 as text
        {"model.qk_norm": [True, False]},
        {"train.batch_size": [8, 16]},
        {"optim.min_lr": [1e-05, 1e-6]},
    ],
)
def test_codec_round_trips_every_kind_of_value(axes):
    grid = Grid(axes_experiment(axes=axes))
    for run_id, run in grid.runs.items():
        assert parse_run_id(run_id) == run.key, run_id


def test_codec_refuses_non_canonical_and_unknown_ids():
    good = "tiny-baseline-lr0.01-s1-mlp_gelu-sched_wsd"
    assert parse_run_id(good).axis_value("optim.schedule") == "wsd"
    for bad in (
        "tiny-baseline-lr0.01-s1-sched_wsd-mlp_gelu",  # not ordered by code
        "tiny-baseline-lr0.01-s1-sched_cosine",  # the default is never written
        "tiny-baseline-lr0.01-s1-zz_1",  # no such code
        "tiny-baseline-lr0.01-s1-sched_nope",  # not a schedule
        "tiny-baseline-lr0.01-s1-T_0120",  # not the shortest spelling
    ):
        with pytest.raises(ValueError):
            parse_run_id(bad)


def test_axis_codes_are_unique_and_documented():
    codes = [axis_code(k) for k in AXES]
    assert len(codes) == len(set(codes))
    readme = (REPO / "config/README.md").read_text()
    for key in AXES:
        assert re.search(rf"`{re.escape(key)}`\s*\|\s*`{axis_code(key)}`", readme), key


@pytest.mark.parametrize(
    "grid_extra, message",
    [
        ({"axes": {"optim.nope": [1, 2]}}, "'optim.nope' is not a run-config key that can be swept"),
        ({"axes": {"optim.lr": [1e-3]}}, "'optim.lr' is not a run-config key"),  # the grid's lrs
        ({"axes": {"optim.schedule": ["cosine", "cubic"]}}, "'cubic' is not one of"),
        (
            {"axes": {"model.mlp": ["gelu"]}, "overrides": {"model": {"mlp": "swiglu"}}},
            "both an axis and an override",
        ),
        ({"zip": [{"train.steps": [60, 120], "optim.warmup": [5]}]}, "differ in length"),
        ({"methods": {"baseline": {"cap": [30]}}}, "methods.baseline.cap: not a parameter of baseline"),
        ({"methods": {"dropout": {}}}, "unknown method 'dropout'"),
    ],
)
def test_bad_axes_are_refused_naming_the_key(grid_extra, message):
    with pytest.raises(ExperimentError, match=re.escape(message)):
        Grid(axes_experiment(**grid_extra))


def test_two_grids_differing_only_in_overrides_point_to_axes():
    config = axes_experiment(axes={})
    config["grids"].append({**config["grids"][0], "overrides": {"optim": {"schedule": "wsd"}}})
    with pytest.raises(ExperimentError, match="sweep the key as an axis"):
        Grid(config)


def test_member_pins_select_runs_and_unknown_pins_are_refused():
    grid = Grid(axes_experiment())
    ids = grid.members_runs("schedule")
    assert len(ids) == 12  # both members: every run, once
    wsd = parse_member("baseline,optim.schedule=wsd")
    assert wsd.pins == (("optim.schedule", "wsd"),)
    chosen = [r for r in grid.runs.values() if grid._matches(wsd, r)]
    assert len(chosen) == 6 and all("sched_wsd" in r.id for r in chosen)
    config = axes_experiment()
    config["comparisons"]["bad"] = ["baseline,train.steps=60"]
    with pytest.raises(ExperimentError, match="pins train.steps, which no grid sweeps"):
        Grid(config)
    with pytest.raises(ValueError, match="not key=value"):
        parse_member("baseline,optim.nope=1")


def test_registry_drives_config_bench_and_import():
    params = {p.key for option in METHODS.values() for p in option.params}
    fields = {f.rstrip("_") for f in MethodConfig.__dataclass_fields__} - {"name"}
    assert fields == params  # one run-config key per hyper-parameter of the registry
    assert set(PUBLISHED_METHODS.values()) <= set(METHODS)
    for name, option in METHODS.items():
        assert len(option.params) <= 1  # run ids and members have one value part
        assert set(example_params(name)) == {p.key for p in option.params}
    readme = (REPO / "config/README.md").read_text()
    assert all(f"`{name}`" in readme for name in METHODS)


def test_grid_and_codec_import_no_torch():
    code = "import sys; import workflow.scripts.grid; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_run_key_axes_leave_defaults_out():
    assert RunKey.axes_of({"optim.schedule": "cosine", "model.mlp": "gelu"}) == (("model.mlp", "gelu"),)


@pytest.mark.parametrize(
    "optim, message",
    [
        ({"name": "adamx"}, "optim.name: 'adamx' is not one of adamw, muon"),
        ({"rho": 0.1}, "optim.rho: not a hyper-parameter of optimizer adamw"),
        ({"name": "lion", "momentum": 0.9}, "optim.momentum: not a hyper-parameter of optimizer lion"),
        ({"name": "sfadamw"}, "optim.schedule: schedule-free AdamW (sfadamw) needs `constant`"),
    ],
)
def test_a_bad_optimizer_or_a_foreign_hyper_parameter_stops_the_plan(optim, message):
    config = axes_experiment()
    config["protocol"]["optim"].update(optim)
    with pytest.raises(ExperimentError, match=re.escape(message)):
        Grid(config)
