"""Rotary position embeddings: the RoPE part of a model's config, read from an HF `config.json`,
changed by a run's `model.rope` keys, written back for the export, turned into the inverse
frequencies and the cos/sin scale exactly as transformers computes them, and applied to q and k.

Types: `default`, `linear` (position interpolation), `llama3`, `yarn` (Peng et al. 2023). Dynamic
NTK scaling is refused: its frequencies follow the length of the sequence being run, so training
and inference disagree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cptjax.core.errors import CptjaxError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
REFUSED_ROPE_TYPES = ("dynamic", "longrope", "su", "proportional", "mrope")

# The keys each type reads (theta: all of them); the rest of RopeConfig keeps its defaults.
TYPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
             "truncate"),
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: `type` is one of SUPPORTED_ROPE_TYPES; field names are HF's."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0  # linear, llama3, yarn: how many times the original context
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3, yarn: the context before scaling
    beta_fast: float = 32.0  # yarn: dimensions turning more often than this over the context keep their frequency
    beta_slow: float = 1.0  # yarn: ... less often than this are interpolated by `factor`
    attention_factor: float | None = None  # yarn: the cos/sin scale; None: 0.1 ln(factor) + 1
    truncate: bool = True  # yarn: the ramp's ends rounded to whole dimensions

    def __post_init__(self):
        if self.type not in SUPPORTED_ROPE_TYPES:
            raise CptjaxError(rope_refusal(self.type))
        if not _is_number(self.theta) or self.theta <= 0:
            raise CptjaxError(f"rope_theta must be a positive number, got {self.theta!r}")
        if self.type != "default" and (not _is_number(self.factor) or self.factor <= 0):
            raise CptjaxError(f"rope scaling of type {self.type!r} needs a positive 'factor', got {self.factor!r}")
        if self.type in ("llama3", "yarn"):
            original = self.original_max_position_embeddings
            if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
                raise CptjaxError(f"rope scaling of type {self.type!r} needs 'original_max_position_embeddings' "
                                  f"(a positive integer: the context before scaling), got {original!r}")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise CptjaxError("llama3 rope needs high_freq_factor > low_freq_factor")
        if self.type == "yarn":
            if not (_is_number(self.beta_fast) and _is_number(self.beta_slow) and self.beta_fast >= self.beta_slow > 0):
                raise CptjaxError(f"yarn rope needs beta_fast >= beta_slow > 0, got beta_fast {self.beta_fast!r}, "
                                  f"beta_slow {self.beta_slow!r}")
            if self.attention_factor is not None and (not _is_number(self.attention_factor)
                                                      or self.attention_factor <= 0):
                raise CptjaxError(f"yarn's attention_factor must be a positive number, got {self.attention_factor!r}")
            if not isinstance(self.truncate, bool):
                raise CptjaxError(f"yarn's truncate must be true or false, got {self.truncate!r}")


@dataclasses.dataclass(frozen=True)
class RopeOverrides:
    """`model.rope`: this run's changes to the loaded model's RoPE; a key left null keeps the model's.
    Changing `type` starts that type's keys from their defaults (transformers')."""

    theta: float | None = None  # the RoPE base (rope_theta); raising it extends the context (ABF)
    type: str | None = None  # default, linear, llama3 or yarn; dynamic is refused for training
    factor: float | None = None  # linear, llama3, yarn: how many times the original context (needed to change type)
    original_max_position_embeddings: int | None = None  # llama3, yarn: context before scaling (default: the model's)
    low_freq_factor: float | None = None  # llama3: wavelengths above original/this are divided by factor
    high_freq_factor: float | None = None  # llama3: wavelengths below original/this are kept
    beta_fast: float | None = None  # yarn: rotations over the original context above which a frequency is kept (32)
    beta_slow: float | None = None  # yarn: rotations below which a frequency is interpolated by factor (1)
    attention_factor: float | None = None  # yarn: the cos/sin scale (default 0.1 ln(factor) + 1)
    truncate: bool | None = None  # yarn: round the ramp's ends to whole dimensions (default true)

    def __post_init__(self):
        if self.type is not None and self.type not in SUPPORTED_ROPE_TYPES:
            raise CptjaxError("model.rope.type: " + rope_refusal(self.type))
        for key, value in self.given().items():
            if key not in ("type", "truncate") and value <= 0:
                raise CptjaxError(f"model.rope.{key}: must be positive, got {value}")

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


def override_rope(rope: RopeConfig, changes: RopeOverrides, original_len: int) -> RopeConfig:
    """`rope` with a run's `changes`; `original_len` (the loaded model's max_position_embeddings)
    is the original context of a type newly switched to llama3 or yarn. Errors name the key."""
    given = changes.given()
    new_type = given.pop("type", rope.type)
    for key in given:
        if key != "theta" and key not in TYPE_KEYS[new_type]:
            users = ", ".join(t for t, keys in TYPE_KEYS.items() if key in keys)
            raise CptjaxError(f"model.rope.{key}: used by rope type {users}, not {new_type!r}; "
                              "set model.rope.type or leave the key out")
    if new_type == rope.type:
        start = dataclasses.asdict(rope)
    else:
        if new_type != "default" and "factor" not in given:
            raise CptjaxError(f"model.rope.factor: required when model.rope.type changes from {rope.type!r} "
                              f"to {new_type!r} (how many times the original context)")
        start = {"theta": rope.theta}
        if new_type in ("llama3", "yarn"):
            start["original_max_position_embeddings"] = original_len
    try:
        return RopeConfig(**{**start, **given, "type": new_type})
    except CptjaxError as err:
        raise CptjaxError(f"model.rope: {err}") from None


def rope_refusal(rope_type: Any) -> str:
    if rope_type == "dynamic":
        return ("rope type 'dynamic' (dynamic NTK scaling) is refused: its frequencies change with the length of "
                "the sequence being run, so a model trained at one length would see other positions at inference; "
                "to extend the context raise the RoPE base (model.rope.theta) or use yarn (model.rope.type: yarn)")
    return (f"unsupported rope type {rope_type!r}: cptjax implements {', '.join(SUPPORTED_ROPE_TYPES)} "
            f"and refuses {', '.join(REFUSED_ROPE_TYPES)}")


def rope_from_hf(hf: dict, source: str) -> RopeConfig:
    """The RopeConfig of an HF config dict, read as transformers reads it; `source` names the file."""
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
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CptjaxError(f"{source}: " + rope_refusal(rope_type))
    partial = merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise CptjaxError(f"{source}: partial_rotary_factor {partial} is not supported (only 1.0)")
    fields = {"theta": merged.get("rope_theta", hf.get("rope_theta", 10000.0)), "type": rope_type}
    if rope_type != "default":
        fields["factor"] = merged.get("factor")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in merged:
                raise CptjaxError(f"{source}: rope scaling of type 'llama3' needs {key!r}")
            fields[key] = merged[key]
    if rope_type in ("llama3", "yarn"):
        # transformers: a top-level original_max_position_embeddings wins (Phi-3 writes it there);
        # yarn without one anywhere scales from max_position_embeddings.
        fields["original_max_position_embeddings"] = hf.get("original_max_position_embeddings") or merged.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings"))
    if rope_type == "yarn":
        fields.update(beta_fast=merged.get("beta_fast") or 32.0, beta_slow=merged.get("beta_slow") or 1.0,
                      truncate=merged.get("truncate", True), attention_factor=merged.get("attention_factor"))
        mscale, mscale_all_dim = merged.get("mscale"), merged.get("mscale_all_dim")
        if fields["attention_factor"] is None and mscale and mscale_all_dim and _is_number(fields["factor"]):
            fields["attention_factor"] = _yarn_mscale(fields["factor"], mscale) / _yarn_mscale(
                fields["factor"], mscale_all_dim)
    for key, value in fields.items():  # JSON's 8 and 8.0 alike: floats, and a whole-number length
        if key == "original_max_position_embeddings":
            fields[key] = int(value) if isinstance(value, float) and value.is_integer() else value
        elif key not in ("type", "truncate") and _is_number(value):
            fields[key] = float(value)
    try:
        return RopeConfig(**fields)
    except CptjaxError as err:
        raise CptjaxError(f"{source}: {err}") from None


def split_layer_rope(hf: dict, source: str) -> tuple[dict, float]:
    """Gemma 3's two RoPEs: (`hf` with the full-attention layers' RoPE as its only one, for
    `rope_from_hf`; the sliding layers' base). The hub spells them `rope_theta`/`rope_scaling` and
    `rope_local_base_freq`; transformers 5 writes `rope_parameters` keyed by layer type. The
    sliding layers' RoPE is unscaled in every published model; another type there is refused."""
    params = hf.get("rope_parameters")
    if not (isinstance(params, dict) and {"full_attention", "sliding_attention"} & params.keys()):
        return hf, hf["rope_local_base_freq"]
    local = params.get("sliding_attention") or {}
    if not isinstance(local, dict) or local.get("rope_type", local.get("type", "default")) != "default":
        raise CptjaxError(f"{source}: rope_parameters.sliding_attention must be default RoPE (cptjax scales only "
                          f"the full-attention layers' RoPE), got {local!r}")
    unmodeled = set(params) - {"full_attention", "sliding_attention"}
    if unmodeled:
        raise CptjaxError(f"{source}: rope_parameters keys {sorted(unmodeled)} are not layer types "
                          "(full_attention, sliding_attention)")
    single = {k: v for k, v in hf.items() if k != "rope_parameters"}
    if params.get("full_attention"):
        single["rope_parameters"] = params["full_attention"]
    return single, local.get("rope_theta", hf["rope_local_base_freq"])


def rope_to_hf(rope: RopeConfig) -> dict[str, Any] | None:
    """The `rope_scaling` entry of an HF config.json (rope_theta is written beside it)."""
    if rope.type == "default":
        return None
    out: dict[str, Any] = {"rope_type": rope.type}
    for key in TYPE_KEYS[rope.type]:
        value = getattr(rope, key)
        if value is not None and not (key == "truncate" and value):  # truncate: only when off (newer key)
            out[key] = value
    return out


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """The H/2 inverse frequencies, computed in float32 the way transformers does."""
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
    if rope.type == "yarn":
        return _yarn_inverse_frequencies(rope, head_dim)
    return inv_freq


def rope_attention_factor(rope: RopeConfig) -> float:
    """The scale transformers applies to cos and sin (yarn's mscale; 1 for the other types)."""
    if rope.type != "yarn":
        return 1.0
    return rope.attention_factor if rope.attention_factor is not None else _yarn_mscale(rope.factor)


def _yarn_inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    # transformers' _compute_yarn_parameters, step by step: dimensions that turn more than
    # beta_fast times over the original context keep their frequency (extrapolation), those below
    # beta_slow are divided by factor (interpolation), and a linear ramp blends the ones between.
    base, dim, original = rope.theta, head_dim, rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim))
    extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
    interpolation = (np.float32(1.0) / (np.float32(rope.factor) * pos_freqs)).astype(np.float32)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = (np.float32(1) - ramp).astype(np.float32)
    return (interpolation * (np.float32(1) - keep) + extrapolation * keep).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's Eq. 21, as transformers' yarn_get_mscale: 0.1 * mscale * ln(scale) + 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def rope_tables(rope: RopeConfig, head_dim: int, positions, dtype):
    """cos and sin [B, L, H] in `dtype` for the token positions [B, L]."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(rope, head_dim))  # [H/2]
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, H/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [B, L, H]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    scale = rope_attention_factor(rope)  # yarn's mscale; transformers scales cos/sin in float32
    if scale != 1.0:
        cos, sin = cos * jnp.float32(scale), sin * jnp.float32(scale)
    return cos.astype(dtype), sin.astype(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@jax.custom_vjp
def apply_rope(x, cos, sin):
    """x [B, L, N, H] rotated by the tables of `rope_tables`."""
    # HF's rotate-half convention (its checkpoints are permuted for it), so weights need no permutation.
    return x * cos[:, :, None, :] + _rotate_half(x) * sin[:, :, None, :]


def _apply_rope_forward(x, cos, sin):
    return apply_rope(x, cos, sin), (cos, sin)


def _apply_rope_backward(residuals, d_out):
    # rotate_half's transpose is -rotate_half, written directly (autodiff pads and adds the two
    # halves); the tables are functions of the positions only and get no gradient.
    cos, sin = residuals
    return d_out * cos[:, :, None, :] - _rotate_half(d_out * sin[:, :, None, :]), None, None


apply_rope.defvjp(_apply_rope_forward, _apply_rope_backward)
