"""Hugging Face safetensors <-> cptjax parameters, streamed one tensor at a time.

Import reads each HF tensor straight into its slot of the stacked parameter arrays: no torch model,
no second copy of the weights. Every HF tensor must be consumed and every parameter produced, with
shapes checked from the headers before any byte is read, or the conversion fails naming the key.
Export writes sharded safetensors plus the index, config.json and generation_config.json that
transformers' AutoModelForCausalLM loads.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from cptjax.errors import CptjaxError
from cptjax.model import layer_weight_names, layer_weight_shape
from cptjax.model_config import ModelConfig
from cptjax.safetensors_io import SafetensorsFile, write_safetensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files that travel with the weights: tokenizer, chat template, generation defaults.
HF_ASSET_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
# Buffers some old exports carry that are recomputed from the config, not learned.
_RECOMPUTED_BUFFERS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
EXPORT_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}

ParamPath = tuple[str, ...]


@dataclass(frozen=True)
class KeyMapping:
    """One HF tensor and where it lives in cptjax's parameters (`layer` indexes a stacked array)."""

    hf_name: str
    path: ParamPath
    layer: int | None
    shape: tuple[int, ...]  # cptjax's per-tensor shape; HF's is the same bytes, heads flattened


_HF_LAYER_NAMES = {
    "input_layernorm": "input_layernorm.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
    "q_proj_bias": "self_attn.q_proj.bias", "k_proj_bias": "self_attn.k_proj.bias",
    "v_proj_bias": "self_attn.v_proj.bias", "o_proj_bias": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight", "gate_proj_bias": "mlp.gate_proj.bias",
    "up_proj_bias": "mlp.up_proj.bias", "down_proj_bias": "mlp.down_proj.bias",
}


def key_map(cfg: ModelConfig) -> list[KeyMapping]:
    """Every HF tensor of this config, grouped by cptjax parameter (the order export writes them)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out = [KeyMapping("model.embed_tokens.weight", ("embed_tokens",), None, (v, d))]
    for name in layer_weight_names(cfg):
        shape = layer_weight_shape(cfg, name)
        out += [KeyMapping(f"model.layers.{i}.{_HF_LAYER_NAMES[name]}", ("layers", name), i, shape)
                for i in range(cfg.num_layers)]
    out.append(KeyMapping("model.norm.weight", ("norm",), None, (d,)))
    if not cfg.tie_word_embeddings:
        out.append(KeyMapping("lm_head.weight", ("lm_head",), None, (v, d)))
    return out


def _hf_shape(mapping: KeyMapping) -> tuple[int, ...]:
    """HF flattens heads into the output (or input) dimension of each projection."""
    name, shape = mapping.path[-1], mapping.shape
    if name in ("q_proj", "k_proj", "v_proj"):
        return (shape[0] * shape[1], shape[2])
    if name == "o_proj":
        return (shape[0], shape[1] * shape[2])
    if name in ("q_proj_bias", "k_proj_bias", "v_proj_bias"):
        return (shape[0] * shape[1],)
    return shape


def find_weight_files(hf_dir: Path) -> dict[str, SafetensorsFile]:
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
class _ReadPlan:
    """Checked headers: where each HF tensor is, grouped by cptjax parameter."""

    hf_dir: Path
    located: dict[str, SafetensorsFile]
    groups: dict[ParamPath, list[KeyMapping]]
    tied_head: bool  # a tied model whose files still carry lm_head.weight

    def info(self, m: KeyMapping):
        return self.located[m.hf_name].tensors[m.hf_name]

    def read(self, m: KeyMapping) -> np.ndarray:
        """One tensor in cptjax's per-tensor shape and its stored dtype."""
        return self.located[m.hf_name].read(m.hf_name).reshape(m.shape)


def _plan(hf_dir: Path, cfg: ModelConfig) -> _ReadPlan:
    files = find_weight_files(hf_dir)
    located: dict[str, SafetensorsFile] = {}
    for file in files.values():
        for name in file.tensors:
            if name in located:
                raise CptjaxError(f"{hf_dir}: tensor {name!r} appears in both {located[name].path.name} "
                                  f"and {file.path.name}")
            located[name] = file
    mappings = key_map(cfg)
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
        if info.shape != _hf_shape(m):
            raise CptjaxError(f"{info.name!r} in {located[m.hf_name].path.name} has shape "
                              f"{list(info.shape)}, but config.json implies {list(_hf_shape(m))}")
        if info.dtype.kind != "f" and info.dtype != ml_dtypes.bfloat16:
            raise CptjaxError(f"{info.name!r} in {located[m.hf_name].path.name} has dtype {info.dtype}; "
                              "weights must be floating point")
    groups: dict[ParamPath, list[KeyMapping]] = {}
    for m in mappings:
        groups.setdefault(m.path, []).append(m)
    return _ReadPlan(hf_dir, located, groups, tied_head)


def _check_tied_head(plan: _ReadPlan, embed: np.ndarray) -> None:
    if plan.tied_head:
        head = plan.located["lm_head.weight"].read("lm_head.weight")
        if not np.array_equal(head, embed):
            raise CptjaxError(f"{plan.hf_dir}: config.json says tie_word_embeddings=true but lm_head.weight "
                              "differs from model.embed_tokens.weight; fix tie_word_embeddings")


def read_hf_params(hf_dir: str | Path, cfg: ModelConfig,
                   progress: Callable[[Iterator], Iterator] | None = None) -> dict:
    """Reads an HF folder's weights into cptjax's nested parameter dict of NumPy arrays.

    Arrays keep the checkpoint's dtype (a bf16 checkpoint stays bf16). All checks run on the
    headers before any tensor data is read.
    """
    plan = _plan(Path(hf_dir), cfg)
    params: dict = {}
    items = list(plan.groups.items())
    for path, group in (progress(items) if progress else items):
        stacked = group[0].layer is not None
        dtype = plan.info(group[0]).dtype
        array = np.empty(((len(group),) if stacked else ()) + group[0].shape, dtype)
        for m in group:
            file = plan.located[m.hf_name]
            dest = array[m.layer] if stacked else array
            if plan.info(m).dtype == array.dtype:
                file.read_into(m.hf_name, dest.reshape(_hf_shape(m)))
            else:  # a layer stored in another dtype than layer 0: convert this one tensor
                dest[...] = plan.read(m).astype(array.dtype)
        _set(params, path, array)
    _check_tied_head(plan, params["embed_tokens"])
    return params


def load_hf_params_sharded(hf_dir: str | Path, cfg: ModelConfig, shardings: dict, dtype,
                           progress: Callable[[Iterator], Iterator] | None = None) -> dict:
    """Reads an HF folder straight onto the devices: each process reads only the tensors (layers)
    its devices hold, one at a time, and no host ever assembles the whole model."""
    import jax

    plan = _plan(Path(hf_dir), cfg)
    params: dict = {}
    items = list(plan.groups.items())
    for path, group in (progress(items) if progress else items):
        sharding = shardings
        for key in path:
            sharding = sharding[key]
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

        _set(params, path, jax.make_array_from_callback(shape, sharding, shard))
    if plan.tied_head:
        _check_tied_head(plan, plan.read(plan.groups[("embed_tokens",)][0]))
    return params


def _set(tree: dict, path: ParamPath, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, as transformers reads --max-shard-size."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise CptjaxError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    if number * scale <= 0:
        raise CptjaxError(f"--max-shard-size {text!r}: must be positive")
    return int(number * scale)


def write_hf_dir(out: Path, cfg: ModelConfig, get_param: Callable[[ParamPath], np.ndarray],
                 dtype: str = "bfloat16", max_shard_size: int | str = "5GB",
                 assets_dir: Path | None = None,
                 progress: Callable[[Iterator], Iterator] | None = None) -> list[str]:
    """Writes an HF model folder into the existing empty folder `out`; returns the weight files.

    `get_param(path)` returns one (stacked) parameter array; it is called once per parameter, in
    key-map order, so a caller can restore parameters one at a time.
    """
    if dtype not in EXPORT_DTYPES:
        raise CptjaxError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}")
    target = EXPORT_DTYPES[dtype]
    limit = parse_size(max_shard_size)
    mappings = key_map(cfg)
    shards: list[list[KeyMapping]] = [[]]
    size = 0
    for m in mappings:
        nbytes = int(np.prod(m.shape)) * target.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(m)
        size += nbytes
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    cache: dict[ParamPath, np.ndarray] = {}

    def fetch(m: KeyMapping) -> np.ndarray:
        if m.path not in cache:
            cache.clear()  # parameters come grouped, so one is held at a time
            cache[m.path] = np.asarray(get_param(m.path))
        array = cache[m.path]
        tensor = array[m.layer] if m.layer is not None else array
        if tuple(tensor.shape) != m.shape:
            raise CptjaxError(f"parameter {'/'.join(m.path)} has shape {list(array.shape)}, which does "
                              f"not fit the checkpoint's model config")
        return tensor.astype(target, copy=False).reshape(_hf_shape(m))

    steps = list(zip(names, shards))
    for name, shard in (progress(steps) if progress else steps):
        specs = [(m.hf_name, target, _hf_shape(m)) for m in shard]
        write_safetensors(out / name, ((m.hf_name, fetch(m)) for m in shard), specs)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(int(np.prod(m.shape)) * target.itemsize for m in mappings)},
                 "weight_map": {m.hf_name: names[i] for i, shard in enumerate(shards) for m in shard}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    hf_config = cfg.to_hf_config()
    hf_config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    copy_assets(assets_dir, out)
    if not (out / "generation_config.json").exists():
        generation = {k: v for k, v in (("bos_token_id", cfg.bos_token_id),
                                        ("eos_token_id", hf_config["eos_token_id"]),
                                        ("pad_token_id", cfg.pad_token_id)) if v is not None}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return names


def copy_assets(src: Path | None, dst: Path) -> list[str]:
    """Copies the tokenizer and generation files that exist in `src` into `dst`."""
    if src is None or not Path(src).is_dir():
        return []
    copied = []
    for name in HF_ASSET_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dst / name)
            copied.append(name)
    return copied
