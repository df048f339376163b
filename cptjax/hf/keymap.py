"""The HF key map: every tensor name of an HF Llama-family checkpoint <-> a cptjax parameter.

cptjax keeps HF's layout ([out, in], heads split out of `out`), so the map is a reshape, never a
transpose: pure, total (every HF tensor has a place, every parameter a source) and checked on shapes.
Where a checkpoint fuses projections in one tensor (Phi-3's qkv_proj and gate_up_proj, their parts
stacked along the output rows), each part maps to its own parameter as a block of rows: a split on
import, and an exact concatenation on export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cptjax.model.config import ModelConfig
from cptjax.model.layers import layer_stack, layer_weight_names, layer_weight_shape
from cptjax.model.transformer import ParamPath

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
# Mixture-of-experts layers' names, by family (ModelConfig.model_type): the router, and each
# expert's gate, up and down projections with `{e}` for the expert's index.
_HF_MOE_NAMES = {
    "mixtral": {"router": "block_sparse_moe.gate.weight", "expert_gate_proj": "block_sparse_moe.experts.{e}.w1.weight",
                "expert_up_proj": "block_sparse_moe.experts.{e}.w3.weight",
                "expert_down_proj": "block_sparse_moe.experts.{e}.w2.weight"},
    "qwen3_moe": {"router": "mlp.gate.weight", "expert_gate_proj": "mlp.experts.{e}.gate_proj.weight",
                  "expert_up_proj": "mlp.experts.{e}.up_proj.weight",
                  "expert_down_proj": "mlp.experts.{e}.down_proj.weight"},
}
# Phi-3's fused tensors: the parameters stacked along their first axis, in this order.
_FUSED = {"self_attn.qkv_proj.weight": ("q_proj", "k_proj", "v_proj"),
          "mlp.gate_up_proj.weight": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class KeyMapping:
    """One HF tensor and where it lives in cptjax's parameters (`layer` indexes a stacked array)."""

    hf_name: str
    path: ParamPath
    # Where the tensor sits in a stacked parameter: its layer, or for an expert's tensor (stacked
    # [Ly, E, ...]) layer * E + expert, an index into the stack's leading axes flattened.
    layer: int | None
    shape: tuple[int, ...]  # cptjax's per-tensor shape; HF's is the same bytes, heads flattened
    # In a fused HF tensor: (this part's first row, the tensor's rows), both along the first axis
    # of `shape` (heads for q/k/v, F for gate/up); None where the HF tensor is this parameter alone.
    fused: tuple[int, int] | None = None
    experts: int = 0  # E for one expert's tensor: the stacked parameter is [Ly, E, *shape]

    @property
    def stack(self) -> tuple[int, ...]:
        """The leading axes of the stacked parameter this tensor is one slice of, given Ly."""
        return (self.experts,) if self.experts else ()

    @property
    def view_shape(self) -> tuple[int, ...]:
        """The whole HF tensor in cptjax's letters (`shape`, or the stack of the fused parts)."""
        return self.shape if self.fused is None else (self.fused[1], *self.shape[1:])

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The HF tensor's shape: heads flattened into the output (or input) dimension of each projection."""
        name, shape = self.path[-1], self.view_shape
        if name in ("q_proj", "k_proj", "v_proj"):
            return (shape[0] * shape[1], shape[2])
        if name == "o_proj":
            return (shape[0], shape[1] * shape[2])
        if name in ("q_proj_bias", "k_proj_bias", "v_proj_bias", "q_norm", "k_norm"):
            return (int(np.prod(shape)),)
        return shape

    def file_index(self, block: tuple[slice, ...]) -> tuple[slice, ...]:
        """`block` of this parameter (slices of `shape`) as slices of the HF tensor's `view_shape`."""
        if self.fused is None:
            return block
        start, stop, _ = block[0].indices(self.shape[0])
        return (slice(start + self.fused[0], stop + self.fused[0]), *block[1:])

    def take(self, hf_tensor: np.ndarray) -> np.ndarray:
        """This parameter's part of the whole HF tensor, in `shape`."""
        return hf_tensor.reshape(self.view_shape)[self.file_index((slice(None),) * len(self.shape))]


def key_map(cfg: ModelConfig) -> list[KeyMapping]:
    """Every HF tensor of this config, grouped by cptjax parameter (the order export writes them)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out = [KeyMapping("model.embed_tokens.weight", ("embed_tokens",), None, (v, d))]
    fused = {part: (hf_name, parts) for hf_name, parts in _FUSED.items() for part in parts}
    for name in layer_weight_names(cfg):
        shape = layer_weight_shape(cfg, name)
        hf_name, where = _HF_LAYER_NAMES.get(name), None
        if cfg.fused_projections and name in fused:
            hf_name, parts = fused[name]
            rows = [layer_weight_shape(cfg, part)[0] for part in parts]
            where = (sum(rows[:parts.index(name)]), sum(rows))
        layers = layer_stack(cfg, name)  # every layer, or (mixed MLPs) the dense or the MoE ones
        if name.startswith("expert_"):  # one HF tensor per expert: [E, ...] per layer in cptjax
            hf_name, e = _HF_MOE_NAMES[cfg.model_type][name], cfg.num_experts
            out += [KeyMapping(f"model.layers.{i}.{hf_name.format(e=j)}", ("layers", name), n * e + j, shape[1:],
                               experts=e) for n, i in enumerate(layers) for j in range(e)]
            continue
        if name == "router":
            hf_name = _HF_MOE_NAMES[cfg.model_type][name]
        out += [KeyMapping(f"model.layers.{i}.{hf_name}", ("layers", name), n, shape, where)
                for n, i in enumerate(layers)]
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


def hf_tensors(cfg: ModelConfig) -> dict[str, list[KeyMapping]]:
    """The key map by HF tensor, in the order of their first part in `key_map`: a fused tensor
    lists its parts in the order they are stacked."""
    tensors: dict[str, list[KeyMapping]] = {}
    for m in key_map(cfg):
        tensors.setdefault(m.hf_name, []).append(m)
    for parts in tensors.values():
        parts.sort(key=lambda m: m.fused[0] if m.fused else 0)
    return tensors
