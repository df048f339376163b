"""Loading an HF folder onto a mesh reads each checkpoint byte once in total: a process reads only
its devices' share of each tensor (byte ranges of the safetensors files), also of a tensor that no
axis splits evenly over the devices (padded in the read layout), and every shard equals the plain
host read."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import hf_models
import numpy as np
import pytest
import tiny_configs

from cptjax.hf.read import find_weight_files
from cptjax.hf.safetensors import bytes_read

WORKER = Path(__file__).parent / "load_worker.py"


def _tensor_bytes(hf_dir) -> int:
    return sum(info.nbytes for f in find_weight_files(Path(hf_dir)).values() for info in f.tensors.values())


def _odd_model(tmp_path_factory) -> Path:
    """A tiny Llama whose embedding and head [509, 36] and norms [36] (stacked [3, 36]) no axis of 8
    devices divides: before the read layout padded them, every process read these whole."""
    hf = dict(tiny_configs.shrunk_config("llama-3.1-8b"), hidden_size=36, head_dim=16, vocab_size=509)
    return hf_models.save_hf_model(hf, tmp_path_factory.mktemp("odd") / "hf")


@pytest.fixture(scope="module")
def odd_hf(tmp_path_factory):
    return _odd_model(tmp_path_factory)


def _worker_env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


def test_a_block_read_reads_only_its_bytes(tiny_hf):
    files = find_weight_files(tiny_hf("llama-3.2-1b"))
    file = next(f for f in files.values() if "model.layers.1.mlp.up_proj.weight" in f.tensors)
    full = file.read("model.layers.1.mlp.up_proj.weight")  # [F, D] = [160, 64]
    for index in [(slice(40, 80), slice(0, 64)), (slice(0, 160), slice(16, 32)), (slice(8, 9), slice(3, 5))]:
        out = np.empty((index[0].stop - index[0].start, index[1].stop - index[1].start), full.dtype)
        before = bytes_read()
        file.read_block_into("model.layers.1.mlp.up_proj.weight", full.shape, index, out)
        assert bytes_read() - before == out.nbytes  # its own bytes, nothing around them
        assert np.array_equal(out, full[index])


@pytest.mark.parametrize("mesh,dtype", [((2, 2, 2), "float32"), ((1, 8, 1), "bfloat16")])
def test_eight_devices_of_one_process_read_the_checkpoint_once(tiny_hf, mesh, dtype):
    hf_dir = tiny_hf("qwen2.5-0.5b")  # q/k/v biases, tied embeddings
    result = subprocess.run([sys.executable, str(WORKER), str(hf_dir), *map(str, mesh), dtype],
                            capture_output=True, text=True, env=_worker_env(8), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["devices"] == 8 and found["all_equal"] and found["shards_checked"] > 8
    assert found["bytes_read"] == _tensor_bytes(hf_dir)  # once, not once per device


def test_fused_tensors_are_split_onto_the_mesh_and_read_once(tiny_hf):
    """Phi-3's qkv_proj and gate_up_proj: each part read as its own rows, straight into its parameter."""
    hf_dir = tiny_hf("phi3-gqa")
    result = subprocess.run([sys.executable, str(WORKER), str(hf_dir), "2", "2", "2", "float32"],
                            capture_output=True, text=True, env=_worker_env(8), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["devices"] == 8 and found["all_equal"] and found["shards_checked"] > 8
    assert found["bytes_read"] == _tensor_bytes(hf_dir)


def test_a_tensor_no_axis_divides_is_still_read_once(odd_hf):
    result = subprocess.run([sys.executable, str(WORKER), str(odd_hf), "1", "8", "1", "float32"],
                            capture_output=True, text=True, env=_worker_env(8), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["all_equal"] and found["bytes_read"] == _tensor_bytes(odd_hf)


def _two_processes(hf_dir) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(hf_dir), "1", "8", "1", "float32", str(i), "2",
                                 str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_worker_env(4)) for i in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
    found = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(f["process_count"] == 2 and f["devices"] == 8 and f["all_equal"] for f in found)
    return found


@pytest.mark.slow
def test_each_of_two_processes_reads_half_the_checkpoint(tiny_hf):
    hf_dir = tiny_hf("llama-3.1-8b")
    found = _two_processes(hf_dir)
    total = _tensor_bytes(hf_dir)
    # Every tensor of this model splits evenly over the 8 devices: exactly half each.
    assert [f["bytes_read"] for f in found] == [total // 2, total // 2]


@pytest.mark.slow
def test_two_processes_share_the_tensors_no_axis_divides(odd_hf):
    found = _two_processes(odd_hf)
    total, reads = _tensor_bytes(odd_hf), [f["bytes_read"] for f in found]
    assert sum(reads) == total  # every byte once, none by both processes
    # Half of each evenly split tensor; of a padded one, process 1's devices hold the padding, so it
    # reads that much less (float32): the 3 vocabulary entries of 512 - 509 in the embedding and the
    # head (3 * 36 each), the last 4 of 40 in the norms (2 per layer of 3, and the final one).
    padding = 2 * 3 * 36 * 4 + 3 * 2 * 4 * 4 + 4 * 4
    assert reads == [(total + padding) // 2, (total - padding) // 2]
