"""The public GPT-2-tokenised FineWeb shards the paper trained on (Hugging Face: kjj0/fineweb100B-gpt2)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from data.shardwriter import sha256, write_meta
from data.tokenizers import GPT2_EOT, GPT2_VOCAB
from trainer.shards import ShardError, read_header

REPO = "kjj0/fineweb100B-gpt2"


class DownloadError(RuntimeError):
    """A shard that could not be fetched: the message names it."""


def filenames(train_shards: int) -> list[str]:
    """The validation shard and training shards 1..N, as the repository names them."""
    return ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, train_shards + 1)]


def _fetch(name: str, out: Path, repo: str, from_dir: str | None) -> Path:
    staging = out / ".download"
    staging.mkdir(exist_ok=True)
    if from_dir:
        source = Path(from_dir) / name
        if not source.exists():
            raise DownloadError(f"{source}: not found in --from-dir")
        tmp = staging / name
        shutil.copyfile(source, tmp)
        return tmp
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, repo_type="dataset", filename=name, local_dir=staging))
    except Exception as err:  # network, authentication, missing file
        raise DownloadError(f"{repo}/{name}: download failed ({type(err).__name__}: {err})") from None


def prepare(out: Path, train_shards: int, repo: str = REPO, from_dir: str | None = None) -> dict:
    """Fetch what is missing, verify every header, and write meta.json. Re-running resumes."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for i, name in enumerate(filenames(train_shards)):
        path = out / name
        try:
            tokens = read_header(path)
        except (FileNotFoundError, ShardError):
            fetched = _fetch(name, out, repo, from_dir)
            tokens = read_header(fetched)  # a bad download is an error, never a shard
            os.replace(fetched, path)
        shards.append(
            {"file": name, "split": "val" if i == 0 else "train", "tokens": tokens, "sha256": sha256(path)}
        )
        print(f"\r{i + 1}/{train_shards + 1} shards", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    shutil.rmtree(out / ".download", ignore_errors=True)
    meta = {
        "dataset": "fineweb",
        "source": {"kind": "pretokenized", "repo": repo, "from_dir": from_dir},
        "tokenizer": "gpt2",
        "vocab_size": GPT2_VOCAB,
        "eot": GPT2_EOT,
        "shards": shards,
        "complete": True,
    }
    write_meta(out, meta)
    return meta
