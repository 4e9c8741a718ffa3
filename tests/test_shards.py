import json

import numpy as np
import pytest

from trainer.shards import (
    HEADER_BYTES,
    ShardError,
    TrainBatches,
    ValidationSet,
    check_vocab,
    open_shard,
    rank_rows,
    read_header,
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


def test_model_vocab_smaller_than_tokenizer_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257}))
    check_vocab(tmp_path, 50304)
    with pytest.raises(ShardError, match="model.vocab_size: 320 is smaller"):
        check_vocab(tmp_path, 320)
