"""What each HF `model_type` implies about its layers: the one table that knows HF architecture
names (`ARCHITECTURES`), and which layers have a sliding window, read as transformers reads it.

An entry says what the HF class implies about fields its config.json does not spell out (Qwen2
always has q/k/v biases, Qwen3 always has per-head q/k RMSNorm, Gemma 2 always has (1 + weight)
norms on both sides of each sub-layer, OLMo 2 norms only after them and q/k norms over all heads,
Phi-3 fuses q/k/v and gate/up in its files, Gemma 3 gives its sliding layers their own RoPE base),
and the values its config class gives keys that config.json leaves out. config.py turns them into
ModelConfig fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cptjax.core.errors import CptjaxError


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What an HF `model_type` implies about the structure of its layers."""

    hf_class: str
    qkv_bias: str | bool  # a config key to read, or a fixed value
    o_bias: str | bool
    mlp_bias: str | bool
    qk_norm: bool
    # Which layers slide: 'never', 'all_layers' (Mistral), 'max_window_layers' (Qwen2/3: where
    # use_sliding_window is set, the layers from max_window_layers on, unless layer_types lists
    # them), 'use_sliding_window' (Qwen3-MoE: every layer where that is set) or 'alternating'
    # (Gemma 2 and 3: layer_types, else every `sliding_window_pattern`-th layer is full).
    sliding_window: str
    gemma_norms: bool = False  # (1 + weight) RMSNorms, also after attention and the MLP; sqrt(D)-scaled embeddings
    post_norms: bool = False  # OLMo 2: RMSNorms on the attention's and the MLP's outputs only, none before
    qk_norm_all_heads: bool = False  # OLMo 2: q/k RMSNorm over all heads together (N*H), not per head (H)
    fused_projections: bool = False  # Phi-3: the checkpoint stores qkv_proj and gate_up_proj, each one tensor
    only_default_rope: bool = False  # Phi-3: rope_scaling other than null is longrope, which cptjax refuses
    act_key: str = "hidden_act"  # the config key naming the MLP's activation
    default_act: str = "silu"
    tied_by_default: bool = False  # tie_word_embeddings where config.json leaves it out
    window_pattern: int | None = None  # 'alternating': every n-th layer full (None: sliding_window_pattern's n)
    sliding_rope_base: bool = False  # Gemma 3: sliding layers use default RoPE at rope_local_base_freq
    # Mixture of experts: None (dense MLPs), or the config keys of the family's MoE layers
    # (Mixtral's or Qwen3-MoE's names; MOE_KEYS), read by parse_experts.
    moe: str | None = None
    # What the HF config class assumes for keys config.json leaves out (transformers' defaults).
    defaults: tuple[tuple[str, Any], ...] = ()


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaForCausalLM", "attention_bias", "attention_bias", "mlp_bias", False, "never"),
    "mistral": Architecture("MistralForCausalLM", False, False, False, False, "all_layers"),
    "qwen2": Architecture("Qwen2ForCausalLM", True, False, False, False, "max_window_layers"),
    "qwen3": Architecture("Qwen3ForCausalLM", "attention_bias", "attention_bias", False, True, "max_window_layers"),
    "gemma2": Architecture("Gemma2ForCausalLM", "attention_bias", "attention_bias", False, False, "alternating",
                           gemma_norms=True, act_key="hidden_activation", default_act="gelu_pytorch_tanh",
                           tied_by_default=True, window_pattern=2,
                           defaults=(("query_pre_attn_scalar", 256), ("attn_logit_softcapping", 50.0),
                                     ("final_logit_softcapping", 30.0), ("sliding_window", 4096))),
    "gemma3_text": Architecture("Gemma3ForCausalLM", "attention_bias", "attention_bias", False, True, "alternating",
                                gemma_norms=True, act_key="hidden_activation", default_act="gelu_pytorch_tanh",
                                tied_by_default=True, sliding_rope_base=True,
                                defaults=(("query_pre_attn_scalar", 256), ("sliding_window", 4096),
                                          ("sliding_window_pattern", 6), ("rope_theta", 1_000_000.0),
                                          ("rope_local_base_freq", 10_000.0))),
    "olmo2": Architecture("Olmo2ForCausalLM", "attention_bias", "attention_bias", False, True, "never",
                          post_norms=True, qk_norm_all_heads=True),
    "phi3": Architecture("Phi3ForCausalLM", False, False, False, False, "all_layers", fused_projections=True,
                         only_default_rope=True),
    "mixtral": Architecture("MixtralForCausalLM", False, False, False, False, "all_layers", moe="mixtral",
                            defaults=(("num_local_experts", 8), ("num_experts_per_tok", 2),
                                      ("router_aux_loss_coef", 0.001), ("rope_theta", 1_000_000.0))),
    "qwen3_moe": Architecture("Qwen3MoeForCausalLM", "attention_bias", "attention_bias", False, True,
                              "use_sliding_window", moe="qwen3_moe",
                              defaults=(("num_experts_per_tok", 8), ("norm_topk_prob", False),
                                        ("moe_intermediate_size", 768), ("decoder_sparse_step", 1),
                                        ("mlp_only_layers", []), ("router_aux_loss_coef", 0.001),
                                        ("sliding_window", 4096))),
}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # transformers' names: x * sigmoid(x), and GELU's tanh form
# Each MoE family's config keys: experts per layer (the hub's name, then the one transformers 5
# writes, and the config class's default), experts per token, and the router's weight
# renormalised over the chosen experts (a key, or always).
MOE_KEYS = {"mixtral": (("num_local_experts",), "num_experts_per_tok", True),
            "qwen3_moe": (("num_experts", "num_local_experts", 128), "num_experts_per_tok", "norm_topk_prob")}
LAYER_TYPES = ("full_attention", "sliding_attention")
_QWEN_MAX_WINDOW_LAYERS = 28  # transformers' default when config.json leaves max_window_layers out


# model_types close to a supported one, with what to do instead.
_NEAR_MISSES = {
    "gemma3": "it is Gemma 3's multimodal checkpoint (Gemma3ForConditionalGeneration); cptjax trains the text "
              "decoder, model_type 'gemma3_text' (Gemma3ForCausalLM: Gemma 3 270M and 1B)",
}


def architecture_refusal(model_type: Any) -> str:
    supported = ", ".join(f"{t} ({a.hf_class})" for t, a in ARCHITECTURES.items())
    hint = f" ({_NEAR_MISSES[model_type]})" if model_type in _NEAR_MISSES else ""
    return (f"unsupported architecture: model_type {model_type!r}{hint}. "
            f"cptjax supports: {supported}; TinyLlama and SmolLM use model_type 'llama'")


def with_defaults(hf: dict, arch: Architecture) -> dict:
    """`hf` with the config class's defaults for the keys it leaves out (a key set to null stays
    null, as transformers keeps it: Gemma 2 with `attn_logit_softcapping: null` has no cap)."""
    return {**dict(arch.defaults), **hf}


def flag(hf: dict, spec: str | bool, source: str) -> bool:
    """A true/false field: `spec` is a fixed value, or the config key that holds it (absent: false)."""
    if isinstance(spec, bool):
        return spec
    value = hf.get(spec, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise CptjaxError(f"{source}: key {spec!r} must be true or false, got {value!r}")
    return value


def parse_layer_windows(hf: dict, arch: Architecture, num_layers: int,
                         source: str) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers reads them for this architecture: the window
    and, where sliding and full layers mix, each layer's kind (else ())."""
    window = hf.get("sliding_window")
    if arch.sliding_window == "never" or window is None:
        return None, ()
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise CptjaxError(f"{source}: sliding_window must be a positive integer or null, got {window!r}")
    if arch.sliding_window == "all_layers":
        return window, ()
    if arch.sliding_window == "use_sliding_window":
        return (window if flag(hf, "use_sliding_window", source) else None), ()
    if arch.sliding_window == "max_window_layers" and not flag(hf, "use_sliding_window", source):
        return None, ()  # transformers' Qwen2/3 set the window to None then, whatever layer_types says
    layer_types = hf.get("layer_types")
    if layer_types is None:
        layer_types = [_default_layer_type(hf, arch, i, source) for i in range(num_layers)]
    if (not isinstance(layer_types, list) or len(layer_types) != num_layers
            or not set(layer_types) <= set(LAYER_TYPES)):
        raise CptjaxError(f"{source}: layer_types must list one of {', '.join(LAYER_TYPES)} for each of the "
                          f"{num_layers} layers, got {layer_types!r}")
    if set(layer_types) == {"full_attention"}:
        return None, ()
    if set(layer_types) == {"sliding_attention"}:
        return window, ()
    return window, tuple(layer_types)


def _default_layer_type(hf: dict, arch: Architecture, layer: int, source: str) -> str:
    """Layer `layer`'s kind where config.json has no layer_types (transformers' defaults)."""
    if arch.sliding_window == "max_window_layers":
        first = hf.get("max_window_layers", _QWEN_MAX_WINDOW_LAYERS)
        if not isinstance(first, int) or isinstance(first, bool) or first < 0:
            raise CptjaxError(f"{source}: max_window_layers must be a non-negative integer, got {first!r}")
        return "sliding_attention" if layer >= first else "full_attention"
    pattern = arch.window_pattern or hf.get("sliding_window_pattern")  # every `pattern`-th layer is full
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
        raise CptjaxError(f"{source}: sliding_window_pattern must be a positive integer, got {pattern!r}")
    return "sliding_attention" if (layer + 1) % pattern else "full_attention"


def parse_experts(hf: dict, arch: Architecture, num_layers: int, source: str) -> dict[str, Any]:
    """The MoE fields of ModelConfig for an MoE family (num_experts, experts_per_token,
    moe_intermediate_size, norm_topk_prob, router_aux_loss_coef, and the layers that Qwen3-MoE's
    mlp_only_layers and decoder_sparse_step keep dense); {} for a dense one."""
    if arch.moe is None:
        return {}
    experts_keys, top_k_key, renormalise = MOE_KEYS[arch.moe]
    experts_key = next((k for k in experts_keys if isinstance(k, str) and k in hf), experts_keys[0])
    default = experts_keys[-1] if not isinstance(experts_keys[-1], str) else None
    fields = {"num_experts": hf.get(experts_key, default), "experts_per_token": hf.get(top_k_key)}
    for key, name in ((experts_key, "num_experts"), (top_k_key, "experts_per_token")):
        value = fields[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CptjaxError(f"{source}: {key} must be a positive integer, got {value!r}")
    if fields["experts_per_token"] > fields["num_experts"]:
        raise CptjaxError(f"{source}: {top_k_key} ({fields['experts_per_token']}) exceeds {experts_key} "
                          f"({fields['num_experts']})")
    fields["norm_topk_prob"] = flag(hf, renormalise, source)
    coefficient = hf.get("router_aux_loss_coef") or 0.0
    if not isinstance(coefficient, (int, float)) or isinstance(coefficient, bool) or coefficient < 0:
        raise CptjaxError(f"{source}: router_aux_loss_coef must be a non-negative number, got {coefficient!r}")
    fields["router_aux_loss_coef"] = float(coefficient)
    if hf.get("router_jitter_noise"):
        raise CptjaxError(f"{source}: router_jitter_noise {hf['router_jitter_noise']} is not supported "
                          "(set it to 0: every published Mixtral has none)")
    if arch.moe == "qwen3_moe":
        size = hf.get("moe_intermediate_size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise CptjaxError(f"{source}: moe_intermediate_size must be a positive integer, got {size!r}")
        fields["moe_intermediate_size"] = size
        step, dense = hf.get("decoder_sparse_step"), hf.get("mlp_only_layers") or []
        if not isinstance(step, int) or isinstance(step, bool) or step <= 0 or not isinstance(dense, list):
            raise CptjaxError(f"{source}: decoder_sparse_step must be a positive integer and mlp_only_layers a "
                              f"list, got {step!r} and {dense!r}")
        if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers for i in dense):
            raise CptjaxError(f"{source}: mlp_only_layers must list layer indices below num_hidden_layers "
                              f"({num_layers}), got {dense!r}")
        # As transformers' Qwen3-MoE decides: experts where the layer is not listed and (i + 1) % step == 0.
        fields["dense_layers"] = tuple(i for i in range(num_layers) if i in dense or (i + 1) % step)
        if len(fields["dense_layers"]) == num_layers:
            raise CptjaxError(f"{source}: every layer is a dense MLP (mlp_only_layers {dense}, decoder_sparse_step "
                              f"{step}): load it as a dense model, or give some layers experts")
    return fields


def expert_keys(arch: Architecture, cfg) -> dict[str, Any]:
    """The MoE keys of an export's config.json (`cfg`: a ModelConfig), as parse_experts reads them."""
    if arch.moe is None:
        return {}
    experts_keys, top_k_key, renormalise = MOE_KEYS[arch.moe]
    hf = {experts_keys[0]: cfg.num_experts, top_k_key: cfg.experts_per_token,
          "router_aux_loss_coef": cfg.router_aux_loss_coef}
    if isinstance(renormalise, str):
        hf[renormalise] = cfg.norm_topk_prob
    if arch.moe == "qwen3_moe":  # every dense layer listed, so the step is 1
        hf.update(moe_intermediate_size=cfg.moe_intermediate_size, decoder_sparse_step=1,
                  mlp_only_layers=list(cfg.dense_layers))
    return hf


def layer_window_keys(arch: Architecture, window: int | None, layer_windows: tuple[int | None, ...]) -> dict:
    """The config.json keys that say which layers slide, as parse_layer_windows reads them back
    (and as transformers 4 reads them, where its keys differ)."""
    if arch.sliding_window == "never":
        return {}
    hf: dict[str, Any] = {"sliding_window": window}
    if arch.sliding_window == "all_layers":
        return hf
    if arch.sliding_window == "use_sliding_window":
        return hf | {"use_sliding_window": window is not None}
    kinds = ["full_attention" if w is None else "sliding_attention" for w in layer_windows]
    hf["layer_types"] = kinds
    if arch.sliding_window == "alternating" and arch.window_pattern is None and "full_attention" in kinds:
        # Gemma 3 before transformers 4.53 reads only the pattern: written where the layers follow one.
        pattern = kinds.index("full_attention") + 1
        if kinds == ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(len(kinds))]:
            hf["sliding_window_pattern"] = pattern
    if arch.sliding_window == "max_window_layers":
        hf["use_sliding_window"] = window is not None
        # transformers 4 reads max_window_layers, not layer_types: the first sliding layer, when
        # the sliding layers are the last ones (the only pattern it can say).
        full = kinds.count("full_attention")
        if kinds == ["full_attention"] * full + ["sliding_attention"] * (len(kinds) - full):
            hf["max_window_layers"] = full
    return hf


def refuse_scaled_rope(hf: dict, model_type: str, source: str) -> None:
    """Phi-3 reads any rope_scaling as longrope ('su' and 'yarn' included): refused, naming the field."""
    for key in ("rope_scaling", "rope_parameters"):
        scaling = hf.get(key)
        kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
        if kind != "default":
            raise CptjaxError(f"{source}: {key}.type {kind!r} is not supported for model_type {model_type!r}: "
                              "cptjax implements Phi-3's unscaled RoPE only (the 4K-context models, "
                              "rope_scaling null), not longrope")

