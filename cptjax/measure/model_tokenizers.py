"""Which of several models share a tokenizer: those can be compared token for token (and merged);
the others only per byte of the same text.

A loss per token depends on what a token is: a tokenizer with more or longer tokens spreads the
same text's information over fewer of them, so its loss per token rises while the model may be no
worse. Bits per byte divide the same information by the same bytes and compare across tokenizers
(`cptjax eval` tokenizes each set with each model's own tokenizer and counts its bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

from cptjax.core.errors import CptjaxError
from cptjax.data.tokenize import load_tokenizer_spec
from cptjax.io.weights import Weights
from cptjax.model.config import ModelConfig

NOT_COMPARABLE = ("these models use different tokenizers: loss per token and perplexity are not comparable "
                  "across them; compare bits per byte, and adaptation and forgetting are given in bits per byte")


def check_vocabulary(reference: ModelConfig, other: ModelConfig, names: tuple[str, str]) -> None:
    """Models compared (or merged) on the same tokens must share a vocabulary."""
    if reference.vocab_size != other.vocab_size:
        raise CptjaxError(f"{names[1]}: vocabulary of {other.vocab_size} tokens, but {names[0]} has "
                          f"{reference.vocab_size}; models with different vocabularies cannot be "
                          "compared or merged on the same tokens")


def check_tokenizers(weights: Sequence[Weights], labels: Sequence[str]) -> None:
    """Every model that carries a tokenizer carries the same one (by fingerprint)."""
    first = None
    for w, label in zip(weights, labels):
        if w.tokenizer_dir is None:
            continue
        spec = load_tokenizer_spec(w.tokenizer_dir)
        if first is None:
            first = (label, spec.fingerprint)
        elif spec.fingerprint != first[1]:
            raise CptjaxError(f"{label}: its tokenizer differs from {first[0]}'s; losses per token of "
                              "models with different tokenizers are not comparable")


def tokenizer_groups(weights: Sequence[Weights], tokenizer: str | None = None) -> list[list[int]]:
    """The models' indices grouped by tokenizer (fingerprint), the first model's group first. One
    group when a `tokenizer` is given for all; a model without tokenizer files joins the first
    model's (or the first found) tokenizer, as it always did."""
    if tokenizer is not None:
        return [list(range(len(weights)))]
    keys = [load_tokenizer_spec(w.tokenizer_dir).fingerprint if w.tokenizer_dir is not None else None
            for w in weights]
    first = next((k for k in keys if k is not None), None)
    groups: dict[str | None, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key if key is not None else first, []).append(index)
    return list(groups.values())
