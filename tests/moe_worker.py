"""Expert parallelism on simulated CPU devices against one device; prints JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/moe_worker.py

For tiny Mixtral (8 experts, 2 per token) and Qwen3-MoE (16 experts, 4 per token) models, the
train step's loss (with the load-balancing loss in the objective) and each gradient: relative
errors (normwise) of meshes of 4 and 8 devices with an expert axis (beside data, fsdp and tensor
axes) against one device, and of a Qwen3-MoE with a dense middle layer on one of them; the expert
loads against one device's; and how many all-gathers and reduce-scatters the program has. Used by
test_moe.py.
"""

import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
import tiny_configs
from batches import packed_batch

from cptjax.model.config import ModelConfig
from cptjax.model.sharding import DEFAULT_RULES, MeshConfig, make_mesh, with_activation_sharding
from cptjax.model.transformer import Llama
from cptjax.train.step import StepConfig, loss_and_grads

MESHES = {"4: expert 4": (4, MeshConfig(data=1, fsdp=1, expert=4, tensor=1)),
          "8: data 2 x expert 4": (8, MeshConfig(data=2, fsdp=1, expert=4, tensor=1)),
          "8: fsdp 2 x expert 2 x tensor 2": (8, MeshConfig(data=1, fsdp=2, expert=2, tensor=2))}
# family -> (shape, config changes, meshes): Qwen3-MoE with a dense middle layer too.
# Each mesh kind once per family, for the suite's time (all seven pairs agreed as closely, <= 1e-6).
MODELS = {"mixtral": ("mixtral-8x7b-v0.1", {}, ("4: expert 4", "8: fsdp 2 x expert 2 x tensor 2")),
          "qwen3_moe": ("qwen3-30b-a3b", {}, ("8: data 2 x expert 4",)),
          "qwen3_moe-mixed": ("qwen3-30b-a3b", {"mlp_only_layers": [1]}, ("8: data 2 x expert 4",))}


def main():
    out = {"devices": jax.device_count(), "errors": {}, "loads": {}, "collectives": {}}
    rng = np.random.default_rng(0)
    for family, (name, changes, meshes) in MODELS.items():
        cfg = ModelConfig.from_hf_config(dict(tiny_configs.shrunk_config(name), **changes))
        params = nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
        params["layers"]["router"] = params["layers"]["router"] * 20  # choices clear of ties (test_moe.py)
        # 8 rows of packed documents, with padding at the ends of some rows
        batch = packed_batch([[rng.integers(3, cfg.vocab_size, n) for n in lengths]
                              for lengths in [(20, 25), (48,), (30, 11), (9, 9, 9), (40,), (17, 31), (33,), (12, 30)]],
                             48)
        graphdef = nnx.graphdef(Llama(cfg, attention="xla", rngs=nnx.Rngs(0)))
        fn = functools.partial(loss_and_grads, graphdef, config=StepConfig(num_sources=1, router_aux_loss=0.1))

        def flat(result):
            loss, grads, _ = result
            return [np.asarray(loss)] + [np.asarray(g) for g in jax.tree.leaves(grads)]

        single = jax.jit(fn)(params, batch)
        reference, reference_counts = flat(single), np.asarray(single[2]["router"]["counts"])
        for label in meshes:
            count, mesh_config = MESHES[label]
            mesh = make_mesh(mesh_config, jax.devices()[:count])
            step = jax.jit(with_activation_sharding(fn, mesh, DEFAULT_RULES))
            traced = step.trace(params, batch)
            program = str(traced.jaxpr)
            result = traced.lower().compile()(params, batch)
            case = f"{family}/{label}"
            out["errors"][case] = [float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
                                   for a, b in zip(flat(result), reference, strict=True)]
            out["loads"][case] = float(np.max(np.abs(np.asarray(result[2]["router"]["counts"]) - reference_counts)))
            out["collectives"][case] = {"all_gather": program.count("all_gather"),
                                        "reduce_scatter": program.count("reduce_scatter")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
