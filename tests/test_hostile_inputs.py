"""Hostile and damaged inputs on the workflow side (issue 15): names are data, never code or a way
out of the project; paths that may hold anything are quoted; published copies are verified; a
download that cannot happen says so in one line. The hostile names' dry runs are in
test_workflow.py (BAD); figures of degenerate grids in test_analysis.py."""

import hashlib
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from test_workflow import SMALL, run_in, snakemake, workspace

from conftest import REPO
from workflow.scripts import fetch_published
from workflow.scripts.fetch_published import PublishedError, fetch
from workflow.scripts.grid import SAFE_PATH, ExperimentError, Grid, check_name, load, one_of
from workflow.scripts.runids import RUN_WILDCARD
from workflow.scripts.runscsv import read_runs

HOSTILE = ["..", ".", "", "-rf", ".hidden", "a b", "a/b", "a;b", "a|b", "$(x)", "`x`", "a'b", 'a"b',
           "a\nb", "a..b", "x" * 101, "a*", "~root"]  # fmt: skip
SAFE = ["main", "main_v2", "v1.0", "16M", "1.5B", "tied-2", "A"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused_naming_the_key(name):
    with pytest.raises(ExperimentError, match=re.escape(f"comparisons: {name!r} is not a safe name")):
        check_name("comparisons", name)


@pytest.mark.parametrize("name", SAFE)
def test_safe_names_pass(name):
    check_name("comparisons", name)


def test_published_paths_may_have_folders_but_never_leave_resources():
    for ok in ("v1/loss_overview.csv", "v2/loss_overview_all.wt.csv", "x.csv"):
        check_name("published[0].file", ok, SAFE_PATH)
    for bad in ("../x.csv", "v1/../../x.csv", "/etc/passwd", "v1//x.csv", "v1/", "v1/.x", "v1/a b.csv"):
        with pytest.raises(ExperimentError, match=r"published\[0\]\.file: .* is not a safe path"):
            check_name("published[0].file", bad, SAFE_PATH)


def test_wildcard_constraints_match_exactly_the_names():
    pattern = one_of(["v1/loss_overview.csv", "a+b"])
    assert re.fullmatch(pattern, "v1/loss_overview.csv") and re.fullmatch(pattern, "a+b")
    for other in ("v1/loss_overviewXcsv", "aab", "v1/loss_overview.csv/x"):
        assert not re.fullmatch(pattern, other)


def test_every_run_id_of_the_shipped_experiments_is_a_safe_name():
    for name in ("demo", "paper"):
        for run_id in load(REPO / "config" / f"{name}.yaml").runs:
            check_name("run", run_id)


def test_a_value_that_gives_no_run_id_is_refused():
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    config["grids"][1]["methods"]["softcap"]["cap"] = [float("inf")]
    with pytest.raises(ExperimentError, match=r"grids\[1\]: run id 'small-softcap-cinf-lr0.001-s1-tied'"):
        Grid(config)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "experiment: x\nscales:\n  tiny: {n_layer: 2, n_embd: 32\ncomparisons:\n  main: [baseline]\n"
    )
    with pytest.raises(ExperimentError, match=re.escape(f"{bad}:4:12: expected ',' or '}}', but got ':'")):
        load(bad)
    # Snakemake itself, which parses --configfile before the workflow: the profile's check says it
    result = snakemake("-n", "--configfile", str(bad), cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert f"error: {bad}:4:12: not valid YAML: expected ',' or '}}', but got ':'" in result.stderr


def test_a_target_after_configfile_is_one_clear_line(tmp_path):
    target = "results/paper/tables/main/lr_sensitivity.csv"
    result = snakemake(
        "-n", "--configfile", str(REPO / "config" / "paper.yaml"), target, cwd=tmp_path, check=False
    )
    assert result.returncode != 0
    assert (
        f"error: --configfile {target}: no such file; a target? put targets before --configfile"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


# --- shell rules with a path that needs quoting -------------------------------------------------

ODD_DIR = "data/it's a corpus; touch pwned $(touch pwned) #"


@pytest.mark.slow
def test_odd_data_dir_is_one_quoted_argument_and_a_one_lr_grid_runs_end_to_end(tmp_path):
    """The real shell rules (prepare, train, evaluate, aggregate, table, figure) with a data.dir
    holding a space, a quote, `;`, `$(...)` and `#`: nothing runs but the pipeline. The grid is
    degenerate (one scale, one lr, one member): the LR-sensitivity figure becomes a page saying why."""
    prefix = Path(ODD_DIR).name
    experiment = {**SMALL, "experiment": "odd",
                  "data": {**SMALL["data"], "dir": ODD_DIR, "train_pattern": f"{prefix}_train_*.bin",
                           "val_pattern": f"{prefix}_val_*.bin",
                           "prepare": {"source": "demo", "args": "--shard-tokens 100000 --val-tokens 20000 --train-shards 1"}},
                  "grids": [{"scales": ["tiny"], "lrs": [1.0e-2], "seeds": [1], "methods": {"baseline": {}}}],
                  "comparisons": {"main": ["baseline"]}, "figures": ["lr_sensitivity", "test_loss"],
                  "tables": ["lr_sensitivity"]}  # fmt: skip
    experiment["protocol"] = {**SMALL["protocol"], "train": {**SMALL["protocol"]["train"], "steps": 4}}
    repo, configfile = workspace(tmp_path, experiment)
    result = run_in(repo, "-c2", "--printshellcmds", "--quiet", "host", "--configfile", str(configfile))
    assert "--out 'data/it'\"'\"'s a corpus; touch pwned $(touch pwned) #'" in result.stdout + result.stderr
    assert (repo / ODD_DIR / "meta.json").exists()
    out = repo / "results" / "odd"
    assert read_runs(out / "runs.csv")["status"].tolist() == ["completed"]
    assert (out / "tables" / "main" / "lr_sensitivity.md").exists()
    for ext in ("pdf", "png"):
        assert (out / "figures" / "main" / f"test_loss.{ext}").stat().st_size > 0
        assert (out / "figures" / "main" / f"lr_sensitivity.{ext}").stat().st_size > 0
    log = (out / "logs" / "figure" / "main-lr_sensitivity.log").read_text()
    assert "placeholder: main/lr_sensitivity: LR sensitivity needs at least two learning rates" in log

    # extra arguments of data.prepare are split and quoted word by word: `;` is no command separator
    experiment["data"] = {**experiment["data"], "dir": "data/other",
                          "prepare": {"source": "demo", "args": "--train-shards 1; touch pwned"}}  # fmt: skip
    configfile.write_text(yaml.safe_dump(experiment, sort_keys=False))
    result = run_in(repo, "-c1", "data/other/meta.json", "--configfile", str(configfile), check=False)
    assert result.returncode != 0
    assert "invalid int value: '1;'" in (out / "logs" / "prepare_data.log").read_text()

    assert not [p for p in tmp_path.rglob("*pwned*") if "corpus" not in str(p)]  # no marker anywhere
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # nothing written beside the project


# --- published CSVs ----------------------------------------------------------------------------


def entry_for(content: bytes, file: str = "v1/x.csv", url: str = "http://127.0.0.1:9/x.csv") -> dict:
    return {"file": file, "url": url, "sha256": hashlib.sha256(content).hexdigest()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_shipped_pins_are_the_files_we_have(published_dir):
    """config/published.yaml's sha256 are those of the copies in PUBLISHED_DIR (v2: reconstructions)."""
    for entry in yaml.safe_load((REPO / "config" / "published.yaml").read_text())["published"]:
        assert hashlib.sha256((published_dir / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]


def test_a_changed_local_copy_is_an_error_unless_unverified_is_asked_for(tmp_path):
    local = tmp_path / "published"
    (local / "v1").mkdir(parents=True)
    entry = entry_for(b"run,test_loss\na,3.881\n")
    (local / "v1" / "x.csv").write_bytes(b"run,test_loss\na,2.222\n")  # one value changed
    out = tmp_path / "resources" / "v1" / "x.csv"
    log = tmp_path / "resources" / "v1" / "x.csv.log"
    sm = SimpleNamespace(params=SimpleNamespace(entry=entry, local=str(local), unverified=False),
                         output=[str(out)], log=[str(log)])  # fmt: skip
    assert fetch_published.main(sm) == 1
    message = log.read_text()
    assert message.startswith("error: v1/x.csv: sha256 ") and message.count("\n") == 1
    assert "published_unverified=True" in message
    assert leftovers(out.parent) == ["x.csv.log"]  # no table from it, no temporary file

    sm.params.unverified = True
    assert fetch_published.main(sm) == 0
    assert out.read_bytes() == b"run,test_loss\na,2.222\n"
    assert log.read_text().startswith("warning: v1/x.csv: sha256 ")

    (local / "v1" / "x.csv").write_bytes(b"run,test_loss\na,3.881\n")
    assert fetch(entry, str(local), str(out)) is None  # the pinned file: no warning


def test_offline_download_is_one_line_with_the_way_out(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/loss_overview.csv"
    out = tmp_path / "v1" / "x.csv"
    with pytest.raises(PublishedError) as err:
        fetch(entry_for(b"", url=url), None, str(out))
    assert url in str(err.value) and "--config published_dir=" in str(err.value)
    assert "\n" not in str(err.value)
    assert leftovers(tmp_path) == []


def test_a_silent_server_times_out(tmp_path, monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()  # and never answer
    monkeypatch.setattr(fetch_published, "TIMEOUT_S", 0.5)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/x.csv"
    start = time.monotonic()
    with pytest.raises(PublishedError, match="cannot download .*timed out.*published_dir"):
        fetch(entry_for(b"", url=url), None, str(tmp_path / "x.csv"))
    assert time.monotonic() - start < 5
    assert leftovers(tmp_path) == []
    server.close()


def test_the_run_wildcard_matches_no_path_and_no_shell_code():
    for bad in ("../x-baseline-lr0.1-s1", "..-baseline-lr0.1-s1", "16M-baseline-lr0.1-s1;x", "16M-baseline-lr0.1-s1/x",
                "16M-baseline-lr$(x)-s1", "16M-baseline-lr0.1-s1 -tied"):  # fmt: skip
        assert not re.fullmatch(RUN_WILDCARD, bad), bad
