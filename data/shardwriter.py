"""Cut a token stream into shards: validation first, then training; resumable; atomic.

Shard k holds a fixed stretch of the stream, so a re-run that skips the documents of the
complete shards writes the same bytes. meta.json records, after every shard, where in the
stream the next one starts (document index and tokens of that document already written).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from trainer.files import write_json
from trainer.shards import ShardError, read_header, read_meta, sha256, write_shard


def write_meta(out: Path, meta: dict) -> None:
    write_json(out / "meta.json", meta)


class Progress:
    """One status line: tokens, tokens/s and an ETA against a target, at most every 0.5 s."""

    def __init__(self, target: int | None, start: int = 0):
        self.target, self.start, self.t0, self.last = target, start, time.perf_counter(), 0.0

    def update(self, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not final and now - self.last < 0.5:
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        line = f"\r{done:,} tokens  {rate:,.0f} tokens/s"
        if self.target:
            eta = (self.target - done) / rate if rate > 0 else float("inf")
            line += f"  {100 * done / self.target:5.1f}%  eta {eta:,.0f} s" if eta != float("inf") else ""
        print(line, end="\n" if final else "", file=sys.stderr, flush=True)


class ShardWriter:
    """Feeds documents' tokens into `<dataset>_val_%06d.bin` then `<dataset>_train_%06d.bin`."""

    def __init__(
        self,
        out: Path,
        dataset: str,
        settings: dict,
        shard_tokens: int,
        val_tokens: int,
        max_train_shards: int | None,
    ):
        self.out, self.dataset = out, dataset
        self.shard_tokens, self.val_tokens, self.max_train_shards = shard_tokens, val_tokens, max_train_shards
        out.mkdir(parents=True, exist_ok=True)
        self.meta = {
            "dataset": dataset,
            **settings,
            "shard_tokens": shard_tokens,
            "val_tokens": val_tokens,
            "shards": [],
            "complete": False,
        }
        self._load_previous(settings)
        self.buffer: list[np.ndarray] = []
        self.buffered = 0

    # --- resuming ----------------------------------------------------------------------------

    def _load_previous(self, settings: dict) -> None:
        """Keep the complete shards of an earlier attempt with the same settings; drop the rest."""
        old = read_meta(self.out)
        if old is not None:
            differing = [k for k in settings if old.get(k) != settings[k]]
            if old.get("shard_tokens") != self.shard_tokens or old.get("val_tokens") != self.val_tokens:
                differing.append("shard size")
            if differing:
                raise ShardError(
                    f"{self.out} was prepared with other settings ({', '.join(differing)}); use another --out or delete it"
                )
            for shard in old.get("shards", []):
                path = self.out / shard["file"]
                if not all(isinstance(shard.get(k), int) for k in ("end_doc", "end_offset")):
                    break  # no resume point recorded: redo from here
                try:
                    if read_header(path) != shard["tokens"]:
                        break
                except (OSError, ShardError):
                    break
                self.meta["shards"].append(shard)
            self.meta["complete"] = old.get("complete", False) and len(self.meta["shards"]) == len(
                old.get("shards", [])
            )
        kept = {s["file"] for s in self.meta["shards"]}
        for stray in self.out.glob(f"{self.dataset}_*.bin*"):
            if stray.name not in kept:
                stray.unlink()  # partial or orphaned shards are redone

    @property
    def complete(self) -> bool:
        return self.meta["complete"]

    def resume_point(self) -> tuple[int, int]:
        """(document index, tokens of it already written) where the stream continues."""
        if not self.meta["shards"]:
            return 0, 0
        last = self.meta["shards"][-1]
        return last["end_doc"], last["end_offset"]

    @property
    def tokens_written(self) -> int:
        return sum(s["tokens"] for s in self.meta["shards"])

    def _next_shard(self) -> tuple[str, int, int]:
        """(split, index, size) of the next shard to fill."""
        written_val = sum(s["tokens"] for s in self.meta["shards"] if s["split"] == "val")
        index = len(self.meta["shards"])
        if written_val < self.val_tokens:
            return "val", index, min(self.shard_tokens, self.val_tokens - written_val)
        return "train", index, self.shard_tokens

    def full(self) -> bool:
        train = sum(1 for s in self.meta["shards"] if s["split"] == "train")
        return self.max_train_shards is not None and train >= self.max_train_shards

    # --- writing -----------------------------------------------------------------------------

    def add(self, tokens: list[int], doc: int, offset: int = 0) -> None:
        """Tokens of document `doc` (its first `offset` tokens already written earlier)."""
        array = np.asarray(tokens[offset:], dtype=np.int64)
        while len(array) and not self.full():
            split, index, size = self._next_shard()
            room = size - self.buffered
            take = array[:room]
            self.buffer.append(take)
            self.buffered += len(take)
            offset += len(take)
            array = array[room:]
            if self.buffered == size:
                done = offset == len(tokens)
                self._flush(split, index, doc + 1 if done else doc, 0 if done else offset)

    def _flush(self, split: str, index: int, end_doc: int, end_offset: int) -> None:
        name = f"{self.dataset}_{split}_{index:06d}.bin"
        path = self.out / name
        write_shard(path, np.concatenate(self.buffer))
        entry = {
            "file": name,
            "split": split,
            "tokens": self.buffered,
            "sha256": sha256(path),
            "end_doc": end_doc,
            "end_offset": end_offset,
        }
        self.meta["shards"].append(entry)
        write_meta(self.out, self.meta)
        self.buffer, self.buffered = [], 0

    def close(self, next_doc: int) -> None:
        """End of the stream: the last, shorter shard is written too; the preparation is complete."""
        if self.buffered:
            split, index, _ = self._next_shard()
            self._flush(split, index, next_doc, 0)
        self.meta["complete"] = True
        write_meta(self.out, self.meta)
