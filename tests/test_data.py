"""data.prepare: round trips, resumability, the datasets code path on local files, tokenizers."""

import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import run_module
from data import prepare as prepare_module
from data import pretokenized
from data.shardwriter import ShardWriter
from data.tokenizers import GPT2Tokenizer, load_tokenizer, padded_vocab
from trainer.shards import (
    HEADER_BYTES,
    ShardError,
    find_shards,
    open_shard,
    sha256,
    verify_shards,
    write_shard,
)

DOCS = [
    f"Document {i}: the quick brown fox jumps over the lazy dog {i} times. Ünïcödé ✓." for i in range(300)
]


def prepare(*args, check=True):
    return run_module("data.prepare", *args, check=check)


def stream_tokens(directory: Path, split: str) -> list[int]:
    return [int(t) for p in find_shards(directory, f"*_{split}_*.bin") for t in open_shard(p)]


def decode_documents(directory: Path, tokenizer) -> list[str]:
    """All shards (val first, then train) back to documents, split at end-of-text."""
    tokens = stream_tokens(directory, "val") + stream_tokens(directory, "train")
    docs, current = [], []
    for t in tokens + [tokenizer.eot]:
        if t == tokenizer.eot:
            if current:
                docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(t)
    return docs


@pytest.fixture(scope="session")
def gpt2_ranks(tmp_path_factory) -> str:
    """A GPT-2 ranks file: $GPT2_TIKTOKEN_FILE (CI sets it), else the asset inside the openai-whisper
    source distribution, fetched with `pip download` (a package registry, never the tokenizer site)."""
    if os.environ.get("GPT2_TIKTOKEN_FILE"):
        return os.environ["GPT2_TIKTOKEN_FILE"]
    folder = tmp_path_factory.mktemp("whisper")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--no-binary",
        ":all:",
        "openai-whisper",
        "-d",
        str(folder),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = list(folder.glob("openai_whisper-*.tar.gz"))
    if result.returncode or not archives:
        pytest.fail(f"cannot obtain gpt2.tiktoken (set GPT2_TIKTOKEN_FILE): {result.stderr[-500:]}")
    with tarfile.open(archives[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
        tar.extract(member, folder, filter="data")
    return str(folder / member.name)


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet(path: Path, docs: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path)
    return path


def test_gpt2_tokenizer_from_a_ranks_file(gpt2_ranks):
    tok = GPT2Tokenizer(gpt2_ranks)
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's own ids
    assert tok.decode(tok.encode("Ünïcödé ✓ text")) == "Ünïcödé ✓ text"
    assert (tok.vocab_size, tok.eot, padded_vocab(tok.vocab_size)) == (50257, 50256, 50304)


def test_bytes_tokenizer_and_padding():
    tok = load_tokenizer("bytes")
    assert tok.encode("aé") == [97, 195, 169] and tok.decode([97, 195, 169]) == "aé"
    assert (tok.vocab_size, tok.eot, padded_vocab(tok.vocab_size)) == (257, 256, 320)


def test_text_round_trip_with_gpt2_on_jsonl(tmp_path, gpt2_ranks):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    out = tmp_path / "shards"
    prepare("text", str(source), "--out", str(out), "--tokenizer-file", gpt2_ranks,
            "--shard-tokens", "2000", "--val-tokens", "1500")  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot"]) == ("gpt2", 50257, 50256)
    assert (
        meta["shards"][0]["file"] == "shards_val_000000.bin"
        and meta["shards"][1]["file"] == "shards_train_000001.bin"
    )
    assert decode_documents(out, GPT2Tokenizer(gpt2_ranks)) == DOCS
    assert stream_tokens(out, "val")[0] == 50256  # end-of-text before every document
    with pytest.raises(ShardError, match="smaller than the vocabulary"):
        verify_shards(sorted(out.glob("*.bin")), 320)


def test_fineweb_path_on_a_local_parquet_stream(tmp_path):
    source = write_parquet(tmp_path / "part-0.parquet", DOCS)
    out = tmp_path / "fw"
    prepare("fineweb", "--hf-dataset", "parquet", "--hf-name", "default", "--data-files", str(source),
            "--out", str(out), "--tokenizer", "bytes", "--shard-tokens", "5000", "--val-tokens", "3000",
            "--train-shards", "2")  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    assert [s["tokens"] for s in meta["shards"]] == [3000, 5000, 5000]  # stops after 2 training shards
    assert meta["source"]["path"] == "parquet" and meta["complete"]
    tokens = stream_tokens(out, "val") + stream_tokens(out, "train")
    expected = [t for d in DOCS for t in [256, *d.encode()]][:13000]
    assert tokens == expected


def test_text_directory_with_txt_files_is_one_document_per_file(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(DOCS[:5]):
        (folder / f"{i}.txt").write_text(doc + "\nsecond line\n")
    (folder / "notes.bin").write_bytes(b"ignored")
    out = tmp_path / "txt"
    prepare(
        "text",
        str(folder),
        "--out",
        str(out),
        "--tokenizer",
        "bytes",
        "--val-tokens",
        "100",
        "--shard-tokens",
        "10000",
    )
    assert sorted(decode_documents(out, load_tokenizer("bytes"))) == sorted(
        d + "\nsecond line\n" for d in DOCS[:5]
    )


@pytest.mark.slow
def test_interrupted_preparation_resumes_to_identical_shards(tmp_path, monkeypatch):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    args = ["--tokenizer", "bytes", "--shard-tokens", "3000", "--val-tokens", "2000", "--workers", "1"]
    reference = tmp_path / "reference"
    prepare("text", str(source), "--out", str(reference), *args)

    out = tmp_path / "interrupted"
    original = ShardWriter._flush
    calls = {"n": 0}

    def flaky_flush(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # after 3 complete shards, die half-way through the 4th
            (self.out / "interrupted_train_000003.bin.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(ShardWriter, "_flush", flaky_flush)
    with pytest.raises(KeyboardInterrupt):
        prepare_module.main(["text", str(source), "--out", str(out), *args])
    assert len(json.loads((out / "meta.json").read_text())["shards"]) == 3
    monkeypatch.setattr(ShardWriter, "_flush", original)
    result = prepare("text", str(source), "--out", str(out), *args)
    assert "resuming after 3 complete shards" in result.stderr
    assert not list(out.glob("*.tmp"))
    ref_meta = json.loads((reference / "meta.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    assert len(meta["shards"]) == len(ref_meta["shards"]) > 4
    assert [s["sha256"] for s in meta["shards"]] == [s["sha256"] for s in ref_meta["shards"]]
    again = prepare("text", str(source), "--out", str(out), *args)
    assert "already complete" in again.stderr
    changed = prepare(
        "text", str(source), "--out", str(out), "--tokenizer", "bytes", "--shard-tokens", "999", check=False
    )
    assert changed.returncode == 2 and "other settings" in changed.stderr


@pytest.mark.slow
def test_demo_corpus_is_offline_and_deterministic(tmp_path):
    a, b = tmp_path / "a" / "demo", tmp_path / "b" / "demo"
    for out in (a, b):
        prepare(
            "demo",
            "--out",
            str(out),
            "--shard-tokens",
            "500000",
            "--val-tokens",
            "50000",
            "--train-shards",
            "2",
        )
    meta_a = json.loads((a / "meta.json").read_text())
    meta_b = json.loads((b / "meta.json").read_text())
    assert meta_a["shards"] == meta_b["shards"]
    assert meta_a["python"]["python"] == sys.version.split()[0] and meta_a["tokenizer"] == "bytes"
    assert [s["tokens"] for s in meta_a["shards"]] == [50_000, 500_000, 500_000]
    text = load_tokenizer("bytes").decode(open_shard(a / "demo_train_000001.bin")[:200_000])
    assert "def " in text or "Return" in text  # Python's docs and docstrings


def test_installed_corpus_is_this_installation_in_a_fixed_order(tmp_path):
    from data.sources import installed_documents, installed_files, installed_identity

    files = installed_files()
    names = [name for _, name in files]
    assert files == installed_files() and len(set(names)) == len(names)
    assert any(name.endswith("/json/__init__.py") for name in names)  # the standard library
    assert any("site-packages/torch/" in name for name in names)  # and what pip installed
    first = list(itertools.islice(installed_documents(0, files), 5))
    assert list(itertools.islice(installed_documents(2, files), 3)) == first[2:]
    name, _, text = first[0].partition("\n\n")
    assert name == files[0][1] and text == files[0][0].read_text(encoding="utf-8")
    # the fingerprint changes with the set of files: a resume on another installation is refused
    assert installed_identity(files) == installed_identity(list(files))
    assert installed_identity(files[1:])["sha256"] != installed_identity(files)["sha256"]

    out = tmp_path / "pycode"
    args = ["installed", "--out", str(out), "--tokenizer", "bytes", "--shard-tokens", "100000"]
    prepare(*args, "--val-tokens", "10000", "--train-shards", "1")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["kind"] == "installed" and meta["source"]["files"] == len(files)
    assert [s["tokens"] for s in meta["shards"]] == [10_000, 100_000]
    first_text = load_tokenizer("bytes").decode(open_shard(out / "pycode_val_000000.bin")[1:200])
    assert first_text.startswith(names[0])


@pytest.mark.slow
def test_inspect_reports_and_decodes(tmp_path):
    out = tmp_path / "demo"
    prepare(
        "demo", "--out", str(out), "--shard-tokens", "200000", "--val-tokens", "20000", "--train-shards", "1"
    )
    result = prepare("inspect", str(out), "--windows", "2", "--window-tokens", "40")
    assert "demo_val_000000.bin: 20,000 tokens" in result.stdout and "header ok" in result.stdout
    assert result.stdout.count("--- demo_") == 2
    path = out / "demo_train_000001.bin"
    path.write_bytes(path.read_bytes()[:-7])
    bad = prepare("inspect", str(out), check=False)
    assert bad.returncode == 2 and "demo_train_000001.bin" in bad.stderr and "truncated" in bad.stderr


def test_pretokenized_from_a_local_mirror(tmp_path):
    from trainer.shards import write_shard

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_shard(mirror / "fineweb_val_000000.bin", np.arange(1000) % 50257)
    for i in (1, 2):
        write_shard(mirror / f"fineweb_train_{i:06d}.bin", np.arange(2000) % 50257)
    out = tmp_path / "fineweb"
    prepare("pretokenized", "--out", str(out), "--train-shards", "2", "--from-dir", str(mirror))
    meta = json.loads((out / "meta.json").read_text())
    assert [s["file"] for s in meta["shards"]] == [
        "fineweb_val_000000.bin",
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
    ]
    assert meta["vocab_size"] == 50257 and meta["tokenizer"] == "gpt2"
    (mirror / "fineweb_train_000003.bin").write_bytes(b"<html>not found</html>")
    bad = prepare(
        "pretokenized", "--out", str(out), "--train-shards", "3", "--from-dir", str(mirror), check=False
    )
    assert bad.returncode == 2 and "fineweb_train_000003.bin" in bad.stderr
    assert not (out / "fineweb_train_000003.bin").exists()


def test_unknown_input_is_a_clear_error(tmp_path):
    result = prepare(
        "text",
        str(tmp_path / "missing.txt"),
        "--out",
        str(tmp_path / "x"),
        "--tokenizer",
        "bytes",
        check=False,
    )
    assert result.returncode == 2 and "missing.txt: no such file" in result.stderr


def test_corrupt_meta_json_is_named_by_prepare_and_inspect(tmp_path, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS[:20])
    out = tmp_path / "out"
    args = ["text", str(source), "--out", str(out), "--tokenizer", "bytes", "--shard-tokens", "500",
            "--val-tokens", "300", "--workers", "1"]  # fmt: skip
    assert prepare_module.main(args) == 0
    for text in ['{"shards": [', "[1, 2]", '{"shards": [{"file": 1}]}']:
        (out / "meta.json").write_text(text)
        capsys.readouterr()
        assert prepare_module.main(args) == 2  # resuming reads meta.json
        assert prepare_module.main(["inspect", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count(f"error: {out / 'meta.json'}: ") == 2 and "Traceback" not in err


def test_inspect_checks_sha256_against_meta_json(tmp_path, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", DOCS[:20])
    out = tmp_path / "out"
    args = [
        "text",
        str(source),
        "--out",
        str(out),
        "--tokenizer",
        "bytes",
        "--val-tokens",
        "300",
        "--workers",
        "1",
    ]
    assert prepare_module.main(args) == 0
    path = out / "out_train_000001.bin"
    tokens = np.array(open_shard(path))
    tokens[5] = 97 if tokens[5] != 97 else 98
    write_shard(path, tokens)  # a sound shard, but not the one prepared
    assert prepare_module.main(["inspect", str(out)]) == 2
    assert "out_train_000001.bin: sha256" in capsys.readouterr().err


def test_pretokenized_refetches_a_shard_that_differs_from_meta_json(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_shard(mirror / "fineweb_val_000000.bin", np.arange(1000) % 50257)
    write_shard(mirror / "fineweb_train_000001.bin", np.arange(2000) % 50257)
    out = tmp_path / "fineweb"
    meta = pretokenized.prepare(out, 1, from_dir=str(mirror))
    verify_shards(find_shards(out, "*.bin"), 50304)  # what the trainer checks

    damaged = out / "fineweb_train_000001.bin"
    with open(damaged, "r+b") as f:  # tokens overwritten, header intact
        f.seek(HEADER_BYTES + 100)
        f.write(b"\x07\x00" * 8)
    assert pretokenized.prepare(out, 1, from_dir=str(mirror)) == meta
    assert "fineweb_train_000001.bin: sha256" in capsys.readouterr().err
    assert sha256(damaged) == meta["shards"][1]["sha256"]  # fetched again

    write_shard(damaged, np.arange(2000) % 7)
    write_shard(mirror / "fineweb_train_000001.bin", np.arange(2000) % 7)  # the source changed
    with pytest.raises(pretokenized.DownloadError, match="fineweb_train_000001.bin: the fetched copy"):
        pretokenized.prepare(out, 1, from_dir=str(mirror))
