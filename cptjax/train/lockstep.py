"""One process drives, every process computes: work whose control flow lives on one host.

lm-evaluation-harness decides on process 0 which requests to score and in what batches; a jitted
function over a multi-host mesh must still be called by every process, in the same order, with
the same shapes. `Lockstep` turns the driver's calls into that: process 0 calls `call(name,
*arrays)`; every other process sits in `follow()`, receives the same op and integer arrays through
two broadcasts (a fixed-size header with the op and the shapes, then the arrays), and makes the
same call. `finish(status)` ends the followers' loop and hands them one integer (for example
"interrupted"), so that every process leaves with the same answer and takes the same next step.

In one process nothing is broadcast: `call` is a plain call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

MAX_ARRAYS = 8
MAX_DIMS = 4
_HEADER = 3 + MAX_ARRAYS * (1 + MAX_DIMS)  # op, status, count, then per array: ndim, dims
_FINISH = -1
_INTERRUPTED, _FAILED = 1, 2  # finish statuses `led` uses


class Lockstep:
    """`ops` maps a name to a function of integer numpy arrays, the same on every process (each
    process builds its own from the same config). Its return value is used on process 0 only."""

    def __init__(self, ops: dict[str, Callable[..., Any]]):
        import jax

        self.ops = ops
        self.names = sorted(ops)
        self.lead = jax.process_index() == 0
        self.alone = jax.process_count() == 1

    def call(self, name: str, *arrays: np.ndarray) -> Any:
        """Process 0: runs `ops[name](*arrays)` on every process and returns process 0's result."""
        if not self.lead:
            raise RuntimeError("Lockstep.call: only process 0 drives; the others call follow()")
        arrays = tuple(np.ascontiguousarray(a, dtype=np.int32) for a in arrays)
        if not self.alone:
            self._send(self.names.index(name), 0, arrays)
        return self.ops[name](*arrays)

    def finish(self, status: int = 0) -> int:
        """Process 0: releases the followers, handing them `status`; returns it."""
        if self.lead and not self.alone:
            self._send(_FINISH, status, ())
        return status

    def follow(self) -> int:
        """Every process but 0: makes each call process 0 makes, until it finishes; returns its status."""
        while True:
            op, status, arrays = self._receive()
            if op == _FINISH:
                return status
            self.ops[self.names[op]](*arrays)

    def _send(self, op: int, status: int, arrays: tuple[np.ndarray, ...]) -> None:
        from jax.experimental import multihost_utils

        if len(arrays) > MAX_ARRAYS or any(a.ndim > MAX_DIMS for a in arrays):
            raise ValueError(f"Lockstep: at most {MAX_ARRAYS} arrays of at most {MAX_DIMS} dimensions")
        header = np.zeros(_HEADER, np.int64)
        header[:3] = op, status, len(arrays)
        for i, a in enumerate(arrays):
            at = 3 + i * (1 + MAX_DIMS)
            header[at] = a.ndim
            header[at + 1:at + 1 + a.ndim] = a.shape
        multihost_utils.broadcast_one_to_all(header)
        if arrays:
            multihost_utils.broadcast_one_to_all(arrays)

    def _receive(self) -> tuple[int, int, tuple[np.ndarray, ...]]:
        from jax.experimental import multihost_utils

        header = np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(_HEADER, np.int64)))
        op, status, count = (int(v) for v in header[:3])
        shapes = []
        for i in range(count):
            at = 3 + i * (1 + MAX_DIMS)
            shapes.append(tuple(int(d) for d in header[at + 1:at + 1 + int(header[at])]))
        arrays = ()
        if shapes:
            received = multihost_utils.broadcast_one_to_all(tuple(np.zeros(s, np.int32) for s in shapes))
            arrays = tuple(np.asarray(a) for a in received)
        return op, status, arrays


def led(lockstep: Lockstep, drive: Callable[[], Any], interrupted: type[BaseException] | None = None):
    """Runs `drive()` on process 0 while the others follow. Returns (process 0's result or None,
    interrupted) on every process: `interrupted` is True everywhere when `drive` raised
    `interrupted` on process 0 (the followers learn it from finish's status). Any other error
    on process 0 is raised there and, as a RuntimeError, on the others."""
    if not lockstep.lead:
        status = lockstep.follow()
        if status == _FAILED:
            raise RuntimeError("process 0 failed while it drove this work: its log says why")
        return None, status == _INTERRUPTED
    try:
        result = drive()
    except BaseException as error:
        stopped = interrupted is not None and isinstance(error, interrupted)
        lockstep.finish(_INTERRUPTED if stopped else _FAILED)  # followers must never wait forever
        if stopped:
            return None, True
        raise
    lockstep.finish(0)
    return result, False
