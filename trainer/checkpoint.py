"""Checkpoints that are whole, verified and never run code.

A file is written to a temporary name, then renamed, so a file that exists is whole. It records a
sha256 of its content (`checksum`), verified on load: a damaged file is an error, not different
weights. Loading unpickles tensors, dicts, lists, numbers and strings only (weights_only): a file
that needs anything else (code) is refused. Files written before checksums load with a warning.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

PREFIX = "step_"
SUFFIX = ".pt"
CHECKSUM = "checksum"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the file and the reason."""


class UnsafeCheckpointError(CheckpointError):
    """A file that asks to unpickle more than data: tampered with, or not ours. Never skipped."""


def checksum(obj: Any) -> str:
    """sha256 of a checkpoint's content: dicts (sorted keys), lists, tensors (dtype, shape, bytes)
    and scalars (repr). Deterministic, one pass over the bytes; equal content, equal checksum."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest, obj: Any) -> None:
    if isinstance(obj, dict):
        digest.update(b"{%d" % len(obj))
        for key in sorted(obj, key=repr):  # keys are strings, or ints in optimizer state
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[%d" % len(obj))
        for item in obj:
            _feed(digest, item)
    elif isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{tuple(obj.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    else:
        digest.update(f"S{obj!r}".encode())


def save(obj: dict, path: str | Path) -> None:
    """obj and its checksum, written atomically; a failed write (a full disk) leaves no file behind
    and is a CheckpointError that says why."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        # A file object of our own: torch reports a failed write of a path without its reason.
        with open(tmp, "wb") as f:
            torch.save({**obj, CHECKSUM: checksum(obj)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot save: {_reason(err)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reason(err: OSError) -> str:
    """E.g. "no space left on device (ENOSPC)"."""
    text = (err.strerror or str(err)).lower()
    return f"{text} ({errno.errorcode[err.errno]})" if err.errno in errno.errorcode else text


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
    """The content of a file written by save(), checksum verified (and removed)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refused(path, err) from None
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: cannot read checkpoint (a {type(state).__name__}, not a dict)")
    stored = state.pop(CHECKSUM, None)
    if stored is None:
        print(f"warning: {path} has no checksum (written before checksums); loaded unverified", flush=True)
    elif stored != checksum(state):
        raise CheckpointError(f"{path}: checksum mismatch, the file is damaged")
    return state


def _refused(path: Path, err: pickle.UnpicklingError) -> CheckpointError:
    """The weights_only unpickler's refusal in one line: a file that asks for a GLOBAL (a function
    or class: code) is unsafe; one it cannot parse (not a pickle, a damaged one) is damaged."""
    said = _unpickler_says(err)
    if "GLOBAL" in said:
        return UnsafeCheckpointError(
            f"{path}: refusing to unpickle it ({said}); a checkpoint holds only tensors, dicts, "
            "lists, numbers and strings"
        )
    return CheckpointError(f"{path}: cannot read checkpoint (UnpicklingError: {said})")


def _unpickler_says(err: pickle.UnpicklingError) -> str:
    """The line of torch's long weights_only message that says what stopped it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "GLOBAL" in line:
            return line.rstrip(".")
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1].rstrip(".")
    return lines[0] if lines else "refused"


@contextmanager
def misfit_is_an_error(path: Path) -> Iterator[None]:
    """Around putting a loaded checkpoint into a model or optimizer: content that does not fit
    (a missing key, another shape) is a one-line CheckpointError naming the file."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        detail = " ".join(f"{type(err).__name__}: {err}".split())
        raise CheckpointError(f"{path}: does not fit this run ({detail[:300]})") from None


def newest(directory: Path) -> tuple[dict, Path] | None:
    """The newest checkpoint that loads; a damaged one is reported and the previous one tried.
    One that asks to run code is an error: it did not come from this trainer."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return load(path), path
        except UnsafeCheckpointError:
            raise
        except CheckpointError as err:
            print(f"warning: skipping {err}", flush=True)
    return None


def prune(directory: Path, keep: int) -> None:
    for _, path in list_checkpoints(directory)[:-keep]:
        path.unlink(missing_ok=True)
