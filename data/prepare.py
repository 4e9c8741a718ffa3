"""Prepare token shards: `python -m data.prepare <source> --out data/<dataset> ...` from the repo root.

Sources:
  fineweb       stream a FineWeb configuration (or any `datasets` dataset) and tokenise it
  pretokenized  download the public GPT-2 FineWeb shards the paper used (kjj0/fineweb100B-gpt2)
  text          local .txt / .jsonl / .parquet files or directories
  demo          text that ships with Python itself: no network at all
  installed     every source and text file of this Python installation, for the GPT-2 tokenizer
                with no network (pass --tokenizer-file offline)
  inspect       statistics, header check and a few decoded windows of a shard directory
Shards are named `<dataset>_val_%06d.bin` (first) and `<dataset>_train_%06d.bin`, in the format
of trainer/shards.py; meta.json records tokenizer, vocabulary, token counts, source and sha256.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Iterator
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from data import pretokenized
from data.shardwriter import Progress, ShardWriter
from data.sources import (
    SourceError,
    demo_documents,
    installed_documents,
    installed_files,
    installed_identity,
    python_identity,
    stream_dataset,
    stream_local,
)
from data.tokenizers import TokenizerError, load_tokenizer, padded_vocab
from trainer.shards import (
    MAX_TOKEN,
    ShardError,
    find_shards,
    open_shard,
    read_header,
    read_meta,
    verify_shards,
)

DOCS_PER_TASK = 64  # documents per task handed to a tokenizer worker
TASKS_PER_WORKER = 8  # tasks in flight per worker

_worker_tokenizer = None


def _init_worker(name: str, tokenizer_file: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(name, tokenizer_file)


def _encode_batch(docs: list[str]) -> list[list[int]]:
    """End-of-text before every document, as the public shards have it."""
    eot = _worker_tokenizer.eot
    return [[eot, *_worker_tokenizer.encode(doc)] for doc in docs]


def _batches(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(docs, size)):
        yield batch


def tokenize_to_shards(
    documents: Callable[[int], Iterator[str]],
    out: Path,
    dataset: str,
    source: dict,
    tokenizer: str,
    tokenizer_file: str | None,
    shard_tokens: int,
    val_tokens: int,
    max_train_shards: int | None,
    workers: int,
) -> dict:
    """Tokenise documents(skip) in worker processes into shards; resumes an earlier attempt."""
    tok = load_tokenizer(tokenizer, tokenizer_file)  # fail early, in this process
    settings = {"source": source, "tokenizer": tokenizer, "vocab_size": tok.vocab_size, "eot": tok.eot}
    if tokenizer_file:
        settings["tokenizer_file"] = str(tokenizer_file)
    if source.get("kind") == "demo":
        settings["python"] = python_identity()
    writer = ShardWriter(out, dataset, settings, shard_tokens, val_tokens, max_train_shards)
    if writer.complete:
        print(f"{out}: already complete ({len(writer.meta['shards'])} shards)", file=sys.stderr)
        return writer.meta
    start_doc, offset = writer.resume_point()
    if start_doc or offset:
        print(
            f"{out}: resuming after {len(writer.meta['shards'])} complete shards (document {start_doc})",
            file=sys.stderr,
        )
    target = val_tokens + max_train_shards * shard_tokens if max_train_shards else None
    progress = Progress(target, writer.tokens_written)
    doc = start_doc
    batches = _batches(documents(start_doc), DOCS_PER_TASK)
    with Pool(workers, initializer=_init_worker, initargs=(tokenizer, tokenizer_file)) as pool:
        # A few batches per worker at a time: memory stays bounded on an endless stream, and the
        # pool is never left with queued work when the last shard is full.
        while not writer.full() and (chunk := list(itertools.islice(batches, TASKS_PER_WORKER * workers))):
            for encoded in pool.imap(_encode_batch, chunk):
                for tokens in encoded:
                    if writer.full():
                        break
                    writer.add(tokens, doc, offset)
                    offset = 0
                    doc += 1
                progress.update(writer.tokens_written + writer.buffered)
    writer.close(doc)
    progress.update(writer.tokens_written, final=True)
    if not any(s["split"] == "train" for s in writer.meta["shards"]):
        raise ShardError(
            f"{out}: the source ended after {writer.tokens_written} tokens, all of them validation; lower --val-tokens"
        )
    return writer.meta


def inspect(directory: Path, windows: int, window_tokens: int) -> None:
    """Print shard statistics, check every shard (header, sha256 against meta.json, token ids
    against the tokenizer's vocabulary), and decode a few windows back to text."""
    meta = read_meta(directory) or {}
    paths = find_shards(directory, "*.bin")
    verify_shards(paths, meta.get("vocab_size", MAX_TOKEN + 1))  # sha256 against meta.json, ids
    total = 0
    print(
        f"{directory}: tokenizer {meta.get('tokenizer', '?')}, vocab {meta.get('vocab_size', '?')}, source {meta.get('source', '?')}"
    )
    for path in paths:
        count = read_header(path)
        tokens = open_shard(path)
        sample = np.asarray(tokens[: min(count, 10_000_000)])
        total += count
        checked = "header ok, sha256 ok" if meta.get("shards") else "header ok"
        print(f"  {path.name}: {count:,} tokens, ids {sample.min()}..{sample.max()}, {checked}")
    print(f"  {len(paths)} shards, {total:,} tokens")
    if "tokenizer" in meta:
        tok = load_tokenizer(meta["tokenizer"], meta.get("tokenizer_file"))
        tokens = open_shard(paths[0])
        rng = np.random.default_rng(0)
        for start in rng.integers(0, max(1, len(tokens) - window_tokens), size=windows):
            text = tok.decode(tokens[start : start + window_tokens])
            print(f"--- {paths[0].name} @ {start}\n{text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    sub = parser.add_subparsers(dest="source", required=True)

    def tokenising(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--out", required=True, help="output directory, e.g. data/fineweb")
        p.add_argument("--dataset", help="shard name prefix (default: the --out directory's name)")
        p.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "bytes"])
        p.add_argument(
            "--tokenizer-file", help="GPT-2 ranks in tiktoken's format (gpt2.tiktoken), for offline use"
        )
        p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
        p.add_argument(
            "--val-tokens", type=int, default=100_000_000, help="tokens of the validation shard(s)"
        )
        p.add_argument("--train-shards", type=int, help="stop after this many training shards (default: all)")
        p.add_argument("--workers", type=int, default=2, help="tokenizer processes")
        return p

    fineweb = tokenising("fineweb", "stream a FineWeb configuration with `datasets`")
    fineweb.add_argument(
        "--hf-dataset",
        default="HuggingFaceFW/fineweb",
        help="Hub dataset, or a local builder (parquet, json)",
    )
    fineweb.add_argument("--hf-name", default="sample-10BT", help="the configuration")
    fineweb.add_argument("--data-files", nargs="*", help="files for a local builder")
    fineweb.add_argument("--split", default="train")
    fineweb.add_argument("--text-field", default="text")
    text = tokenising("text", "local .txt/.jsonl/.parquet files or directories")
    text.add_argument("inputs", nargs="+")
    text.add_argument("--text-field", default="text")
    demo = tokenising("demo", "text that ships with Python (no network)")
    demo.set_defaults(tokenizer="bytes", shard_tokens=1_000_000, val_tokens=100_000)
    tokenising("installed", "the source and text files of this Python installation (no network)")
    pre = sub.add_parser(
        "pretokenized", help="download the public GPT-2 FineWeb shards (kjj0/fineweb100B-gpt2)"
    )
    pre.add_argument("--out", required=True)
    pre.add_argument("--train-shards", type=int, required=True, help="how many training shards (paper: 1027)")
    pre.add_argument("--repo", default=pretokenized.REPO)
    pre.add_argument("--from-dir", help="copy from a local directory of the same files instead of the Hub")
    ins = sub.add_parser("inspect", help="statistics and decoded windows of a shard directory")
    ins.add_argument("directory")
    ins.add_argument("--windows", type=int, default=3)
    ins.add_argument("--window-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    try:
        if args.source == "inspect":
            inspect(Path(args.directory), args.windows, args.window_tokens)
            return 0
        out = Path(args.out)
        if args.source == "pretokenized":
            pretokenized.prepare(out, args.train_shards, args.repo, args.from_dir)
            return 0
        if args.source == "fineweb":
            source = {
                "kind": "datasets",
                "path": args.hf_dataset,
                "name": args.hf_name,
                "split": args.split,
                "data_files": args.data_files,
            }

            def documents(skip: int) -> Iterator[str]:
                return stream_dataset(
                    args.hf_dataset, args.hf_name, args.data_files, args.split, args.text_field, skip
                )

        elif args.source == "text":
            source = {"kind": "local", "inputs": [str(Path(p)) for p in args.inputs]}

            def documents(skip: int) -> Iterator[str]:
                return stream_local(args.inputs, args.text_field, skip)

        elif args.source == "installed":
            files = installed_files()
            # the installation's fingerprint: a resume on another installation is refused
            source = {"kind": "installed", **installed_identity(files)}

            def documents(skip: int) -> Iterator[str]:
                return installed_documents(skip, files)

        else:
            source = {"kind": "demo"}
            documents = demo_documents
        meta = tokenize_to_shards(
            documents, out, args.dataset or out.name, source, args.tokenizer, args.tokenizer_file,
            args.shard_tokens, args.val_tokens, args.train_shards, args.workers,
        )  # fmt: skip
        print(
            f"{out}: {len(meta['shards'])} shards, model vocab_size >= {meta['vocab_size']} (padded: {padded_vocab(meta['vocab_size'])})"
        )
        return 0
    except (ShardError, SourceError, TokenizerError, pretokenized.DownloadError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
