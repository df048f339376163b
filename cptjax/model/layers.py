"""The decoder layers' weights: which ones a config has, their shapes and logical axes, and the
module that holds them stacked over the layers (each kind's own layers, where an MoE model has dense
layers among its MoE ones). Dimension letters as in transformer.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cptjax.model.config import ModelConfig

# (name, shape in letters, logical axes) of each per-layer weight; the stacked array adds Ly in front.
_LAYER_WEIGHTS = (
    ("input_layernorm", "D", ("norm",)),
    ("q_proj", "NHD", ("q_heads", "head_dim", "embed")),
    ("k_proj", "KHD", ("kv_heads", "head_dim", "embed")),
    ("v_proj", "KHD", ("kv_heads", "head_dim", "embed")),
    ("o_proj", "DNH", ("embed", "q_heads", "head_dim")),
    ("q_proj_bias", "NH", ("q_heads", "head_dim")),
    ("k_proj_bias", "KH", ("kv_heads", "head_dim")),
    ("v_proj_bias", "KH", ("kv_heads", "head_dim")),
    ("o_proj_bias", "D", ("embed",)),
    ("q_norm", "H", ("head_dim",)),
    ("k_norm", "H", ("head_dim",)),
    ("post_attention_layernorm", "D", ("norm",)),  # Gemma 2, OLMo 2: on the attention's output
    ("pre_feedforward_layernorm", "D", ("norm",)),  # Gemma 2 only: before the MLP
    ("post_feedforward_layernorm", "D", ("norm",)),  # Gemma 2, OLMo 2: on the MLP's output
    ("gate_proj", "FD", ("mlp", "embed")),
    ("up_proj", "FD", ("mlp", "embed")),
    ("down_proj", "DF", ("embed", "mlp")),
    ("gate_proj_bias", "F", ("mlp",)),
    ("up_proj_bias", "F", ("mlp",)),
    ("down_proj_bias", "D", ("embed",)),
    # Mixture of experts (moe.py): the router, and E experts' gated MLPs of size M each.
    ("router", "ED", ("experts", "embed")),
    ("expert_gate_proj", "EMD", ("experts", "mlp", "embed")),
    ("expert_up_proj", "EMD", ("experts", "mlp", "embed")),
    ("expert_down_proj", "EDM", ("experts", "embed", "mlp")),
)
_MOE_WEIGHTS = ("router", "expert_gate_proj", "expert_up_proj", "expert_down_proj")
_DENSE_MLP_WEIGHTS = ("gate_proj", "up_proj", "down_proj", "gate_proj_bias", "up_proj_bias", "down_proj_bias")


def layer_weight_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The per-layer weights this config has (biases and q/k norms only where the config says)."""
    present = {
        "q_proj_bias": cfg.qkv_bias, "k_proj_bias": cfg.qkv_bias, "v_proj_bias": cfg.qkv_bias,
        "o_proj_bias": cfg.o_bias, "q_norm": cfg.qk_norm, "k_norm": cfg.qk_norm,
        "gate_proj_bias": cfg.mlp_bias, "up_proj_bias": cfg.mlp_bias, "down_proj_bias": cfg.mlp_bias,
        "input_layernorm": not cfg.post_norms, "pre_feedforward_layernorm": cfg.gemma_norms,
        "post_feedforward_layernorm": cfg.gemma_norms or cfg.post_norms,
        **{name: not cfg.num_experts or cfg.mixed_mlps for name in ("gate_proj", "up_proj", "down_proj")},
        **{name: bool(cfg.num_experts) for name in _MOE_WEIGHTS},
    }
    return tuple(name for name, _, _ in _LAYER_WEIGHTS if present.get(name, True))


def _letters_and_axes(cfg: ModelConfig, name: str) -> tuple[str, tuple[str, ...]]:
    if cfg.qk_norm_all_heads and name in ("q_norm", "k_norm"):  # OLMo 2: one norm over all heads
        return ("NH", ("q_heads", "head_dim")) if name == "q_norm" else ("KH", ("kv_heads", "head_dim"))
    return next((letters, axes) for n, letters, axes in _LAYER_WEIGHTS if n == name)


def layer_stack(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """The layers a per-layer weight is stacked over: all, or in an MoE model with dense layers
    (ModelConfig.mixed_mlps) the dense MLP's over the dense layers and the experts' over the others."""
    if cfg.mixed_mlps and name in _DENSE_MLP_WEIGHTS:
        return cfg.dense_layers
    if cfg.mixed_mlps and name in _MOE_WEIGHTS:
        return cfg.moe_layers
    return tuple(range(cfg.num_layers))


def layer_weight_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    sizes = {"D": cfg.hidden_size, "F": cfg.intermediate_size, "N": cfg.num_heads,
             "K": cfg.num_kv_heads, "H": cfg.head_dim, "E": cfg.num_experts, "M": cfg.expert_size}
    return tuple(sizes[c] for c in _letters_and_axes(cfg, name)[0])


def initial_value(name: str, shape, key, dtype, std: float, cfg: ModelConfig):
    if name.endswith("norm"):  # a scale of 1: Gemma's norms store it as 1 + weight
        return jnp.zeros(shape, dtype) if cfg.gemma_norms else jnp.ones(shape, dtype)
    if name.endswith("bias"):
        return jnp.zeros(shape, dtype)
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def logical_param(value, names) -> nnx.Param:
    # Logical names as metadata only (eager_sharding=False): sharding.py maps them to the mesh and
    # the trainer places arrays with explicit shardings.
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, each stacked on a leading Ly axis."""

    def __init__(self, cfg: ModelConfig, *, param_dtype, std: float, rngs: nnx.Rngs):
        self.names = layer_weight_names(cfg)
        for name in self.names:
            shape = (len(layer_stack(cfg, name)), *layer_weight_shape(cfg, name))
            axes = ("layers", *_letters_and_axes(cfg, name)[1])
            setattr(self, name, logical_param(initial_value(name, shape, rngs.params(), param_dtype, std, cfg), axes))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}

    def scanned(self, cfg: ModelConfig) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
        """(the weights stacked over every layer, scanned with the layers; those stacked over some
        layers only (mixed MLPs), which each layer indexes; each layer's index into its MLP's
        stack [Ly])."""
        arrays = self.arrays()
        per_layer = {n: a for n, a in arrays.items() if len(layer_stack(cfg, n)) == cfg.num_layers}
        partial = {n: a for n, a in arrays.items() if n not in per_layer}
        position = {layer: i for group in (cfg.dense_layers, cfg.moe_layers) for i, layer in enumerate(group)}
        if cfg.mixed_mlps:
            per_layer["is_moe"] = jnp.asarray([i in cfg.moe_layers for i in range(cfg.num_layers)])
        return per_layer, partial, jnp.asarray([position.get(i, i) for i in range(cfg.num_layers)], jnp.int32)
