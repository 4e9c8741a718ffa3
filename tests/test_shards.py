import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from trainer import shards
from trainer.shards import (
    CACHE_NAME,
    HEADER_BYTES,
    ShardError,
    TrainBatches,
    ValidationSet,
    open_shard,
    rank_rows,
    read_header,
    sha256,
    verify_shards,
    write_shard,
)


def test_round_trip_and_header(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7])
    path = tmp_path / "x_train_000001.bin"
    write_shard(path, tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * 5
    header = np.fromfile(path, dtype=np.int32, count=3)
    assert header.tolist() == [20240520, 1, 5]
    assert read_header(path) == 5
    assert open_shard(path).tolist() == tokens.tolist()
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "cut.bin"
    write_shard(path, np.arange(100))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"cut\.bin: .* truncated"):
        read_header(path)
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"\x00" * 2000)
    with pytest.raises(ShardError, match=r"foreign\.bin: not a token shard"):
        read_header(foreign)
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"abc")
    with pytest.raises(ShardError, match=r"tiny\.bin: 3 bytes"):
        read_header(tiny)
    with pytest.raises(ShardError, match="0 to fit uint16|fit uint16"):
        write_shard(tmp_path / "big.bin", [70000])


def test_batch_is_a_pure_function_of_seed_and_step(tiny_data):
    paths = sorted(tiny_data.glob("tiny_train_*.bin"))
    a = TrainBatches(paths, seq_len=16, batch_size=8, seed=1)
    b = TrainBatches(paths, seq_len=16, batch_size=8, seed=1)
    assert np.array_equal(a.read(5, range(8)).numpy(), b.read(5, range(8)).numpy())
    assert not np.array_equal(a.read(5, range(8)).numpy(), a.read(6, range(8)).numpy())
    c = TrainBatches(paths, seq_len=16, batch_size=8, seed=2)
    assert not np.array_equal(a.read(5, range(8)).numpy(), c.read(5, range(8)).numpy())
    shard, offset = a.positions(3)
    assert len(set(shard.tolist())) > 1  # several shards are drawn from
    assert (offset + 17 <= a.sizes[shard]).all()


def test_rank_and_micro_slices_partition_the_global_batch(tiny_data):
    paths = sorted(tiny_data.glob("tiny_train_*.bin"))
    batches = TrainBatches(paths, seq_len=16, batch_size=12, seed=1)
    whole = batches.read(4, range(12)).numpy()
    for world, micro in [(1, 12), (2, 3), (3, 1), (4, 3)]:
        parts = []
        for rank in range(world):
            mine = batches.read(4, rank_rows(12, rank, world)).numpy()
            parts += [mine[k : k + micro] for k in range(0, len(mine), micro)]
        assert np.array_equal(np.concatenate(parts), whole)


def test_validation_windows_are_fixed_and_contiguous_across_shards(tmp_path):
    write_shard(tmp_path / "v_val_000000.bin", np.arange(50))  # 3 windows of 16 (+1)
    write_shard(tmp_path / "v_val_000001.bin", np.arange(100, 140))  # 2 windows
    val = ValidationSet(sorted(tmp_path.glob("v_val_*.bin")), seq_len=16)
    assert len(val) == 5
    w = val.read(range(5))
    assert w.shape == (5, 17)
    assert w[2].tolist() == list(range(32, 49))
    assert w[3].tolist() == list(range(100, 117)) and w[4].tolist() == list(range(116, 133))
    assert [f["tokens"] for f in val.identity()] == [50, 40]
    with pytest.raises(ShardError, match="6 validation windows of 16 tokens asked for"):
        val.require(6, "eval.batches")


def prepared(directory, shards: dict, vocab_size: int = 64):
    """Shards plus the meta.json data.prepare would write, their files aged past SETTLE_NS."""
    directory.mkdir(exist_ok=True)
    entries = []
    for name, tokens in shards.items():
        write_shard(directory / name, tokens)
        age(directory / name)
        entries.append(
            {"file": name, "split": "train", "tokens": len(tokens), "sha256": sha256(directory / name)}
        )
    (directory / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "shards": entries}))
    return [directory / name for name in shards]


def age(path, seconds: int = 3600):
    """An mtime in the past: a freshly written file is verified but not cached (see SETTLE_NS)."""
    old = path.stat().st_mtime_ns - seconds * 10**9
    os.utime(path, ns=(old, old))


def overwrite(path, at: int, tokens):
    """Change tokens in place: header and size intact."""
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 2 * at)
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_overwritten_tokens_are_caught_against_meta_json(tmp_path):
    paths = prepared(tmp_path / "d", {"d_train_000001.bin": np.arange(500) % 64})
    verify_shards(paths, 64)
    before = sha256(paths[0])
    overwrite(paths[0], 100, [7] * 20)
    after = sha256(paths[0])
    with pytest.raises(
        ShardError, match=rf"d_train_000001\.bin: sha256 {after} but .*meta\.json records {before}"
    ):
        verify_shards(paths, 64)


def test_shard_against_meta_json_token_count_and_listing(tmp_path):
    paths = prepared(tmp_path / "d", {"d_train_000001.bin": np.arange(500) % 64})
    write_shard(paths[0], np.arange(400) % 64)  # a consistent header, but not what was prepared
    with pytest.raises(ShardError, match=r"d_train_000001\.bin: holds 400 tokens but .*records 500"):
        verify_shards(paths, 64)
    extra = tmp_path / "d" / "d_train_000002.bin"
    write_shard(extra, np.arange(500) % 64)
    with pytest.raises(ShardError, match=r"d_train_000002\.bin: not listed in .*meta\.json"):
        verify_shards([extra], 64)


def test_verification_is_cached_and_redone_for_a_changed_shard(tmp_path, monkeypatch):
    names = {f"d_train_{i:06d}.bin": np.arange(500 + i) % 64 for i in (1, 2)}
    paths = prepared(tmp_path / "d", names)
    hashed = []
    monkeypatch.setattr(shards, "sha256", lambda p: hashed.append(p.name) or sha256(p))
    verify_shards(paths, 64)
    assert sorted(hashed) == sorted(names)
    cache = json.loads((tmp_path / "d" / CACHE_NAME).read_text())["shards"]
    assert (
        cache["d_train_000001.bin"]["sha256"] == sha256(paths[0])
        and cache["d_train_000001.bin"]["max_id"] == 63
    )

    hashed.clear()
    verify_shards(paths, 64)
    verify_shards(paths[:1], 64)  # the val shards' call keeps the train shards' entries, and back
    assert hashed == []
    os.utime(paths[1])  # touched, content unchanged: read again, and not cached while it is fresh
    verify_shards(paths, 64)
    verify_shards(paths, 64)
    assert hashed == ["d_train_000002.bin"] * 2

    hashed.clear()
    mtime = paths[0].stat().st_mtime_ns
    overwrite(paths[0], 10, [1, 2, 3])
    os.utime(paths[0], ns=(mtime + 1, mtime + 1))  # changed with an old mtime; only the ns differ
    with pytest.raises(ShardError, match=r"d_train_000001\.bin: sha256"):
        verify_shards(paths, 64)
    assert hashed == ["d_train_000001.bin"]  # the error stops at the first bad shard


def test_token_id_beyond_the_model_vocabulary_names_shard_and_id(tmp_path):
    path = tmp_path / "t_train_000001.bin"  # no meta.json: hand-made data still gets the id check
    write_shard(path, [1, 2, 70, 3])
    with pytest.raises(
        ShardError, match=r"t_train_000001\.bin: token id 70 does not fit model\.vocab_size 64"
    ):
        verify_shards([path], 64)
    verify_shards([path], 71)
    paths = prepared(tmp_path / "d", {"d_val_000000.bin": np.arange(300)}, vocab_size=300)
    with pytest.raises(ShardError, match="model.vocab_size: 256 is smaller than the vocabulary"):
        verify_shards(paths, 256)  # the tokenizer's vocabulary, from meta.json


@pytest.mark.parametrize(
    "text",
    ["{not json", "[1, 2]", '{"vocab_size": "big"}', '{"shards": {}}', '{"shards": [{"file": "../x.bin"}]}'],
)
def test_corrupt_meta_json_is_an_error_naming_it(tmp_path, text):
    paths = prepared(tmp_path / "d", {"d_train_000001.bin": np.arange(100)})
    (tmp_path / "d" / "meta.json").write_text(text)
    with pytest.raises(ShardError, match=r"d/meta\.json: (unreadable|not a meta\.json of data\.prepare)"):
        verify_shards(paths, 128)


def test_read_only_data_directory_caches_under_the_user_cache(tmp_path, monkeypatch):
    paths = prepared(tmp_path / "d", {"d_train_000001.bin": np.arange(500) % 64})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write = shards.write_atomic
    read_only = [tmp_path / "d"]

    def refuse(path, data):  # chmod does not stop root: refuse writes as a read-only mount would
        if path.parent in read_only:
            raise PermissionError(13, "Read-only file system", str(path))
        write(path, data)

    monkeypatch.setattr(shards, "write_atomic", refuse)
    verify_shards(paths, 64)
    assert not (tmp_path / "d" / CACHE_NAME).exists()
    assert [c.name for c in (tmp_path / "cache" / "oec-pipeline" / "shards").iterdir()][0].endswith(".json")
    hashed = []
    monkeypatch.setattr(shards, "sha256", lambda p: hashed.append(p) or sha256(p))
    verify_shards(paths, 64)
    assert hashed == []

    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setattr(shards, "write_atomic", lambda path, data: refuse(path.parent, data))  # nowhere
    read_only.append(tmp_path / "cache" / "oec-pipeline")
    verify_shards(paths, 64)  # uncached, still checked
    overwrite(paths[0], 0, [5])
    with pytest.raises(ShardError, match="sha256"):
        verify_shards(paths, 64)


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(self, data):
        open(self, "wb").write(data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_shard(tmp_path / "x.bin", np.arange(100))
    assert list(tmp_path.iterdir()) == []
