"""The two conversions behind `cptjax convert`: HF -> cptjax checkpoint and back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from etils import epath

from cptjax.core.atomic_dir import atomic_output_dir, check_output_dir
from cptjax.core.dtypes import float_dtype
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, is_remote
from cptjax.core.progress import progress_bar
from cptjax.hf.verify import torch_available, verify_export
from cptjax.hf.write import copy_assets, parse_size, write_hf_dir
from cptjax.io.checkpoint import ASSETS_DIR, save_params_checkpoint
from cptjax.io.pretrained import PretrainedModel, params_to_dtype
from cptjax.io.weights import open_weights
from cptjax.measure.model_card import CARD, write_model_card
from cptjax.model.transformer import model_from_params


def hf_to_orbax(hf_dir: PathLike, out: PathLike, step: int = 0) -> epath.Path:
    """Converts an HF folder to a cptjax checkpoint at `out` (which must be new or empty)."""
    out = check_output_dir(out)
    with open_weights(hf_dir, flag="--hf-dir", kind="hf") as weights:
        params = weights.read(progress=progress_bar("reading safetensors"))
        with atomic_output_dir(out) as tmp:
            save_params_checkpoint(tmp, step, weights.config, params)
            (tmp / ASSETS_DIR).mkdir()
            copy_assets(weights.assets_dir, tmp / ASSETS_DIR)
    return out


@dataclass(frozen=True)
class ExportResult:
    out: epath.Path
    step: int
    files: list[str]
    max_logit_diff: float | None  # from --verify, else None


def orbax_to_hf(ckpt: PathLike, out: PathLike, step: int | None = None, dtype: str | None = None,
                max_shard_size: str | int = "5GB", verify: bool = False, ema: bool = False) -> ExportResult:
    """Exports one step of a cptjax checkpoint as an HF folder, restoring a parameter at a time;
    with `ema`, the EMA of the weights a training run (training.ema) saved in that step.

    `dtype` None keeps the precision the source model's config.json recorded (float32 where it
    recorded none), so HF -> cptjax -> HF is lossless by default."""
    out = check_output_dir(out)
    if dtype is not None:
        float_dtype(dtype, "--dtype")
    parse_size(max_shard_size)
    if verify and not torch_available():
        raise CptjaxError("--verify needs torch (pip install torch); run again without --verify to "
                          "export without checking")
    if verify and is_remote(out):
        raise CptjaxError(f"--verify: transformers reads local folders only, and --out {out} is remote; "
                          "export to a local folder to verify, then copy it")
    with open_weights(ckpt, step, flag="--ckpt", kind="checkpoint", ema=ema) as weights:
        target = float_dtype(dtype or weights.config.dtype or "float32", "--dtype")
        with atomic_output_dir(out) as tmp:
            files = write_hf_dir(tmp, weights.config, weights.read_one, dtype=target,
                                 max_shard_size=max_shard_size, assets_dir=weights.assets_dir,
                                 progress=progress_bar("writing safetensors"))
            if write_model_card(tmp, weights.path, weights.step, weights.config.hf_architecture, weights.ema):
                files.append(CARD)
        diff = None
        if verify:
            # The reference is cptjax on the exported (rounded) weights, computed in float32.
            params = params_to_dtype(params_to_dtype(weights.read(), target), np.float32)
            reference = PretrainedModel(weights.config, model_from_params(weights.config, params))
            diff = verify_export(out, reference.logits, weights.config.num_tokens)
        return ExportResult(out, weights.step, files, diff)
