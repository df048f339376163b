"""Writing an HF model folder: sharded safetensors with their index, config.json,
generation_config.json and the tokenizer files, one parameter held in memory at a time.
transformers' AutoModelForCausalLM loads the result as the right class.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable

import numpy as np
from etils import epath

from cptjax.core.dtypes import dtype_name
from cptjax.core.errors import CptjaxError
from cptjax.data.tokenize import TOKENIZER_FILES
from cptjax.hf.keymap import KeyMapping, hf_tensors
from cptjax.hf.read import INDEX_FILE, SINGLE_FILE, Progress
from cptjax.hf.safetensors import write_safetensors
from cptjax.model.config import ModelConfig
from cptjax.model.transformer import ParamPath

# Files that travel with the weights: tokenizer, chat template, generation defaults.
HF_ASSET_FILES = (*TOKENIZER_FILES, "generation_config.json")


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


def _shard_plan(tensors: list[list[KeyMapping]], itemsize: int, limit: int) -> list[list[list[KeyMapping]]]:
    """Consecutive HF tensors (each the list of its parts) into files of at most `limit` bytes (a
    larger tensor gets its own)."""
    shards: list[list[list[KeyMapping]]] = [[]]
    size = 0
    for parts in tensors:
        nbytes = int(np.prod(parts[0].hf_shape)) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(parts)
        size += nbytes
    return shards


def write_hf_dir(out: epath.Path, cfg: ModelConfig, get_param: Callable[[ParamPath], np.ndarray],
                 dtype: np.dtype, max_shard_size: int | str = "5GB", assets_dir: epath.Path | None = None,
                 progress: Progress | None = None) -> list[str]:
    """Writes an HF model folder into the existing empty folder `out`; returns the weight files.

    `get_param(path)` returns one (stacked) parameter array; it is called once per parameter, in
    key-map order, so a caller can restore parameters one at a time. Tensors are cast to `dtype`.

    A vocabulary padded past the tokenizer's ids (ModelConfig.real_vocab_size) is written without
    its padding rows: transformers does not mask their logits, as cptjax does, so an export that kept
    them could predict ids no tokenizer decodes. config.json's vocab_size is then the tokenizer's.
    """
    if cfg.real_vocab_size is not None:
        cfg, get_param = _unpadded(cfg, get_param)
    target = np.dtype(dtype)
    tensors = list(hf_tensors(cfg).values())
    shards = _shard_plan(tensors, target.itemsize, parse_size(max_shard_size))
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    # Parameters come grouped, so one is held at a time; a fused tensor's parts (Phi-3's q, k and
    # v projections) are held together.
    cache: dict[ParamPath, np.ndarray] = {}

    def part(m: KeyMapping) -> np.ndarray:
        if m.path not in cache:
            cache[m.path] = np.asarray(get_param(m.path))
        array = cache[m.path]
        tensor = array.reshape(-1, *m.shape)[m.layer] if m.layer is not None else array
        if tuple(tensor.shape) != m.shape:
            raise CptjaxError(f"parameter {'/'.join(m.path)} has shape {list(array.shape)}, which does "
                              f"not fit the checkpoint's model config")
        return tensor.astype(target, copy=False)

    def fetch(parts: list[KeyMapping]) -> np.ndarray:
        for path in [p for p in cache if p not in {m.path for m in parts}]:
            del cache[path]
        if len(parts) == 1:
            return part(parts[0]).reshape(parts[0].hf_shape)
        return np.concatenate([part(m) for m in parts]).reshape(parts[0].hf_shape)

    steps = list(zip(names, shards))
    for name, shard in (progress(steps) if progress else steps):
        specs = [(parts[0].hf_name, target, parts[0].hf_shape) for parts in shard]
        write_safetensors(out / name, ((parts[0].hf_name, fetch(parts)) for parts in shard), specs)
    if len(shards) > 1:
        total = sum(int(np.prod(parts[0].hf_shape)) * target.itemsize for parts in tensors)
        index = {"metadata": {"total_size": total},
                 "weight_map": {parts[0].hf_name: names[i] for i, shard in enumerate(shards) for parts in shard}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    hf_config = cfg.to_hf_config()
    hf_config["torch_dtype"] = hf_config["dtype"] = dtype_name(target)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    copy_assets(assets_dir, out)
    if not (out / "generation_config.json").exists():
        generation = {k: v for k, v in (("bos_token_id", cfg.bos_token_id),
                                        ("eos_token_id", hf_config["eos_token_id"]),
                                        ("pad_token_id", cfg.pad_token_id)) if v is not None}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return names


def _unpadded(cfg: ModelConfig, get_param: Callable[[ParamPath], np.ndarray]):
    """(config, get_param) of the model without its vocabulary's padding rows."""
    rows = cfg.num_tokens

    def unpadded_param(path: ParamPath) -> np.ndarray:
        array = get_param(path)
        return array[:rows] if path in (("embed_tokens",), ("lm_head",)) else array
    return dataclasses.replace(cfg, vocab_size=rows, real_vocab_size=None), unpadded_param


def copy_assets(src: epath.Path | None, dst: epath.Path) -> list[str]:
    """Copies the tokenizer and generation files that exist in `src` into `dst` (overwriting)."""
    if src is None or not src.is_dir():
        return []
    copied = []
    for name in HF_ASSET_FILES:
        if (src / name).is_file():
            (src / name).copy(dst / name, overwrite=True)
            copied.append(name)
    return copied
