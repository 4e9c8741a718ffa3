"""Snakemake script of rule fetch_published: one of the paper's CSVs, from a local folder or its
pinned URL, checked against its sha256 (an error for byte-exact copies, a warning otherwise)."""

import hashlib
import shutil
import sys
import urllib.request
from pathlib import Path


class ChecksumError(ValueError):
    pass


def fetch(entry: dict, local_dir: str | None, out: str) -> None:
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    if local_dir:
        shutil.copyfile(Path(local_dir) / entry["file"], tmp)
    else:
        urllib.request.urlretrieve(entry["url"], tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
        message = f"{entry['file']}: sha256 {digest}, expected {entry['sha256']}"
        if entry.get("exact", True):
            tmp.unlink()
            raise ChecksumError(message)
        print(f"warning: {message} (a reconstructed copy; used anyway)", file=sys.stderr)
    tmp.replace(target)


if "snakemake" in globals():  # run by Snakemake's script directive
    sm = snakemake  # noqa: F821
    fetch(sm.params.entry, sm.params.local, sm.output[0])
