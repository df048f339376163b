"""Loads an HF folder onto a mesh of simulated CPU devices as the trainer does (Weights.read_onto)
and prints, as JSON, the checkpoint bytes this process read and whether every shard it holds equals
the host read of the same folder.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/load_worker.py HF_DIR D F T DTYPE \\
        [PROCESS_ID PROCESSES PORT]

(mesh sizes data, fsdp, tensor; with the last three, it joins jax.distributed first.) Used by
test_sharded_load.py.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np


def main(hf_dir, data, fsdp, tensor, dtype, process_id=None, processes=None, port=None):
    if process_id is not None:
        jax.distributed.initialize(f"127.0.0.1:{port}", int(processes), int(process_id))
    from flax import nnx

    from cptjax.hf import safetensors
    from cptjax.hf.read import read_hf_params
    from cptjax.io.weights import open_weights
    from cptjax.model.sharding import DEFAULT_RULES, MeshConfig, make_mesh, param_shardings
    from cptjax.model.transformer import abstract_model, get_param, param_paths

    with open_weights(Path(hf_dir)) as weights:
        mesh = make_mesh(MeshConfig(data=int(data), fsdp=int(fsdp), tensor=int(tensor)))
        abstract = abstract_model(weights.config, param_dtype=np.dtype(dtype))
        abstract_params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                       nnx.to_pure_dict(nnx.state(abstract, nnx.Param)),
                                       param_shardings(abstract, mesh, DEFAULT_RULES))
        before = safetensors.bytes_read()
        params = weights.read_onto(abstract_params)
        jax.block_until_ready(params)
        read = safetensors.bytes_read() - before
        host = read_hf_params(hf_dir, weights.config)
    checked, equal = 0, True
    for path in param_paths(host):
        array, expected = get_param(params, path), get_param(host, path).astype(dtype)
        assert array.dtype == np.dtype(dtype) and array.sharding == get_param(abstract_params, path).sharding
        for shard in array.addressable_shards:
            equal &= bool(np.array_equal(np.asarray(shard.data), expected[shard.index]))
            checked += 1
    print(json.dumps({"bytes_read": read, "shards_checked": checked, "all_equal": equal,
                      "devices": jax.device_count(), "process_count": jax.process_count()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
