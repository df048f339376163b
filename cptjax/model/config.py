"""The model's hyperparameters, read from and written back to a Hugging Face `config.json`.

The model keys every behaviour on these fields (bias, qk-norm, rope type, which layers have a
sliding window, soft-caps, norm placement, fused checkpoint tensors, tied embeddings), never on a
model name. What each HF architecture implies about fields its config does not spell out is in
families.py; RoPE's part is in rope.py.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from cptjax.core.dtypes import FLOAT_NAMES
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, user_path
from cptjax.model.families import (
    ACTIVATIONS,
    ARCHITECTURES,
    LAYER_TYPES,
    architecture_refusal,
    expert_keys,
    flag,
    layer_window_keys,
    parse_experts,
    parse_layer_windows,
    refuse_scaled_rope,
    with_defaults,
)
from cptjax.model.rope import RopeConfig, RopeOverrides, override_rope, rope_from_hf, rope_to_hf, split_layer_rope

# Keys this module reads or writes itself; every other key of the source config.json is carried
# through unchanged so that an export keeps what the user's model had (initializer_range, use_cache...).
_MODELED_KEYS = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "attention_bias", "mlp_bias", "hidden_act", "tie_word_embeddings", "sliding_window",
    "use_sliding_window", "max_window_layers", "layer_types", "bos_token_id", "eos_token_id",
    "pad_token_id", "torch_dtype", "dtype", "partial_rotary_factor", "transformers_version",
    "hidden_activation", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
    "sliding_window_pattern", "rope_local_base_freq", "_sliding_window_pattern",
    "num_local_experts", "num_experts", "num_experts_per_tok", "norm_topk_prob", "moe_intermediate_size",
    "router_aux_loss_coef", "decoder_sparse_step", "mlp_only_layers", "router_jitter_noise", "real_vocab_size",
})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Dimension letters: V vocab, D model, F mlp, N query heads,
    K kv heads, H head dim, Ly layers."""

    vocab_size: int  # V: rows of the embedding and the output head
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    # Gemma 3: the sliding-window layers' RoPE base (default RoPE, never scaled); `rope` is then the
    # full-attention layers'. None: every layer uses `rope`. `layer_ropes` reads it.
    sliding_rope_theta: float | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    qk_norm_all_heads: bool = False  # OLMo 2: the q/k norms over all heads together (weights [N, H], [K, H])
    sliding_window: int | None = None  # tokens a query sees, itself included (HF's convention)
    # Per layer, 'sliding_attention' or 'full_attention' where the layers mix; () when every layer
    # is alike (all sliding with a sliding_window, else all full). `layer_windows` reads it.
    layer_types: tuple[str, ...] = ()
    hidden_act: str = "silu"  # the MLP's gate activation, one of ACTIVATIONS
    gemma_norms: bool = False  # Gemma 2's (1 + weight) norms before and after each sub-layer, sqrt(D) embeddings
    post_norms: bool = False  # OLMo 2's norms after each sub-layer only, their scale applied in float32
    fused_projections: bool = False  # Phi-3: HF files hold qkv_proj and gate_up_proj (hf/keymap.py splits them)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power (None: head_dim's)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax
    final_logit_softcapping: float | None = None  # the same on the output logits
    # Mixture of experts (Mixtral, Qwen3-MoE): every layer's MLP is E experts, of which a router
    # picks `experts_per_token` per token (cptjax/model/moe.py). 0: dense MLPs.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int | None = None  # each expert's hidden size (None: intermediate_size, Mixtral)
    norm_topk_prob: bool = False  # the chosen experts' weights renormalised to sum to 1
    router_aux_loss_coef: float = 0.0  # the load-balancing loss's weight in the training objective
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP instead (Qwen3-MoE's mlp_only_layers)
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str | None = None  # the precision the source's config.json records: exports default to it
    hf_extra_json: str = "{}"  # source config keys this class does not model, kept for the export
    real_vocab_size: int | None = None  # the tokenizer's ids when rows are padded past them; the rest: -inf logits

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CptjaxError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.real_vocab_size is not None and not 0 < self.real_vocab_size <= self.vocab_size:
            raise CptjaxError(f"model config: real_vocab_size {self.real_vocab_size!r} must be in 1..vocab_size")
        if self.num_heads % self.num_kv_heads:
            raise CptjaxError(
                f"model config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise CptjaxError(f"model config: sliding_window must be positive, got {self.sliding_window}")
        if self.model_type not in ARCHITECTURES:
            raise CptjaxError(architecture_refusal(self.model_type))
        if self.hidden_act not in ACTIVATIONS:
            raise CptjaxError(f"model config: hidden_act {self.hidden_act!r} is not supported "
                              f"(one of {', '.join(ACTIVATIONS)})")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise CptjaxError(f"model config: layer_types must list one of {', '.join(LAYER_TYPES)} "
                                  f"for each of the {self.num_layers} layers, got {list(self.layer_types)}")
            if len(set(self.layer_types)) == 1 or self.sliding_window is None:
                raise CptjaxError("model config: layer_types is for layers that mix sliding and full "
                                  "attention, with a sliding_window; leave it empty otherwise")
        dense = list(self.dense_layers)
        if dense and (not self.num_experts or dense != sorted(set(dense)) or dense[0] < 0
                      or dense[-1] >= self.num_layers or len(dense) == self.num_layers):
            raise CptjaxError(f"model config: dense_layers must be sorted distinct layer indices of an MoE model, "
                              f"leaving some layers with experts; got {list(self.dense_layers)}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise CptjaxError(f"model config: experts_per_token must be in 1..num_experts ({self.num_experts}), "
                              f"got {self.experts_per_token}")
        if self.qk_norm_all_heads and not self.qk_norm:
            raise CptjaxError("model config: qk_norm_all_heads needs qk_norm")
        if self.post_norms and self.gemma_norms:
            raise CptjaxError("model config: post_norms (OLMo 2) and gemma_norms (Gemma 2) exclude each other")
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                     "sliding_rope_theta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise CptjaxError(f"model config: {name} must be positive or null, got {value!r}")

    @property
    def num_tokens(self) -> int:
        """The ids a tokenizer may give and the model may predict: real_vocab_size, else vocab_size."""
        return self.vocab_size if self.real_vocab_size is None else self.real_vocab_size

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full causal attention)."""
        if not self.layer_types:
            return (self.sliding_window,) * self.num_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in self.layer_types)

    @property
    def attention_windows(self) -> tuple[int | None, ...]:
        """The distinct windows of the layers, in order of first use: the branches each layer's
        attention chooses among (`layer_window_index`)."""
        return tuple(dict.fromkeys(self.layer_windows))

    @property
    def layer_window_index(self) -> tuple[int, ...]:
        """Per layer, its window's index in `attention_windows`."""
        return tuple(self.attention_windows.index(w) for w in self.layer_windows)

    @property
    def layer_ropes(self) -> tuple[RopeConfig, ...]:
        """Each layer's RoPE: `rope`, or for Gemma 3's sliding layers default RoPE at sliding_rope_theta."""
        if self.sliding_rope_theta is None:
            return (self.rope,) * self.num_layers
        local = RopeConfig(theta=self.sliding_rope_theta)
        return tuple(self.rope if w is None else local for w in self.layer_windows)

    @property
    def ropes(self) -> tuple[RopeConfig, ...]:
        """The distinct RoPEs of the layers, in order of first use (`layer_rope_index` picks one)."""
        return tuple(dict.fromkeys(self.layer_ropes))

    @property
    def layer_rope_index(self) -> tuple[int, ...]:
        return tuple(self.ropes.index(r) for r in self.layer_ropes)

    @property
    def mixed_mlps(self) -> bool:
        """An MoE model some of whose layers have a dense MLP: each kind's weights are stacked over
        its own layers, and each layer picks its kind (transformer.py)."""
        return bool(self.num_experts and self.dense_layers)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.num_experts and i not in self.dense_layers)

    @property
    def expert_size(self) -> int:
        """M: each expert's hidden size."""
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def attention_scale(self) -> float:
        """The factor on q . k: query_pre_attn_scalar ** -0.5 where the config sets it, else head_dim's."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def hf_architecture(self) -> str:
        return ARCHITECTURES[self.model_type].hf_class

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Builds the config from an HF config dict; `source` names the file in error messages."""
        return _from_hf_config(hf, source)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF config dict, in the spelling both transformers 4 and 5 read (rope_theta/rope_scaling)."""
        return _to_hf_config(self)


def read_hf_config(hf_dir: PathLike) -> ModelConfig:
    """Reads `hf_dir/config.json`, with an error that names the file for every way it can be wrong."""
    hf_dir = user_path(hf_dir)
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise CptjaxError(f"{hf_dir}: no such directory; pass the folder that holds config.json "
                          "and the *.safetensors files")
    if not path.is_file():
        raise CptjaxError(f"{path}: missing; an HF model folder needs its config.json")
    return read_hf_config_file(path)


def read_hf_config_file(path: PathLike) -> ModelConfig:
    """Reads one HF config.json file (the folder's, or a standalone one for training from scratch)."""
    path = user_path(path)
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CptjaxError(f"{path}: not valid JSON ({err}); restore the file from the model's source")
    if not isinstance(hf, dict):
        raise CptjaxError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return ModelConfig.from_hf_config(hf, str(path))


def extend_context(cfg: ModelConfig, rope: RopeOverrides, max_position_embeddings: int | None) -> ModelConfig:
    """`cfg` with a run's RoPE and length keys (`model.rope`, `model.max_position_embeddings`)
    applied: the one place a run's model config departs from the loaded one."""
    new_rope = override_rope(cfg.rope, rope, original_len=cfg.max_position_embeddings)
    if ARCHITECTURES[cfg.model_type].only_default_rope and new_rope.type != "default":
        raise CptjaxError(f"model.rope.type: {new_rope.type!r} cannot be exported as a {cfg.model_type} model "
                          "(transformers reads any rope_scaling of one as longrope); raise model.rope.theta "
                          "to extend its context instead")
    length = cfg.max_position_embeddings if max_position_embeddings is None else max_position_embeddings
    return dataclasses.replace(cfg, rope=new_rope, max_position_embeddings=length)


def _require(hf: dict, key: str, source: str, kind=int):
    if key not in hf or hf[key] is None:
        raise CptjaxError(f"{source}: missing key {key!r}")
    value = hf[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise CptjaxError(f"{source}: key {key!r} must be an integer, got {value!r}")
    if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise CptjaxError(f"{source}: key {key!r} must be a number, got {value!r}")
    return value


def _optional_number(hf: dict, key: str, source: str) -> float | None:
    value = hf.get(key)
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
        raise CptjaxError(f"{source}: {key} must be a positive number or null, got {value!r}")
    return value  # as written: transformers' config classes check int against float


def _recorded_dtype(hf: dict) -> str | None:
    """transformers 5 writes `dtype`, earlier versions `torch_dtype`; "auto" or none records nothing."""
    recorded = hf.get("dtype") or hf.get("torch_dtype")
    return recorded if recorded in FLOAT_NAMES else None


def _from_hf_config(hf: dict[str, Any], source: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CptjaxError(f"{source}: " + architecture_refusal(model_type))
    arch = ARCHITECTURES[model_type]
    hf = with_defaults(hf, arch)
    archs = hf.get("architectures")
    if archs is not None and archs != [arch.hf_class]:
        raise CptjaxError(f"{source}: architectures {archs} do not match model_type {model_type!r} "
                          f"(expected [{arch.hf_class!r}]); only causal-LM checkpoints are supported")
    act = hf.get(arch.act_key) or arch.default_act
    act = "silu" if act == "swish" else act
    if act not in ACTIVATIONS:
        raise CptjaxError(f"{source}: {arch.act_key} {act!r} is not supported (one of {', '.join(ACTIVATIONS)})")
    if hf.get("use_bidirectional_attention"):
        raise CptjaxError(f"{source}: use_bidirectional_attention is not supported; cptjax trains causal "
                          "decoders (set it to false or null)")
    hidden = _require(hf, "hidden_size", source)
    heads = _require(hf, "num_attention_heads", source)
    num_layers = _require(hf, "num_hidden_layers", source)
    head_dim = hf.get("head_dim") or None
    if head_dim is None:
        if hidden % heads:
            raise CptjaxError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads "
                              f"{heads}; set head_dim explicitly")
        head_dim = hidden // heads
    eos = hf.get("eos_token_id")
    if arch.only_default_rope:
        refuse_scaled_rope(hf, model_type, source)
    sliding_rope_theta = None
    if arch.sliding_rope_base:
        hf, sliding_rope_theta = split_layer_rope(hf, source)
        sliding_rope_theta = _optional_number({"rope_local_base_freq": sliding_rope_theta},
                                              "rope_local_base_freq", source)
    rope = rope_from_hf(hf, source)
    sliding_window, layer_types = parse_layer_windows(hf, arch, num_layers, source)
    experts = parse_experts(hf, arch, num_layers, source)
    modeled = _MODELED_KEYS | ({"original_max_position_embeddings"} if rope.type in ("llama3", "yarn") else set())
    extra = {k: v for k, v in hf.items() if k not in modeled}
    try:
        return ModelConfig(
            vocab_size=_require(hf, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=_require(hf, "intermediate_size", source),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=_require(hf, "max_position_embeddings", source),
            rms_norm_eps=float(_require(hf, "rms_norm_eps", source, float)),
            rope=rope,
            sliding_rope_theta=None if sliding_rope_theta is None else float(sliding_rope_theta),
            qkv_bias=flag(hf, arch.qkv_bias, source),
            o_bias=flag(hf, arch.o_bias, source),
            mlp_bias=flag(hf, arch.mlp_bias, source),
            qk_norm=arch.qk_norm,
            qk_norm_all_heads=arch.qk_norm_all_heads,
            sliding_window=sliding_window,
            layer_types=layer_types,
            hidden_act=act,
            gemma_norms=arch.gemma_norms,
            post_norms=arch.post_norms,
            fused_projections=arch.fused_projections,
            query_pre_attn_scalar=_optional_number(hf, "query_pre_attn_scalar", source),
            attn_logit_softcapping=_optional_number(hf, "attn_logit_softcapping", source),
            final_logit_softcapping=_optional_number(hf, "final_logit_softcapping", source),
            **experts,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", arch.tied_by_default)),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            dtype=_recorded_dtype(hf),
            hf_extra_json=json.dumps(extra, sort_keys=True),
            real_vocab_size=hf.get("real_vocab_size"),
        )
    except CptjaxError as err:  # __post_init__'s checks, now naming the file
        message = str(err)
        if message.startswith(source):
            raise
        raise CptjaxError(f"{source}: {message.removeprefix('model config: ')}") from None


def _to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    arch = ARCHITECTURES[cfg.model_type]
    hf: dict[str, Any] = json.loads(cfg.hf_extra_json)
    hf.update({
        "architectures": [arch.hf_class],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope.theta,
        "rope_scaling": rope_to_hf(cfg.rope),
        arch.act_key: cfg.hidden_act,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
    })
    if cfg.pad_token_id is not None:
        hf["pad_token_id"] = cfg.pad_token_id
    if cfg.real_vocab_size is not None:  # a cptjax checkpoint's only: HF exports are unpadded
        hf["real_vocab_size"] = cfg.real_vocab_size
    if cfg.dtype is not None:  # both spellings: transformers 4 reads torch_dtype, 5 writes dtype
        hf["torch_dtype"] = hf["dtype"] = cfg.dtype
    if isinstance(arch.qkv_bias, str):
        hf[arch.qkv_bias] = cfg.qkv_bias
    if isinstance(arch.mlp_bias, str):
        hf[arch.mlp_bias] = cfg.mlp_bias
    for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
        value = getattr(cfg, key)
        if value is not None or key in dict(arch.defaults):  # a null the config class would fill
            hf[key] = value
    if arch.sliding_rope_base:
        hf["rope_local_base_freq"] = cfg.sliding_rope_theta
    hf.update(expert_keys(arch, cfg))
    return hf | layer_window_keys(arch, cfg.sliding_window, cfg.layer_windows)
