"""`cptjax merge`: a CPT model interpolated back toward its base, one tensor at a time.

  linear  (1 - alpha) * base + alpha * tuned, in float32.
  slerp   per tensor, both flattened to vectors at angle theta:
          sin((1 - alpha) theta) / sin(theta) * base + sin(alpha theta) / sin(theta) * tuned.
          Where theta is ill-conditioned, that tensor is merged linearly instead: |cos theta| > 0.9995
          (nearly parallel or opposite vectors, the threshold mergekit uses) or a tensor of zeros.

alpha 0 and 1 return the base's and the tuned model's tensors themselves (no arithmetic), so they
reproduce them bit for bit. The two models must have the same architecture, shapes, vocabulary and
(where they carry one) tokenizer. The merge keeps the models' stored dtype when they agree, else
float32 (which holds both exactly), unless `dtype` says otherwise; the tuned model's config,
tokenizer and generation files travel with it.

The HF writer streams: each output tensor is read from both models, merged and written before the
next is read. A cptjax checkpoint (Orbax) is saved from the whole merged tree, so that form holds
the merged model in memory once (as `cptjax convert hf-to-orbax` does). Either way the output
folder appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
from etils import epath

from cptjax.core.atomic_dir import atomic_output_dir, check_output_dir
from cptjax.core.dtypes import dtype_name, float_dtype
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike
from cptjax.core.progress import progress_bar
from cptjax.hf.keymap import grouped_key_map
from cptjax.hf.write import copy_assets, write_hf_dir
from cptjax.io.checkpoint import ASSETS_DIR, save_params_checkpoint
from cptjax.io.weights import Weights, open_weights, parse_model_arg
from cptjax.measure.model_tokenizers import check_tokenizers, check_vocabulary
from cptjax.model.config import ModelConfig
from cptjax.model.transformer import ParamPath, set_param

Method = Literal["linear", "slerp"]
METHODS = ("linear", "slerp")
Format = Literal["checkpoint", "hf"]
PARALLEL_COS = 0.9995  # slerp falls back to linear above this |cos theta|
# ModelConfig fields that describe a model's files, not its computation: they may differ.
_METADATA_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "dtype", "hf_extra_json")
# ... and those a context-extending run changes (model.rope, model.max_position_embeddings): no shape
# depends on them, so it still merges with and compares to its base; a merge keeps the tuned model's.
_CONTEXT_FIELDS = ("rope", "max_position_embeddings")


def check_alpha(alpha: float) -> float:
    if not 0 <= alpha <= 1:  # NaN fails too
        raise CptjaxError(f"--alpha {alpha:g}: must be in [0, 1] (0: the base, 1: the tuned model)")
    return float(alpha)


def parse_alphas(text: str) -> list[float]:
    """'0,0.25,1' -> [0.0, 0.25, 1.0], each checked."""
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise CptjaxError(f"--alpha {text!r}: expected a number in [0, 1] or a comma-separated list such "
                          "as 0,0.25,0.5,0.75,1") from None
    if not alphas:
        raise CptjaxError("--alpha: give a number in [0, 1]")
    return [check_alpha(a) for a in alphas]


def merge_tensor(base: np.ndarray, tuned: np.ndarray, alpha: float, method: Method, dtype) -> np.ndarray:
    """One merged tensor in `dtype`."""
    if alpha == 0:
        return base.astype(dtype, copy=False)
    if alpha == 1:
        return tuned.astype(dtype, copy=False)
    b, t = base.astype(np.float32), tuned.astype(np.float32)
    if method == "slerp":
        weights = slerp_weights(b, t, alpha)
        if weights is not None:
            return (weights[0] * b.astype(np.float64) + weights[1] * t.astype(np.float64)).astype(dtype)
    return (np.float32(1 - alpha) * b + np.float32(alpha) * t).astype(dtype)


def slerp_weights(base: np.ndarray, tuned: np.ndarray, alpha: float) -> tuple[float, float] | None:
    """(weight of base, weight of tuned) of spherical interpolation, or None where the angle is
    ill-conditioned (a zero tensor, or |cos theta| > PARALLEL_COS): merge linearly there."""
    b, t = base.reshape(-1).astype(np.float64), tuned.reshape(-1).astype(np.float64)
    norms = np.linalg.norm(b) * np.linalg.norm(t)
    if norms == 0:
        return None
    cos = float(np.clip(np.dot(b, t) / norms, -1.0, 1.0))
    if abs(cos) > PARALLEL_COS:
        return None
    theta = np.arccos(cos)
    return float(np.sin((1 - alpha) * theta) / np.sin(theta)), float(np.sin(alpha * theta) / np.sin(theta))


@dataclasses.dataclass
class MergePair:
    """The base and the tuned model, opened and checked to fit each other."""

    base: Weights
    tuned: Weights
    dtype: np.dtype  # of the merged tensors

    @property
    def config(self) -> ModelConfig:
        return dataclasses.replace(self.tuned.config, dtype=dtype_name(self.dtype))

    def paths(self) -> list[ParamPath]:
        return list(grouped_key_map(self.tuned.config))

    def merged(self, path: ParamPath, alpha: float, method: Method) -> np.ndarray:
        base, tuned = self.base.read_one(path), self.tuned.read_one(path)
        if base.shape != tuned.shape:  # the configs agree, so only the files can disagree
            raise CptjaxError(f"parameter {'/'.join(path)}: --base has shape {list(base.shape)}, --tuned "
                              f"{list(tuned.shape)}")
        return merge_tensor(base, tuned, alpha, method, self.dtype)

    def close(self) -> None:
        self.base.close()
        self.tuned.close()

    def __enter__(self) -> MergePair:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_pair(base: str, tuned: str, dtype: str | None = None) -> MergePair:
    """Opens --base and --tuned (PATH or PATH@STEP) and checks that they can be merged."""
    if dtype is not None:
        float_dtype(dtype, "--dtype")
    opened = []
    try:
        for text, flag in ((base, "--base"), (tuned, "--tuned")):
            path, step, ema = parse_model_arg(text, flag)
            opened.append(open_weights(path, step, flag=flag, step_flag=f"{flag} PATH@STEP", ema=ema))
        check_same_architecture(*opened)
        check_tokenizers(opened, ("--base", "--tuned"))
        stored = {np.dtype(opened[0].read_one(("norm",)).dtype), np.dtype(opened[1].read_one(("norm",)).dtype)}
        target = float_dtype(dtype, "--dtype") if dtype else (stored.pop() if len(stored) == 1 else np.float32)
        return MergePair(opened[0], opened[1], np.dtype(target))
    except BaseException:
        for weights in opened:
            weights.close()
        raise


def check_same_architecture(base: Weights, tuned: Weights) -> None:
    check_vocabulary(base.config, tuned.config, ("--base", "--tuned"))
    for field in dataclasses.fields(ModelConfig):
        a, b = getattr(base.config, field.name), getattr(tuned.config, field.name)
        if field.name not in _METADATA_FIELDS + _CONTEXT_FIELDS and a != b:
            raise CptjaxError(f"--tuned {tuned.describe()}: {field.name} is {b}, but {a} in --base; a merge "
                              "or a comparison of weights needs two models of the same architecture and shapes")


def write_merge(base: str, tuned: str, alpha: float, out: PathLike, *, method: Method = "linear",
                fmt: Format = "checkpoint", dtype: str | None = None, max_shard_size: str = "5GB") -> epath.Path:
    """Writes the merge at `alpha` to the new folder `out` as a cptjax checkpoint or an HF folder."""
    check_alpha(alpha)
    if method not in METHODS:
        raise CptjaxError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    out = check_output_dir(out)
    with open_pair(base, tuned, dtype) as pair, atomic_output_dir(out) as tmp:
        if fmt == "hf":
            write_hf_dir(tmp, pair.config, lambda path: pair.merged(path, alpha, method), dtype=pair.dtype,
                         max_shard_size=max_shard_size, assets_dir=pair.tuned.assets_dir,
                         progress=progress_bar(f"merging (alpha {alpha:g}, {method})"))
        else:
            params: dict = {}
            for path in progress_bar(f"merging (alpha {alpha:g}, {method})")(pair.paths()):
                set_param(params, path, pair.merged(path, alpha, method))
            save_params_checkpoint(tmp, 0, pair.config, params)
            (tmp / ASSETS_DIR).mkdir()
            copy_assets(pair.tuned.assets_dir, tmp / ASSETS_DIR)
    return out
