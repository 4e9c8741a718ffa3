"""Atomic file writes, the one way every part of the pipeline writes a file it later reads."""

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
