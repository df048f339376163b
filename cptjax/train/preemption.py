"""Preemption: SIGTERM becomes a request the training loop honours at a step boundary (save, exit 0).

One process: a Python SIGTERM handler sets a flag, from the moment `cptjax train` starts (the CLI
installs it before importing JAX) to the end of the final save. The loop checks it after each
step; start-up checks it between phases; evaluation checks it between batches.

Several processes (jax.distributed): JAX's preemption service (on by default) catches SIGTERM
itself and the processes agree, through the coordination service, on the step at which all of
them stop: `multihost_utils.reached_preemption_sync_point(step)` is a local check, with no
per-step collective. A SIGTERM that arrived before the service started is shared once, at start.
"""

from __future__ import annotations

import signal

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


class Preemption:
    """`with Preemption() as p:` for a whole run; `p.requested` during start-up and evaluation,
    `p.agreed(step)` after each step (True on every process at the same step)."""

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
        """This process was asked to stop (between phases of start-up, between eval batches)."""
        return _requested[0]

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
