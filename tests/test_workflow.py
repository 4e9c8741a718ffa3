"""The Snakemake workflow: dry-run counts, the demo end to end, rerun triggers, resume, bad input."""

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO
from workflow.scripts.grid import load
from workflow.scripts.runids import RUN_WILDCARD, parse_run_id

PAPER = REPO / "config" / "paper.yaml"


def snakemake(*args, cwd=REPO, check=True, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[-1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def dry_run(*targets, configfile=PAPER, cwd=REPO):
    result = snakemake("-n", *targets, "--quiet", "rules", "--configfile", str(configfile), cwd=cwd)
    return job_counts(result.stdout + result.stderr)


@pytest.mark.parametrize(
    "targets, expected",
    [
        ((), 560),
        (("results/paper/tables/main/lr_sensitivity.csv",), 140),
        (
            tuple(
                f"results/paper/tables/{c}/lr_sensitivity.csv"
                for c in ("main", "zloss_lambda", "muloss_lambda")
            ),
            350,
        ),
        (("results/paper/figures/tied/test_loss.pdf",), 175),
    ],
)
@pytest.mark.slow
def test_dry_run_train_jobs(tmp_path, targets, expected):
    counts = dry_run(*targets, cwd=tmp_path)
    assert counts["train_run"] == expected and counts["evaluate"] == expected


@pytest.mark.parametrize("configfile", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.slow
def test_every_experiment_file_plans(tmp_path, configfile):
    """Each shipped experiment file passes the schema and the grid, and plans one train job per run."""
    counts = dry_run(configfile=configfile, cwd=tmp_path)
    expected = 0 if configfile.name == "published.yaml" else len(load(configfile).runs)
    assert counts.get("train_run", 0) == expected and counts.get("evaluate", 0) == expected


def test_run_ids_round_trip_through_the_wildcard():
    grid = load(PAPER)
    assert len(grid.runs) == 560
    for run_id, run in grid.runs.items():
        assert re.fullmatch(RUN_WILDCARD, run_id), run_id
        assert parse_run_id(run_id) == run.key
    assert not re.fullmatch(RUN_WILDCARD, "16M-baseline-lr0.001-s1/final")


def test_plan_reports_gpu_hours_fast():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "workflow.scripts.plan", "--configfile", str(PAPER)],
                            cwd=REPO, capture_output=True, text=True, check=True)  # fmt: skip
    assert time.perf_counter() - start < 10
    assert "experiment paper: 560 runs, 0 finished" in result.stdout
    assert "measured on one H200" in result.stdout
    assert "comparison main: 140 runs, 140 to train, 843.5 GPU-hours" in result.stdout
    assert re.search(r"^train_run\s+112\s+112\s+112\s+112\s+112\s+560$", result.stdout, re.M)


@pytest.mark.slow
def test_lint_and_format_are_clean():
    assert "Congratulations" in snakemake("--lint").stdout + snakemake("--lint").stderr
    for configfile in ("config/paper.yaml", "config/published.yaml"):
        result = snakemake("--lint", "--configfile", configfile)
        assert "Congratulations" in result.stdout + result.stderr
    files = [str(REPO / "Snakefile"), *map(str, (REPO / "workflow" / "rules").glob("*.smk"))]
    subprocess.run(["snakefmt", "--check", *files], check=True, capture_output=True)


# --- the demo shape, small, end to end ---------------------------------------------------------

SMALL = {
    "experiment": "small",
    "data": {"dataset": "demo", "dir": "data/demo", "tokenizer": "bytes", "train_pattern": "demo_train_*.bin",
             "val_pattern": "demo_val_*.bin",
             "prepare": {"source": "demo", "args": "--shard-tokens 300000 --val-tokens 30000 --train-shards 2"}},
    "protocol": {"model": {"vocab_size": 320, "seq_len": 32},
                 "optim": {"warmup": 2, "min_lr": 1.0e-5},
                 "train": {"steps": 12, "batch_size": 8, "dtype": "float32", "checkpoint_every": 4, "checkpoint_minutes": 0,
                           "log_every": 2},
                 "eval": {"batches": 4, "micro_batch": 8, "logit_batches": 1}},
    "scales": {"tiny": {"n_layer": 1, "n_embd": 16, "params": 5000, "throughput": 5000},
               "small": {"n_layer": 1, "n_embd": 32, "params": 12000, "throughput": 5000}},
    "grids": [{"scales": ["tiny", "small"], "lrs": [1.0e-3, 1.0e-2], "seeds": [1],
               "methods": {"baseline": {}, "zloss": {"lambda": [1.0e-4]}, "muloss": {"lambda": [1.0e-4]}, "mucentering": {}}},
              {"scales": ["small"], "lrs": [1.0e-3, 1.0e-2], "seeds": [1], "tied": [True],
               "methods": {"baseline": {}, "softcap": {"cap": [30]}}}],
    "comparisons": {"main": ["baseline", "zloss:1e-4", "muloss:1e-4", "mucentering"],
                    "tied": ["baseline@tied", "softcap:30@tied"]},
}  # fmt: skip


def workspace(tmp_path: Path, experiment: dict) -> tuple[Path, Path]:
    """A copy of the code (so a test may edit it) and an experiment file in a fresh directory."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("Snakefile", "trainer", "data", "workflow", "profiles", "environment.yml"):
        source = REPO / item
        if source.is_dir():
            shutil.copytree(
                source, repo / item, ignore=shutil.ignore_patterns("__pycache__", "demo", "fineweb*")
            )
        else:
            shutil.copy(source, repo / item)
    configfile = repo / "config" / "experiment.yaml"
    configfile.parent.mkdir()
    configfile.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return repo, configfile


def run_in(repo: Path, *args, check=True, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "snakemake", *args]
    result = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


@pytest.mark.slow
def test_demo_shape_end_to_end_then_noop_then_exact_reruns(tmp_path):
    repo, configfile = workspace(tmp_path, SMALL)
    run_in(repo, "-c2", "--configfile", str(configfile))
    out = repo / "results" / "small"
    runs = (out / "runs.csv").read_text().splitlines()
    assert len(runs) == 1 + 20 and all(",completed," in line for line in runs[1:])
    for comparison in ("main", "tied"):
        for table in ("best_loss", "best_lr", "lr_sensitivity", "rel_time"):
            for ext in ("csv", "md", "tex"):
                assert (out / "tables" / comparison / f"{table}.{ext}").stat().st_size > 0
        figures = [
            "test_loss",
            "logit_mean",
            "logit_std",
            "logit_absmax",
            "mu_norm",
            "lr_sensitivity",
            "b_ratio_hist",
            "train_loss",
        ]
        for figure in figures:
            for ext in ("pdf", "png"):
                assert (out / "figures" / comparison / f"{figure}.{ext}").stat().st_size > 0
    assert (out / "runs" / "small-softcap-c30-lr0.01-s1-tied" / "logs" / "train.attempt1.log").exists()
    run_in(repo, "--report", "results/small/report.html", "--configfile", str(configfile))
    report = (out / "report.html").read_text(errors="replace")
    assert "lr_sensitivity" in report and "train_loss" in report
    assert "runs.csv" in report and "best_loss.csv" in report  # the tables and runs.csv too

    # a second invocation does nothing
    assert "Nothing to be done" in run_in(repo, "-n", "--configfile", str(configfile)).stdout

    # editing trainer code restarts nothing
    with open(repo / "trainer" / "model.py", "a") as f:
        f.write("\n# an edit that must not restart finished runs\n")
    assert "Nothing to be done" in run_in(repo, "-n", "--configfile", str(configfile)).stdout

    # a run-config value that is not part of the run id, changed for one method: exactly its runs rerun
    changed = yaml.safe_load(configfile.read_text())
    changed["grids"][0]["methods"]["zloss"]["overrides"] = {"optim": {"warmup": 3}}
    configfile.write_text(yaml.safe_dump(changed, sort_keys=False))
    result = run_in(repo, "-n", "--quiet", "rules", "--configfile", str(configfile))
    counts = job_counts(result.stdout + result.stderr)
    assert counts["configure_run"] == counts["train_run"] == counts["evaluate"] == 4  # 2 scales x 2 lrs
    detailed = run_in(repo, "-n", "--quiet", "host", "--configfile", str(configfile)).stdout  # job blocks
    retrained = set(re.findall(r"wildcards: run=(\S+)", detailed))
    assert retrained == {
        f"{s}-zloss-g0.0001-lr{lr}-s1" for s in ("tiny", "small") for lr in ("0.001", "0.01")
    }


@pytest.mark.slow
def test_axes_demo_shape_end_to_end(tmp_path):
    """config/axes_demo.yaml's grid and comparisons at the small shape's size: a column per axis
    in runs.csv, tables with a row per value of the other axis, figures."""
    experiment = yaml.safe_load((REPO / "config" / "axes_demo.yaml").read_text())
    experiment.update({k: SMALL[k] for k in ("experiment", "data", "protocol", "scales")})
    experiment["grids"][0].update(scales=["tiny"], lrs=[1.0e-3, 1.0e-2])
    repo, configfile = workspace(tmp_path, experiment)
    run_in(repo, "-c2", "--configfile", str(configfile))
    out = repo / "results" / "small"
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 * 2 * 2 and set(runs["status"]) == {"completed"}
    assert set(runs["optim.schedule"]) == {"cosine", "wsd"} and set(runs["model.mlp"]) == {"swiglu", "gelu"}
    assert "tiny-baseline-lr0.01-s1-mlp_gelu-sched_wsd" in set(runs["run"])
    for comparison, rows in (("schedule", ["gelu", "swiglu"]), ("mlp", ["cosine", "wsd"])):
        table = pd.read_csv(out / "tables" / comparison / "best_loss.csv")
        assert table.iloc[:, 0].tolist() == rows and table.iloc[:, 1:].notna().all().all()
        for figure in experiment["figures"]:
            assert (out / "figures" / comparison / f"{figure}.png").stat().st_size > 0


def start_snakemake(repo: Path, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "snakemake", "-c1", *args]
    return subprocess.Popen(
        cmd,
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def ctrl_c(proc: subprocess.Popen) -> None:
    """SIGINT to the whole process group, as Ctrl-C in a terminal does; a second one if Snakemake
    is still there after a minute (it can miss a SIGINT that arrives while it writes a log line,
    and then retries the interrupted job, as a user would see and press Ctrl-C again)."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=120)


def wait_for(condition, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(proc.communicate()[0][-3000:])
        time.sleep(0.2)


@pytest.mark.slow
def test_interrupted_training_resumes_from_its_checkpoint(tmp_path):
    slow = {**SMALL, "experiment": "slow",
            "grids": [{"scales": ["small"], "lrs": [1.0e-3], "seeds": [1], "methods": {"baseline": {}}}],
            "comparisons": {"main": ["baseline"]}}  # fmt: skip
    slow["protocol"] = {
        **SMALL["protocol"],
        "train": {**SMALL["protocol"]["train"], "steps": 100_000, "checkpoint_every": 20},
    }
    repo, configfile = workspace(tmp_path, slow)
    run_dir = repo / "results" / "slow" / "runs" / "small-baseline-lr0.001-s1"
    target = str(run_dir.relative_to(repo) / "final.pt")
    proc = start_snakemake(repo, target, "--configfile", str(configfile))
    wait_for(lambda: len(list((run_dir / "checkpoints").glob("step_*.pt"))) > 0, proc)
    time.sleep(1.0)
    ctrl_c(proc)  # the trainer saves a checkpoint and exits, snakemake stops
    assert not (run_dir / "final.pt").exists()
    saved = max(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt"))
    assert saved >= 20

    attempts = len(list((run_dir / "logs").glob("train.attempt*.log")))
    second = run_dir / "logs" / f"train.attempt{attempts + 1}.log"
    proc = start_snakemake(repo, target, "--configfile", str(configfile))
    wait_for(lambda: second.exists() and "resumed from" in second.read_text(), proc)
    ctrl_c(proc)
    line = next(x for x in second.read_text().splitlines() if x.startswith("resumed from"))
    assert line.endswith(f"step_{saved:08d}.pt at step {saved}")  # not from step 0


# --- bad input -----------------------------------------------------------------------------


def demo_config() -> dict:
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def with_change(change) -> dict:
    config = demo_config()
    change(config)
    return config


BAD = {
    "unknown top-level key": (lambda c: c.update(bogus=1), "bogus"),
    "unknown grid key": (lambda c: c["grids"][0].update(lrz=[1.0]), "lrz"),
    "negative lr": (lambda c: c["grids"][0].update(lrs=[-1.0e-3]), "-0.001"),
    "non-numeric lr": (lambda c: c["grids"][0].update(lrs=["fast"]), "'fast' is not of type 'number'"),
    "unknown method": (lambda c: c["grids"][0]["methods"].update(dropout={}), "dropout"),
    "unknown scale": (lambda c: c["grids"][0].update(scales=["tiny", "huge"]), "unknown scale 'huge'"),
    "empty grid": (lambda c: c["grids"][0].update(lrs=[]), "should be non-empty"),
    "no grids": (lambda c: c.update(grids=[]), "grids: empty"),
    "duplicate run ids": (
        lambda c: c["grids"].append(c["grids"][0]),
        "run tiny-baseline-lr0.001-s1 is already made by grids[0]",
    ),
    "bad protocol value": (
        lambda c: c["protocol"]["optim"].update(warmup=-5),
        "optim.warmup: -5 is out of range",
    ),
    # hostile names (issue 15): shell code, and paths out of the project, never reach a job
    "comparison with shell code": (
        lambda c: c["comparisons"].update({"x;touch pwned;y": ["baseline"]}),
        "comparisons: 'x;touch pwned;y' is not a safe name",
    ),
    "comparison with a command substitution": (
        lambda c: c["comparisons"].update({"x$(touch pwned)": ["baseline"]}),
        "comparisons: 'x$(touch pwned)' is not a safe name",
    ),
    "comparison out of the project": (
        lambda c: c["comparisons"].update({"../../../../escaped": ["baseline"]}),
        "comparisons: '../../../../escaped' is not a safe name",
    ),
    "experiment '..'": (lambda c: c.update(experiment=".."), "experiment: '..' is not a safe name"),
    "scale '..'": (
        lambda c: c["scales"].update({"..": c["scales"]["tiny"]}),
        "scales: '..' is not a safe name",
    ),
    "dataset with a slash": (
        lambda c: c["data"].update(dataset="../x"),
        "data.dataset: '../x' is not a safe name",
    ),
    "published file out of resources/": (
        lambda c: c.update(
            published=[{"file": "v1/../../x.csv", "url": "https://x.org/x.csv", "sha256": "0" * 64}]
        ),
        "published[0].file: 'v1/../../x.csv' is not a safe path",
    ),
    "lr that gives no run id": (
        lambda c: c["grids"][0].update(lrs=[math.inf]),
        "run id 'tiny-baseline-lrinf-s1'",
    ),
    "prepare args with an open quote": (
        lambda c: c["data"]["prepare"].update(args="--train-shards '1"),
        "data.prepare.args: No closing quotation",
    ),
}


@pytest.mark.parametrize("case", BAD)
@pytest.mark.slow
def test_bad_experiment_files_fail_before_any_job(tmp_path, case):
    change, message = BAD[case]
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(yaml.safe_dump(with_change(change), sort_keys=False))
    work = tmp_path / "work"  # names with ../ would land in tmp_path, never further out
    work.mkdir()
    result = snakemake("-n", "--configfile", str(configfile), cwd=work, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output[-3000:]
    assert "Job stats" not in output
    written = {p.relative_to(tmp_path).parts[:2] for p in tmp_path.rglob("*")}
    assert written <= {("bad.yaml",), ("work",), ("work", ".snakemake")}, written
