"""`cptjax vocab resize`: a model's embedding and output head grown to an extended tokenizer.

The extended tokenizer keeps every id of the model's own tokenizer and adds new ones after them
(what `cptjax vocab extend` writes). The model's rows of the old ids are copied, the new ids' rows
initialised (cptjax.model.vocab: mean, covariance or pieces), and the tables padded to a multiple
of `pad_to` rows, whose logits the model masks. The result is a cptjax checkpoint (padded, its
config.json recording real_vocab_size) or an HF folder (never padded: hf/write.py), with the
extended tokenizer's files and the model's generation_config.json.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
from etils import epath

from cptjax.core.atomic_dir import atomic_output_dir, check_output_dir
from cptjax.core.dtypes import float_dtype
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, local_copy, user_path
from cptjax.data.tokenize import TOKENIZER_FILES
from cptjax.data.vocab import new_token_pieces
from cptjax.hf.write import copy_assets, write_hf_dir
from cptjax.io.checkpoint import ASSETS_DIR, save_params_checkpoint
from cptjax.io.weights import open_weights, parse_model_arg
from cptjax.model.transformer import get_param
from cptjax.model.vocab import INITS, Init, padded_rows, resize_table

Format = Literal["orbax", "hf"]
# The head's rows are a table of their own only when untied; tied, the embedding is the head.
TABLES = (("embed_tokens",), ("lm_head",))


@dataclasses.dataclass(frozen=True)
class ResizeResult:
    out: epath.Path
    old_tokens: int  # the model's tokenizer's ids: rows [0, old_tokens) are the base model's, unchanged
    new_tokens: int  # the extended tokenizer's ids
    rows: int  # the tables' rows (new_tokens padded; new_tokens in an HF folder)
    notes: tuple[str, ...]  # where an init fell back to the mean


def _tokenizer(folder: epath.Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(local_copy(folder, ("tokenizer.json",)) / "tokenizer.json"))


def piece_ids(base_dir: epath.Path, extended_dir: epath.Path, new_ids: range) -> dict[int, list[int]]:
    """For each new id: the base tokenizer's ids of the same text (cptjax.data.vocab.new_token_pieces)."""
    pieces = new_token_pieces(_tokenizer(base_dir), _tokenizer(extended_dir))
    return {i: pieces[i] for i in new_ids}


def tokenizer_sizes(base_dir: epath.Path, extended_dir: epath.Path) -> tuple[int, int]:
    """(old ids, new ids): checks that the extended tokenizer keeps every id of the base one."""
    try:
        extended = _tokenizer(extended_dir)
    except Exception as err:  # noqa: BLE001 - the Rust library raises its own exception types
        raise CptjaxError(f"--tokenizer {extended_dir}: tokenizer.json does not load ({err})") from None
    base = _tokenizer(base_dir)
    old, new = base.get_vocab_size(with_added_tokens=True), extended.get_vocab_size(with_added_tokens=True)
    if new <= old:
        raise CptjaxError(f"--tokenizer {extended_dir}: {new} ids, no more than the model's tokenizer's {old}; "
                          "give the extended tokenizer (cptjax vocab extend)")
    for i in range(old):
        if base.id_to_token(i) != extended.id_to_token(i):
            raise CptjaxError(f"--tokenizer {extended_dir}: id {i} is {extended.id_to_token(i)!r}, but "
                              f"{base.id_to_token(i)!r} in the model's tokenizer; an extended tokenizer keeps "
                              "every old id and adds new ones after them")
    return old, new


def resize_vocab(model: PathLike, tokenizer: PathLike, out: PathLike, init: Init = "mean", pad_to: int = 128,
                 fmt: Format = "orbax", seed: int = 0) -> ResizeResult:
    """Writes `model` (an HF folder or cptjax checkpoint, PATH[@STEP][:ema]) with its vocabulary
    grown to the extended tokenizer folder `tokenizer`, to the new folder `out`."""
    if init not in INITS:
        raise CptjaxError(f"--init {init!r}: one of {', '.join(INITS)}")
    if pad_to < 1:
        raise CptjaxError(f"--pad-to {pad_to}: must be >= 1 (1: no padding)")
    extended = user_path(tokenizer, "--tokenizer")
    if not (extended / "tokenizer.json").is_file():
        raise CptjaxError(f"--tokenizer {extended}: no tokenizer.json in this folder; give the extended "
                          "tokenizer's folder")
    out = check_output_dir(out, "--out")
    path, step, ema = parse_model_arg(str(model))
    with open_weights(path, step, ema=ema) as weights:
        base = weights.tokenizer_dir
        if base is None:
            raise CptjaxError(f"--model {path}: has no tokenizer.json beside its weights; the model's own "
                              "tokenizer says which rows are old (copy its tokenizer files in)")
        old, new = tokenizer_sizes(base, extended)
        cfg = weights.config
        if old > cfg.num_tokens:
            raise CptjaxError(f"--model {path}: its tokenizer has {old} ids but the model only {cfg.num_tokens} "
                              "rows; the folder's tokenizer is not the model's")
        rows = padded_rows(new, pad_to) if fmt == "orbax" else new
        pieces = piece_ids(base, extended, range(old, new)) if init == "pieces" else None
        params = weights.read()
        rng, notes = np.random.default_rng(seed), []
        for table in TABLES[:1 if cfg.tie_word_embeddings else 2]:
            resized, note = resize_table(get_param(params, table), old, new, rows, init, pieces, rng)
            params[table[0]] = resized
            if note:
                notes.append(f"{table[0]}: {note}")
        new_cfg = dataclasses.replace(cfg, vocab_size=rows, real_vocab_size=new if rows > new else None)
        with atomic_output_dir(out) as tmp:
            if fmt == "hf":
                write_hf_dir(tmp, new_cfg, lambda p: get_param(params, p), float_dtype(cfg.dtype or "float32"),
                             assets_dir=weights.assets_dir)
                _copy_tokenizer(extended, tmp)
            else:
                save_params_checkpoint(tmp, 0, new_cfg, params)
                (tmp / ASSETS_DIR).mkdir()
                copy_assets(weights.assets_dir, tmp / ASSETS_DIR)  # generation_config.json
                _copy_tokenizer(extended, tmp / ASSETS_DIR)
    return ResizeResult(out, old, new, rows, tuple(notes))


def _copy_tokenizer(src: epath.Path, dst: epath.Path) -> None:
    """The extended tokenizer's files in place of the model's own (which `copy_assets` brought)."""
    for name in TOKENIZER_FILES:
        if (dst / name).exists():
            (dst / name).unlink()
        if (src / name).is_file():
            (src / name).copy(dst / name)
