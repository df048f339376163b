"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks `experts_per_token` of E experts for
each token; each expert is a gated MLP of size M, and a token's output is its experts' outputs
weighted by the router.

Dropless: every token reaches every expert it picked, none is dropped for capacity. The tokens'
copies (one per chosen expert) are sorted by expert and run through grouped matmuls
(`jax.lax.ragged_dot_general`: a native grouped matmul on TPU and GPU; on CPU JAX lowers it densely,
which is correct and fine for tests), then put back in token order and summed with their weights.
No [tokens, experts] mask over every expert's weights is formed.

Routing, as transformers computes it: softmax over the router's float32 logits, the top k
probabilities, renormalised to sum to 1 where the family does (Mixtral always; Qwen3-MoE with
`norm_topk_prob`). The router's statistics per layer (`RouterStats`) feed the load-balancing loss
(Switch Transformer's, as transformers' `load_balancing_loss_func` computes it over all layers), the
router z-loss and the expert-load metrics.

Letters: T tokens (B x L), E experts, k experts per token, M expert size, D model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cptjax.model.config import ModelConfig

# x [T*k, D] @ w[E, M, D]^T per group of rows: contract D with the weights' last axis (HF's layout).
_GROUPED = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([1], [2]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def _grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [R, in] with its rows grouped by expert (group_sizes [E] rows each, in order) times each
    group's expert weight w [E, out, in] -> [R, out]."""
    return jax.lax.ragged_dot_general(x, w, group_sizes, _GROUPED)


def route(x: jax.Array, router: jax.Array, cfg: ModelConfig, dt: Any):
    """Router logits [T, E] (float32), probabilities [T, E], and each token's chosen experts [T, k]
    with their weights [T, k] (float32)."""
    logits = jnp.einsum("TD,ED->TE", x, router.astype(dt), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return logits, probs, experts, weights


def moe_mlp(h: jax.Array, w: dict[str, jax.Array], cfg: ModelConfig, dt: Any,
            token_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """h [B, L, D] -> (out [B, L, D], this layer's router statistics). `token_mask` [B, L]: the
    tokens the statistics count (padding left out); None: all."""
    batch, length, d = h.shape
    x = h.reshape(batch * length, d)
    logits, probs, experts, weights = route(x, w["router"], cfg, dt)
    k, e = cfg.experts_per_token, cfg.num_experts

    flat = experts.reshape(-1)  # [T*k]: copy j of token t is row t*k + j
    order = jnp.argsort(flat, stable=True)  # copies sorted by expert
    group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)  # [T*k, D]
    gate = _grouped_matmul(xs, w["expert_gate_proj"].astype(dt), group_sizes)  # [T*k, M]
    up = _grouped_matmul(xs, w["expert_up_proj"].astype(dt), group_sizes)
    act = (jax.nn.silu(gate) if cfg.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)) * up
    down = _grouped_matmul(act, w["expert_down_proj"].astype(dt), group_sizes)  # [T*k, D]
    # Back to token order (the inverse permutation: a gather, not a scatter), weighted in float32.
    back = jnp.take(down, jnp.argsort(order), axis=0).reshape(batch * length, k, d)
    out = jnp.einsum("TkD,Tk->TD", back.astype(jnp.float32), weights).astype(dt)
    return out.reshape(batch, length, d), router_stats(logits, probs, experts, e, token_mask)


def router_stats(logits, probs, experts, num_experts: int, token_mask=None) -> dict[str, jax.Array]:
    """Sums over the counted tokens: `counts` [E] (tokens that chose each expert), `probs` [E]
    (router probability), `z` (squared log-partition of the router logits) and `tokens`."""
    mask = (jnp.ones(logits.shape[:1], jnp.float32) if token_mask is None
            else token_mask.reshape(-1).astype(jnp.float32))
    chosen = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=1)  # [T, E]
    return {"counts": jnp.einsum("T,TE->E", mask, chosen),
            "probs": jnp.einsum("T,TE->E", mask, probs),
            "z": jnp.sum(mask * jnp.square(jax.nn.logsumexp(logits, axis=-1))),
            "tokens": jnp.sum(mask)}


def load_balancing_loss(stats: dict[str, jax.Array], num_experts: int) -> jax.Array:
    """Switch Transformer's auxiliary loss from the layers' stacked statistics ([Ly, E] each), as
    transformers' load_balancing_loss_func computes it: every layer's tokens pooled, E x the sum
    over experts of (share of routed copies) x (mean router probability)."""
    rows = jnp.maximum(jnp.sum(stats["tokens"]), 1.0)  # tokens x layers
    return num_experts * jnp.sum((jnp.sum(stats["counts"], axis=0) / rows) * (jnp.sum(stats["probs"], axis=0) / rows))


def expert_load(stats: dict[str, jax.Array]) -> jax.Array:
    """[Ly, E]: each layer's share of routed token copies per expert (each row sums to 1)."""
    return stats["counts"] / jnp.maximum(jnp.sum(stats["counts"], axis=-1, keepdims=True), 1.0)
