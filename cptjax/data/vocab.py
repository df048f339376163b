"""New tokens for a domain, added to an HF BPE tokenizer so that text without them keeps its ids.

The base's BPE is continued on the domain corpus: each pre-token (a piece of the base's
pre-tokenizer; a word starting at "▁" for SentencePiece-style tokenizers) is tokenized by the base,
and BPE training (the `tokenizers` trainer) goes on from those base tokens, merging the most frequent
adjacent pair again and again. Each chosen merge is appended after all of the base's merges, its
token after all of the base's ids. Where the base falls back to bytes for a character
(SentencePiece-style BPE with byte_fallback), that character can become a token of its own.

Why ids are kept: BPE applies, within a pre-token, the lowest-ranked merge it can until none
applies. Every new merge ranks after every base merge and no base merge involves a new token, so
the base's merges run exactly as before; a new merge can only fire afterwards, on two adjacent
tokens whose strings together make a new token's string. Hence:

  KEPT_IDS: a text in which no pre-token contains a new token's string encodes to exactly the ids
  of the base; any other text encodes to the base's tokens with some of them merged, never to more.

(A new token's string is its vocabulary string: byte-level characters for byte-level BPE, "▁" for
spaces in SentencePiece-style tokenizers.) Merges whose result is already a base token are never
added, since they would change text that holds only base tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cptjax.core.errors import CptjaxError

# Symbols of the continued training: base id i is chr(SYMBOL_BASE + i); a character the base could
# only spell in bytes gets a symbol after all base ids. Supplementary planes: no surrogates, no spaces.
SYMBOL_BASE = 0x10000
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SUPPORTED = ("BPE models (tokenizer.json model.type 'BPE'): byte-level BPE as in Llama 3, Qwen and GPT-2, "
             "and SentencePiece-style BPE with byte fallback as in Llama 2, Mistral and TinyLlama")


def _components(node) -> Iterable[dict]:
    """A normalizer or pre-tokenizer and, for a Sequence, each of its parts."""
    if isinstance(node, dict):
        yield node
        for part in node.get("normalizers") or node.get("pretokenizers") or ():
            yield from _components(part)


@dataclasses.dataclass
class BaseTokenizer:
    """A base tokenizer.json as extension sees it: the parsed JSON and what its kind implies."""

    data: dict
    where: str  # the tokenizer.json, for messages

    def __post_init__(self):
        model = self.data.get("model") or {}
        kind = model.get("type")
        if kind != "BPE":
            raise CptjaxError(f"{self.where}: model.type is {kind!r}; vocabulary extension supports {SUPPORTED} "
                              "(Unigram and WordPiece tokenizers cannot be extended by cptjax)")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise CptjaxError(f"{self.where}: model.{key} is set ({model[key]!r}); vocabulary extension "
                                  f"supports {SUPPORTED}, without {key}")
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.added: dict[str, int] = {t["content"]: t["id"] for t in self.data.get("added_tokens") or ()}
        self.next_id = max([*self.vocab.values(), *self.added.values(), -1]) + 1
        parts = [*_components(self.data.get("normalizer")), *_components(self.data.get("pre_tokenizer"))]
        self.byte_level = any(p.get("type") == "ByteLevel" for p in parts)
        metaspace = [p.get("replacement", "▁") for p in parts if p.get("type") == "Metaspace"]
        replaced = [p["content"] for p in parts if p.get("type") == "Replace"
                    and p.get("pattern") == {"String": " "}]
        self.word_start = (metaspace + replaced + [None])[0]  # SentencePiece's "▁": a token starting it opens a word
        self.byte_tokens = {i: int(_BYTE_TOKEN.match(t).group(1), 16) for t, i in self.vocab.items()
                            if model.get("byte_fallback") and _BYTE_TOKEN.match(t)}
        self.unk_id = self.vocab.get(model.get("unk_token")) if model.get("unk_token") else None

    @property
    def kind(self) -> str:
        if self.byte_level:
            return "byte-level BPE"
        return "SentencePiece-style BPE" + (" with byte fallback" if self.byte_tokens else "")

    @property
    def size(self) -> int:
        """Ids in use (model vocabulary and added tokens)."""
        return len(set(self.vocab.values()) | set(self.added.values()))

    def text(self, token: str) -> str:
        """A vocabulary string as text: byte-level characters decoded (a part of a character shows
        as U+FFFD), SentencePiece's "▁" as a space."""
        if self.byte_level:
            from tokenizers import decoders

            return decoders.ByteLevel().decode([token])
        return token.replace(self.word_start, " ") if self.word_start else token

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(json.dumps(self.data))


class WordCounter:
    """Counts the domain corpus's words as strings of base-token symbols: a word is a pre-token's
    run of base tokens, cut at added tokens and (SentencePiece-style) before each "▁" token."""

    def __init__(self, base: BaseTokenizer):
        self.base = base
        self.counts: collections.Counter[str] = collections.Counter()
        self.new_chars: dict[str, int] = {}  # a character the base spells in bytes -> its symbol offset
        id_to_token = {i: t for t, i in base.vocab.items()}
        size = max(base.next_id, 1)
        self._breaks = np.zeros(size, bool)  # tokens that never join a new token
        for i in [*base.added.values(), *([base.unk_id] if base.unk_id is not None else [])]:
            self._breaks[i] = True
        self._opens = np.zeros(size, bool)  # tokens that start a word (SentencePiece-style "▁...")
        if base.word_start:
            for i, token in id_to_token.items():
                self._opens[i] = token.startswith(base.word_start)
        self._is_byte = np.zeros(size, bool)
        self._is_byte[list(base.byte_tokens)] = True

    def add(self, encodings) -> None:
        """Adds the words of `tokenizers` Encodings of documents (encoded without special tokens)."""
        for encoding in encodings:
            ids = np.asarray(encoding.ids, np.int64)
            if not len(ids):
                continue
            words = np.asarray([-1 if w is None else w for w in encoding.word_ids], np.int64)
            starts = np.ones(len(ids), bool)
            starts[1:] = (words[1:] != words[:-1]) | self._opens[ids[1:]]
            symbols = (SYMBOL_BASE + ids).astype(np.uint32)
            symbols[self._breaks[ids]] = ord(" ")
            if self._is_byte[ids].any():
                symbols, starts = self._fold_bytes(ids, symbols, starts)
            # a space before each word start: the trainer splits words on whitespace
            spaced = np.insert(symbols, np.flatnonzero(starts), ord(" "))
            self.counts.update(spaced.tobytes().decode("utf-32-le").split())

    def _fold_bytes(self, ids, symbols, starts):
        """Runs of byte-fallback tokens -> one symbol per UTF-8 character they spell (a possible new
        token); bytes that spell no character break words."""
        keep = np.ones(len(ids), bool)
        is_byte = self._is_byte[ids]
        i = 0
        while i < len(ids):
            if not is_byte[i]:
                i += 1
                continue
            j = i
            while j < len(ids) and is_byte[j]:
                j += 1
            raw = bytes(self.base.byte_tokens[int(t)] for t in ids[i:j])
            text = raw.decode("utf-8", errors="replace")
            if "\ufffd" in text or len(text.encode()) != len(raw):  # not whole characters
                symbols[i:j] = ord(" ")
            else:
                at = i
                for char in text:
                    offset = self.new_chars.setdefault(char, len(self.new_chars))
                    symbols[at] = SYMBOL_BASE + self.base.next_id + offset
                    keep[at + 1:at + len(char.encode())] = False
                    at += len(char.encode())
            i = j
        return symbols[keep], starts[keep]

    def symbol_table(self) -> dict[int, str]:
        """Symbol offset -> vocabulary string: base tokens, then the characters the base spells in bytes."""
        tokens = {i: t for t, i in self.base.vocab.items()}
        tokens.update({self.base.next_id + o: c for c, o in self.new_chars.items()})
        return tokens


@dataclasses.dataclass(frozen=True)
class Extension:
    """The new tokens (id -> vocabulary string, in id order) and the merges that make them."""

    tokens: dict[int, str]
    merges: list[tuple[str, str]]


def continue_bpe(counter: WordCounter, new_tokens: int, progress: bool = False) -> Extension:
    """Up to `new_tokens` new tokens: the merges of BPE training continued from the base's tokens
    of the domain's words, most frequent pair first, each kept if its result is not a base token
    and its parts exist; a character the base spelled in bytes costs a token of its own."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    alphabet = {s for word in counter.counts for s in word}
    budget = new_tokens + new_tokens // 2 + 64  # results that are base tokens, or repeat a string, are dropped
    while True:
        trainer_tokenizer = Tokenizer(models.BPE())
        trainer_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + budget, min_frequency=2,
                                      show_progress=progress, limit_alphabet=len(alphabet))
        trainer_tokenizer.train_from_iterator(_repeated(counter.counts), trainer)
        merges = json.loads(trainer_tokenizer.to_str())["model"]["merges"]
        extension = _choose(counter, [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1))
                                      for m in merges], new_tokens)
        if len(extension.tokens) >= new_tokens or len(merges) < budget:  # enough, or the corpus ran out
            return extension
        budget *= 2


def _repeated(counts: collections.Counter, chunk: int = 1 << 16) -> Iterable[str]:
    """The trainer's input: each word as often as it occurs, in texts of about `chunk` words."""
    batch, size = [], 0
    for word, count in counts.items():
        batch.append(" ".join([word] * count))
        size += count
        if size >= chunk:
            yield " ".join(batch)
            batch, size = [], 0
    if batch:
        yield " ".join(batch)


def _choose(counter: WordCounter, merges: list[tuple[str, str]], new_tokens: int) -> Extension:
    base, table = counter.base, counter.symbol_table()
    known = dict(base.vocab)  # vocabulary string -> id, growing
    tokens: dict[int, str] = {}
    chosen: list[tuple[str, str]] = []
    pairs: set[tuple[str, str]] = set()
    made: set[str] = set()  # the symbol strings of the kept merges' results

    def surface(symbols: str) -> str:
        return "".join(table[ord(s) - SYMBOL_BASE] for s in symbols)

    for left, right in merges:
        if any(len(s) > 1 and s not in made for s in (left, right)):
            continue  # a part whose own merge was not kept
        pair = (surface(left), surface(right))
        result = pair[0] + pair[1]
        if result in base.vocab or result in base.added or pair in pairs:
            continue  # a base token's string would change text without new tokens
        missing = [p for p in dict.fromkeys(pair) if p not in known]  # characters the base spells in bytes
        new = missing + ([result] if result not in known else [])
        if len(tokens) + len(new) > new_tokens:
            continue
        for text in new:  # characters first: a merge's parts exist before it
            known[text] = base.next_id + len(tokens)
            tokens[known[text]] = text
        chosen.append(pair)
        pairs.add(pair)
        made.add(left + right)
        if len(tokens) >= new_tokens:
            break
    return Extension(tokens, chosen)


def extended_json(base: BaseTokenizer, extension: Extension) -> dict:
    """The base's tokenizer.json with the new tokens after every existing id and their merges after
    every base merge; everything else (added and special tokens, their ids) unchanged."""
    data = json.loads(json.dumps(base.data))
    model = data["model"]
    # `tokenizers` gives an added token that the model's vocabulary lacks the id after the model's last
    # one when it loads the file, whatever id the file says (Llama 3's 128000+ would move past the new
    # tokens): in the vocabulary they keep their ids. Added tokens are matched before the model runs,
    # and no merge makes their strings, so the model never produces them itself.
    model["vocab"].update({text: i for text, i in base.added.items() if text not in model["vocab"]})
    model["vocab"].update({text: i for i, text in extension.tokens.items()})
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    if as_strings and any(" " in p for pair in extension.merges for p in pair):
        model["merges"] = [m.split(" ", 1) for m in model["merges"]]  # a space in a token needs the pair form
        as_strings = False
    model["merges"] += [f"{a} {b}" if as_strings else [a, b] for a, b in extension.merges]
    return data


def new_token_pieces(base_tokenizer, extended_tokenizer) -> dict[int, list[int]]:
    """{new id: the base's ids for the same text} for every id of `extended_tokenizer` that the base
    lacks: what a model's new embedding rows can start from (e.g. the mean of those rows). The one
    place that asks how a new token splits.

    Either argument is an HF tokenizer folder, a tokenizer.json file or a `tokenizers.Tokenizer`.
    A token of the BPE model (`cptjax vocab extend`'s merges) splits by the base's own BPE of its
    vocabulary string (its bytes, where the base spells a character in byte-fallback tokens); an
    added token (`add_tokens`) by the base's encoding of its content, without special tokens (a
    byte-level decoder would garble its non-ASCII content, and its content is no vocabulary string).
    """
    base, extended = _as_tokenizer(base_tokenizer), _as_tokenizer(extended_tokenizer)
    old = set(base.get_vocab(with_added_tokens=True).values())
    added = {i: t.content for i, t in extended.get_added_tokens_decoder().items()}

    def pieces(token: str, i: int) -> list[int]:
        if i in added:
            return base.encode(added[i], add_special_tokens=False).ids
        return [t.id for t in base.model.tokenize(token)]
    return {i: pieces(token, i)
            for token, i in sorted(extended.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
            if i not in old}


def _as_tokenizer(tokenizer):
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    path = Path(tokenizer)
    return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
