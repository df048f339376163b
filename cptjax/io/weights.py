"""Where weights come from, answered in one place: an HF model folder or a cptjax checkpoint.

`open_weights(path)` is what the trainer (`model.init_from`, resuming), `load_model`, `cptjax
convert` and the evaluation commands call. It decides what `path` is, and returns a `Weights`
with the model config, the tokenizer files' folder and ways to read the parameters: all on the
host (NumPy, stored dtype), one at a time (export), or straight onto device shardings (training).

  - an HF folder: `config.json` + `*.safetensors` (its tokenizer files beside them);
  - a cptjax checkpoint: an Orbax folder of finished steps (`<step>/params`, `<step>/model_config`,
    `hf_assets/` with the tokenizer), as `cptjax convert hf-to-orbax` or a training run writes it;
  - a training run's folder: its `checkpoints/` subfolder is used.

A training run with `training.ema` also keeps the EMA of its weights in each step; `ema=True`
(`PATH:ema`, `PATH@STEP:ema` on the command line, `--ema` for `cptjax convert`) reads that instead.
"""

from __future__ import annotations

from typing import Literal

import jax
import numpy as np
from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, user_path
from cptjax.hf.read import HFTensors, Progress, load_hf_params_sharded, open_hf_tensors, read_group, read_hf_params
from cptjax.io.checkpoint import ASSETS_DIR, EMA, PARAMS, CheckpointReader
from cptjax.io.run_layout import RunPaths
from cptjax.model.config import ModelConfig, read_hf_config
from cptjax.model.transformer import ParamPath


def find_kind(path: epath.Path) -> tuple[Literal["hf", "checkpoint"], epath.Path] | None:
    """("hf" | "checkpoint", the folder to read) for a path, or None if it is neither."""
    if (path / "config.json").is_file():
        return "hf", path
    for folder in (path, RunPaths(path).checkpoints):
        if folder.is_dir() and any(p.name.isdigit() and p.is_dir() for p in folder.iterdir()):
            return "checkpoint", folder
    return None


class Weights:
    """An opened source of weights; close it (or use `with`) when done."""

    def __init__(self, kind: Literal["hf", "checkpoint"], path: epath.Path, config: ModelConfig,
                 reader: CheckpointReader | None = None):
        self.kind = kind
        self.path = path
        self.config = config
        self._reader = reader
        self._tensors: HFTensors | None = None

    @property
    def step(self) -> int | None:
        """The checkpoint step being read (None for an HF folder)."""
        return None if self._reader is None else self._reader.step

    @property
    def assets_dir(self) -> epath.Path:
        """The folder that holds the tokenizer and generation files (if there are any)."""
        return self.path if self.kind == "hf" else self.path / ASSETS_DIR

    @property
    def tokenizer_dir(self) -> epath.Path | None:
        return self.assets_dir if (self.assets_dir / "tokenizer.json").is_file() else None

    @property
    def ema(self) -> bool:
        """Whether these are a training run's EMA of the weights."""
        return self._reader is not None and self._reader.item == EMA

    def describe(self) -> str:
        if self.kind == "hf":
            return str(self.path)
        return f"{self.path} (step {self.step}{', EMA of the weights' if self.ema else ''})"

    def read(self, progress: Progress | None = None) -> dict:
        """Every parameter as a NumPy array in its stored dtype, in a nested dict."""
        if self._reader is None:
            return read_hf_params(self.path, self.config, progress=progress)
        return self._reader.restore()

    def read_one(self, path: ParamPath) -> np.ndarray:
        """One (stacked) parameter in its stored dtype: for streaming exports and merges."""
        if self._reader is not None:
            return self._reader.restore_one(path)
        if self._tensors is None:
            self._tensors = open_hf_tensors(self.path, self.config)
        array = read_group(self._tensors, self._tensors.groups[path])
        if path == ("embed_tokens",):
            self._tensors.check_tied_head(array)
        return array

    def read_onto(self, abstract_params: dict, progress: Progress | None = None) -> dict:
        """Every parameter straight onto the sharding and dtype of `abstract_params`' leaves
        (ShapeDtypeStructs): each process reads only what its devices hold."""
        if self._reader is not None:  # Orbax reads each shard onto its device, cast on the way
            return self._reader.restore_onto(abstract_params)
        shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
        dtype = jax.tree.leaves(abstract_params)[0].dtype
        return load_hf_params_sharded(self.path, self.config, shardings, dtype, progress=progress)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> Weights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_weights(path: PathLike, step: int | None = None, *, flag: str = "--model",
                 step_flag: str | None = "--step", kind: Literal["hf", "checkpoint"] | None = None,
                 ema: bool = False) -> Weights:
    """Opens an HF folder or a cptjax checkpoint (the latest finished step, or `step`); with `ema`,
    the EMA of the weights that a training run with training.ema saved in that step.

    `flag` and `step_flag` are how the user named the path and the step, for messages. `kind`
    says what the caller needs (`cptjax convert` knows its direction); None accepts either.
    """
    path = user_path(path, flag)
    if not path.exists():
        raise CptjaxError(f"{flag} {path}: no such folder")
    if not path.is_dir():
        raise CptjaxError(f"{flag} {path}: is a file; give the folder that holds config.json and the "
                          "*.safetensors files, or a cptjax checkpoint folder")
    found = find_kind(path)
    if found is None and kind is None:
        raise CptjaxError(f"{flag} {path}: neither an HF model folder (no config.json) nor a cptjax "
                          "checkpoint (no finished step folders)")
    if found is not None and kind is not None and found[0] != kind:
        what = {"hf": "an HF model folder", "checkpoint": "a cptjax checkpoint"}
        raise CptjaxError(f"{flag} {path}: is {what[found[0]]}, not {what[kind]}")
    kind, folder = found or (kind, path)
    if kind == "hf":
        if ema:
            raise CptjaxError(f"{flag} {path}: is an HF folder, which holds no EMA of the weights; the EMA "
                              "(':ema', --ema) is read from a cptjax training run that set training.ema")
        if step is not None:
            raise CptjaxError(f"{step_flag} {step}: {path} is an HF folder, which has no steps; "
                              f"leave {step_flag} out")
        return Weights("hf", folder, read_hf_config(folder))
    reader = CheckpointReader(folder, step, flag=flag, step_flag=step_flag, item=EMA if ema else PARAMS)
    return Weights("checkpoint", folder, reader.config, reader)


def split_step(text: str, flag: str = "--model") -> tuple[epath.Path, int | None]:
    """A model argument as users write it: PATH, or PATH@STEP for one step of a cptjax checkpoint
    (a path that exists as written, '@' included, is taken as the path)."""
    path = user_path(text, flag)
    head, sep, step = text.rpartition("@")
    if sep and head and step.isdigit() and not path.exists():
        return user_path(head, flag), int(step)
    return path, None


EMA_SUFFIX = ":ema"


def parse_model_arg(text: str, flag: str = "--model") -> tuple[epath.Path, int | None, bool]:
    """A model argument as users write it: PATH or PATH@STEP (`split_step`), either followed by
    ':ema' for the EMA of a training run's weights (a path that exists as written is taken as the
    path). Returns (path, step, ema)."""
    ema = text.endswith(EMA_SUFFIX) and len(text) > len(EMA_SUFFIX) and not user_path(text, flag).exists()
    path, step = split_step(text[:-len(EMA_SUFFIX)] if ema else text, flag)
    return path, step, ema
