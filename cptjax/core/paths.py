"""Paths as users give them: relative to the working folder, with ~, or remote URIs (gs://...).

Every path a user gives (flags, config keys) goes through `user_path` once, at the boundary, and is
an `etils.epath.Path` from there on: local paths become absolute (Orbax refuses relative ones, and
a run must not depend on where a later process starts), remote ones keep their scheme.
`pathlib.Path("gs://bucket/run")` would collapse to "gs:/bucket/run"; epath keeps it.
"""

from __future__ import annotations

import os
from typing import Annotated

from etils import epath

from cptjax.core.errors import CptjaxError

PathLike = str | os.PathLike
# A config field that holds a path: cptjax.core.config_tree makes it absolute (local) when it reads it,
# so every later use, the run's saved config.yaml and a resume from another folder agree.
USER_PATH = "user path"
UserPath = Annotated[str, USER_PATH]


def is_remote(path: PathLike) -> bool:
    return "://" in os.fspath(path)


def user_path(path: PathLike, key: str = "path") -> epath.Path:
    """The absolute epath.Path of a path a user wrote; `key` names the flag or config key."""
    text = os.fspath(path)
    if not text:
        raise CptjaxError(f"{key}: the path is empty")
    if not is_remote(text):
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    try:
        return epath.Path(text)
    except (KeyError, ValueError):
        scheme = text.split("://", 1)[0]
        raise CptjaxError(f"{key} {text}: paths with {scheme}:// are not supported here; use a local "
                          "path or gs:// (install the filesystem's package for others)") from None


def local_copy(folder: epath.Path, names: tuple[str, ...]) -> epath.Path:
    """`folder` itself if it is local; else a temporary local folder holding those of `names` it
    has (removed when the process exits), for libraries that read only local files (transformers'
    tokenizers)."""
    if not is_remote(folder):
        return folder
    import atexit
    import shutil
    import tempfile

    local = epath.Path(tempfile.mkdtemp(prefix="cptjax-"))
    atexit.register(shutil.rmtree, str(local), ignore_errors=True)
    for name in names:
        if (folder / name).is_file():
            (folder / name).copy(local / name)
    return local
