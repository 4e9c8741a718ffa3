"""Atomic checkpoints: written to a temporary name, then renamed, so a file that exists is whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

PREFIX = "step_"
SUFFIX = ".pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the file and the reason."""


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"{PREFIX}{step:08d}{SUFFIX}"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob(f"{PREFIX}*{SUFFIX}"):
        digits = path.name[len(PREFIX) : -len(SUFFIX)]
        if digits.isdigit():
            found.append((int(digits), path))
    return sorted(found)


def load(path: str | Path, device: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None


def newest(directory: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads; a damaged one is reported and the previous one tried."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return load(path), path
        except CheckpointError as err:
            print(f"warning: skipping {err}", flush=True)
    return None


def prune(directory: Path, keep: int) -> None:
    for _, path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)
