"""The two conversions behind `cptjax convert`: HF -> cptjax checkpoint and back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cptjax.atomic_dir import atomic_output_dir, check_output_dir
from cptjax.checkpoint import ASSETS_DIR, CheckpointReader, save_params_checkpoint
from cptjax.errors import CptjaxError
from cptjax.hf_convert import EXPORT_DTYPES, copy_assets, parse_size, read_hf_params, write_hf_dir
from cptjax.hf_parity import torch_available, verify_export
from cptjax.model import model_from_params
from cptjax.model_config import read_hf_config
from cptjax.progress import progress_bar
from cptjax.pretrained import PretrainedModel, params_to_dtype


def hf_to_orbax(hf_dir: str | Path, out: str | Path, step: int = 0) -> Path:
    """Converts an HF folder to a cptjax checkpoint at `out` (which must be new or empty)."""
    out = check_output_dir(out)
    hf_dir = Path(hf_dir)
    config = read_hf_config(hf_dir)
    params = read_hf_params(hf_dir, config, progress=progress_bar("reading safetensors"))
    with atomic_output_dir(out) as tmp:
        save_params_checkpoint(tmp, step, config, params)
        (tmp / ASSETS_DIR).mkdir()
        copy_assets(hf_dir, tmp / ASSETS_DIR)
    return out


@dataclass(frozen=True)
class ExportResult:
    out: Path
    step: int
    files: list[str]
    max_logit_diff: float | None  # from --verify, else None


def orbax_to_hf(ckpt: str | Path, out: str | Path, step: int | None = None, dtype: str = "bfloat16",
                max_shard_size: str | int = "5GB", verify: bool = False) -> ExportResult:
    """Exports one step of a cptjax checkpoint as an HF folder, restoring a parameter at a time."""
    out = check_output_dir(out)
    if dtype not in EXPORT_DTYPES:
        raise CptjaxError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    parse_size(max_shard_size)
    if verify and not torch_available():
        raise CptjaxError("--verify needs torch (pip install torch); run again without --verify to "
                          "export without checking")
    reader = CheckpointReader(ckpt, step)
    try:
        with atomic_output_dir(out) as tmp:
            files = write_hf_dir(tmp, reader.config, reader.restore_one, dtype=dtype,
                                 max_shard_size=max_shard_size, assets_dir=reader.assets_dir,
                                 progress=progress_bar("writing safetensors"))
        diff = None
        if verify:
            # The reference is cptjax on the exported (rounded) weights, computed in float32.
            params = params_to_dtype(params_to_dtype(reader.restore(), EXPORT_DTYPES[dtype]), np.float32)
            reference = PretrainedModel(reader.config, model_from_params(reader.config, params))
            diff = verify_export(out, reference.logits, reader.config.vocab_size)
    finally:
        reader.close()
    return ExportResult(out, reader.step, files, diff)
