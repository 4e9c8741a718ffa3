"""Where documents come from: a `datasets` stream (the Hub or local files), or Python's own text."""

from __future__ import annotations

import ast
import hashlib
import random
import site
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
# The files of an installation that are text a tokenizer should see: source, stubs and docs.
INSTALLED_SUFFIXES = {".py", ".pyi", ".md", ".rst", ".txt"}


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


def installed_files() -> list[tuple[Path, str]]:
    """The text files of this Python installation (standard library and site-packages), each
    with a name relative to its folder, in one fixed shuffled order."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), *map(Path, site.getsitepackages())]
    found: dict[Path, str] = {}
    for root in roots:
        if root.is_dir():
            for path in sorted(root.rglob("*")):
                if path.suffix in INSTALLED_SUFFIXES and path.is_file():
                    found.setdefault(path.resolve(), f"{root.name}/{path.relative_to(root)}")
    files = sorted(found.items(), key=lambda item: item[1])
    random.Random(0).shuffle(files)
    return files


def installed_identity(files: list[tuple[Path, str]]) -> dict:
    """What makes `installed_documents` reproducible: the Python version and the files' names and sizes."""
    digest = hashlib.sha256()
    size = 0
    for path, name in files:
        n = path.stat().st_size
        digest.update(f"{name}\0{n}\n".encode())
        size += n
    return {**python_identity(), "files": len(files), "bytes": size, "sha256": digest.hexdigest()}


def installed_documents(skip: int = 0, files: list[tuple[Path, str]] | None = None) -> Iterator[str]:
    """Every text file of this installation as one document (its name, a blank line, its text),
    from document `skip` on; files that are not UTF-8 are left out. Real text for the GPT-2
    tokenizer on a machine with no network (the source of torch, numpy, the standard library...).
    """
    count = 0
    for path, name in installed_files() if files is None else files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if count >= skip:
            yield f"{name}\n\n{text}"
        count += 1


def python_identity() -> dict:
    return {"python": sys.version.split()[0], "implementation": sys.implementation.name}
