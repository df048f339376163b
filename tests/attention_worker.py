"""The Pallas attention kernels under `jax.shard_map` on simulated CPU devices (interpret mode),
against XLA attention on one device; prints the relative errors as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/attention_worker.py D F T

(mesh sizes data, fsdp, tensor). Used by test_attention.py.
"""

import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
import attention_cases as cases
import tiny_configs
from batches import packed_batch

from cptjax.model.attention import attend
from cptjax.model.config import ModelConfig
from cptjax.model.sharding import DEFAULT_RULES, MeshConfig, make_mesh, spec_for_shape, with_activation_sharding
from cptjax.model.transformer import Llama
from cptjax.train.step import StepConfig, loss_and_grads

Q_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")


def kernel_errors(mesh) -> dict:
    """attend() on the mesh vs XLA attention on one device, forward and gradients."""
    errors = {}

    def put(x, names):  # laid out as the model's activations are (indivisible axes replicated)
        spec = spec_for_shape(names, x.shape, mesh, DEFAULT_RULES)
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    for shape_name in cases.SHAPES:
        q, k, v, cotangent, seg, window = cases.qkv(shape_name, rows=4)
        reference = cases.value_and_grads(
            lambda q, k, v: attend(q, k, v, seg, choice="xla", window=window), q, k, v, cotangent)
        q, cotangent = put(q, Q_AXES), put(cotangent, Q_AXES)
        k, v = put(k, KV_AXES), put(v, KV_AXES)
        seg = put(seg, ("activation_batch", "activation_length"))
        for kernel in ("splash", "pallas_gpu"):
            if kernel == "pallas_gpu" and window is not None:
                continue  # no sliding window in that kernel (refused; see test_attention.py)
            fn = with_activation_sharding(
                lambda q, k, v, kernel=kernel: attend(q, k, v, seg, choice=kernel, window=window),
                mesh, DEFAULT_RULES)
            ours = cases.value_and_grads(fn, q, k, v, cotangent)
            errors[f"{shape_name}/{kernel}"] = cases.relative_errors(ours, reference)
    return errors


def model_errors(mesh, name: str, kernel: str) -> list[float]:
    """Loss and gradients of the whole model (layers under scan, remat full) with `kernel` on the
    mesh vs XLA attention on one device: relative error of the loss, then of each gradient (norm)."""
    cfg = ModelConfig.from_hf_config(tiny_configs.shrunk_config(name))
    params = nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    rng = np.random.default_rng(1)
    docs = [[rng.integers(0, cfg.vocab_size, n) for n in lengths]
            for lengths in ([40, 60, 20], [129], [70, 50], [100], [10, 10, 90], [128], [33, 33], [64, 65])]
    batch = packed_batch(docs, 128)

    def run(attention, on_mesh):
        graphdef = nnx.graphdef(Llama(cfg, remat="full", attention=attention, rngs=nnx.Rngs(0)))
        fn = functools.partial(loss_and_grads, graphdef, config=StepConfig(num_sources=1))
        if on_mesh:
            fn = with_activation_sharding(fn, mesh, DEFAULT_RULES)
        loss, grads, _ = jax.jit(fn)(params, batch)
        return [np.asarray(loss)] + [np.asarray(g) for g in jax.tree.leaves(grads)]

    ours, reference = run(kernel, True), run("xla", False)
    return [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(ours, reference, strict=True)]


def main(data, fsdp, tensor):
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    result = {"devices": jax.device_count(), "kernels": kernel_errors(mesh),
              "model": {"mistral/splash": model_errors(mesh, "mistral-7b-v0.1", "splash"),
                        "qwen2.5/pallas_gpu": model_errors(mesh, "qwen2.5-0.5b", "pallas_gpu"),
                        # OLMo 2's q/k norms span all heads: heads split over `tensor` must be reduced.
                        "olmo2/xla": model_errors(mesh, "olmo-2-1124-7b", "xla")}}
    print(json.dumps(result))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
