"""Runs a few sharded training steps on simulated CPU devices; prints the losses as JSON.

Run as `XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/mesh_worker.py D F T`
(mesh sizes data, fsdp, tensor). Used by test_mesh.py, which compares meshes.
"""

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
import hf_models  # noqa: E402
from test_train_step import packed_batch  # noqa: E402

from cptjax.model import Llama, abstract_model  # noqa: E402
from cptjax.model_config import ModelConfig  # noqa: E402
from cptjax.optimizer import OptimizerConfig, build_optimizer  # noqa: E402
from cptjax.schedules import ScheduleConfig, make_schedule  # noqa: E402
from cptjax.sharding import (DEFAULT_RULES, MeshConfig, batch_sharding, make_mesh,  # noqa: E402
                             param_shardings, with_activation_sharding)
from cptjax.train_step import StepConfig, train_step  # noqa: E402


def main(data, fsdp, tensor, steps=4):
    cfg = ModelConfig.from_hf_config(hf_models.shrunk_config("llama-3.1-8b"))
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    abstract = abstract_model(cfg)
    shardings = param_shardings(abstract, mesh, DEFAULT_RULES)
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param)),
                     out_shardings=shardings)()
    schedule_config = ScheduleConfig(total_steps=steps, peak_lr=1e-3, warmup=1)
    optimizer = build_optimizer(OptimizerConfig(), schedule_config)
    state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}
    b_sharding = batch_sharding(mesh, DEFAULT_RULES)
    step = functools.partial(train_step, graphdef=nnx.graphdef(abstract), optimizer=optimizer,
                             schedule=make_schedule(schedule_config), config=StepConfig(num_sources=2))
    step_fn = jax.jit(with_activation_sharding(step, mesh, DEFAULT_RULES))
    rng = np.random.default_rng(0)
    losses, placements = [], []
    for _ in range(steps):
        docs = [[rng.integers(0, cfg.vocab_size, n) for n in (17, 15)] for _ in range(8)]
        batch = packed_batch(docs, 32, sources=[0, 1])
        batch = {k: jax.device_put(v, b_sharding) for k, v in batch.items()}
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss"]))
    # the activations really are constrained in the traced step (not only the weights)
    traced = str(jax.make_jaxpr(step_fn)(state, batch))
    q = state["params"]["layers"]["q_proj"]
    placements = {"q_proj_spec": list(q.sharding.spec), "devices": jax.device_count(),
                  "q_proj_shards": len({str(s.index) for s in q.addressable_shards}),
                  "activation_constraints": traced.count("sharding_constraint")}
    print(json.dumps({"losses": losses, **placements}))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
