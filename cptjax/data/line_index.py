"""Where the lines of a plain JSONL file start, scanned once and stored beside it; exact byte-range reads.

Reading document i of a JSONL file needs the byte offsets of its line. Scanning the file for them
reads all of it, so the scan happens once: its result, the line index, is stored beside the file
(by `store`, which the training pipeline calls once all its sources passed their checks, so a
command that fails writes nothing) as
`NAME.cptjax-lines` (a JSON header line, then little-endian int64 offsets: line i is
bytes [b[i], b[i+1] - 1), the newline excluded), and every later open of the file, by any process
of any run, reads the index instead. Where the data's folder cannot be written (a read-only bucket
or mount), the index goes to this machine's cache folder ($XDG_CACHE_HOME or ~/.cache,
`cptjax/line-index/`); where neither can be written, the file is scanned at every open.

The index records the file's size and modification time and is rebuilt when either differs. Every
read of a line also checks that it sits between two newlines (one byte on each side), so a file
rewritten in place with the same size and time fails naming the line instead of giving wrong text.
Several processes building the same index at once write identical bytes; each writes a private
temporary file and renames it into place (a local rename is atomic; an object-store write
appears whole), so a reader never sees half an index.

Reads go through `open_ranged`, which asks storage for exactly the bytes requested: unbuffered on
a local disk, no read-ahead cache on an object store (gcsfs would otherwise fetch 5 MiB per read).
`bytes_read()` counts them, for the tests that check each process reads only its share.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets

import numpy as np
from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import is_remote

SUFFIX = ".cptjax-lines"
_FORMAT = "cptjax-line-index"
_VERSION = 1
_SCAN_CHUNK = 16 << 20  # bytes per read while scanning a file for newlines

_bytes_read = 0


def bytes_read() -> int:
    """Bytes this process has read from document files and line indexes so far (for the tests and
    benchmarks of how much of a corpus each process reads)."""
    return _bytes_read


def count_read(nbytes: int) -> None:
    global _bytes_read
    _bytes_read += nbytes


def is_index_file(path: str) -> bool:
    """A line index, or one being written: globs over a data folder skip these."""
    return SUFFIX in os.path.basename(path)


def open_ranged(path: str):
    """A binary file object whose `seek` + `read(n)` fetch exactly those n bytes from storage."""
    if not is_remote(path):
        return open(path, "rb", buffering=0)
    import fsspec

    fs, _ = fsspec.core.url_to_fs(path)
    return fs.open(path, "rb", cache_type="none")


def read_range(handle, start: int, nbytes: int) -> bytes:
    """Up to `nbytes` bytes from `start` (fewer only at the end of the file), counted."""
    handle.seek(start)
    parts, got = [], 0
    while got < nbytes:
        part = handle.read(nbytes - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    count_read(got)
    return b"".join(parts)


def bounds_of(data: bytes) -> np.ndarray:
    """Line bounds of bytes in memory: line i is data[b[i]:b[i+1] - 1]; no empty line after a final newline."""
    newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10).astype(np.int64)
    return _bounds(newlines, len(data))


def _bounds(newlines: np.ndarray, size: int) -> np.ndarray:
    """[0, each newline + 1, ..., the end]: the last entry is size + 1 when no newline ends the file,
    so that every line i is [b[i], b[i+1] - 1); a final newline starts no empty line."""
    if size == 0:
        return np.zeros(1, np.int64)
    starts = np.concatenate([[0], newlines + 1])
    ends_with_newline = starts[-1] == size
    if ends_with_newline:
        starts = starts[:-1]
    return np.concatenate([starts, [size if ends_with_newline else size + 1]]).astype(np.int64)


def line_bounds(path: str) -> tuple[np.ndarray, dict | None]:
    """(the line bounds of the plain file `path`, None) from its stored index if that is fresh;
    else (bounds, key) from a scan, `key` what `store` needs to write the index."""
    key = _file_key(path)
    for place in _index_places(path):
        bounds = _load(place, key)
        if bounds is not None:
            return bounds, None
    return _scan(path), key


def store(path: str, key: dict, bounds: np.ndarray) -> None:
    """Writes the index of `path` beside it, else in the cache folder, else nowhere."""
    for place in _index_places(path):
        if _store(place, key, bounds):
            return


def index_path(path: str) -> str:
    """Where the index of `path` is stored when its folder can be written."""
    return path + SUFFIX


def _index_places(path: str) -> list[str]:
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "cptjax", "line-index")
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    return [index_path(path), os.path.join(cache, f"{digest}-{os.path.basename(path)}{SUFFIX}")]


def _file_key(path: str) -> dict:
    if is_remote(path):
        stat = epath.Path(path).stat()
        return {"size": int(stat.length), "mtime": int(stat.mtime)}
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime": stat.st_mtime_ns}


def _scan(path: str) -> np.ndarray:
    """Reads the whole file once, in chunks, collecting the offsets of its newlines."""
    found, offset = [], 0
    with open_ranged(path) as handle:
        while True:
            chunk = read_range(handle, offset, _SCAN_CHUNK)
            if not chunk:
                break
            found.append(np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + offset)
            offset += len(chunk)
    newlines = np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)
    return _bounds(newlines, offset)


def _load(place: str, key: dict) -> np.ndarray | None:
    """The stored bounds at `place`, or None if there are none or they are for another version of the file."""
    try:
        data = epath.Path(place).read_bytes()
    except (OSError, ValueError):  # missing or unreadable: build it again
        return None
    count_read(len(data))
    head, _, body = data.partition(b"\n")
    try:
        header = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or header.get("format") != _FORMAT or header.get("version") != _VERSION \
            or any(header.get(k) != v for k, v in key.items()) or len(body) != 8 * (header.get("lines", -1) + 1):
        return None
    return np.frombuffer(body, dtype="<i8").astype(np.int64)


def _store(place: str, key: dict, bounds: np.ndarray) -> bool:
    """Writes the index whole or not at all; False where `place` cannot be written."""
    header = json.dumps({"format": _FORMAT, "version": _VERSION, **key, "lines": len(bounds) - 1})
    data = header.encode() + b"\n" + bounds.astype("<i8").tobytes()
    try:
        if is_remote(place):  # an object appears whole when its upload ends
            epath.Path(place).write_bytes(data)
            return True
        os.makedirs(os.path.dirname(place), exist_ok=True)
        tmp = os.path.join(os.path.dirname(place), f".{os.path.basename(place)}.tmp-{secrets.token_hex(6)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, place)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return True
    except Exception:  # noqa: BLE001 -- read-only folders and buckets raise many types; the index is optional
        return False


def read_line(handle, start: int, next_start: int, where: str, path: str) -> bytes:
    """The line [start, next_start - 1) of an indexed file, read with the byte before it and its
    newline, to check that the index still fits the file: newlines around it, none inside."""
    low = start - 1 if start > 0 else 0
    raw = read_range(handle, low, next_start - low)
    line = raw[start - low:next_start - 1 - low]
    before, after = raw[:start - low], raw[next_start - 1 - low:]
    if (start > 0 and before != b"\n") or after not in (b"\n", b"") or len(line) != next_start - 1 - start \
            or b"\n" in line:
        raise CptjaxError(f"{where}: the line is not where the line index says; {path} changed after "
                          f"its index was made (rewritten in place with the same size and time?). Delete "
                          f"{index_path(path)} (or its copy in ~/.cache/cptjax/line-index/) and start again")
    return line
