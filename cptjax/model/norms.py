"""The decoder's RMSNorms, one function for every family: statistics in float32, then Llama's scale
(applied after the cast back to the compute dtype), Gemma's (1 + weight) or OLMo 2's weight (both
applied in float32 before the cast), each as transformers computes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cptjax.model.config import ModelConfig


def norm(x: jax.Array, weight: jax.Array, cfg: ModelConfig, axes: tuple[int, ...] = (-1,)) -> jax.Array:
    """The model's RMSNorm of `x` over `axes` (the last one, or OLMo 2's q/k norms over heads and
    head dim together), with `weight` shaped like those axes."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axes, keepdims=True) + cfg.rms_norm_eps)
    if cfg.gemma_norms:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    if cfg.post_norms:
        return (weight.astype(jnp.float32) * normed).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)
