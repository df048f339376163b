"""The key/value cache of generation: every layer's keys and values of the tokens seen so far.

Keys and values are kept per kv head ([.., K, H], not N: grouped-query attention stores each once).
A model whose every layer has a sliding window of W tokens keeps min(length, W) slots and writes
position p into slot p % W, a ring, so a long generation holds at most W tokens per layer; other
models (models whose layers mix sliding and full attention included: the cache is one array over the
layers) keep one slot per position. Each slot records the position it holds (-1: empty), and
attention masks by positions, not by slots: a query at position p sees the keys at positions
max(0, p - W + 1) .. p with its layer's window W, the rule the training path applies.

New tokens attend over the cached keys and their own (concatenated), and are written into the cache
afterwards, so a prompt longer than the window is prefilled in one call. A negative position marks
padding (rows of a batch of prompts of different lengths, left-padded): it attends to nothing, no
token attends to it, and it is never written into the cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cptjax.model.attention import _MASKED, scores
from cptjax.model.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """keys, values [Ly, B, S, K, H] in the compute dtype; positions [B, S] int32 (-1: empty)."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype) -> KVCache:
        """A cache for `length` positions (prompt + new tokens) of `batch` rows."""
        windows = cfg.layer_windows
        slots = length if None in windows else min(length, *windows)
        shape = (cfg.num_layers, batch, slots, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, slots), -1, jnp.int32))

    def written(self, positions: jax.Array) -> KVCache:
        """The slot positions after the tokens at `positions` [B, L] have been added (the layers'
        keys and values come back from `LayerCache.attend`)."""
        slots = self.positions.shape[1]
        kept = positions[:, -min(positions.shape[1], slots):]  # older ones would be overwritten
        rows = np.arange(positions.shape[0])[:, None]
        return dataclasses.replace(self, positions=self.positions.at[rows, _slot(kept, slots)].set(kept, mode="drop"))


def _slot(positions: jax.Array, slots: int) -> jax.Array:
    """The cache slot of each position; padding (< 0) gets an index past the end, which the
    writes drop."""
    return jnp.where(positions >= 0, positions % slots, slots)


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """One layer's view of the cache inside the layer scan, with the new tokens' positions."""

    keys: jax.Array  # [B, S, K, H]
    values: jax.Array
    slot_positions: jax.Array  # [B, S]
    positions: jax.Array  # [B, L]: the new tokens'
    window: int | jax.Array | None  # this layer's (traced under the layer scan); None: no layer slides

    def attend(self, q, k, v, *, scale: float, logit_cap: float | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attention of the new tokens' q [B, L, N, H] over the cached and the new keys k, v
        [B, L, K, H], scores scaled by `scale` and soft-capped by `logit_cap`; returns
        ([B, L, N, H], this layer's updated (keys, values))."""
        all_k = jnp.concatenate([self.keys, k.astype(self.keys.dtype)], axis=1)  # [B, S + L, K, H]
        all_v = jnp.concatenate([self.values, v.astype(self.values.dtype)], axis=1)
        key_pos = jnp.concatenate([self.slot_positions, self.positions], axis=1)[:, None, :]  # [B, 1, S + L]
        query_pos = self.positions[:, :, None]  # [B, L, 1]
        mask = (key_pos >= 0) & (key_pos <= query_pos)
        if self.window is not None:
            mask &= key_pos > query_pos - self.window
        rows, length, num_heads, head_dim = q.shape
        num_kv = all_k.shape[2]
        grouped = q.reshape(rows, length, num_kv, num_heads // num_kv, head_dim)  # [B, L, K, G, H]
        logits = scores("BLKGH,BSKH->BKGLS", grouped, all_k.astype(q.dtype), scale, logit_cap)
        probs = jax.nn.softmax(jnp.where(mask[:, None, None], logits, _MASKED), axis=-1)  # float32
        attn = jnp.einsum("BKGLS,BSKH->BLKGH", probs.astype(q.dtype), all_v.astype(q.dtype))
        attn = attn.reshape(q.shape)
        slots = self.keys.shape[1]
        keep = min(k.shape[1], slots)
        rows = np.arange(k.shape[0])[:, None]
        where = _slot(self.positions[:, -keep:], slots)  # [B, keep]
        keys = self.keys.at[rows, where].set(k[:, -keep:].astype(self.keys.dtype), mode="drop")
        values = self.values.at[rows, where].set(v[:, -keep:].astype(self.values.dtype), mode="drop")
        return attn, (keys, values)


def layer_window_sizes(cfg: ModelConfig) -> jax.Array | None:
    """int32 [Ly]: each layer's window for the generation cache's position mask, full layers as
    a window longer than any position; None when no layer slides."""
    if all(w is None for w in cfg.layer_windows):
        return None
    return jnp.asarray([2 ** 30 if w is None else w for w in cfg.layer_windows], jnp.int32)
