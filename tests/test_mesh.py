"""The trainer on 1 device and on a data 2 x fsdp 2 x tensor 2 mesh of 8 CPU devices: its own
step construction, shardings, donation, eval, checkpoint and resume, with the same losses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "mesh_worker.py"


def _run(hf_dir, run_dir, devices, data, fsdp, tensor):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(WORKER), str(hf_dir), str(run_dir), str(data), str(fsdp),
                             str(tensor)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch" not in result.stderr  # the worker's helpers need no torch
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device(tiny_hf, tmp_path):
    hf_dir = tiny_hf("llama-3.1-8b")
    single = _run(hf_dir, tmp_path / "one", 1, 1, 1, 1)
    mesh = _run(hf_dir, tmp_path / "eight", 8, 2, 2, 2)
    assert mesh["devices"] == 8 and single["devices"] == 1
    assert mesh["origins"][1].startswith("resumed from step 2") and mesh["final_step"] == 4
    # The weights really are split: q_proj [Ly, N, H, D] over tensor (heads) and fsdp (embed).
    assert mesh["q_proj_spec"] == [None, "tensor", None, "fsdp"]
    assert mesh["q_proj_shards"] == 4
    assert mesh["activation_constraints"] > 0
    assert len(single["losses"]) == 4 and single["losses"][0] > single["losses"][-1]
    # Sharded reductions sum in another order: float32 noise only, far below a step's change.
    for a, b in zip(single["losses"] + single["eval"], mesh["losses"] + mesh["eval"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
