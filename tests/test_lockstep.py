"""Lockstep: process 0 drives calls whose order only it knows; every process makes them.

Two processes on one machine (jax.distributed over localhost), each with 2 CPU devices: the lead
calls a jitted function over the 4-device mesh with shapes it picks as it goes; the follower must
make the same calls or the collectives would hang. The test starts this file twice as a script.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

SHAPES = [(4, 3), (8, 5), (4, 3), (12, 1)]


def _worker(port: int, process_id: int, out: str) -> None:
    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, local_device_ids=[0, 1])
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from cptjax.train.lockstep import Lockstep, led

    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    rows, whole = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    row_sums = jax.jit(lambda x, w: (x * w).sum(axis=1), in_shardings=(rows, whole), out_shardings=whole)
    calls = []

    def row_sum(x, w):
        calls.append(list(x.shape))
        glob = [jax.make_array_from_process_local_data(s, a) for s, a in ((whole, x), (whole, w))]
        x, w = (jax.device_put(g, s) for g, s in zip(glob, (rows, whole)))
        return np.asarray(jax.experimental.multihost_utils.process_allgather(row_sums(x, w), tiled=True))

    lockstep = Lockstep({"row_sum": row_sum})

    class Stop(Exception):
        pass

    def drive(stop_after=None):
        results = []
        for i, shape in enumerate(SHAPES):
            if i == stop_after:
                raise Stop
            x = np.arange(np.prod(shape)).reshape(shape) * (i + 1)
            results.append(lockstep.call("row_sum", x, np.full(shape[1], 2)).tolist())
        return results

    done, interrupted = led(lockstep, drive, Stop)
    first = {"results": done, "interrupted": interrupted, "calls": list(calls)}
    calls.clear()
    done, interrupted = led(lockstep, lambda: drive(stop_after=2), Stop)
    second = {"results": done, "interrupted": interrupted, "calls": list(calls)}
    calls.clear()
    try:
        led(lockstep, lambda: drive(stop_after=1), None)  # any other error
        third = "no error"
    except Exception as error:  # noqa: BLE001
        third = f"{type(error).__name__}: {error}"
    Path(out).write_text(json.dumps({"first": first, "second": second, "third": third, "calls": calls}))
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_follower_makes_every_call_process_0_makes(tmp_path):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(port), str(i), str(tmp_path / f"p{i}.json")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    lead, follower = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
    expected = [((np.arange(np.prod(s)).reshape(s) * (i + 1)) * 2).sum(axis=1).tolist() for i, s in enumerate(SHAPES)]
    assert lead["first"] == {"results": expected, "interrupted": False, "calls": [list(s) for s in SHAPES]}
    assert follower["first"] == {"results": None, "interrupted": False, "calls": [list(s) for s in SHAPES]}
    # interrupted after two calls: both processes made exactly those two, and both know it
    assert lead["second"] == {"results": None, "interrupted": True, "calls": [list(s) for s in SHAPES[:2]]}
    assert follower["second"] == {"results": None, "interrupted": True, "calls": [list(s) for s in SHAPES[:2]]}
    # another error: raised on the lead, and the follower is released with an error, not left waiting
    assert lead["third"] == "Stop: " and lead["calls"] == [list(SHAPES[0])]
    assert follower["third"].startswith("RuntimeError: process 0 failed") and follower["calls"] == [list(SHAPES[0])]


if __name__ == "__main__" and sys.argv[1] == "--worker":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
