"""The trainer end to end on tiny CPU runs: files, resume, signals, divergence, DDP, micro-batching."""

import json
import math
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, child_env, run_module, run_trainer, tiny_config, write_config
from trainer import train as train_module
from trainer.config import ConfigError, config_from_dict
from trainer.distributed import process_group

LOG_KEYS = {"step", "loss", "lr", "grad_norm", "mu_norm", "tokens_per_s", "elapsed_s"}
TRAIN_JSON_KEYS = {
    "status",
    "steps",
    "tokens",
    "train_time_s",
    "tokens_per_s",
    "peak_mem_gb",
    "versions",
    "git",
}


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_weights(run_dir):
    return torch.load(run_dir / "final.pt", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_run_writes_every_file_with_the_contract_keys(tmp_path, tiny_data):
    run = tmp_path / "run"
    cfg = write_config(
        run / "config.yaml", tiny_config(tiny_data, train={"eval_every": 6, "eval_batches": 2})
    )
    result = run_trainer(cfg, run)
    assert "eta" in result.stdout and "tok/s" in result.stdout
    rows = read_rows(run / "train.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(set(r) == LOG_KEYS for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns the random walk
    assert rows[0]["lr"] == pytest.approx(1e-2 * 1 / 3)  # warmup 2: lr * (t+1)/(W+1)
    info = json.loads((run / "train.json").read_text())
    assert set(info) == TRAIN_JSON_KEYS
    assert info["status"] == "completed" and info["steps"] == 12 and info["tokens"] == 12 * 8 * 16
    assert info["train_time_s"] > 0 and info["versions"]["torch"] == torch.__version__
    final = torch.load(run / "final.pt", weights_only=True)
    assert final["status"] == "completed" and "lm_head.weight" in final["model"]
    assert [r["step"] for r in read_rows(run / "val.jsonl")] == [6, 12]
    assert len(list((run / "checkpoints").glob("step_*.pt"))) == 2  # keep_checkpoints
    # a finished run exits at once
    again = run_trainer(cfg, run)
    assert "nothing to do" in again.stdout
    assert len(read_rows(run / "train.jsonl")) == 12


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_rerun_is_bit_identical(tmp_path, tiny_data):
    steps = 300
    overrides = {"train": {"steps": steps, "checkpoint_every": 7, "log_every": 1}}
    reference = tmp_path / "reference"
    run_trainer(write_config(reference / "config.yaml", tiny_config(tiny_data, **overrides)), reference)

    run = tmp_path / "killed"
    cfg = write_config(run / "config.yaml", tiny_config(tiny_data, **overrides))
    kill_at = random.Random().randint(20, steps - 60)
    cmd = [sys.executable, "-m", "trainer.train", "--config", str(cfg), "--out", str(run)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = run / "train.jsonl"
    while proc.poll() is None:
        if log.exists() and sum(1 for _ in log.open()) >= kill_at:
            proc.kill()
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill at step {kill_at}"
    assert not (run / "final.pt").exists()
    result = run_trainer(cfg, run)
    assert "resumed from" in result.stdout
    assert_same_weights(final_weights(run), final_weights(reference))
    rows = read_rows(run / "train.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # no duplicated steps in the log
    ref_rows = read_rows(reference / "train.jsonl")
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT])
@pytest.mark.slow
def test_stop_signal_saves_a_checkpoint_and_the_rerun_completes(tmp_path, tiny_data, sig):
    run = tmp_path / "run"
    cfg = write_config(
        run / "config.yaml", tiny_config(tiny_data, train={"steps": 400, "checkpoint_every": 0})
    )
    cmd = [sys.executable, "-m", "trainer.train", "--config", str(cfg), "--out", str(run)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = run / "train.jsonl"
    while not (log.exists() and sum(1 for _ in log.open()) >= 5):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert "checkpoint at step" in out
    assert not (run / "final.pt").exists()
    checkpoints = list((run / "checkpoints").glob("step_*.pt"))
    assert len(checkpoints) == 1
    stopped_at = torch.load(checkpoints[0], weights_only=True)["step"]
    assert stopped_at >= 5
    result = run_trainer(cfg, run)
    assert f"resumed from {checkpoints[0]} at step {stopped_at}" in result.stdout
    assert json.loads((run / "train.json").read_text())["steps"] == 400


@pytest.mark.slow
def test_changed_config_is_refused_on_resume(tmp_path, tiny_data):
    run = tmp_path / "run"
    cfg = write_config(run / "config.yaml", tiny_config(tiny_data, train={"steps": 8}))
    run_trainer(cfg, run)
    (run / "train.json").unlink()
    (run / "final.pt").unlink()
    write_config(run / "config.yaml", tiny_config(tiny_data, train={"steps": 8}, optim={"warmup": 3}))
    result = run_trainer(cfg, run, check=False)
    assert result.returncode == 2
    assert "made with a different run config" in result.stderr
    assert "Traceback" not in result.stderr
    # the workflow asks for a fresh start instead: it reruns a run exactly because its config changed
    result = run_module(
        "trainer.train", "--config", str(cfg), "--out", str(run), "--on-config-change", "restart"
    )
    assert "starting afresh" in result.stdout and "resumed" not in result.stdout
    assert [r["step"] for r in read_rows(run / "train.jsonl")] == list(range(1, 9))
    # a bookkeeping change is fine
    (run / "train.json").unlink()
    (run / "final.pt").unlink()
    write_config(
        run / "config.yaml", tiny_config(tiny_data, train={"steps": 8, "log_every": 2}, optim={"warmup": 3})
    )
    assert "resumed from" in run_trainer(cfg, run).stdout


def test_bad_config_and_missing_data_are_clear_errors(tmp_path, tiny_data):
    cfg = write_config(tmp_path / "a.yaml", tiny_config(tiny_data, optim={"lr": "fast"}))
    result = run_trainer(cfg, tmp_path / "a", check=False)
    assert result.returncode == 2 and "optim.lr: expected a number" in result.stderr
    cfg = write_config(tmp_path / "b.yaml", tiny_config(tmp_path / "nowhere"))
    result = run_trainer(cfg, tmp_path / "b", check=False)
    assert result.returncode == 2 and "no shard matches" in result.stderr


def test_injected_nan_ends_the_run_as_diverged(tmp_path, tiny_data, monkeypatch, in_process):
    run = tmp_path / "run"
    cfg = config_from_dict(tiny_config(tiny_data, train={"steps": 20, "checkpoint_every": 1, "log_every": 5}))
    original = train_module.Run.train_step

    def poisoned(self, lr):
        loss, grad_norm = original(self, lr)
        if self.step >= 7:  # from the 8th step on, the loss and the weights are NaN
            with torch.no_grad():
                self.model.lm_head.weight.fill_(float("nan"))
            loss = loss * float("nan")
        return loss, grad_norm

    monkeypatch.setattr(train_module.Run, "train_step", poisoned)
    assert train_module.train(cfg, run) == 0
    info = json.loads((run / "train.json").read_text())
    assert info["status"] == "diverged"
    assert info["steps"] == 8
    final = torch.load(run / "final.pt", weights_only=True)
    assert final["status"] == "diverged" and final["model"] is None
    for path in (run / "checkpoints").glob("step_*.pt"):
        state = torch.load(path, weights_only=True)
        assert state["step"] <= 7
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    # a diverged run is finished: re-running does nothing
    assert train_module.train(cfg, run) == 0


def test_diverged_run_from_the_cli_exits_zero_without_traceback(tmp_path, tiny_data):
    run = tmp_path / "run"
    cfg = write_config(
        run / "config.yaml",
        tiny_config(
            tiny_data, optim={"lr": 1e6, "min_lr": 0, "warmup": 0}, train={"log_every": 1, "steps": 30}
        ),
    )
    result = run_trainer(cfg, run, check=False)
    info = json.loads((run / "train.json").read_text())
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert info["status"] == "diverged" and info["steps"] < 30
    assert not math.isfinite(read_rows(run / "train.jsonl")[-1]["loss"])
    assert torch.load(run / "final.pt", weights_only=True)["model"] is None


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path, tiny_data):
    overrides = {"train": {"steps": 10, "batch_size": 8, "log_every": 1, "checkpoint_every": 5}}
    one, two = tmp_path / "one", tmp_path / "two"
    run_trainer(write_config(one / "config.yaml", tiny_config(tiny_data, **overrides)), one, cpu=True)
    result = run_trainer(write_config(two / "config.yaml", tiny_config(tiny_data, **overrides)), two, nproc=2)
    assert "world 2" in result.stdout
    a, b = read_rows(one / "train.jsonl"), read_rows(two / "train.jsonl")
    assert len(a) == len(b) == 10
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5, (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) < 1e-4


@pytest.mark.slow
def test_micro_batch_one_matches_the_full_per_rank_batch(tmp_path, tiny_data):
    losses = {}
    for micro in (1, 8):
        run = tmp_path / f"micro{micro}"
        cfg = tiny_config(tiny_data, train={"steps": 10, "batch_size": 8, "micro_batch": micro})
        result = run_trainer(write_config(run / "config.yaml", cfg), run)
        assert f"micro-batch {micro} x {8 // micro} accumulation" in result.stdout
        losses[micro] = [r["loss"] for r in read_rows(run / "train.jsonl")]
    assert max(abs(a - b) for a, b in zip(losses[1], losses[8])) < 1e-5


@pytest.mark.parametrize("method", [
    {"name": "zloss", "lambda": 1e-4}, {"name": "muloss", "lambda": 1e-4},
    {"name": "mucentering"}, {"name": "softcap", "cap": 30},
])  # fmt: skip
@pytest.mark.slow
def test_every_method_trains_tied_and_untied(tmp_path, tiny_data, method):
    for tied in (False, True):
        run = tmp_path / f"tied{tied}"
        cfg = tiny_config(tiny_data, method=method, model={"tied": tied}, train={"steps": 6})
        run_trainer(write_config(run / "config.yaml", cfg), run)
        rows = read_rows(run / "train.jsonl")
        assert all(math.isfinite(r["loss"]) for r in rows)
        if method["name"] == "mucentering":
            assert all(r["mu_norm"] < 1e-5 for r in rows)


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path, tiny_data, in_process):
    run = tmp_path / "run"
    cfg = config_from_dict(tiny_config(tiny_data, train={"eval_every": 6, "eval_batches": 2}))
    assert train_module.train(cfg, run) == 0
    (run / "final.pt").unlink()
    (run / "train.json").unlink()
    for name in ("train.jsonl", "val.jsonl"):  # what a kill or a full disk leaves mid-write
        with open(run / name, "a") as f:
            f.write('{"step": 13, "loss": 3.1')
    assert train_module.train(cfg, run) == 0
    assert [r["step"] for r in read_rows(run / "train.jsonl")] == list(range(1, 13))
    assert [r["step"] for r in read_rows(run / "val.jsonl")] == [6, 12]


@pytest.mark.slow
def test_sigkill_before_the_first_checkpoint_then_rerun_logs_each_step_once(tmp_path, tiny_data):
    steps = 200
    run = tmp_path / "run"
    cfg = write_config(
        run / "config.yaml", tiny_config(tiny_data, train={"steps": steps, "checkpoint_every": 0})
    )
    cmd = [sys.executable, "-m", "trainer.train", "--config", str(cfg), "--out", str(run)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = run / "train.jsonl"
    while proc.poll() is None:
        if log.exists() and sum(1 for _ in log.open()) >= 10:
            proc.kill()
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert not (run / "checkpoints").exists()
    killed_time = read_rows(log)[-1]["elapsed_s"]
    result = run_trainer(cfg, run)
    assert "resumed" not in result.stdout
    assert [r["step"] for r in read_rows(log)] == list(range(1, steps + 1))
    assert json.loads((run / "train.json").read_text())["train_time_s"] >= killed_time


def test_a_kill_before_the_first_new_log_row_loses_no_training_time(tmp_path, tiny_data, in_process):
    run = tmp_path / "run"
    run.mkdir()
    earlier = [{"step": s, "loss": 3.0, "elapsed_s": 1000.0 + s} for s in (1, 2, 3)]  # no checkpoint
    (run / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier))
    cfg = config_from_dict(tiny_config(tiny_data))
    with process_group() as d:
        train_module.Run(cfg, run, d)  # starts, and is killed before it logs a row
    assert not (run / "train.jsonl").exists()  # a fresh start logs from scratch
    assert train_module.train(cfg, run) == 0
    assert [r["step"] for r in read_rows(run / "train.jsonl")] == list(range(1, 13))
    assert json.loads((run / "train.json").read_text())["train_time_s"] >= 1003.0


def test_an_lr_that_overflows_float32_ends_the_run_as_diverged(tmp_path, tiny_data, in_process):
    run = tmp_path / "run"
    cfg = config_from_dict(tiny_config(tiny_data, optim={"lr": 1e39, "min_lr": 0}))  # inf in float32
    assert train_module.train(cfg, run) == 0
    info = json.loads((run / "train.json").read_text())
    assert info["status"] == "diverged" and info["steps"] == 0
    assert torch.load(run / "final.pt", weights_only=True)["model"] is None


def test_a_model_that_cannot_fit_the_memory_is_refused_before_allocating(tmp_path, tiny_data, capsys):
    model = {"n_layer": 1024, "n_embd": 16384, "n_head": 128}  # within each key's range: 3.3T parameters
    cfg = write_config(tmp_path / "run" / "config.yaml", tiny_config(tiny_data, model=model))
    assert train_module.main(["--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model: needs about 52,940.3 GB (3,302,865,780,736 parameters")
    assert "GB of device cpu" in err and err.count("\n") == 1


def test_memory_estimate_counts_weights_optimizer_and_activations(tiny_data):
    cfg = config_from_dict(tiny_config(tiny_data))
    n_params, micro = 1000, 4
    need = 16 * n_params + micro * 16 * train_module.activation_bytes_per_token(cfg)
    train_module.check_memory(cfg, n_params, micro, need, "a device of exactly that size")
    with pytest.raises(ConfigError, match="more than the 0.0 GB of a smaller one"):
        train_module.check_memory(cfg, n_params, micro, need - 1, "a smaller one")
