"""Runs the trainer itself (its own step construction, shardings and donation, checkpoint and
resume) for a few steps on simulated CPU devices; prints what it saw as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_worker.py HF_DIR RUN_DIR D F T

(mesh sizes data, fsdp, tensor). Used by test_mesh.py, which compares meshes.
"""

import json
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
from batches import CountingData, raw_config

from cptjax.io.weights import open_weights
from cptjax.train.config import config_from_dict
from cptjax.train.step import build_setup
from cptjax.train.trainer import run

VOCAB = 512


def main(hf_dir, run_dir, data, fsdp, tensor, steps=4):
    raw = raw_config(run_dir, hf_dir, training={"steps": steps, "batch_size": 8, "seq_len": 32},
                     mesh={"data": data, "fsdp": fsdp, "tensor": tensor},
                     checkpoint={"every": 2, "keep_last": 2}, eval={"every": 2},
                     schedule={"peak_lr": 1e-3, "warmup": 1, "end_lr": 1e-4})
    config = config_from_dict(raw)

    def train(until):
        stream = CountingData(VOCAB, 8, 32)
        evals = {"heldout": [CountingData(VOCAB, 8, 32, seed=99).batch(0)]}
        return run(config, until_step=until, data=stream, eval_sets=evals)

    first = train(steps // 2)  # then resume onto the mesh from its own checkpoint
    second = train(None)
    records = [json.loads(line) for line in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]
    q = second.state["params"]["layers"]["q_proj"]
    # the activations really are constrained in the traced step (not only the weights)
    with open_weights(hf_dir) as weights:
        setup = build_setup(config, weights.config, num_sources=2)
    batch = {k: jax.ShapeDtypeStruct((8, 32), "float32" if k == "loss_mask" else "int32",
                                     sharding=setup.batch_sharding) for k in CountingData(VOCAB, 8, 32).batch(0)
             if k != "num_bytes"}
    state = {**setup.abstract_state, "step": jax.ShapeDtypeStruct((), "int32")}
    traced = str(jax.make_jaxpr(setup.step_fn)(state, batch))
    print(json.dumps({
        "origins": [first.origin, second.origin], "final_step": second.final_step,
        "losses": [r["loss"] for r in records if r["kind"] == "train"],
        "eval": [r["heldout"]["loss"] for r in records if r["kind"] == "eval"],
        "q_proj_spec": list(q.sharding.spec), "devices": jax.device_count(),
        "q_proj_shards": len({str(s.index) for s in q.addressable_shards}),
        "activation_constraints": traced.count("sharding_constraint")}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:6]))
