"""Documents by index from files: JSON Lines, plain text and Parquet, each naming the file (and line).

A `DocumentSource` is `len(source)` documents, `source[i]` the text of document i (or, for a
prepared corpus, its token ids), and `source.where(i)` "file:line" for messages. The file-based
readers here index their files (line offsets, row counts) up front and open them lazily, so a
source pickles small and reopens in each Grain worker process. records.py holds the record-based
sources (ArrayRecord, TFDS, prepared corpora); read.py's `open_source` picks one by type.

Random access is what makes the order a pure function of the seed (shuffled per epoch by Grain)
and resume exact. A process reads only the documents of its share, by byte range: a plain JSONL
file through its line index (line_index.py: scanned once, stored beside the file, then read
instead of the file), text pieces and whole text files by their offsets. The exceptions read whole
files in every process (each Grain worker too), because they have no random access: compressed
files (.gz, .zst; decompressed into memory once and kept, and scanned for lines at every open),
Parquet (read by column), and text split on a delimiter (scanned for it at every open; the pieces
are then read by range). Use `cptjax data prepare` for corpora too big for that.
"""

from __future__ import annotations

import bisect
import collections
import glob as globlib
import gzip
import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import is_remote, user_path
from cptjax.data import line_index

_GLOB_CHARS = set("*?[")
_MAX_OPEN_FILES = 64  # plain files kept open per source (least recently used closed first)


class InvalidUtf8(CptjaxError):
    """A document that is not valid UTF-8; skipped or fatal by `data.invalid_utf8`."""


def expand_paths(patterns: Sequence[str], key: str) -> list[epath.Path]:
    """Expands each glob (sorted), refusing a missing path or a glob that matches nothing."""
    files: list[epath.Path] = []
    for i, pattern in enumerate(patterns):
        if not any(c in _GLOB_CHARS for c in pattern):
            path = user_path(pattern, f"{key}.paths[{i}]")
            if not path.exists():
                raise CptjaxError(f"{key}.paths[{i}]: {pattern}: no such file or folder")
            files.append(path)
            continue
        if not is_remote(pattern):
            matches = [user_path(p) for p in sorted(globlib.glob(pattern, recursive=True))
                       if not line_index.is_index_file(p)]
        else:
            parts = pattern.split("/")
            first = next(j for j, part in enumerate(parts) if any(c in _GLOB_CHARS for c in part))
            base = epath.Path("/".join(parts[:first]))
            matches = sorted(p for p in base.glob("/".join(parts[first:]))
                             if not line_index.is_index_file(str(p))) if base.exists() else []
        if not matches:
            raise CptjaxError(f"{key}.paths[{i}]: the glob {pattern!r} matches no file; check the "
                              "path (globs are not expanded by a shell here)")
        files.extend(matches)
    return files


def decode_utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidUtf8(f"{where}: invalid UTF-8 at byte {err.start} of the document; fix the "
                          "file or set data.invalid_utf8: skip to drop such documents") from None


class DocumentSource:
    """`len(source)` documents; `source[i]` -> str (or token ids for prepared corpora)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Any:
        raise NotImplementedError

    def where(self, index: int) -> str:
        raise NotImplementedError

    def store_indexes(self) -> None:
        """Stores what opening found that later opens can reuse (JSONL line indexes). The training
        pipeline calls it once its sources all passed their checks, so a failed command writes nothing."""


class _FileIndexed(DocumentSource):
    """Documents spread over files: a global index -> (file, index in file) by cumulative counts."""

    def __init__(self, files: list[epath.Path], counts: list[int]):
        self._files = [str(f) for f in files]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        f = bisect.bisect_right(self._starts, index) - 1
        return f, index - int(self._starts[f])

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}

    def _whole(self, f: int, load: Callable[[str], Any]) -> Any:
        """`load(path)` of file f, computed once per process and kept (not pickled: workers reload)."""
        cache = self.__dict__.setdefault("_open_whole", {})
        if f not in cache:
            cache[f] = load(self._files[f])
        return cache[f]

    def _compressed(self, f: int) -> bool:
        return self._files[f].endswith((".gz", ".zst"))

    def _handle(self, f: int):
        """File f opened for exact byte-range reads (line_index.open_ranged), kept open (LRU)."""
        handles = self.__dict__.setdefault("_open_handles", collections.OrderedDict())
        if f in handles:
            handles.move_to_end(f)
        else:
            if len(handles) >= _MAX_OPEN_FILES:
                handles.popitem(last=False)[1].close()
            handles[f] = line_index.open_ranged(self._files[f])
        return handles[f]

    def _read_span(self, f: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of file f's (decompressed) content."""
        if self._compressed(f):
            return self._whole(f, _read_bytes)[start:end]
        return line_index.read_range(self._handle(f), start, end - start)


def _read_bytes(path: str) -> bytes:
    data = epath.Path(path).read_bytes()
    line_index.count_read(len(data))
    if path.endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise CptjaxError(f"{path}: not a readable gzip file ({err})") from None
    if path.endswith(".zst"):
        import zstandard

        try:
            return zstandard.ZstdDecompressor().stream_reader(data).read()
        except zstandard.ZstdError as err:
            raise CptjaxError(f"{path}: not a readable zstd file ({err})") from None
    return data


class JsonlSource(_FileIndexed):
    """JSON Lines, plain or .gz/.zst: one object per line, the document in `text_field`.

    Blank lines are empty documents (skipped downstream). Plain files are read line by line by
    offset, from their stored line index (line_index.py); compressed ones are decompressed into
    memory once per process and kept.
    """

    def __init__(self, files: list[epath.Path], text_field: str):
        self._text_field = text_field
        self._bounds = []  # per file: line i is bytes [b[i], b[i+1] - 1)
        self._scanned = {}  # file -> its key, for the plain files that had no fresh stored index
        for f, path in enumerate(map(str, files)):
            if path.endswith((".gz", ".zst")):
                self._bounds.append(line_index.bounds_of(_read_bytes(path)))
                continue
            bounds, key = line_index.line_bounds(path)
            self._bounds.append(bounds)
            if key is not None:
                self._scanned[f] = key
        super().__init__(files, [len(b) - 1 for b in self._bounds])

    def store_indexes(self) -> None:
        for f, key in self._scanned.items():
            line_index.store(self._files[f], key, self._bounds[f])
        self._scanned = {}

    def where(self, index: int) -> str:
        f, line = self._locate(index)
        return f"{self._files[f]}:{line + 1}"

    def __getitem__(self, index: int) -> str:
        f, line = self._locate(index)
        where = f"{self._files[f]}:{line + 1}"
        start, next_start = int(self._bounds[f][line]), int(self._bounds[f][line + 1])
        if self._compressed(f):
            raw = self._read_span(f, start, next_start - 1)
        else:
            raw = line_index.read_line(self._handle(f), start, next_start, where, self._files[f])
        if not raw.strip():
            return ""
        text = decode_utf8(raw, where)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise CptjaxError(f"{where}: malformed JSON at column {err.colno} "
                              f"({err.msg}); fix the line or remove it") from None
        if not isinstance(record, dict):
            raise CptjaxError(f"{where}: expected a JSON object per line, got "
                              f"{type(record).__name__}")
        if self._text_field not in record:
            fields = ", ".join(list(record)[:10]) or "none"
            raise CptjaxError(f"{where}: no field {self._text_field!r} (fields: {fields}); set "
                              "the source's text_field")
        value = record[self._text_field]
        if not isinstance(value, str):
            raise CptjaxError(f"{where}: field {self._text_field!r} is a "
                              f"{type(value).__name__}, expected a string")
        return value


class TextSource(_FileIndexed):
    """Plain text: a whole file per document, or pieces between occurrences of `delimiter`."""

    def __init__(self, files: list[epath.Path], delimiter: str | None):
        self._delimiter = delimiter.encode("utf-8") if delimiter else None
        self._spans = []
        for path in files:
            if self._delimiter is None:
                self._spans.append(None)
                continue
            data = _read_bytes(str(path))
            spans, start = [], 0
            while True:
                end = data.find(self._delimiter, start)
                piece_end = len(data) if end < 0 else end
                if data[start:piece_end].strip():
                    spans.append((start, piece_end))
                if end < 0:
                    break
                start = end + len(self._delimiter)
            self._spans.append(np.asarray(spans, dtype=np.int64).reshape(-1, 2))
        super().__init__(files, [1 if s is None else len(s) for s in self._spans])

    def where(self, index: int) -> str:
        f, piece = self._locate(index)
        if self._spans[f] is None:
            return self._files[f]
        return f"{self._files[f]}: document {piece + 1} (byte {int(self._spans[f][piece][0])})"

    def __getitem__(self, index: int) -> str:
        f, piece = self._locate(index)
        path = self._files[f]
        if self._spans[f] is None:
            return decode_utf8(_read_bytes(path), path)
        raw = self._read_span(f, *(int(x) for x in self._spans[f][piece]))
        return decode_utf8(raw, self.where(index))


class ParquetSource(_FileIndexed):
    """Parquet files (the HF hub's format): the string column `text_field`, one row per document."""

    def __init__(self, files: list[epath.Path], text_field: str):
        import pyarrow.parquet as pq

        self._text_field = text_field
        counts = []
        for path in files:
            try:
                with epath.Path(path).open("rb") as handle:
                    parquet = pq.ParquetFile(handle)
                    schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
            except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
                raise CptjaxError(f"{path}: not a readable Parquet file ({err})") from None
            if text_field not in schema.names:
                raise CptjaxError(f"{path}: no column {text_field!r} (columns: "
                                  f"{', '.join(schema.names[:10])}); set the source's text_field")
            counts.append(rows)
        super().__init__(files, counts)

    def where(self, index: int) -> str:
        f, row = self._locate(index)
        return f"{self._files[f]}: row {row}"

    def _read_column(self, path: str):
        import pyarrow.parquet as pq

        with epath.Path(path).open("rb") as handle:
            return pq.read_table(handle, columns=[self._text_field]).column(0)

    def __getitem__(self, index: int) -> str:
        f, row = self._locate(index)
        value = self._whole(f, self._read_column)[row].as_py()
        if isinstance(value, bytes):
            return decode_utf8(value, self.where(index))
        if value is not None and not isinstance(value, str):
            raise CptjaxError(f"{self.where(index)}: column {self._text_field!r} holds "
                              f"{type(value).__name__}, expected strings")
        return value or ""
