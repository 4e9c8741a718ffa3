"""The public GPT-2-tokenised FineWeb shards the paper trained on (Hugging Face: kjj0/fineweb100B-gpt2)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from data.shardwriter import write_meta
from data.tokenizers import GPT2_EOT, GPT2_VOCAB
from trainer.shards import ShardError, read_header, read_meta, sha256

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


def _on_disk(path: Path, recorded: str | None) -> tuple[int, str] | None:
    """(tokens, sha256) of a sound local copy, or None where it must be fetched (again)."""
    try:
        tokens, digest = read_header(path), sha256(path)
    except FileNotFoundError:
        return None
    except ShardError as err:
        print(f"\n{err}; fetching it again", file=sys.stderr)
        return None
    if recorded is not None and digest != recorded:
        print(f"\n{path}: sha256 {digest}, meta.json records {recorded}; fetching it again", file=sys.stderr)
        return None
    return tokens, digest


def prepare(out: Path, train_shards: int, repo: str = REPO, from_dir: str | None = None) -> dict:
    """Fetch what is missing or damaged, verify every header, and write meta.json. Re-running resumes.

    A shard already on disk is kept only if its header is sound and, where the meta.json of an
    earlier prepare records its sha256, its content still matches; otherwise it is fetched again.
    A fetched copy that differs from that record is an error: the source changed since.
    """
    out.mkdir(parents=True, exist_ok=True)
    recorded = {s["file"]: s["sha256"] for s in (read_meta(out) or {}).get("shards", [])}
    shards = []
    for i, name in enumerate(filenames(train_shards)):
        path = out / name
        found = _on_disk(path, recorded.get(name))
        if found is None:
            fetched = _fetch(name, out, repo, from_dir)
            found = read_header(fetched), sha256(fetched)  # a bad download is an error, never a shard
            if name in recorded and found[1] != recorded[name]:
                raise DownloadError(
                    f"{name}: the fetched copy has sha256 {found[1]} but {out / 'meta.json'} records "
                    f"{recorded[name]}; the source changed since (use another --out)"
                )
            os.replace(fetched, path)
        tokens, digest = found
        shards.append(
            {"file": name, "split": "val" if i == 0 else "train", "tokens": tokens, "sha256": digest}
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
