"""Next-token cross-entropy sums from the final hidden states, without [B, L, V] float32 logits.

The logits of `chunk` positions of every row at a time ([B, chunk, V] float32) are all that exist:
chunks run along L under `jax.lax.scan`, and the backward pass recomputes each chunk's logits
(`jax.checkpoint`) instead of keeping them. Chunking along L keeps the rows (sharded over the data
axes) whole, so no device gathers another's hidden states; a row split over the sequence axis is
chunked within each shard's part (chunk j of every shard at once). A chunk of at least L positions is the
dense computation. Sums, not means, so micro-batches and chunks add up exactly (up to float32
summation order): the train step divides once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cptjax.model.attention import soft_cap
from cptjax.model.context_parallel import sequence_ways
from cptjax.model.sharding import constrain

# Positions per row per chunk. Memory: rows per device x chunk x V x 4 bytes of logits (and as much
# again for their gradient): 2 GiB for 8 rows of a 128k vocabulary.
DEFAULT_LOSS_CHUNK = 512


def final_logits(logits: jax.Array, logit_cap: float | None, real_vocab: int | None) -> jax.Array:
    """The head's float32 logits [..., V] as the model gives them: soft-capped where the config says
    (final_logit_softcapping), and -inf from `real_vocab` on (a vocabulary padded past the
    tokenizer's ids, ModelConfig.real_vocab_size), so padding rows are never predicted and take no
    probability (nor any gradient). Every caller that turns head outputs into logits asks this."""
    logits = soft_cap(logits, logit_cap)
    if real_vocab is None or real_vocab >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < real_vocab, logits, -jnp.inf)


def logit_sums(hidden, head, targets, mask, source_ids, num_sources: int,
               logit_cap: float | None = None, real_vocab: int | None = None) -> dict[str, jax.Array]:
    """Float32 sums over hidden [B, L, D] (compute dtype) with the output head [V, D]: the target
    NLL, the squared log-partition (z-loss) and the NLL per source [S], each weighted by mask.
    `logit_cap` and `real_vocab`: the model's final_logit_softcapping and real_vocab_size (`final_logits`)."""
    logits = jnp.einsum("BLD,VD->BLV", hidden, head, preferred_element_type=jnp.float32)
    logits = final_logits(logits, logit_cap, real_vocab)
    logits = constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (log_z - target_logit) * mask
    sources = jax.nn.one_hot(source_ids, num_sources, dtype=jnp.float32)  # [B, L, S]; -1: none
    return {"nll": nll.sum(), "z": (jnp.square(log_z) * mask).sum(),
            "source_nll": jnp.einsum("BL,BLS->S", nll, sources)}


def loss_sums(hidden, head, targets, mask, source_ids, num_sources: int,
              chunk: int | None = DEFAULT_LOSS_CHUNK, logit_cap: float | None = None,
              real_vocab: int | None = None) -> dict[str, jax.Array]:
    """`logit_sums` over chunks of `chunk` positions (None: all at once); [B, L] arrays besides
    hidden [B, L, D] and head [V, D]; mask float32."""
    rows, length = targets.shape
    if chunk is None or chunk >= length:
        return logit_sums(hidden, head, targets, mask, source_ids, num_sources, logit_cap, real_vocab)
    ways = sequence_ways()
    ways = ways if length % ways == 0 else 1
    local = length // ways  # positions per shard of a row
    chunk = min(chunk, local)
    count = -(-local // chunk)
    pad = count * chunk - local

    def chunks(x, fill=0):  # [B, L, ...] -> [count, B, ways * chunk, ...]: chunk j of each shard's part
        x = x.reshape(rows, ways, local, *x.shape[2:])
        if pad:  # padded positions have mask 0 and no source: they add nothing
            x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)
        x = jnp.moveaxis(x.reshape(rows, ways, count, chunk, *x.shape[3:]), 2, 0)
        return x.reshape(count, rows, ways * chunk, *x.shape[4:])

    @jax.checkpoint
    def add(total, xs):
        part = logit_sums(*xs[:1], head, *xs[1:], num_sources, logit_cap, real_vocab)
        return jax.tree.map(jnp.add, total, part), None

    zeros = {"nll": jnp.zeros((), jnp.float32), "z": jnp.zeros((), jnp.float32),
             "source_nll": jnp.zeros((num_sources,), jnp.float32)}
    xs = (chunks(hidden), chunks(targets), chunks(mask), chunks(source_ids, fill=-1))
    total, _ = jax.lax.scan(add, zeros, xs)
    return total
