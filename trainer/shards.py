"""The token shard format, defined once: data/ writes it, the trainer reads it.

A shard is 256 int32 header words (magic 20240520, version 1, token count, zeros) followed
by the tokens as uint16. Training windows are sampled like the paper: random shard, random
offset, with replacement. The global batch of step t is a pure function of (seed, t); ranks
and micro-steps take disjoint slices of it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from trainer.files import write_atomic

MAGIC = 20240520
VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
MAX_TOKEN = np.iinfo(np.uint16).max
CACHE_NAME = ".shards-verified.json"  # see verify_shards
# A file modified this recently may change again within the same mtime tick (coarse file-system
# clocks), unseen by a (size, mtime) cache: such a shard is checked but not cached.
SETTLE_NS = 2_000_000_000


class ShardError(ValueError):
    """A shard file that is not in the format: the message names the file."""


def sha256(path: str | Path) -> str:
    """Streaming sha256 of a file: a 200 MB shard never sits in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: str | Path, tokens) -> None:
    """Write tokens (ints < 65536) as one shard, atomically (temporary name, then rename)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > MAX_TOKEN):
        raise ShardError(f"{path}: token ids must lie in [0, {MAX_TOKEN}] to fit uint16")
    header = np.zeros(HEADER_WORDS, dtype=np.int32)
    header[:3] = (MAGIC, VERSION, tokens.size)
    write_atomic(path, header.tobytes() + tokens.astype(np.uint16).tobytes())


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


def _meta_problem(meta) -> str | None:
    """What makes a parsed meta.json unusable, or None: the fields verify_shards and data/ rely on."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    if not isinstance(meta.get("vocab_size", 0), int):
        return "vocab_size is not an integer"
    shards = meta.get("shards", [])
    if not isinstance(shards, list):
        return "shards is not a list"
    for i, shard in enumerate(shards):
        name = shard.get("file") if isinstance(shard, dict) else None
        if not (
            isinstance(name, str)
            and name not in ("", ".", "..")
            and name == Path(name).name
            and isinstance(shard.get("tokens"), int)
            and isinstance(shard.get("sha256"), str)
        ):
            return f"shards[{i}] needs a plain file name, tokens and sha256"
    return None


def read_meta(directory: str | Path) -> dict | None:
    """<directory>/meta.json as data.prepare wrote it, or None without one. A damaged one is a
    ShardError naming it, never a bare JSONDecodeError."""
    path = Path(directory) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: unreadable ({err}); delete it and prepare the data again") from None
    if problem := _meta_problem(meta):
        raise ShardError(
            f"{path}: not a meta.json of data.prepare ({problem}); delete it and prepare the data again"
        )
    return meta


def _check_tokenizer_vocab(meta: dict | None, directory: Path, vocab_size: int) -> None:
    tokenizer_vocab = (meta or {}).get("vocab_size")
    if tokenizer_vocab is not None and tokenizer_vocab > vocab_size:
        raise ShardError(
            f"model.vocab_size: {vocab_size} is smaller than the vocabulary of the tokenizer that "
            f"wrote {directory} ({tokenizer_vocab}, from {directory / 'meta.json'})"
        )


def _cache_files(directory: Path) -> list[Path]:
    """Where verify_shards keeps its cache, preferred first: the data directory, else (a read-only
    shared dataset) the user's cache directory, keyed by the data directory's absolute path."""
    key = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:16]
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [directory / CACHE_NAME, user / "oec-pipeline" / "shards" / f"{key}.json"]


def _load_cache(directory: Path) -> dict:
    """Cached scans by file name; a missing or damaged cache is an empty one (it only saves time)."""
    entries = {}
    for path in reversed(_cache_files(directory)):  # the data directory's entries win
        try:
            cache = json.loads(path.read_text())
            if cache.get("format") == 1 and isinstance(cache.get("shards"), dict):
                entries.update(cache["shards"])
        except (OSError, ValueError, AttributeError):
            pass
    return entries


def _save_cache(directory: Path, entries: dict) -> None:
    data = (json.dumps({"format": 1, "shards": entries}, indent=1) + "\n").encode()
    for path in _cache_files(directory):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
            return
        except OSError:
            continue  # read-only: the next place, or no cache at all


def _scan(path: Path, count: int, stat: os.stat_result) -> dict:
    """The facts verify_shards checks, read once per version of the file."""
    max_id = int(open_shard(path).max()) if count else -1
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256(path), "max_id": max_id}


def _fresh(entry, stat: os.stat_result) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("max_id"), int)
    )


def _verify_directory(directory: Path, paths: list[Path], vocab_size: int) -> None:
    meta = read_meta(directory)
    _check_tokenizer_vocab(meta, directory, vocab_size)
    meta_path = directory / "meta.json"
    listed = {s["file"]: s for s in meta["shards"]} if meta and "shards" in meta else None
    cache = _load_cache(directory)
    changed = False
    try:
        for path in paths:
            count = read_header(path)  # magic, version, size vs header: always
            record = listed.get(path.name) if listed is not None else None
            if listed is not None and record is None:
                raise ShardError(
                    f"{path}: not listed in {meta_path}, so not written by the preparation that wrote "
                    "it; remove the file or prepare the data again"
                )
            if record and record["tokens"] != count:
                raise ShardError(f"{path}: holds {count} tokens but {meta_path} records {record['tokens']}")
            stat = path.stat()
            scan = cache.get(path.name)
            if not _fresh(scan, stat):
                scan = _scan(path, count, stat)
                if time.time_ns() - stat.st_mtime_ns > SETTLE_NS:
                    cache[path.name] = scan
                    changed = True
            if record and scan["sha256"] != record["sha256"]:
                raise ShardError(
                    f"{path}: sha256 {scan['sha256']} but {meta_path} records {record['sha256']}; "
                    "the shard changed after preparation (prepare the data again)"
                )
            if scan["max_id"] >= vocab_size:
                raise ShardError(
                    f"{path}: token id {scan['max_id']} does not fit model.vocab_size {vocab_size}"
                )
    finally:
        if changed:  # even on an error: the shards scanned so far need no second read
            _save_cache(directory, cache)


def verify_shards(paths: list[Path], vocab_size: int) -> None:
    """Refuse shards that are not what data.prepare wrote, or that hold ids the model cannot embed
    (an IndexError deep in the model otherwise). Raises ShardError naming the file.

    Every call checks each header and size, and the token count against `<dir>/meta.json`. Each
    shard's sha256 (against meta.json; streamed) and largest token id (against vocab_size) are
    computed together and cached by file name with its (size, mtime_ns) in
    `<dir>/.shards-verified.json`, so a 1027-shard dataset is read once, not at every run start; a
    changed or touched shard is read again (one modified in the last SETTLE_NS is checked but not
    cached: coarse mtime clocks could hide a second change). A read-only directory (a shared dataset) keeps the cache under
    `$XDG_CACHE_HOME/oec-pipeline/shards/` (default ~/.cache) instead, and where neither is
    writable the check runs uncached. The cache is trusted as far as the directory: whoever can
    write it can rewrite meta.json too.
    Where meta.json lists shards, a shard it does not list is an error (no record to check it
    against). A directory without meta.json (hand-made data) gets the header and token-id checks.
    """
    paths = [Path(p) for p in paths]
    for directory in sorted({p.parent for p in paths}):
        _verify_directory(directory, [p for p in paths if p.parent == directory], vocab_size)


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
