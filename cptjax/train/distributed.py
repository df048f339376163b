"""Multi-host start-up through `jax.distributed`, before any device is touched."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from cptjax.core.errors import CptjaxError


def _cluster_detected() -> bool:
    """A TPU VM slice of several hosts, or a SLURM job of several tasks (jax finds the rest)."""
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    return "," in tpu_hosts or slurm_tasks > 1


def initialize(config) -> None:
    """Initialises jax.distributed per `config` (a DistributedSection); a no-op if already done."""
    if jax.distributed.is_initialized() or config.mode == "off":
        return
    try:
        if config.mode == "manual":
            jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                       num_processes=config.num_processes, process_id=config.process_id)
        elif _cluster_detected():
            jax.distributed.initialize()
    except (RuntimeError, ValueError) as err:
        raise CptjaxError(f"distributed: could not join the cluster ({err}); check "
                          "distributed.coordinator_address / num_processes / process_id or the "
                          "SLURM/TPU environment") from None


def gather_states(state: dict) -> list[dict]:
    """Every process's JSON-serializable `state`, in process order, on every process (a collective:
    all processes call it at the same step). Used to keep every host's data position in the
    checkpoint, which Orbax writes from process 0 only."""
    if jax.process_count() == 1:
        return [state]
    raw = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(raw)]))).reshape(-1)
    padded = np.zeros(int(lengths.max()), dtype=np.uint8)
    padded[:len(raw)] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(rows, lengths)]
