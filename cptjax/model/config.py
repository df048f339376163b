"""The model's hyperparameters, read from and written back to a Hugging Face `config.json`.

The model keys every behaviour on these fields (bias, qk-norm, rope type, sliding window, tied
embeddings), never on a model name. The one place that knows HF architecture names is
`ARCHITECTURES` below: it says what each HF class implies about fields its config does not spell out
(Qwen2 always has q/k/v biases, Qwen3 always has q/k RMSNorm).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from cptjax.core.dtypes import FLOAT_NAMES
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, user_path


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What an HF `model_type` implies about the structure of its layers."""

    hf_class: str
    qkv_bias: str | bool  # a config key to read, or a fixed value
    o_bias: str | bool
    mlp_bias: str | bool
    qk_norm: bool
    sliding_window: str  # 'never', 'all_layers' (Mistral) or 'layer_types' (Qwen2/3)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("LlamaForCausalLM", "attention_bias", "attention_bias", "mlp_bias", False, "never"),
    "mistral": Architecture("MistralForCausalLM", False, False, False, False, "all_layers"),
    "qwen2": Architecture("Qwen2ForCausalLM", True, False, False, False, "layer_types"),
    "qwen3": Architecture("Qwen3ForCausalLM", "attention_bias", "attention_bias", False, True, "layer_types"),
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REFUSED_ROPE_TYPES = ("dynamic", "yarn", "longrope", "su", "proportional", "mrope")

# Keys this module reads or writes itself; every other key of the source config.json is carried
# through unchanged so that an export keeps what the user's model had (initializer_range, use_cache...).
_MODELED_KEYS = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "attention_bias", "mlp_bias", "hidden_act", "tie_word_embeddings", "sliding_window",
    "use_sliding_window", "max_window_layers", "layer_types", "bos_token_id", "eos_token_id",
    "pad_token_id", "torch_dtype", "dtype", "partial_rotary_factor", "transformers_version",
})


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: `type` is one of SUPPORTED_ROPE_TYPES."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Dimension letters: V vocab, D model, F mlp, N query heads,
    K kv heads, H head dim, Ly layers."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None  # tokens a query sees, itself included (HF's convention)
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str | None = None  # the precision the source's config.json records: exports default to it
    hf_extra_json: str = "{}"  # source config keys this class does not model, kept for the export

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CptjaxError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise CptjaxError(
                f"model config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.rope.type not in SUPPORTED_ROPE_TYPES:
            raise CptjaxError(_rope_refusal(self.rope.type))
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise CptjaxError(f"model config: sliding_window must be positive, got {self.sliding_window}")
        if self.model_type not in ARCHITECTURES:
            raise CptjaxError(_architecture_refusal(self.model_type))

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


def _architecture_refusal(model_type: Any) -> str:
    supported = ", ".join(f"{t} ({a.hf_class})" for t, a in ARCHITECTURES.items())
    return (f"unsupported architecture: model_type {model_type!r}. "
            f"cptjax supports: {supported}; TinyLlama and SmolLM use model_type 'llama'")


def _rope_refusal(rope_type: str) -> str:
    return (f"unsupported rope type {rope_type!r}: cptjax implements {', '.join(SUPPORTED_ROPE_TYPES)} "
            f"and refuses {', '.join(REFUSED_ROPE_TYPES)} (their positions depend on sequence length "
            "or need attention scaling that is not implemented)")


def _require(hf: dict, key: str, source: str, kind=int):
    if key not in hf or hf[key] is None:
        raise CptjaxError(f"{source}: missing key {key!r}")
    value = hf[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise CptjaxError(f"{source}: key {key!r} must be an integer, got {value!r}")
    if kind is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise CptjaxError(f"{source}: key {key!r} must be a number, got {value!r}")
    return value


def _flag(hf: dict, spec: str | bool, source: str) -> bool:
    if isinstance(spec, bool):
        return spec
    value = hf.get(spec, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise CptjaxError(f"{source}: key {spec!r} must be true or false, got {value!r}")
    return value


def _parse_rope(hf: dict, source: str) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside it); the hub's files have
    # `rope_theta` plus an optional `rope_scaling`. Read either; if both, they must agree.
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise CptjaxError(f"{source}: rope_parameters must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise CptjaxError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
    merged: dict[str, Any] = dict(scaling or {})
    if params and scaling:
        kinds = {d.get("rope_type", d.get("type", "default")) for d in (params, scaling)}
        if len(kinds) > 1:
            raise CptjaxError(f"{source}: rope_scaling and rope_parameters name different rope types "
                              f"({' vs '.join(sorted(kinds))}); keep one of the two keys")
    if params:
        if "layer_types" in hf and any(k in params for k in ("full_attention", "sliding_attention")):
            raise CptjaxError(f"{source}: per-layer rope_parameters are not supported")
        merged.update(params)
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise CptjaxError(f"{source}: rope_theta must be a positive number, got {theta!r}")
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CptjaxError(f"{source}: " + _rope_refusal(rope_type))
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CptjaxError(f"{source}: partial_rotary_factor {partial} is not supported (only 1.0)")
    rope = RopeConfig(theta=float(theta), type=rope_type)
    if rope_type in ("linear", "llama3"):
        factor = merged.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise CptjaxError(f"{source}: rope scaling of type {rope_type!r} needs a positive 'factor'")
        rope = dataclasses.replace(rope, factor=float(factor))
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in merged:
                raise CptjaxError(f"{source}: rope scaling of type 'llama3' needs {key!r}")
        low, high = float(merged["low_freq_factor"]), float(merged["high_freq_factor"])
        if not high > low:
            raise CptjaxError(f"{source}: llama3 rope needs high_freq_factor > low_freq_factor")
        rope = dataclasses.replace(
            rope, low_freq_factor=low, high_freq_factor=high,
            original_max_position_embeddings=int(merged["original_max_position_embeddings"]))
    return rope


def _parse_sliding_window(hf: dict, arch: Architecture, num_layers: int, source: str) -> int | None:
    window = hf.get("sliding_window")
    if arch.sliding_window == "never" or window is None:
        return None
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise CptjaxError(f"{source}: sliding_window must be a positive integer or null, got {window!r}")
    if arch.sliding_window == "all_layers":
        return window
    # Qwen2/Qwen3: a window only where use_sliding_window is set, on layers >= max_window_layers,
    # or as listed in layer_types (transformers 5 writes that list out).
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if not hf.get("use_sliding_window", False):
            return None
        first = hf.get("max_window_layers", num_layers)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise CptjaxError(f"{source}: layer_types must list one entry per layer ({num_layers})")
    if not hf.get("use_sliding_window", False):
        return None
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return window
    raise CptjaxError(
        f"{source}: layers mix sliding-window and full attention (max_window_layers / layer_types); "
        "cptjax runs all layers under one scan and supports a window on all layers or on none")


def _recorded_dtype(hf: dict) -> str | None:
    """transformers 5 writes `dtype`, earlier versions `torch_dtype`; "auto" or none records nothing."""
    recorded = hf.get("dtype") or hf.get("torch_dtype")
    return recorded if recorded in FLOAT_NAMES else None


def _from_hf_config(hf: dict[str, Any], source: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CptjaxError(f"{source}: " + _architecture_refusal(model_type))
    arch = ARCHITECTURES[model_type]
    archs = hf.get("architectures")
    if archs is not None and archs != [arch.hf_class]:
        raise CptjaxError(f"{source}: architectures {archs} do not match model_type {model_type!r} "
                          f"(expected [{arch.hf_class!r}]); only causal-LM checkpoints are supported")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CptjaxError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
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
    extra = {k: v for k, v in hf.items() if k not in _MODELED_KEYS}
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
            rope=_parse_rope(hf, source),
            qkv_bias=_flag(hf, arch.qkv_bias, source),
            o_bias=_flag(hf, arch.o_bias, source),
            mlp_bias=_flag(hf, arch.mlp_bias, source),
            qk_norm=arch.qk_norm,
            sliding_window=_parse_sliding_window(hf, arch, num_layers, source),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            dtype=_recorded_dtype(hf),
            hf_extra_json=json.dumps(extra, sort_keys=True),
        )
    except CptjaxError as err:  # __post_init__'s checks, now naming the file
        message = str(err)
        if message.startswith(source):
            raise
        raise CptjaxError(f"{source}: {message.removeprefix('model config: ')}") from None


def _to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    arch = ARCHITECTURES[cfg.model_type]
    hf: dict[str, Any] = json.loads(cfg.hf_extra_json)
    rope_scaling = None
    if cfg.rope.type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": cfg.rope.factor}
    elif cfg.rope.type == "llama3":
        rope_scaling = {
            "rope_type": "llama3", "factor": cfg.rope.factor,
            "low_freq_factor": cfg.rope.low_freq_factor, "high_freq_factor": cfg.rope.high_freq_factor,
            "original_max_position_embeddings": cfg.rope.original_max_position_embeddings,
        }
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
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
    })
    if cfg.pad_token_id is not None:
        hf["pad_token_id"] = cfg.pad_token_id
    if cfg.dtype is not None:  # both spellings: transformers 4 reads torch_dtype, 5 writes dtype
        hf["torch_dtype"] = hf["dtype"] = cfg.dtype
    if isinstance(arch.qkv_bias, str):
        hf[arch.qkv_bias] = cfg.qkv_bias
    if isinstance(arch.mlp_bias, str):
        hf[arch.mlp_bias] = cfg.mlp_bias
    if arch.sliding_window == "all_layers":
        hf["sliding_window"] = cfg.sliding_window
    elif arch.sliding_window == "layer_types":
        hf["use_sliding_window"] = cfg.sliding_window is not None
        hf["sliding_window"] = cfg.sliding_window
        hf["max_window_layers"] = 0 if cfg.sliding_window is not None else cfg.num_layers
        kind = "sliding_attention" if cfg.sliding_window is not None else "full_attention"
        hf["layer_types"] = [kind] * cfg.num_layers
    return hf


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int):
    """The H/2 inverse frequencies, computed in float32 the way transformers does."""
    import numpy as np

    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(rope.factor), inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq
