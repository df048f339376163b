"""Preemption: SIGTERM becomes a request the training loop honours at a step boundary (save, exit 0).

One process: a Python SIGTERM handler sets a flag, from the moment `cptjax train` starts (the CLI
installs it before importing JAX) to the end of the final save. The loop checks it after each
step; evaluation checks it between batches; start-up checks it between phases (after the config
checks, before the weight load, between the tensors of an HF load, before the first compile) and
stops there with `StartInterrupted`, before anything is written.

Several processes (jax.distributed): JAX's preemption service (on by default) catches SIGTERM
itself and the processes agree, through the coordination service, on the step at which all of
them stop: `multihost_utils.reached_preemption_sync_point(step)` is a local check, with no
per-step collective. A SIGTERM that arrived before the service started is shared once, at start.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator

# JAX is imported where it is used, not here: the CLI installs the handler before anything slow
# (importing JAX takes seconds, and a SIGTERM in them would kill the process unsaved and unexplained)
_requested = [False]  # set by the handler; a list so the handler needs no global statement


def _handle(signum, frame) -> None:
    _requested[0] = True


def install_handler():
    """Turns SIGTERM into a request from now on (main thread only); returns the previous handler."""
    try:
        return signal.signal(signal.SIGTERM, _handle)
    except ValueError:  # not the main thread: no handler, no preemption saves
        return None


class StartInterrupted(Exception):
    """SIGTERM during start-up, raised at the next phase boundary (the phase is the message): the
    run stops before it has written anything, and exits 0."""


class Preemption:
    """`with Preemption() as p:` for a whole run; `p.check(phase)` between start-up phases,
    `p.requested` during evaluation, `p.agreed(step)` after each step (True on every process at
    the same step)."""

    def __enter__(self):
        self._previous = install_handler()
        self._service = False
        return self

    def after_initialize(self) -> None:
        """Call once jax.distributed is up: from then on JAX's service decides, and a request that
        came before it is shared with every process (one collective, at start-up)."""
        import jax
        import numpy as np
        from jax.experimental import multihost_utils

        self._service = jax.distributed.is_initialized()
        if self._service and jax.process_count() > 1:
            _requested[0] = bool(multihost_utils.process_allgather(np.int32(_requested[0])).any())

    @property
    def requested(self) -> bool:
        """This process was asked to stop (between eval batches, before the first step)."""
        return _requested[0]

    def check(self, phase: str) -> None:
        """Between start-up phases: raises StartInterrupted(`phase`) if this process was asked to stop."""
        if _requested[0]:
            raise StartInterrupted(phase)

    def between(self, items: Iterable, phase: str) -> Iterator:
        """`items`, with `check(phase)` before each one: a weight load's tensors, so that a load of
        minutes stops within one tensor of the signal."""
        for item in items:
            self.check(phase)
            yield item

    def agreed(self, step: int) -> bool:
        """True on every process at the same step once any process got SIGTERM."""
        if self._service:
            from jax.experimental import multihost_utils

            return _requested[0] or multihost_utils.reached_preemption_sync_point(step)
        return _requested[0]

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        _requested[0] = False
