"""Documents -> token ids with the model's own HF tokenizer and its family's BOS/EOS convention.

The convention is read from the tokenizer, never from a model name: BOS is prepended when the
tokenizer adds it itself (its post-processor or `add_bos_token`, as Llama's do; Qwen's do not), and
the tokenizer's `eos_token` is appended to every document (Llama 3: <|end_of_text|>, Qwen base:
<|endoftext|>), so the model learns where documents end.

`DocumentTokenizer` pickles as a few ids and the tokenizer.json text, and runs the Rust tokenizer
directly (batched), so Grain worker processes need neither transformers nor the folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

import numpy as np

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, local_copy, user_path

# The files of an HF tokenizer folder (the ones that exist are copied with a model).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """What a token stream depends on: the tokenizer's JSON, its BOS/EOS rule, and vocab size."""

    path: str
    tokenizer_json: str
    bos_id: int | None
    eos_id: int
    vocab_size: int

    @functools.cached_property  # hashed once: the pipeline puts it in every batch's state
    def fingerprint(self) -> str:
        """sha256 of the tokenizer's canonical JSON and the BOS/EOS rule: equal means equal ids."""
        digest = hashlib.sha256(self.tokenizer_json.encode("utf-8"))
        digest.update(json.dumps([self.bos_id, self.eos_id]).encode())
        return digest.hexdigest()[:16]

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.uint32)


def load_tokenizer_spec(tokenizer_dir: PathLike, key: str = "tokenizer") -> TokenizerSpec:
    """Reads an HF tokenizer folder (tokenizer.json + tokenizer_config.json) and its BOS/EOS rule;
    `key` names where the folder came from, for messages."""
    path = user_path(tokenizer_dir, key)
    if not (path / "tokenizer.json").is_file():
        raise CptjaxError(f"{key} {path}: no tokenizer.json (a fast HF tokenizer) in this folder; "
                          "point it at a folder saved by transformers")
    import transformers

    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(local_copy(path, TOKENIZER_FILES)))
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a broken folder
        raise CptjaxError(f"{key} {path}: transformers cannot load this tokenizer ({err})") from None
    if not hf.is_fast:
        raise CptjaxError(f"{key} {path}: not a fast tokenizer; cptjax needs tokenizer.json")
    if hf.eos_token_id is None:
        raise CptjaxError(f"{key} {path}: the tokenizer has no eos_token, so documents could not be "
                          "ended; set eos_token in tokenizer_config.json")
    probe = hf("a", add_special_tokens=True)["input_ids"]
    adds_bos = hf.bos_token_id is not None and len(probe) > 0 and probe[0] == hf.bos_token_id
    return TokenizerSpec(path=str(path), tokenizer_json=hf.backend_tokenizer.to_str(),
                         bos_id=hf.bos_token_id if adds_bos else None, eos_id=hf.eos_token_id,
                         vocab_size=len(hf))


def load_data_tokenizer(data_tokenizer: str | None, model_tokenizer,
                        model_key: str = "the model's tokenizer") -> TokenizerSpec:
    """The data's tokenizer: `data.tokenizer` if set, else the model's folder (`model_key` says
    where that came from, for messages); a TokenizerSpec given as `model_tokenizer` (loaded once
    by the caller) is used as it is."""
    if isinstance(model_tokenizer, TokenizerSpec):
        return model_tokenizer
    if data_tokenizer is not None:
        return load_tokenizer_spec(data_tokenizer, "data.tokenizer")
    if model_tokenizer is None:
        raise CptjaxError("data.tokenizer: no tokenizer; set data.tokenizer or model.tokenizer, or "
                          "start from a model folder that has one")
    return load_tokenizer_spec(model_tokenizer, model_key)


def check_vocabulary(spec: TokenizerSpec, vocab_size: int) -> None:
    """A training run's tokenizer must fit the model's `vocab_size`: ids past it would index beyond
    the embedding table."""
    if spec.vocab_size > vocab_size:
        raise CptjaxError(f"tokenizer {spec.path}: {spec.vocab_size} tokens, more than the model's vocab_size "
                          f"{vocab_size}; ids past it would index beyond the embedding table. "
                          "Use the model's own tokenizer (model.tokenizer / data.tokenizer)")


class DocumentTokenizer:
    """Texts -> token ids (BOS? + text + EOS), batched in Rust; built lazily in each process."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self._tokenizer = None

    def __getstate__(self):
        return {"spec": self.spec, "_tokenizer": None}

    def _backend(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self.spec.tokenizer_json)
        return self._tokenizer

    def _wrap(self, ids) -> np.ndarray:
        bos = self.spec.bos_id is not None
        out = np.empty(len(ids) + 1 + bos, dtype=np.int32)
        if bos:
            out[0] = self.spec.bos_id
        out[bos:-1] = ids
        out[-1] = self.spec.eos_id
        return out

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """int32 ids per text; an empty text gives an empty array (no BOS/EOS)."""
        encodings = self._backend().encode_batch_fast(texts, add_special_tokens=False)
        return [self._wrap(e.ids) if text else np.zeros(0, np.int32)
                for text, e in zip(texts, encodings)]

    def encode_prompt(self, text: str) -> np.ndarray:
        """A prompt's int32 ids for generation: BOS (when the family adds one) + the text, no EOS."""
        ids = self._backend().encode(text, add_special_tokens=False).ids
        return np.asarray(([] if self.spec.bos_id is None else [self.spec.bos_id]) + ids, np.int32)

    def decode(self, ids) -> str:
        """Token ids -> text, special tokens (BOS, EOS) left out."""
        return self._backend().decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, bytes per token): the UTF-8 bytes of `text` each token covers; BOS/EOS cover 0.

        Each token is credited with the bytes up to the furthest character it reaches, so the
        counts are >= 0 and sum to len(text.encode()) exactly, also where byte-level BPE splits
        one character over several tokens (the first of them gets the character's bytes).
        """
        encoding = self._backend().encode(text, add_special_tokens=False)
        ids = self._wrap(encoding.ids)
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        char_bytes = (1 + (codepoints >= 0x80) + (codepoints >= 0x800)
                      + (codepoints >= 0x10000)).astype(np.int64)
        bytes_before = np.concatenate([[0], np.cumsum(char_bytes)])  # [chars + 1]
        ends = np.array([end for _, end in encoding.offsets], dtype=np.int64).reshape(-1)
        reached = bytes_before[np.maximum.accumulate(ends)] if len(ends) else np.zeros(0, np.int64)
        per_token = np.diff(np.concatenate([[0], reached]))
        if len(per_token):
            per_token[-1] += bytes_before[-1] - reached[-1]
        counts = np.zeros(len(ids), dtype=np.int64)
        bos = self.spec.bos_id is not None
        counts[bos:bos + len(per_token)] = per_token
        return ids, counts
