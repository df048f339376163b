"""A vocabulary grown by new token ids: the rows of the embedding and the output head for them.

A table [V, D] (the embedding, or an untied head) keeps its first `old` rows (the base tokenizer's
ids) as they are, gets one row for each new id in [old, new), and padding rows up to a multiple
that suits TPU and GPU matmuls. The padding rows are zeros; the model never predicts them (their
logits are -inf: ModelConfig.real_vocab_size) and no tokenizer gives them as inputs.

The new rows start as one of (`INITS`):
  - "mean": the mean of the old rows. A new token's logit is then the mean of the old logits
    (h . mean(w) = mean(h . w)), so by Jensen each new token takes at most 1/(old + added) of the
    probability, and the distribution over the old ids, renormalised, is unchanged (Hewitt 2021,
    https://nlp.stanford.edu/~johnhew/vocab-expansion.html).
  - "covariance": a sample of a normal with the old rows' mean and covariance scaled by
    `COVARIANCE_SCALE`, as transformers' `resize_token_embeddings(mean_resizing=True)` does; the
    mean where that covariance is not positive definite, as there too.
  - "pieces": the mean of the old rows of the pieces the base tokenizer splits the new token's
    text into (the mean of all old rows for a token it splits into nothing).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from cptjax.core.errors import CptjaxError

Init = Literal["mean", "covariance", "pieces"]
INITS: tuple[str, ...] = ("mean", "covariance", "pieces")
# transformers 5's `_init_added_embeddings_weights_with_mean` samples from N(mean, 1e-9 * covariance).
COVARIANCE_SCALE = 1e-9
_ROWS_PER_CHUNK = 8192  # the covariance sums this many rows at a time in float64


def padded_rows(tokens: int, multiple: int) -> int:
    """The table's rows for `tokens` ids: the next multiple of `multiple` (1: no padding)."""
    return -(-tokens // multiple) * multiple


def new_rows(table: np.ndarray, old: int, new: int, init: Init, pieces: dict[int, list[int]] | None = None,
             rng: np.random.Generator | None = None) -> tuple[np.ndarray, str | None]:
    """(The rows [new - old, D] of ids [old, new) in the table's dtype, a note when the init fell
    back to the mean). Statistics are over rows [0, old) only, in float64."""
    rows = table[:old]
    mean = _mean(rows)
    added = new - old
    if init == "mean":
        return np.broadcast_to(mean, (added, mean.size)).astype(table.dtype), None
    if init == "covariance":
        cov = np.zeros((mean.size, mean.size))
        for start in range(0, old, _ROWS_PER_CHUNK):
            centred = rows[start:start + _ROWS_PER_CHUNK].astype(np.float64) - mean
            cov += centred.T @ centred
        try:
            factor = np.linalg.cholesky(COVARIANCE_SCALE * cov / old)
        except np.linalg.LinAlgError:
            return np.broadcast_to(mean, (added, mean.size)).astype(table.dtype), \
                "the old rows' covariance is not positive definite: the new rows are their mean"
        rng = rng if rng is not None else np.random.default_rng(0)
        return (mean + rng.standard_normal((added, mean.size)) @ factor.T).astype(table.dtype), None
    if init == "pieces":
        if pieces is None:
            raise ValueError("init 'pieces' needs each new id's pieces")
        out = np.empty((added, mean.size), table.dtype)
        empty = []
        for i in range(old, new):
            ids = pieces.get(i, [])
            if any(not 0 <= p < old for p in ids):
                raise CptjaxError(f"new token id {i}: its pieces {ids} are not all old ids (0..{old - 1})")
            out[i - old] = _mean(rows[ids]) if ids else mean
            if not ids:
                empty.append(i)
        return out, (f"{len(empty)} new ids split into no old pieces (e.g. {empty[0]}): their rows are the mean"
                     if empty else None)
    raise ValueError(f"init must be one of {INITS}, got {init!r}")


def resize_table(table: np.ndarray, old: int, new: int, rows: int, init: Init,
                 pieces: dict[int, list[int]] | None = None,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, str | None]:
    """(The table [rows, D]: old rows copied, new ones from `init`, padding zeros; a note as `new_rows`)."""
    if not 0 < old < new <= rows or old > table.shape[0]:
        raise ValueError(f"need 0 < old ({old}) < new ({new}) <= rows ({rows}) and old <= the table's rows "
                         f"({table.shape[0]})")
    out = np.zeros((rows, table.shape[1]), table.dtype)
    out[:old] = table[:old]
    out[old:new], note = new_rows(table, old, new, init, pieces, rng)
    return out, note


def _mean(rows: np.ndarray) -> np.ndarray:
    return rows.astype(np.float64).mean(axis=0)
