"""Output folders that appear whole or not at all: nothing already written is lost or overwritten.

Work happens in a hidden sibling folder that is renamed into place at the end. On a local disk
the rename is atomic; on an object store (gs://) it moves the files one by one, after all of
them were written, so a reader never sees a half-written tensor, only (for a moment) an
incomplete set of files.
"""

from __future__ import annotations

import contextlib
import os

from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, user_path


def check_output_dir(out: PathLike, flag: str = "--out") -> epath.Path:
    """Refuses an existing non-empty folder (or a file) before any work starts."""
    out = user_path(out, flag)
    if out.exists():
        if not out.is_dir():
            raise CptjaxError(f"{flag} {out}: exists and is not a folder; choose a new path")
        if any(out.iterdir()):
            raise CptjaxError(f"{flag} {out}: folder exists and is not empty; choose a new path or "
                              "remove it yourself (cptjax never overwrites)")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: PathLike, flag: str = "--out"):
    """Yields a temporary sibling folder and renames it to `out` only if the block succeeds."""
    out = check_output_dir(out, flag)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        tmp.rmtree()
    tmp.mkdir()
    try:
        yield tmp
        check_output_dir(out, flag)  # someone may have written there meanwhile
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        if tmp.exists():
            tmp.rmtree()
        raise
