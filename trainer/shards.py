"""The token shard format, defined once: data/ writes it, the trainer reads it.

A shard is 256 int32 header words (magic 20240520, version 1, token count, zeros) followed
by the tokens as uint16. Training windows are sampled like the paper: random shard, random
offset, with replacement. The global batch of step t is a pure function of (seed, t); ranks
and micro-steps take disjoint slices of it.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
import torch

MAGIC = 20240520
VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
MAX_TOKEN = np.iinfo(np.uint16).max


class ShardError(ValueError):
    """A shard file that is not in the format: the message names the file."""


def write_shard(path: str | Path, tokens) -> None:
    """Write tokens (ints < 65536) as one shard, atomically (temporary name, then rename)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN):
        raise ShardError(f"{path}: token ids must lie in [0, {MAX_TOKEN}] to fit uint16")
    header = np.zeros(HEADER_WORDS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, tokens.size)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16).tobytes())
    os.replace(tmp, path)


def read_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_WORDS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: not a token shard (magic {header[0]}, expected {MAGIC})")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        raise ShardError(
            f"{path}: {size} bytes but the header promises {count} tokens ({expected} bytes); "
            "the file is truncated or corrupt"
        )
    return count


def open_shard(path: str | Path) -> np.memmap:
    count = read_header(path)
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(count,))


def check_vocab(directory: str | Path, vocab_size: int) -> None:
    """Refuse a model whose vocabulary is smaller than the tokenizer's that wrote the shards."""
    meta = Path(directory) / "meta.json"
    if not meta.exists():
        return
    tokenizer_vocab = json.loads(meta.read_text()).get("vocab_size")
    if tokenizer_vocab is not None and tokenizer_vocab > vocab_size:
        raise ShardError(
            f"model.vocab_size: {vocab_size} is smaller than the vocabulary of the tokenizer that "
            f"wrote {directory} ({tokenizer_vocab}, from {meta})"
        )


def find_shards(directory: str | Path, pattern: str) -> list[Path]:
    paths = sorted(Path(p) for p in glob.glob(str(Path(directory) / pattern)))
    if not paths:
        raise ShardError(f"no shard matches {pattern!r} in {directory}")
    return paths


def rank_rows(batch_size: int, rank: int, world_size: int) -> range:
    """The rows of the global batch that one rank trains on; its micro-steps split them in order."""
    per_rank = batch_size // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


class TrainBatches:
    """Windows of seq_len + 1 tokens drawn from training shards, a pure function of (seed, step)."""

    def __init__(self, paths: list[Path], seq_len: int, batch_size: int, seed: int):
        self.shards = [open_shard(p) for p in paths]
        self.paths = paths
        self.window = seq_len + 1
        self.batch_size = batch_size
        self.seed = seed
        self.sizes = np.array([len(s) for s in self.shards], dtype=np.int64)
        short = [str(p) for p, n in zip(paths, self.sizes) if n < self.window]
        if short:
            raise ShardError(f"shards shorter than one window of {self.window} tokens: {', '.join(short)}")

    def positions(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, offset) of every sequence of the global batch of `step`."""
        rng = np.random.default_rng([self.seed, step])
        shard = rng.integers(0, len(self.shards), size=self.batch_size)
        offset = rng.integers(0, self.sizes[shard] - self.window + 1)
        return shard, offset

    def read(self, step: int, rows: range) -> torch.Tensor:
        """The given rows of step's global batch, (len(rows), seq_len + 1) int64 on the CPU."""
        shard, offset = self.positions(step)
        out = np.empty((len(rows), self.window), dtype=np.int64)
        for i, row in enumerate(rows):
            out[i] = self.shards[shard[row]][offset[row] : offset[row] + self.window]
        return torch.from_numpy(out)


class ValidationSet:
    """Fixed validation windows: window i is tokens [i*T, i*T + T] of the validation shards
    taken in name order. Identical for every run that shares data and sequence length, so
    methods are compared on exactly the same tokens."""

    def __init__(self, paths: list[Path], seq_len: int):
        self.paths = paths
        self.seq_len = seq_len
        self.shards = [open_shard(p) for p in paths]
        self.per_shard = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.starts = np.cumsum([0] + self.per_shard)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def require(self, count: int, what: str) -> None:
        if count > len(self):
            names = ", ".join(p.name for p in self.paths)
            raise ShardError(
                f"{what}: {count} validation windows of {self.seq_len} tokens asked for, "
                f"but {names} hold only {len(self)}"
            )

    def read(self, indices: range) -> torch.Tensor:
        """Windows by global index, (len(indices), seq_len + 1) int64 on the CPU."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, i in enumerate(indices):
            shard = int(np.searchsorted(self.starts, i, side="right") - 1)
            offset = (i - self.starts[shard]) * self.seq_len
            out[row] = self.shards[shard][offset : offset + self.seq_len + 1]
        return torch.from_numpy(out)

    def identity(self) -> list[dict]:
        """Which files were read: for provenance in eval.json."""
        return [
            {"file": p.name, "bytes": p.stat().st_size, "tokens": len(s)}
            for p, s in zip(self.paths, self.shards)
        ]


def to_device(batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) on the device; pinned memory and a non-blocking copy on CUDA."""
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    return batch[:, :-1], batch[:, 1:]
