"""The Llama-family decoder in Flax NNX: Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, TinyLlama, SmolLM,
Gemma 2, Gemma 3 (text), OLMo 2, Phi-3.

Dimension letters (used in einsums, comments and sharding names):
  B batch, L length (S for keys), D model, V vocab, F mlp, N query heads, K kv heads, H head dim,
  Ly layers; in mixture-of-experts layers E experts of size M (moe.py).

Weights keep Hugging Face's layout ([out, in] for every projection, heads split out of `out`), so
the HF key map is a reshape, never a transpose. The layers' weights are stacked on a leading Ly axis
and run under `jax.lax.scan`, so compile time does not grow with depth. Where layers differ in their
attention window (Gemma 2's alternation, Qwen2's max_window_layers), the scan carries each layer's
window index and the layer picks its window with `jax.lax.switch`: still one scanned body. Gemma 3's
sliding layers also have their own RoPE base: the scan carries a RoPE index too.

Numerics: parameters are stored in `param_dtype` and cast to `dtype` for compute; RMSNorm statistics,
the attention softmax and the logits are float32.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cptjax.model.attention import ATTENTION_KERNELS, KV_AXES, Q_AXES
from cptjax.model.config import ModelConfig
from cptjax.model.context_parallel import STRATEGIES, attend_rows, balanced_ways, from_layout, layout_order, to_layout
from cptjax.model.kv_cache import KVCache, LayerCache, layer_window_sizes
from cptjax.model.layers import DecoderLayers, initial_value, logical_param
from cptjax.model.loss import final_logits
from cptjax.model.mlp import gated_mlp
from cptjax.model.moe import moe_mlp
from cptjax.model.norms import norm
from cptjax.model.rope import apply_rope, rope_tables
from cptjax.model.sharding import constrain

# What the backward pass recomputes, per decoder layer: nothing ("none"), everything ("full"),
# or all but the matmul outputs ("dots"; "dots_no_batch": those without batch dimensions).
Remat = Literal["none", "full", "dots", "dots_no_batch"]
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert tuple(REMAT_POLICIES) == typing.get_args(Remat)

class Llama(nnx.Module):
    """`Llama(cfg, rngs=...)(tokens [B, L]) -> logits [B, L, V]` in float32.

    `positions` restart at 0 in each packed document; `segment_ids` keep packed documents from
    attending to each other. `remat` is a key of REMAT_POLICIES; `attention` is a kernel of
    cptjax.model.attention ('auto': splash on TPU, Pallas flash on GPU, XLA on CPU);
    `context_parallel` how attention crosses a row split over the mesh's sequence axis
    (cptjax.model.context_parallel).
    """

    def __init__(self, cfg: ModelConfig, *, param_dtype: Any = jnp.float32, dtype: Any = jnp.float32,
                 remat: str = "none", attention: str = "auto", context_parallel: str = "all_gather",
                 rngs: nnx.Rngs):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
        if context_parallel not in STRATEGIES:
            raise ValueError(f"context_parallel must be one of {STRATEGIES}, got {context_parallel!r}")
        self.config = cfg
        self.context_parallel = context_parallel
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        self.attention = attention
        std = 0.02
        self.embed_tokens = logical_param(initial_value("embed", (cfg.vocab_size, cfg.hidden_size),
                                                        rngs.params(), param_dtype, std, cfg), ("vocab", "embed"))
        self.layers = DecoderLayers(cfg, param_dtype=param_dtype, std=std, rngs=rngs)
        self.norm = logical_param(initial_value("norm", (cfg.hidden_size,), None, param_dtype, std, cfg),
                                  ("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = logical_param(initial_value("lm_head", (cfg.vocab_size, cfg.hidden_size),
                                                       rngs.params(), param_dtype, std, cfg), ("vocab", "embed"))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        logits = self.head_logits(self.hidden_states(tokens, positions, segment_ids))
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def head_logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits [..., V] of final hidden states [..., D]: the output head, then the soft
        cap where config.json sets final_logit_softcapping (Gemma 2) and -inf on a padded
        vocabulary's padding rows (loss.final_logits). Every caller that turns hidden states into
        logits asks this (the chunked loss passes the cap and real_vocab_size itself)."""
        logits = jnp.einsum("...D,VD->...V", hidden, self.output_head(), preferred_element_type=jnp.float32)
        return final_logits(logits, self.config.final_logit_softcapping, self.config.real_vocab_size)

    def output_head(self) -> jax.Array:
        """The output projection [V, D] in the compute dtype (the embedding, when tied)."""
        head = self.embed_tokens[...] if self.config.tie_word_embeddings else self.lm_head[...]
        return head.astype(self.dtype)

    def hidden_states(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """The final-normed hidden states [B, L, D] in the compute dtype. A row split over the
        mesh's sequence axis runs in the load-balanced layout (context_parallel.py), in row order
        again on the way out."""
        return self.hidden_states_and_router(tokens, positions, segment_ids)[0]

    def hidden_states_and_router(self, tokens, positions=None, segment_ids=None):
        """(`hidden_states`, each layer's router statistics stacked [Ly, ...] (moe.router_stats;
        None for a dense model)): what the train step needs for the load-balancing loss."""
        ways = balanced_ways(tokens.shape[1])
        if ways == 1:
            return self._decode(self.embed(tokens), positions, segment_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        tokens, positions = to_layout(tokens, ways), to_layout(positions, ways)
        segment_ids = None if segment_ids is None else to_layout(segment_ids, ways)
        token_index = jnp.asarray(layout_order(tokens.shape[1], ways))
        hidden, stats = self._decode(self.embed(tokens), positions, segment_ids, token_index)
        hidden = constrain(from_layout(hidden, ways), ("activation_batch", "activation_length", "activation_embed"))
        return hidden, stats

    def embed(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)  # [B, L, D]
        if self.config.gemma_norms:  # sqrt(D) rounded to the embeddings' dtype first, as transformers does
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, self.dtype)
        return constrain(x, ("activation_batch", "activation_length", "activation_embed"))

    def decode(self, x: jax.Array, positions=None, segment_ids=None, token_index=None) -> jax.Array:
        """Runs the decoder layers and the final norm on input embeddings x [B, L, D];
        `token_index` [L]: each position's index in the row when the row is reordered."""
        return self._decode(x, positions, segment_ids, token_index)[0]

    def _decode(self, x, positions=None, segment_ids=None, token_index=None):
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        tables = _rope_tables(cfg, positions, self.dtype)
        block = _Block(cfg, dtype=self.dtype, attention=self.attention, context_parallel=self.context_parallel)
        weights, partial, mlp_index = self.layers.scanned(cfg)

        def step(carry, layer):
            weights, window_index, rope_index, mlp_index, partial = layer
            cos, sin = tables(rope_index)
            return block(carry, {**weights, **_pick(partial, mlp_index)}, cos, sin, segment_ids,
                         token_index=token_index, window_index=window_index)  # (x, router stats): no cache

        if self.remat != "none":
            step = jax.checkpoint(step, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        window_index = jnp.asarray(cfg.layer_window_index, jnp.int32)  # [Ly]
        rope_index = jnp.asarray(cfg.layer_rope_index, jnp.int32)  # [Ly]
        x, stats = jax.lax.scan(lambda c, xs: step(c, (*xs, partial)), x,
                                (weights, window_index, rope_index, mlp_index))
        return norm(x, self.norm[...], cfg), stats

    def extend(self, tokens: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Generation: runs new `tokens` [B, L] at `positions` [B, L] through the layers, attending
        over `cache` and their own keys (kv_cache.py); returns the float32 logits of each row's last
        token [B, V] and the cache with the new tokens added."""
        cfg = self.config
        tables = _rope_tables(cfg, positions, self.dtype)
        block = _Block(cfg, dtype=self.dtype, attention=self.attention)
        weights, partial, mlp_index = self.layers.scanned(cfg)

        def step(x, layer):
            weights, keys, values, window, rope_index, mlp_index = layer
            cos, sin = tables(rope_index)
            return block(x, {**weights, **_pick(partial, mlp_index)}, cos, sin, None,
                         LayerCache(keys, values, cache.positions, positions, window))

        windows = layer_window_sizes(cfg)  # [Ly]: the cache masks by each layer's own window
        rope_index = jnp.asarray(cfg.layer_rope_index, jnp.int32)
        x, (keys, values) = jax.lax.scan(step, self.embed(tokens), (weights, cache.keys, cache.values, windows,
                                                                     rope_index, mlp_index))
        logits = self.head_logits(norm(x[:, -1], self.norm[...], cfg))  # [B, V]
        return logits, dataclasses.replace(cache, keys=keys, values=values).written(positions)


def _pick(partial: dict[str, jax.Array], index: jax.Array) -> dict[str, jax.Array]:
    """Each partly stacked weight at `index` (a layer's place in its MLP kind's stack; a layer of
    the other kind reads a neighbour it does not use, clamped into range)."""
    return {n: jax.lax.dynamic_index_in_dim(a, jnp.minimum(index, a.shape[0] - 1), keepdims=False)
            for n, a in partial.items()}


def _rope_tables(cfg: ModelConfig, positions: jax.Array, dtype):
    """`tables(rope_index) -> (cos, sin)` [B, L, H] for positions [B, L]: one pair per distinct
    RoPE of the layers (Gemma 3's sliding and full layers differ), picked by a layer's traced
    `rope_index` inside the layer scan."""
    pairs = [rope_tables(rope, cfg.head_dim, positions, dtype) for rope in cfg.ropes]
    if len(pairs) == 1:
        return lambda rope_index: pairs[0]
    cos, sin = jnp.stack([c for c, _ in pairs]), jnp.stack([s for _, s in pairs])  # [R, B, L, H]
    return lambda rope_index: (cos[rope_index], sin[rope_index])


@dataclasses.dataclass(frozen=True)
class _Block:
    """One decoder layer as a pure function of its (unstacked) weights."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    attention: str = "auto"
    context_parallel: str = "all_gather"

    def __call__(self, x, w, cos, sin, segment_ids, cache: LayerCache | None = None, token_index=None,
                 window_index=None):
        """x [B, L, D] -> (x [B, L, D], the layer's new keys and values with a `cache` (generation),
        else its router statistics (None for a dense MLP)): the (carry, output) pair that
        `jax.lax.scan` over the layers expects.
        `window_index`: this layer's window in `cfg.attention_windows` (a traced int32 under the
        scan; needed only where layers differ)."""
        cfg, dt = self.cfg, self.dtype
        h = x if cfg.post_norms else norm(x, w["input_layernorm"], cfg)  # OLMo 2: no pre-norms
        q = jnp.einsum("BLD,NHD->BLNH", h, w["q_proj"].astype(dt))
        # k and v in one matmul, stacked as gate and up are below.
        kv = jnp.einsum("BLD,TKHD->BLTKH", h, jnp.stack([w["k_proj"], w["v_proj"]]).astype(dt))
        k, v = kv[:, :, 0], kv[:, :, 1]
        if cfg.qkv_bias:
            q = q + w["q_proj_bias"].astype(dt)
            k = k + w["k_proj_bias"].astype(dt)
            v = v + w["v_proj_bias"].astype(dt)
        if cfg.qk_norm:  # per head (Qwen3), or over all heads together (OLMo 2)
            axes = (-2, -1) if cfg.qk_norm_all_heads else (-1,)
            q = norm(q, w["q_norm"], cfg, axes)
            k = norm(k, w["k_norm"], cfg, axes)
        q = constrain(apply_rope(q, cos, sin), Q_AXES)
        k = constrain(apply_rope(k, cos, sin), KV_AXES)
        if cache is None:
            attn = self._attend(q, k, v, segment_ids, token_index, window_index)  # [B, L, N, H]
        else:  # generation: the cached keys too, masked by position (kv_cache.py)
            attn, cache = cache.attend(q, k, v, scale=cfg.attention_scale, logit_cap=cfg.attn_logit_softcapping)
        out = jnp.einsum("BLNH,DNH->BLD", attn, w["o_proj"].astype(dt))
        if cfg.o_bias:
            out = out + w["o_proj_bias"].astype(dt)
        if cfg.gemma_norms or cfg.post_norms:
            out = norm(out, w["post_attention_layernorm"], cfg)
        x = constrain(x + out, ("activation_batch", "activation_length", "activation_embed"))

        # Llama's post_attention_layernorm is the MLP's pre-norm; Gemma 2 names that one
        # pre_feedforward; OLMo 2 has none.
        if cfg.post_norms:
            h = x
        else:
            h = norm(x, w["pre_feedforward_layernorm" if cfg.gemma_norms else "post_attention_layernorm"], cfg)
        stats = None
        mask = None if segment_ids is None else segment_ids > 0
        if cfg.mixed_mlps:  # this layer's kind, chosen at run time inside the one scanned body
            down, stats = jax.lax.cond(w["is_moe"], lambda h: moe_mlp(h, w, cfg, dt, mask),
                                       lambda h: (gated_mlp(h, w, cfg, dt), _no_router_stats(cfg)), h)
        elif cfg.num_experts:
            down, stats = moe_mlp(h, w, cfg, dt, mask)
        else:
            down = gated_mlp(h, w, cfg, dt)
        if cfg.gemma_norms or cfg.post_norms:
            down = norm(down, w["post_feedforward_layernorm"], cfg)
        x = constrain(x + down, ("activation_batch", "activation_length", "activation_embed"))
        return x, (cache if cache is not None else stats)

    def _attend(self, q, k, v, segment_ids, token_index, window_index):
        """Attention with this layer's window: one branch per distinct window of the model,
        chosen by the traced `window_index` where there are several."""
        cfg = self.cfg

        def with_window(window):
            return lambda q, k, v: attend_rows(
                q, k, v, segment_ids, token_index, choice=self.attention, strategy=self.context_parallel,
                window=window, scale=cfg.attention_scale, logit_cap=cfg.attn_logit_softcapping)

        windows = cfg.attention_windows
        if len(windows) == 1:
            return with_window(windows[0])(q, k, v)
        if window_index is None:
            raise ValueError("a model whose layers differ in window needs each layer's window_index")
        return jax.lax.switch(window_index, [with_window(w) for w in windows], q, k, v)


def _no_router_stats(cfg: ModelConfig) -> dict[str, jax.Array]:
    """A dense layer's router statistics in a mixed model: none (it counts toward no expert load)."""
    zeros = jnp.zeros((cfg.num_experts,), jnp.float32)
    return {"counts": zeros, "probs": zeros, "z": jnp.zeros((), jnp.float32), "tokens": jnp.zeros((), jnp.float32)}


def abstract_model(cfg: ModelConfig, param_dtype: Any = jnp.float32, **kwargs) -> Llama:
    """The model with ShapeDtypeStructs for weights: builds any size without allocating."""
    return nnx.eval_shape(lambda: Llama(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(0), **kwargs))


def param_count(model: Llama) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


ParamPath = tuple[str, ...]  # ("layers", "q_proj"): a leaf of the nested parameter dict


def param_paths(tree: dict) -> list[ParamPath]:
    """The path of every leaf of a nested dict of parameters, in insertion order."""
    paths = []
    for key, value in tree.items():
        if isinstance(value, dict):
            paths += [(key, *rest) for rest in param_paths(value)]
        else:
            paths.append((key,))
    return paths


def get_param(tree: dict, path: ParamPath):
    for key in path:
        tree = tree[key]
    return tree


def set_param(tree: dict, path: ParamPath, value) -> None:
    """Puts `value` at `path`, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def model_from_params(cfg: ModelConfig, params: dict, **kwargs) -> Llama:
    """A model whose weights are `params` (a nested dict shaped like `nnx.to_pure_dict`)."""
    first = next(iter(jax.tree.leaves(params)))
    graphdef, state = nnx.split(abstract_model(cfg, param_dtype=first.dtype, **kwargs))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
