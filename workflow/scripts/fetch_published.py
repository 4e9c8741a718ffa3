"""Snakemake script of rule fetch_published: one of the paper's CSVs, copied from a local folder
(--config published_dir=...) or downloaded from its pinned URL, then checked against its pinned
sha256. A local copy is checked exactly like a download: a differing hash is an error, unless
`--config published_unverified=True` (then a warning, in the console and the rule's log). Written
through a temporary file in the target's folder, removed on any failure."""

import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT_S = 60  # per connection attempt and per read: a firewalled node fails instead of hanging
OFFLINE_HINT = "offline? give a local copy: --config published_dir=/abs/path/to/published (with v1/, v2/)"


class PublishedError(RuntimeError):
    """A published file that cannot be fetched or is not the pinned one: one line, what to do."""


def download(url: str, out) -> None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            shutil.copyfileobj(response, out)
    except (urllib.error.URLError, OSError) as err:  # HTTPError, timeouts and resets included
        reason = getattr(err, "reason", None) or err
        raise PublishedError(f"cannot download {url}: {reason}; {OFFLINE_HINT}") from None


def copy_local(local_dir: str, file: str, out) -> None:
    source = Path(local_dir) / file
    try:
        with open(source, "rb") as f:
            shutil.copyfileobj(f, out)
    except OSError as err:
        raise PublishedError(f"{file}: cannot read the local copy {source}: {err.strerror}") from None


def fetch(entry: dict, local_dir: str | None, out: str, unverified: bool = False) -> str | None:
    """Write entry's file to `out`; returns the warning of an unverified copy, if any."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if local_dir:
                copy_local(local_dir, entry["file"], f)
            else:
                download(entry["url"], f)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        warning = None
        if digest != entry["sha256"]:
            where = f"the local copy in {local_dir}" if local_dir else entry["url"]
            message = f"{entry['file']}: sha256 {digest} of {where}, pinned {entry['sha256']}"
            if not unverified:
                raise PublishedError(
                    f"{message}; not the file the tables were verified against (to use it anyway: "
                    "--config published_unverified=True)"
                )
            warning = f"warning: {message}; used anyway (published_unverified=True)"
        os.replace(tmp, target)
        return warning
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(sm) -> int:
    log = Path(sm.log[0])
    try:
        warning = fetch(sm.params.entry, sm.params.local, sm.output[0], bool(sm.params.unverified))
    except PublishedError as err:
        log.write_text(f"error: {err}\n")
        print(f"error: {err}", file=sys.stderr)
        return 1
    log.write_text(f"{warning}\n" if warning else "")
    if warning:
        print(warning, file=sys.stderr)
    return 0


if "snakemake" in globals():  # run by Snakemake's script directive
    sys.exit(main(snakemake))  # noqa: F821
