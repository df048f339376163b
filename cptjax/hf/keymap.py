"""The HF key map: every tensor name of an HF Llama-family checkpoint <-> a cptjax parameter.

cptjax keeps HF's layout ([out, in], heads split out of `out`), so the map is a reshape, never a
transpose: pure, total (every HF tensor has a place, every parameter a source) and checked on shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from cptjax.model.config import ModelConfig
from cptjax.model.transformer import ParamPath, layer_weight_names, layer_weight_shape

_HF_LAYER_NAMES = {
    "input_layernorm": "input_layernorm.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "pre_feedforward_layernorm": "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm": "post_feedforward_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
    "q_proj_bias": "self_attn.q_proj.bias", "k_proj_bias": "self_attn.k_proj.bias",
    "v_proj_bias": "self_attn.v_proj.bias", "o_proj_bias": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight", "gate_proj_bias": "mlp.gate_proj.bias",
    "up_proj_bias": "mlp.up_proj.bias", "down_proj_bias": "mlp.down_proj.bias",
}


@dataclass(frozen=True)
class KeyMapping:
    """One HF tensor and where it lives in cptjax's parameters (`layer` indexes a stacked array)."""

    hf_name: str
    path: ParamPath
    layer: int | None
    shape: tuple[int, ...]  # cptjax's per-tensor shape; HF's is the same bytes, heads flattened

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """HF flattens heads into the output (or input) dimension of each projection."""
        name, shape = self.path[-1], self.shape
        if name in ("q_proj", "k_proj", "v_proj"):
            return (shape[0] * shape[1], shape[2])
        if name == "o_proj":
            return (shape[0], shape[1] * shape[2])
        if name in ("q_proj_bias", "k_proj_bias", "v_proj_bias"):
            return (shape[0] * shape[1],)
        return shape


def key_map(cfg: ModelConfig) -> list[KeyMapping]:
    """Every HF tensor of this config, grouped by cptjax parameter (the order export writes them)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out = [KeyMapping("model.embed_tokens.weight", ("embed_tokens",), None, (v, d))]
    for name in layer_weight_names(cfg):
        shape = layer_weight_shape(cfg, name)
        out += [KeyMapping(f"model.layers.{i}.{_HF_LAYER_NAMES[name]}", ("layers", name), i, shape)
                for i in range(cfg.num_layers)]
    out.append(KeyMapping("model.norm.weight", ("norm",), None, (d,)))
    if not cfg.tie_word_embeddings:
        out.append(KeyMapping("lm_head.weight", ("lm_head",), None, (v, d)))
    return out


def grouped_key_map(cfg: ModelConfig) -> dict[ParamPath, list[KeyMapping]]:
    """The key map grouped by cptjax parameter: a stacked parameter lists one mapping per layer."""
    groups: dict[ParamPath, list[KeyMapping]] = {}
    for m in key_map(cfg):
        groups.setdefault(m.path, []).append(m)
    return groups
