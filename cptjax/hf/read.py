"""Reading an HF model folder's safetensors into cptjax parameters, one tensor at a time.

Every HF tensor must be consumed and every parameter produced, with names, shapes and dtypes checked
from the file headers before any tensor data is read, or the read fails naming the file and key.
Each tensor goes straight into its slot of the stacked parameter arrays (or, on a mesh, each process
reads only its devices' blocks of it: `load_hf_params_sharded`): no torch model, no second copy of
the weights.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, user_path
from cptjax.hf.keymap import KeyMapping, grouped_key_map
from cptjax.hf.safetensors import SafetensorsFile
from cptjax.model.config import ModelConfig
from cptjax.model.transformer import ParamPath, get_param, set_param

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
class HFTensors:
    """Checked headers: where each HF tensor is, grouped by cptjax parameter."""

    hf_dir: epath.Path
    located: dict[str, SafetensorsFile]
    groups: dict[ParamPath, list[KeyMapping]]
    tied_head: bool  # a tied model whose files still carry lm_head.weight

    def dtype(self, m: KeyMapping) -> np.dtype:
        return self.located[m.hf_name].tensors[m.hf_name].dtype

    def read(self, m: KeyMapping) -> np.ndarray:
        """One parameter's tensor (its part, where the HF tensor is fused) in cptjax's per-tensor
        shape and its stored dtype."""
        return m.take(self.located[m.hf_name].read(m.hf_name))

    def check_tied_head(self, embed: np.ndarray) -> None:
        if self.tied_head:
            head = self.located["lm_head.weight"].read("lm_head.weight")
            if not np.array_equal(head, embed):
                raise CptjaxError(f"{self.hf_dir}: config.json says tie_word_embeddings=true but "
                                  "lm_head.weight differs from model.embed_tokens.weight; fix "
                                  "tie_word_embeddings")


def open_hf_tensors(hf_dir: epath.Path, cfg: ModelConfig) -> HFTensors:
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
    return HFTensors(hf_dir, located, groups, tied_head)


def read_hf_params(hf_dir: PathLike, cfg: ModelConfig, progress: Progress | None = None) -> dict:
    """Reads an HF folder's weights into cptjax's nested parameter dict of NumPy arrays.

    Arrays keep the checkpoint's dtype (a bf16 checkpoint stays bf16).
    """
    tensors = open_hf_tensors(user_path(hf_dir), cfg)
    if tensors.tied_head:  # before the long read: a wrong config.json fails at once
        tensors.check_tied_head(tensors.read(tensors.groups[("embed_tokens",)][0]))
    params: dict = {}
    items = list(tensors.groups.items())
    for path, group in (progress(items) if progress else items):
        set_param(params, path, read_group(tensors, group))
    return params


def read_group(tensors: HFTensors, group: list[KeyMapping]) -> np.ndarray:
    """One cptjax parameter (stacked over layers if it is per-layer), in layer 0's stored dtype."""
    stacked = group[0].layer is not None
    array = np.empty(((len(group),) if stacked else ()) + group[0].shape, tensors.dtype(group[0]))
    for m in group:
        file = tensors.located[m.hf_name]
        dest = array[m.layer] if stacked else array
        if tensors.dtype(m) == array.dtype and m.fused is None:
            file.read_into(m.hf_name, dest.reshape(m.hf_shape))
        elif tensors.dtype(m) == array.dtype:  # a part of a fused tensor: its rows only
            file.read_block_into(m.hf_name, m.view_shape, m.file_index((slice(None),) * dest.ndim), dest)
        else:  # a layer stored in another dtype than layer 0: convert this one tensor
            dest[...] = tensors.read(m).astype(array.dtype)
    return array.reshape(_param_shape(group))


def _param_shape(group: list[KeyMapping]) -> tuple[int, ...]:
    """The cptjax parameter's shape: [Ly, *shape], [Ly, E, *shape] (experts) or the tensor's own."""
    m = group[0]
    if m.layer is None:
        return m.shape
    return (len(group) // (m.experts or 1), *m.stack, *m.shape)


def load_hf_params_sharded(hf_dir: PathLike, cfg: ModelConfig, shardings: dict, dtype,
                           progress: Progress | None = None) -> dict:
    """Reads an HF folder onto the devices, each checkpoint byte read by one process only.

    Each parameter is first read in its stored dtype onto a "read layout" that splits it in
    contiguous blocks over every device of the mesh (whole layers, row blocks or column blocks),
    each process reading only its devices' blocks (byte ranges of the safetensors files), so N
    hosts together read the checkpoint once, not N times. A tensor that no axis splits evenly over
    the devices (a norm of 896 over 256 devices, an odd vocabulary) is padded along one axis to a
    multiple of the device count in the read layout, the padding zeros and never read. One jitted
    copy then drops the padding, casts to `dtype` and lays the parameter out on its own sharding
    (the devices exchange the blocks; a replicated parameter reaches every device this way, over
    the interconnect, not by every host reading it). No host reads more than its devices' share.
    (One exception: a tied model whose files still hold lm_head.weight has both it and the
    embedding read whole by every process, to check they are equal.)
    """
    import jax

    tensors = open_hf_tensors(user_path(hf_dir), cfg)
    if tensors.tied_head:
        tensors.check_tied_head(tensors.read(tensors.groups[("embed_tokens",)][0]))
    params: dict = {}
    items = list(tensors.groups.items())
    for path, group in (progress(items) if progress else items):
        stacked = group[0].layer is not None
        shape = ((len(group),) if stacked else ()) + group[0].shape
        target = get_param(shardings, path)
        stored = tensors.dtype(group[0])
        if any(tensors.dtype(m) != stored for m in group):  # layers stored in several dtypes: rare
            stored = np.dtype(dtype)

        layout, padded = _read_layout(shape, target.mesh)

        def block(index, group=group, stacked=stacked, stored=stored, shape=shape, padded=padded):
            spans = [s.indices(n)[:2] for s, n in zip(index, padded)]
            real = tuple(slice(min(a, n), min(b, n)) for (a, b), n in zip(spans, shape))  # padding cut off
            rows = range(len(group))[real[0]] if stacked else [None]
            inner = real[1:] if stacked else real
            out = np.empty(tuple(s.stop - s.start for s in real), stored)
            for i, layer in enumerate(rows):
                m = group[layer if layer is not None else 0]
                dest = out[i] if stacked else out
                if tensors.dtype(m) == stored:
                    tensors.located[m.hf_name].read_block_into(m.hf_name, m.view_shape, m.file_index(inner),
                                                               dest)
                else:
                    dest[...] = tensors.read(m)[inner].astype(stored)
            if out.shape == tuple(b - a for a, b in spans):
                return out
            with_padding = np.zeros(tuple(b - a for a, b in spans), stored)
            with_padding[tuple(slice(0, n) for n in out.shape)] = out
            return with_padding

        read = jax.make_array_from_callback(padded, layout, block)  # experts' tensors as [Ly * E, ...]
        set_param(params, path, _cast_onto(target, np.dtype(dtype), shape, _param_shape(group))(read))
    return params


def _read_layout(shape: tuple[int, ...], mesh):
    """(sharding, padded shape): one contiguous block per device. The first axis (layers, rows,
    then columns) that the device count divides; if none does, the axis that wastes least when
    padded to a multiple of it (the shape returned is then padded there). Replicated only for a scalar."""
    from jax.sharding import NamedSharding, PartitionSpec

    n = mesh.size
    if not shape:
        return NamedSharding(mesh, PartitionSpec()), shape
    divisible = [axis for axis, size in enumerate(shape) if size % n == 0]
    if divisible:
        axis, padded = divisible[0], shape
    else:
        def waste(axis):
            return (-shape[axis] % n) * math.prod(shape[:axis] + shape[axis + 1:])
        axis = min(range(len(shape)), key=waste)
        padded = shape[:axis] + (shape[axis] + -shape[axis] % n,) + shape[axis + 1:]
    return NamedSharding(mesh, PartitionSpec(*(None,) * axis, tuple(mesh.axis_names))), padded


@functools.lru_cache(maxsize=64)
def _cast_onto(sharding, dtype, shape: tuple[int, ...], final: tuple[int, ...]):
    """A jitted copy onto `sharding` in `dtype`, keeping the first `shape` of each axis (the read
    layout's padding dropped), reshaped to the parameter's `final` shape."""
    import jax
    real = tuple(slice(0, n) for n in shape)
    return jax.jit(lambda x: x[real].reshape(final).astype(dtype), out_shardings=sharding)
