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

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cptjax.model.config import ModelConfig
from cptjax.model.sharding import active_mesh, spec_for_shape

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
    tokens the statistics count (padding left out); None: all.

    On a mesh the layer runs under `jax.shard_map`: each device routes its own tokens (no global
    sort). With expert parallelism (mesh.expert > 1) each device holds E / mesh.expert experts: the
    tokens of the devices along the expert axis are gathered, each device runs the copies routed to
    its experts, and a reduce-scatter returns every token's sum to its device (the all-gather
    strategy: its traffic is the activations, twice, whatever the routing)."""
    mask = jnp.ones(h.shape[:2], jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    active = active_mesh()
    if active is None:
        return _local_moe(h, mask, w["router"], w["expert_gate_proj"], w["expert_up_proj"],
                          w["expert_down_proj"], cfg=cfg, dt=dt)
    mesh, rules = active
    rows = spec_for_shape(("activation_batch", "activation_length", "activation_embed"), h.shape, mesh, rules)
    token_axes = tuple(a for part in rows[:2] if part for a in ((part,) if isinstance(part, str) else part))
    ep, tp = mesh.shape["expert"], mesh.shape["tensor"]
    experts_axis = "expert" if ep > 1 else None
    columns = "tensor" if tp > 1 and cfg.expert_size % tp == 0 else None
    specs = (rows, P(*rows[:2]), P(), P(experts_axis, columns, None), P(experts_axis, columns, None),
             P(experts_axis, None, columns))
    body = functools.partial(_local_moe, cfg=cfg, dt=dt, token_axes=token_axes,
                             expert_axis=experts_axis, tensor_axis=columns)
    stats_spec = {"counts": P(), "probs": P(), "z": P(), "tokens": P()}
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(rows, stats_spec), check_vma=False)(
        h, mask, w["router"], w["expert_gate_proj"], w["expert_up_proj"], w["expert_down_proj"])


def _local_moe(h, mask, router, gate_w, up_w, down_w, *, cfg: ModelConfig, dt, token_axes=(),
               expert_axis: str | None = None, tensor_axis: str | None = None):
    """One device's MoE layer: its tokens h [b, l, D], its experts' weights (E_local of E, and a
    slice of M where the tensor axis splits it); statistics summed over `token_axes`."""
    rows, length, d = h.shape
    x = h.reshape(rows * length, d)
    logits, probs, experts, weights = route(x, router, cfg, dt)
    stats = router_stats(logits, probs, experts, cfg.num_experts, mask)
    if token_axes:
        stats = jax.lax.psum(stats, token_axes)
    first = 0
    if expert_axis is not None:  # every expert-axis peer's tokens, to run those routed to our experts
        x, experts, weights = (jax.lax.all_gather(a, expert_axis, tiled=True) for a in (x, experts, weights))
        first = jax.lax.axis_index(expert_axis) * gate_w.shape[0]
    out = _run_experts(x, experts, weights, gate_w, up_w, down_w, first, cfg, dt)
    if tensor_axis is not None:  # each device summed over its slice of M
        out = jax.lax.psum(out, tensor_axis)
    if expert_axis is not None:  # each token's sum over all experts, back on its own device
        out = jax.lax.psum_scatter(out, expert_axis, scatter_dimension=0, tiled=True)
    return out.astype(dt).reshape(rows, length, d), stats


def _run_experts(x, experts, weights, gate_w, up_w, down_w, first, cfg: ModelConfig, dt):
    """Sum over each token's chosen experts among the local ones (experts first .. first + E_local)
    of weight x expert(x): x [R, D], experts and weights [R, k] -> [R, D] float32 (0 where a token
    chose none of them)."""
    rows, k = experts.shape
    local_count = gate_w.shape[0]
    flat = experts.reshape(-1)  # [R*k]: copy j of token t is row t*k + j
    local = (flat - first) % cfg.num_experts  # the local experts 0..E_local-1 first, the others after
    order = jnp.argsort(local, stable=True)  # copies sorted by expert
    group_sizes = jnp.bincount(local, length=cfg.num_experts)[:local_count].astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)  # [R*k, D]
    gate = _grouped_matmul(xs, gate_w.astype(dt), group_sizes)  # [R*k, M]
    up = _grouped_matmul(xs, up_w.astype(dt), group_sizes)
    act = (jax.nn.silu(gate) if cfg.hidden_act == "silu" else jax.nn.gelu(gate, approximate=True)) * up
    down = _grouped_matmul(act, down_w.astype(dt), group_sizes)  # [R*k, D]
    if local_count < cfg.num_experts:  # rows past the local groups: other devices' experts
        down = jnp.where((jnp.arange(rows * k) < jnp.sum(group_sizes))[:, None], down, 0)
    # Back to token order (the inverse permutation: a gather, not a scatter), weighted in float32.
    back = jnp.take(down, jnp.argsort(order), axis=0).reshape(rows, k, -1)
    return jnp.einsum("TkD,Tk->TD", back.astype(jnp.float32), weights)


def router_stats(logits, probs, experts, num_experts: int, token_mask) -> dict[str, jax.Array]:
    """Sums over the counted tokens (`token_mask`, any shape of T elements): `counts` [E] (tokens
    that chose each expert), `probs` [E] (router probability), `z` (squared log-partition of the
    router logits) and `tokens`."""
    mask = token_mask.reshape(-1).astype(jnp.float32)
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
