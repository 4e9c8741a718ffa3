"""Files the pipeline writes and reads back: atomic writes, and JSONL logs that may end torn."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file, and a failed
    write (a full disk) leaves nothing behind. The pid in the name keeps concurrent writers apart."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_log(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of a JSONL log; a torn line (a kill or a full disk mid-write) or any other
    line that is not a row with an integer step is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and type(row.get("step")) is int:
            rows.append((line, row))
    return rows
