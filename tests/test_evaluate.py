"""trainer.evaluate end to end on tiny finished runs."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import run_module, run_trainer, tiny_config, write_config
from trainer.config import load_config
from trainer.evaluate import METRICS
from trainer.methods import build_method
from trainer.model import GPT
from trainer.shards import ValidationSet, find_shards


def evaluate(run, *extra, nproc=1, check=True, cpu=False):
    flag = "--run" if nproc == 1 else "--run-dir"  # torchrun's parser would take --run for --run-path
    return run_module("trainer.evaluate", flag, str(run), *extra, nproc=nproc, check=check, cpu=cpu)


def copy_run(run, tmp_path):
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


def test_eval_json_has_every_metric_and_the_provenance(trained_runs, tmp_path):
    run = copy_run(trained_runs["baseline"], tmp_path)
    evaluate(run)
    result = json.loads((run / "eval.json").read_text())
    assert set(METRICS) <= set(result)
    assert all(math.isfinite(result[k]) for k in METRICS)
    assert result["status"] == "completed" and result["step"] == 12
    assert result["tokens_evaluated"] == 6 * 4 * 16
    assert result["validation_data"] == [
        {"file": "tiny_val_000000.bin", "bytes": 1024 + 40_000, "tokens": 20_000}
    ]
    assert result["wall_s"] > 0
    assert {"in_mu_norm", "in_smax", "in_b_ratio"} <= set(result)  # untied: the input side too


def test_test_loss_equals_a_direct_computation(trained_runs, tmp_path):
    run = copy_run(trained_runs["baseline"], tmp_path)
    evaluate(run)
    cfg = load_config(run / "config.yaml")
    model = GPT(cfg.model, build_method(cfg.method))
    model.load_state_dict(torch.load(run / "final.pt", weights_only=True)["model"])
    windows = ValidationSet(find_shards(cfg.data.dir, cfg.data.val_pattern), cfg.model.seq_len).read(
        range(24)
    )
    with torch.no_grad():
        logits = model(windows[:, :-1])
    expected = F.cross_entropy(logits.reshape(-1, 64), windows[:, 1:].reshape(-1)).item()
    assert json.loads((run / "eval.json").read_text())["test_loss"] == pytest.approx(expected, rel=1e-6)


def test_mucentering_run_has_zero_mu_and_zero_mean_logit(trained_runs, tmp_path):
    run = copy_run(trained_runs["mucentering"], tmp_path)
    evaluate(run)
    result = json.loads((run / "eval.json").read_text())
    assert result["mu_norm"] < 1e-6
    assert abs(result["logit_mean"]) < 1e-5
    assert not any(key.startswith("in_") for key in result)  # tied: one matrix


@pytest.mark.slow
def test_two_gloo_processes_equal_one(trained_runs, tmp_path):
    one = copy_run(trained_runs["baseline"], tmp_path / "one")
    two = copy_run(trained_runs["baseline"], tmp_path / "two")
    evaluate(one, cpu=True)
    evaluate(two, nproc=2)
    a = json.loads((one / "eval.json").read_text())
    b = json.loads((two / "eval.json").read_text())
    assert b["world_size"] == 2 and a["tokens_evaluated"] == b["tokens_evaluated"]
    for key in METRICS:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_intermediate_step_and_missing_step(trained_runs, tmp_path):
    run = copy_run(trained_runs["baseline"], tmp_path)
    evaluate(run, "--step", "8")
    assert json.loads((run / "eval_step8.json").read_text())["step"] == 8
    result = evaluate(run, "--step", "5", check=False)
    assert result.returncode == 2
    assert "no checkpoint of step 5 is kept (kept steps: 4, 8)" in result.stderr


def test_missing_or_corrupt_final_weights_are_clear_errors(trained_runs, tmp_path):
    run = copy_run(trained_runs["baseline"], tmp_path)
    (run / "final.pt").unlink()
    result = evaluate(run, check=False)
    assert result.returncode == 2 and "final.pt: checkpoint not found" in result.stderr
    (run / "final.pt").write_bytes(b"not a checkpoint")
    result = evaluate(run, check=False)
    assert result.returncode == 2 and "final.pt: cannot read checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run / "eval.json").exists()


def test_diverged_run_gets_nan_metrics(tmp_path, tiny_data):
    run = tmp_path / "diverged"
    cfg = tiny_config(tiny_data, optim={"lr": 1e6, "min_lr": 0, "warmup": 0}, train={"steps": 30})
    run_trainer(write_config(run / "config.yaml", cfg), run)
    result = evaluate(run)
    assert "Traceback" not in result.stderr
    metrics = json.loads((run / "eval.json").read_text())
    assert metrics["status"] == "diverged"
    assert all(math.isnan(metrics[k]) for k in METRICS)
