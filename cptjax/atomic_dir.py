"""Output folders that appear whole or not at all: nothing already written is lost or overwritten."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from cptjax.errors import CptjaxError


def check_output_dir(out: str | Path, flag: str = "--out") -> Path:
    """Refuses an existing non-empty folder (or a file) before any work starts."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise CptjaxError(f"{flag} {out}: exists and is not a folder; choose a new path")
        if any(out.iterdir()):
            raise CptjaxError(f"{flag} {out}: folder exists and is not empty; choose a new path or "
                              "remove it yourself (cptjax never overwrites)")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, flag: str = "--out"):
    """Yields a temporary sibling folder and renames it to `out` only if the block succeeds."""
    out = check_output_dir(out, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(out, flag)  # someone may have written there meanwhile
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
