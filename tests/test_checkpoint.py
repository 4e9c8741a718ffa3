"""Checkpoints and final weights: checksums, no code from data, failed saves, old files, and
what resume and evaluate do with a damaged, tampered or old file."""

import errno
import os
import pickle
import shutil
import struct
import zipfile

import pytest
import torch

from conftest import run_module, tiny_config, write_config
from trainer import checkpoint
from trainer import train as train_module
from trainer.checkpoint import CheckpointError, UnsafeCheckpointError
from trainer.config import config_from_dict

# What the code before checksums recorded as the config hash of tiny_config (test_config pins more).
LEGACY_TINY_HASH = "fc9f4ab356cfc5b5"


pytestmark = pytest.mark.usefixtures("in_process")  # conftest: one thread, pytest's signal handlers


class RunsCode:
    """A pickle that runs a shell command when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def flip_a_byte_of_the_biggest_tensor(path):
    """Damage a tensor's bytes inside the zip, leaving the archive itself readable."""
    with zipfile.ZipFile(path) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename]
        info = max(records, key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(data)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def train_run(tmp_path, tiny_data, name="run"):
    """A finished tiny run, trained in this process: 12 steps, checkpoints of steps 4 and 8 kept."""
    run = tmp_path / name
    raw = tiny_config(tiny_data, run=name)
    write_config(run / "config.yaml", raw)
    cfg = config_from_dict(raw)
    assert train_module.train(cfg, run) == 0
    return cfg, run


def unfinish(run):
    """As if the run had been killed after its last checkpoint."""
    (run / "final.pt").unlink()
    (run / "train.json").unlink()


# --- the file format --------------------------------------------------------------------------


def test_checksum_covers_values_dtypes_shapes_and_not_key_order():
    state = {"w": torch.arange(6.0), "step": 3, "cfg": {"lr": 1e-3, "name": "x"}, "rng": [None, True]}
    same = {"rng": [None, True], "cfg": {"name": "x", "lr": 1e-3}, "step": 3, "w": torch.arange(6.0)}
    assert checkpoint.checksum(state) == checkpoint.checksum(same)
    for change in (
        {"w": torch.arange(6.0).reshape(2, 3)},  # the same bytes, another shape
        {"w": torch.arange(6.0).double()},
        {"w": torch.arange(6.0).index_fill(0, torch.tensor([4]), 4.5)},
        {"step": 4},
        {"cfg": {"lr": 1e-3, "name": "y"}},
    ):
        assert checkpoint.checksum({**state, **change}) != checkpoint.checksum(state), change
    bf16 = {"w": torch.ones(3, dtype=torch.bfloat16)}
    assert checkpoint.checksum(bf16) != checkpoint.checksum({"w": torch.ones(3, dtype=torch.float16)})


def test_saved_files_load_with_weights_only_and_round_trip(tmp_path):
    state = {
        "model": {"w": torch.randn(4, 3), "b": torch.zeros((), dtype=torch.bfloat16)},
        "rng": {"torch": torch.get_rng_state(), "cuda": None},
        "step": 8,
        "config": {"optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "run": "r"},
    }
    path = tmp_path / "step_00000008.pt"
    checkpoint.save(state, path)
    raw = torch.load(path, weights_only=True)
    assert raw[checkpoint.CHECKSUM] == checkpoint.checksum(state)
    loaded = checkpoint.load(path)
    assert checkpoint.CHECKSUM not in loaded and loaded["step"] == 8 and loaded["config"] == state["config"]
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_a_flipped_tensor_byte_is_a_checksum_mismatch(tmp_path):
    path = tmp_path / "final.pt"
    checkpoint.save({"model": {"w": torch.randn(1000)}, "step": 1}, path)
    flip_a_byte_of_the_biggest_tensor(path)
    torch.load(path, weights_only=True)  # torch itself loads it without a word
    with pytest.raises(CheckpointError, match=f"^{path}: checksum mismatch"):
        checkpoint.load(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_file_that_asks_to_run_code_is_refused_and_never_runs_it(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "step_00000004.pt"
    payload = {"model": {"w": torch.ones(2)}, "step": 4, "extra": RunsCode(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))  # torch's own legacy format
    with pytest.raises(UnsafeCheckpointError, match=f"^{path}: refusing to unpickle"):
        checkpoint.load(path)
    with pytest.raises(UnsafeCheckpointError):  # not skipped for an older checkpoint
        checkpoint.newest(tmp_path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "content",
    [b"not a checkpoint", b"", pickle.dumps({"step": 4}, protocol=5)],
    ids=["text", "empty", "plain-pickle"],
)
def test_a_file_that_is_no_checkpoint_is_damaged_and_skipped(tmp_path, content, capsys):
    checkpoint.save({"step": 4}, tmp_path / "step_00000004.pt")
    path = tmp_path / "step_00000008.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"^{path}: cannot read checkpoint") as err:
        checkpoint.load(path)
    assert not isinstance(err.value, UnsafeCheckpointError)
    state, found = checkpoint.newest(tmp_path)
    assert found.name == "step_00000004.pt" and f"warning: skipping {path}" in capsys.readouterr().out


def test_a_file_without_checksum_loads_with_a_one_line_warning(tmp_path, capsys):
    path = tmp_path / "step_00000004.pt"
    torch.save({"model": {"w": torch.ones(2)}, "step": 4}, path)  # as the code before checksums
    assert checkpoint.load(path)["step"] == 4
    out = capsys.readouterr().out
    assert out == f"warning: {path} has no checksum (written before checksums); loaded unverified\n"


def test_a_failed_save_removes_its_temporary_and_names_enospc(tmp_path, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    path = tmp_path / "final.pt"
    with pytest.raises(CheckpointError) as err:
        checkpoint.save({"model": None}, path)
    assert str(err.value) == f"{path}: cannot save: no space left on device (ENOSPC)"
    assert list(tmp_path.iterdir()) == []


# --- resume and evaluate ------------------------------------------------------------------------


def test_a_bit_flip_in_the_newest_checkpoint_resumes_from_the_previous_one_bit_identically(
    tmp_path, tiny_data, capsys
):
    cfg, run = train_run(tmp_path, tiny_data)
    uninterrupted = checkpoint.load(run / "final.pt")["model"]
    unfinish(run)
    newest = checkpoint.checkpoint_path(run / "checkpoints", 8)
    flip_a_byte_of_the_biggest_tensor(newest)
    capsys.readouterr()
    assert train_module.train(cfg, run) == 0
    out = capsys.readouterr().out
    assert f"warning: skipping {newest}: checksum mismatch" in out
    assert f"resumed from {checkpoint.checkpoint_path(run / 'checkpoints', 4)} at step 4" in out
    assert_same_weights(checkpoint.load(run / "final.pt")["model"], uninterrupted)


def test_an_old_checkpoint_with_the_legacy_hash_and_no_checksum_resumes(tmp_path, tiny_data, capsys):
    cfg, run = train_run(tmp_path, tiny_data)
    uninterrupted = checkpoint.load(run / "final.pt")["model"]
    unfinish(run)
    path = checkpoint.checkpoint_path(run / "checkpoints", 8)
    state = checkpoint.load(path)
    state["config_hash"] = LEGACY_TINY_HASH
    torch.save(state, path)  # the format of the code before checksums
    capsys.readouterr()
    assert train_module.train(cfg, run) == 0
    out = capsys.readouterr().out
    assert f"warning: {path} has no checksum" in out and f"resumed from {path} at step 8" in out
    assert_same_weights(checkpoint.load(run / "final.pt")["model"], uninterrupted)


@pytest.mark.slow
def test_pickled_code_in_a_checkpoint_or_final_pt_never_runs(trained_runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["baseline"], run)
    marker = tmp_path / "pwned"
    evil = {"model": {}, "step": 8, "config_hash": LEGACY_TINY_HASH, "x": RunsCode(marker)}
    torch.save(evil, checkpoint.checkpoint_path(run / "checkpoints", 8))
    torch.save(evil, run / "final.pt")
    result = run_module("trainer.evaluate", "--run", str(run), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {run / 'final.pt'}: refusing to unpickle it (")
    assert "posix.system" in result.stderr and result.stderr.count("\n") == 1
    (run / "final.pt").unlink()
    (run / "train.json").unlink()
    config = str(run / "config.yaml")
    assert train_module.main(["--config", config, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'checkpoints' / 'step_00000008.pt'}: refusing to unpickle it")
    assert not marker.exists()


def test_a_damaged_final_pt_is_a_one_line_error_naming_it(trained_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["baseline"], run)
    flip_a_byte_of_the_biggest_tensor(run / "final.pt")
    result = run_module("trainer.evaluate", "--run", str(run), check=False)
    assert result.returncode == 2
    assert result.stderr == f"error: {run / 'final.pt'}: checksum mismatch, the file is damaged\n"
    assert not (run / "eval.json").exists()


def test_a_full_disk_ends_training_with_a_one_line_error(tmp_path, tiny_data, monkeypatch, capsys):
    run = tmp_path / "run"
    config = write_config(run / "config.yaml", tiny_config(tiny_data))

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "ab") if isinstance(f, (str, os.PathLike)) else f as out:
            out.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    assert train_module.main(["--config", str(config), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    path = checkpoint.checkpoint_path(run / "checkpoints", 4)
    assert err == f"error: {path}: cannot save: no space left on device (ENOSPC)\n"
    assert list((run / "checkpoints").iterdir()) == []
