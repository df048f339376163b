"""Streaming reads and writes of the safetensors format, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then raw bytes.
Reading goes straight into the caller's destination array (`readinto`, no intermediate copy, no
mmap whose pages would stay resident); writing sends each array's bytes to the file as they come.
The `safetensors` package cannot do either for bfloat16 with NumPy, which is why this module exists;
the tests check it against that package and against transformers.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cptjax.core.dtypes import SAFETENSORS_CODES, safetensors_code
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, user_path

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors package's own limit
_bytes_read = 0  # tensor bytes this process has read through SafetensorsFile


def bytes_read() -> int:
    """Tensor bytes this process has read from safetensors files so far (for tests and benchmarks
    of how much of a checkpoint each host reads)."""
    return _bytes_read


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int


class SafetensorsFile:
    """The header of one .safetensors file, with `read_into` to fetch one tensor at a time."""

    def __init__(self, path: PathLike):
        self.path = user_path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        try:
            size = self.path.stat().length
            with self.path.open("rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise CptjaxError(f"{self.path}: truncated safetensors file (no header)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise CptjaxError(f"{self.path}: not a safetensors file (header length {header_len})")
                header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CptjaxError(f"{self.path}: corrupt safetensors header ({err})")
        except OSError as err:
            raise CptjaxError(f"{self.path}: cannot read ({err.strerror})")
        data_start = 8 + header_len
        for name, entry in header.items():
            if name == "__metadata__":
                self.metadata = entry or {}
                continue
            try:
                dtype = SAFETENSORS_CODES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except KeyError as err:
                raise CptjaxError(f"{self.path}: tensor {name!r} has unsupported or missing {err} "
                                  f"in its header entry {entry}")
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or data_start + end > size:
                raise CptjaxError(f"{self.path}: tensor {name!r} has inconsistent offsets; the file is "
                                  "truncated or corrupt")
            self.tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, nbytes)

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Reads tensor `name` into the C-contiguous array `out` of the same dtype and size."""
        info = self.tensors[name]
        if out.dtype != info.dtype or out.nbytes != info.nbytes or not out.flags.c_contiguous:
            raise ValueError(f"destination {out.dtype}{out.shape} does not fit {name} "
                             f"{info.dtype}{info.shape}")
        with self.path.open("rb") as f:
            self._read_runs(f, name, np.array([info.begin]), info.nbytes, out)

    def read_block_into(self, name: str, shape: tuple[int, ...], index: tuple[slice, ...],
                        out: np.ndarray) -> None:
        """Reads the block `index` (slices with step 1) of tensor `name`, viewed as the C-order
        `shape` (the same bytes: a reshape of the stored shape), into `out`, reading only its bytes:
        one contiguous run per combination of the indices before the last sliced axis."""
        info = self.tensors[name]
        ranges = [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]
        block = tuple(stop - start for start, stop in ranges)
        if out.dtype != info.dtype or out.shape != block or not out.flags.c_contiguous:
            raise ValueError(f"destination {out.dtype}{out.shape} does not fit {name}{list(block)}")
        if math.prod(shape) * info.dtype.itemsize != info.nbytes:
            raise ValueError(f"shape {shape} does not view {name} {info.shape}")
        # Axes after `last` are whole, so each run spans block[last:]; the runs start at the
        # offsets of every index combination of the axes up to `last`.
        last = max((d for d, (r, n) in enumerate(zip(ranges, shape)) if r != (0, n)), default=0)
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        starts = np.zeros((), np.int64)
        for d in range(last + 1):
            axis = np.arange(*ranges[d], dtype=np.int64) if d < last else np.array([ranges[d][0]])
            starts = (starts[..., None] + axis * strides[d])
        run = math.prod(block[last:]) * info.dtype.itemsize
        with self.path.open("rb") as f:
            self._read_runs(f, name, info.begin + starts.reshape(-1) * info.dtype.itemsize, run, out)

    def _read_runs(self, f, name: str, offsets: np.ndarray, run: int, out: np.ndarray) -> None:
        """Reads `run` bytes at each file offset into consecutive parts of `out`."""
        global _bytes_read
        view = memoryview(out.reshape(-1).view(np.uint8))
        for i, offset in enumerate(offsets.tolist()):
            f.seek(offset)
            done = 0
            while done < run:
                got = f.readinto(view[i * run + done:(i + 1) * run])
                if not got:
                    raise CptjaxError(f"{self.path}: truncated while reading tensor {name!r}")
                done += got
        _bytes_read += run * len(offsets)

    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        out = np.empty(info.shape, info.dtype)
        self.read_into(name, out)
        return out


def write_safetensors(path: PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                      specs: list[tuple[str, np.dtype, tuple[int, ...]]],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (yielded lazily, in the order of `specs`) to `path`, one at a time.

    `specs` gives each tensor's name, dtype and shape up front, because the header comes first.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": safetensors_code(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    with user_path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        tensors = iter(tensors)
        for spec_name, dtype, shape in specs:
            name, array = next(tensors)
            if name != spec_name or array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
                raise ValueError(f"tensor {name} {array.dtype}{array.shape} does not match its spec "
                                 f"{spec_name} {dtype}{shape}")
            f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            # Drop the reference now: a view would keep the caller's previous (stacked) array
            # alive while the generator fetches the next one (zip's reused tuple did exactly that).
            del name, array
        if next(tensors, None) is not None:
            raise ValueError("more tensors than specs")
