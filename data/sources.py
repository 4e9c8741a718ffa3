"""Where documents come from: a `datasets` stream (the Hub or local files), or Python's own text."""

from __future__ import annotations

import ast
import random
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Standard-library folders left out of the demo: tests, demos and bundled third-party code.
DEMO_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "turtledemo",
    "lib2to3",
    "ensurepip",
}


class SourceError(ValueError):
    """A data source that cannot be read: the message names it."""


def stream_dataset(
    path: str,
    name: str | None = None,
    data_files: list[str] | None = None,
    split: str = "train",
    text_field: str = "text",
    skip: int = 0,
) -> Iterator[str]:
    """Documents of a `datasets` dataset in streaming mode, from document `skip` on.

    `path` is a Hub dataset (HuggingFaceFW/fineweb) or a local builder (parquet, json, text).
    """
    from datasets import load_dataset

    kwargs = {"sample_by": "document"} if path == "text" else {}
    dataset = load_dataset(path, name=name, data_files=data_files, split=split, streaming=True, **kwargs)
    if skip:
        dataset = dataset.skip(skip)
    for row in dataset:
        if text_field not in row:
            raise SourceError(f"{path}: records have no field {text_field!r} (fields: {', '.join(row)})")
        yield row[text_field]


def local_files(inputs: list[str]) -> dict[str, list[str]]:
    """Files (or the files in directories) grouped by the `datasets` builder that reads them."""
    groups: dict[str, list[str]] = {}
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise SourceError(f"{path}: no such file or directory")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            builder = LOCAL_BUILDERS.get(file.suffix.lower())
            if builder is None:
                if path.is_dir():
                    continue  # other files in a directory are ignored
                raise SourceError(f"{file}: unsupported file type (known: {', '.join(LOCAL_BUILDERS)})")
            groups.setdefault(builder, []).append(str(file))
    if not groups:
        raise SourceError(f"no .txt, .jsonl or .parquet files in {', '.join(inputs)}")
    return groups


def stream_local(inputs: list[str], text_field: str = "text", skip: int = 0) -> Iterator[str]:
    """Documents of local files: a .txt file is one document, jsonl/parquet one per record."""
    count = 0
    for builder, files in sorted(local_files(inputs).items()):
        for doc in stream_dataset(builder, data_files=files, text_field=text_field):
            if count >= skip:
                yield doc
            count += 1


def _module_docstrings(path: Path, root: Path) -> str | None:
    """Every docstring of one source file, read with `ast` (the module is never imported)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    nodes = (
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    )
    docs = [doc for node in nodes if (doc := ast.get_docstring(node))]
    if not docs:
        return None
    return f"{path.relative_to(root)}\n\n" + "\n\n".join(docs)


def _reference_topics(stdlib: Path) -> list[str]:
    """The reference documentation bundled with Python (pydoc_data/topics.py), read with `ast`."""
    topics = stdlib / "pydoc_data" / "topics.py"
    if not topics.exists():
        return []
    tree = ast.parse(topics.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            pairs = zip(node.value.keys, node.value.values, strict=True)
            return [ast.literal_eval(v) for k, v in sorted(pairs, key=lambda kv: ast.literal_eval(kv[0]))]
    return []


def demo_documents(skip: int = 0) -> Iterator[str]:
    """Text that ships with Python: the bundled reference docs and standard-library docstrings.

    Deterministic for a given Python version: files in name order, then one fixed shuffle.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = _reference_topics(stdlib)
    for path in sorted(stdlib.rglob("*.py")):
        if DEMO_SKIP_DIRS.intersection(path.relative_to(stdlib).parts[:-1]):
            continue
        doc = _module_docstrings(path, stdlib)
        if doc:
            docs.append(doc)
    random.Random(0).shuffle(docs)
    yield from docs[skip:]


def python_identity() -> dict:
    return {"python": sys.version.split()[0], "implementation": sys.implementation.name}
