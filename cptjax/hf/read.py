"""Reading an HF model folder's safetensors into cptjax parameters, one tensor at a time.

Every HF tensor must be consumed and every parameter produced, with names, shapes and dtypes checked
from the file headers before any tensor data is read, or the read fails naming the file and key.
Each tensor goes straight into its slot of the stacked parameter arrays (or onto its device shards):
no torch model, no second copy of the weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from etils import epath

from cptjax.errors import CptjaxError
from cptjax.hf.keymap import KeyMapping, grouped_key_map
from cptjax.hf.safetensors import SafetensorsFile
from cptjax.model import ParamPath, get_param, set_param
from cptjax.model_config import ModelConfig
from cptjax.paths import PathLike, user_path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some old exports carry that are recomputed from the config, not learned.
_RECOMPUTED_BUFFERS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

Progress = Callable[[Iterator], Iterator]


def find_weight_files(hf_dir: epath.Path) -> dict[str, SafetensorsFile]:
    """Opens the headers of every safetensors file: sharded (with the index) or single."""
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CptjaxError(f"{index}: malformed index ({err}); it needs a 'weight_map' object")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (hf_dir / name).is_file():
                raise CptjaxError(f"{index}: lists {name}, which is missing from {hf_dir}")
    else:
        names = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not names:
        pickled = sorted(p.name for p in hf_dir.iterdir() if p.suffix in PICKLED_SUFFIXES)
        if pickled:
            raise CptjaxError(
                f"{hf_dir}: holds only pickled weights ({', '.join(pickled)}); cptjax does not unpickle "
                "weights, since loading a pickle can run arbitrary code. Convert them once to "
                "safetensors in a trusted environment (transformers: "
                "model.save_pretrained(dir, safe_serialization=True)) and pass that folder")
        raise CptjaxError(f"{hf_dir}: no *.safetensors weights found")
    return {name: SafetensorsFile(hf_dir / name) for name in names}


@dataclass(frozen=True)
class ReadPlan:
    """Checked headers: where each HF tensor is, grouped by cptjax parameter."""

    hf_dir: epath.Path
    located: dict[str, SafetensorsFile]
    groups: dict[ParamPath, list[KeyMapping]]
    tied_head: bool  # a tied model whose files still carry lm_head.weight

    def dtype(self, m: KeyMapping) -> np.dtype:
        return self.located[m.hf_name].tensors[m.hf_name].dtype

    def read(self, m: KeyMapping) -> np.ndarray:
        """One tensor in cptjax's per-tensor shape and its stored dtype."""
        return self.located[m.hf_name].read(m.hf_name).reshape(m.shape)

    def check_tied_head(self, embed: np.ndarray) -> None:
        if self.tied_head:
            head = self.located["lm_head.weight"].read("lm_head.weight")
            if not np.array_equal(head, embed):
                raise CptjaxError(f"{self.hf_dir}: config.json says tie_word_embeddings=true but "
                                  "lm_head.weight differs from model.embed_tokens.weight; fix "
                                  "tie_word_embeddings")


def plan_read(hf_dir: epath.Path, cfg: ModelConfig) -> ReadPlan:
    """Opens and checks every header against the key map of `cfg`; reads no tensor data."""
    files = find_weight_files(hf_dir)
    located: dict[str, SafetensorsFile] = {}
    for file in files.values():
        for name in file.tensors:
            if name in located:
                raise CptjaxError(f"{hf_dir}: tensor {name!r} appears in both {located[name].path.name} "
                                  f"and {file.path.name}")
            located[name] = file
    groups = grouped_key_map(cfg)
    mappings = [m for group in groups.values() for m in group]
    expected = {m.hf_name for m in mappings}
    tied_head = cfg.tie_word_embeddings and "lm_head.weight" in located
    extra = sorted(n for n in located
                   if n not in expected and not _RECOMPUTED_BUFFERS.fullmatch(n)
                   and not (tied_head and n == "lm_head.weight"))
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise CptjaxError(f"{hf_dir}: tensor {extra[0]!r} in {located[extra[0]].path.name} has no place in "
                          f"a {cfg.hf_architecture} with this config.json{more}: "
                          f"{', '.join(extra[:3])}. Check that config.json matches the weights")
    missing = [m.hf_name for m in mappings if m.hf_name not in located]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CptjaxError(f"{hf_dir}: tensor {missing[0]!r} is missing from the safetensors files{more}; "
                          "the checkpoint is incomplete or config.json does not match it")
    for m in mappings:
        info = located[m.hf_name].tensors[m.hf_name]
        if info.shape != m.hf_shape:
            raise CptjaxError(f"{info.name!r} in {located[m.hf_name].path.name} has shape "
                              f"{list(info.shape)}, but config.json implies {list(m.hf_shape)}")
        if info.dtype.kind != "f" and info.dtype != ml_dtypes.bfloat16:
            raise CptjaxError(f"{info.name!r} in {located[m.hf_name].path.name} has dtype {info.dtype}; "
                              "weights must be floating point")
    return ReadPlan(hf_dir, located, groups, tied_head)


def read_hf_params(hf_dir: PathLike, cfg: ModelConfig, progress: Progress | None = None) -> dict:
    """Reads an HF folder's weights into cptjax's nested parameter dict of NumPy arrays.

    Arrays keep the checkpoint's dtype (a bf16 checkpoint stays bf16).
    """
    plan = plan_read(user_path(hf_dir), cfg)
    if plan.tied_head:  # before the long read: a wrong config.json fails at once
        plan.check_tied_head(plan.read(plan.groups[("embed_tokens",)][0]))
    params: dict = {}
    items = list(plan.groups.items())
    for path, group in (progress(items) if progress else items):
        set_param(params, path, read_group(plan, group))
    return params


def read_group(plan: ReadPlan, group: list[KeyMapping]) -> np.ndarray:
    """One cptjax parameter (stacked over layers if it is per-layer), in layer 0's stored dtype."""
    stacked = group[0].layer is not None
    array = np.empty(((len(group),) if stacked else ()) + group[0].shape, plan.dtype(group[0]))
    for m in group:
        file = plan.located[m.hf_name]
        dest = array[m.layer] if stacked else array
        if plan.dtype(m) == array.dtype:
            file.read_into(m.hf_name, dest.reshape(m.hf_shape))
        else:  # a layer stored in another dtype than layer 0: convert this one tensor
            dest[...] = plan.read(m).astype(array.dtype)
    return array


def load_hf_params_sharded(hf_dir: PathLike, cfg: ModelConfig, shardings: dict, dtype,
                           progress: Progress | None = None) -> dict:
    """Reads an HF folder straight onto the devices: each process reads only the tensors (layers)
    its devices hold, one at a time, and no host ever assembles the whole model."""
    import jax

    plan = plan_read(user_path(hf_dir), cfg)
    if plan.tied_head:
        plan.check_tied_head(plan.read(plan.groups[("embed_tokens",)][0]))
    params: dict = {}
    items = list(plan.groups.items())
    for path, group in (progress(items) if progress else items):
        stacked = group[0].layer is not None
        shape = ((len(group),) if stacked else ()) + group[0].shape
        cache: dict[int | None, np.ndarray] = {}  # devices on one host often want the same layer

        def tensor(layer, group=group, cache=cache):
            if layer not in cache:
                cache.clear()
                cache[layer] = plan.read(group[layer if layer is not None else 0]).astype(dtype)
            return cache[layer]

        def shard(index, stacked=stacked, shape=shape, tensor=tensor):
            if not stacked:
                return tensor(None)[index]
            layers = range(shape[0])[index[0]]
            return np.stack([tensor(i)[index[1:]] for i in layers])

        set_param(params, path, jax.make_array_from_callback(shape, get_param(shardings, path), shard))
    return params
