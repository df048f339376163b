"""The chunked loss equals the dense one (loss, z-loss, per-source sums and gradients within 1e-6
relative), and never holds the [B, L, V] float32 logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
from batches import packed_batch
from flax import nnx

from cptjax.model.config import ModelConfig
from cptjax.model.loss import loss_sums
from cptjax.model.transformer import Llama
from cptjax.train.step import StepConfig, loss_and_grads

# float32 sums taken in another order (per chunk, then across chunks): ~1e-7 in practice.
RELATIVE = 1e-6


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("chunk", [16, 20, 1])  # divides L=48; pads the last chunk; one position
def test_chunked_loss_and_gradients_equal_the_dense_path(chunk):
    cfg = ModelConfig.from_hf_config(tiny_configs.shrunk_config("qwen3-0.6b"))
    model = Llama(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, cfg.vocab_size, n) for n in lengths] for lengths in ([9, 20], [33], [5, 5, 5], [49])]
    batch = packed_batch(docs, 48, sources=[0, 1, 2])

    def run(loss_chunk):
        config = StepConfig(num_sources=3, z_loss=1e-2, loss_chunk=loss_chunk)
        return jax.jit(functools.partial(loss_and_grads, graphdef, config=config))(params, batch)

    dense, chunked = run(None), run(chunk)
    assert _relative(chunked[0], dense[0]) <= RELATIVE
    for key in ("nll", "z", "source_nll", "tokens", "source_tokens"):
        assert _relative(chunked[2][key], dense[2][key]) <= RELATIVE, key
    assert float(dense[2]["z"]) > 0 and np.all(np.asarray(dense[2]["source_nll"]) > 0)
    for a, b in zip(jax.tree.leaves(chunked[1]), jax.tree.leaves(dense[1]), strict=True):
        assert _relative(a, b) <= RELATIVE


def test_chunked_loss_never_holds_the_whole_logits():
    rows, length, dim, vocab = 4, 1024, 64, 32000
    logits_bytes = rows * length * vocab * 4  # 524 MB of float32 logits

    def temp_bytes(chunk):
        def objective(hidden, head):
            sums = loss_sums(hidden, head, targets, mask, sources, 2, chunk)
            return sums["nll"] + 1e-4 * sums["z"]
        targets = jnp.zeros((rows, length), jnp.int32)
        mask, sources = jnp.ones((rows, length), jnp.float32), jnp.zeros((rows, length), jnp.int32)
        args = (jax.ShapeDtypeStruct((rows, length, dim), jnp.bfloat16),
                jax.ShapeDtypeStruct((vocab, dim), jnp.bfloat16))
        compiled = jax.jit(jax.grad(objective, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(None) >= logits_bytes  # the dense path does hold them
    # One chunk's logits (128 of 1024 positions), their exp and gradient: a few times 1/8 of them.
    assert temp_bytes(128) <= 3 * logits_bytes * 128 / length
