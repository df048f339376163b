"""Packing: a stream of tokenized documents -> fixed-length rows, nothing truncated or dropped.

Rows are cut from the concatenated documents of one source: row r holds stream tokens
[r*L, r*L + L] (L + 1 tokens), so consecutive rows overlap by one token. inputs = row[:-1],
targets = row[1:]: every token of the stream is a target in exactly one row, and a document that
continues into the next row loses no training signal. A target counts (loss_mask 1) only when it
is the next token of the same document as its input, so each document's first token (BOS, or its
first text token for tokenizers without BOS) is only ever an input. Padding (input 0, segment 0)
appears only at the very end of a stream that stops.

Dimension letters: R rows, L sequence length (seq_len).

Positions restart at 0 at every segment of a row, also for a document continued from the previous
row. Attention sees only its own segment and RoPE depends only on position differences, so this
gives the same result as the document's true offsets while keeping positions < L.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from cptjax.core.errors import CptjaxError

BATCH_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids", "source_ids")
# Why a document is left out: not UTF-8 (data.invalid_utf8: skip), no text, fewer tokens than the
# source's min_tokens, or a short one left out by its long_upsample (pipeline.LengthFilter).
SKIP_REASONS = ("invalid_utf8", "empty", "short", "downsampled")


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A document left out of the stream; `reason` is one of SKIP_REASONS."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Failed:
    """A document that stops the run (malformed JSON, a missing field, ...): the message says where."""

    message: str


class RowPacker:
    """Cuts rows of L + 1 tokens from documents `open_docs(start)` yields, one source at a time.

    Documents are ndarrays of ids, or (ids, per-token extras) pairs when `with_extra` (eval sets
    carry bytes per token), or `Skipped` markers (a `Failed` one is raised by the reader before it
    gets here). The state is where the next row starts:
    (document index in the stream, token offset in that document) plus skip counts.
    `max_skips_in_a_row` documents left out one after the other (a "downsampled" one, which a later
    epoch may keep, starts the count again) mean that every document is: an error naming `name`.
    """

    def __init__(self, open_docs: Callable[[int], Iterator], seq_len: int, *,
                 with_extra: bool = False, max_skips_in_a_row: int | None = None,
                 name: str = "source"):
        self._open_docs = open_docs
        self._max_skips = max_skips_in_a_row
        self._name = name
        self._seq_len = seq_len
        self._with_extra = with_extra
        self._iterator: Iterator | None = None
        self._doc = 0
        self._offset = 0
        self._tokens: np.ndarray | None = None
        self._extra: np.ndarray | None = None
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        self.exhausted = False

    def get_state(self) -> dict:
        return {"doc": self._doc, "offset": self._offset, "skipped": dict(self.skipped),
                "exhausted": self.exhausted}

    def set_state(self, state: dict) -> None:
        self.close()
        self._doc, self._offset = int(state["doc"]), int(state["offset"])
        self.skipped = {**dict.fromkeys(SKIP_REASONS, 0), **{k: int(v) for k, v in state["skipped"].items()}}
        self.exhausted = bool(state["exhausted"])
        self._tokens = self._extra = None

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
        self._iterator = None

    def _load_next(self) -> bool:
        """Makes the document at self._doc current; False at the end of the stream."""
        if self._iterator is None:
            self._iterator = iter(self._open_docs(self._doc))
        skips = 0
        while True:
            item = next(self._iterator, None)
            if item is None:
                return False
            tokens, extra = (None, None) if isinstance(item, Skipped) else (
                item if self._with_extra else (item, None))
            if tokens is None or len(tokens) == 0:
                reason = item.reason if tokens is None else "empty"
                self.skipped[reason] += 1
                self._doc += 1
                skips = 0 if reason == "downsampled" else skips + 1
                if self._max_skips is not None and skips > self._max_skips:
                    raise CptjaxError(all_skipped(self._name))
                continue
            self._tokens, self._extra = tokens, extra
            return True

    def next_row(self, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(tokens [L+1] int32, segments [L+1] int32, extras [L+1] or None); None when done.

        `seq_len` (default: the packer's) may change from one row to the next (length stages): the
        state is where the next row starts, whatever its length."""
        if self.exhausted:
            return None
        length = self._seq_len if seq_len is None else seq_len
        need = length + 1
        pieces, extras, lengths = [], [], []
        while need > 0:
            if self._tokens is None and not self._load_next():
                self.exhausted = True
                break
            available = len(self._tokens) - self._offset
            take = min(available, need)
            pieces.append(self._tokens[self._offset:self._offset + take])
            if self._with_extra:
                extras.append(self._extra[self._offset:self._offset + take])
            lengths.append(take)
            need -= take
            if need == 0:
                self._offset += take - 1  # the next row starts at this row's last token
            else:
                self._tokens = self._extra = None
                self._doc += 1
                self._offset = 0
        filled = length + 1 - need
        if filled <= 1:  # nothing left to predict
            self.exhausted = True
            return None
        tokens = np.zeros(length + 1, dtype=np.int32)
        tokens[:filled] = np.concatenate(pieces)
        segments = np.zeros(length + 1, dtype=np.int32)
        segments[:filled] = np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)
        extra = None
        if self._with_extra:
            extra = np.zeros(length + 1, dtype=np.float64)
            extra[:filled] = np.concatenate(extras)
        return tokens, segments, extra


def all_skipped(name: str) -> str:
    return (f"{name}: every document is skipped (empty, invalid UTF-8 with data.invalid_utf8: "
            "skip, or shorter than its min_tokens); check its files, text field and min_tokens")


def rows_per_process(batch_size: int, process_index: int, process_count: int) -> int:
    """Rows of each global batch that process `process_index` builds (an even split, in order)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise CptjaxError(f"process_index {process_index} / process_count {process_count}: "
                          "need 0 <= process_index < process_count")
    if batch_size < 1 or batch_size % process_count:
        raise CptjaxError(f"batch_size: {batch_size} rows cannot be split evenly over "
                          f"{process_count} processes; use a multiple of {process_count}")
    return batch_size // process_count


def rows_to_batch(tokens: np.ndarray, segments: np.ndarray, source_ids: np.ndarray) -> dict:
    """Rows of L + 1 tokens [R, L+1] -> the batch dict, all [R, L] (see the module docstring)."""
    rows, length = tokens.shape[0], tokens.shape[1] - 1
    seg_in = segments[:, :-1]
    index = np.arange(length, dtype=np.int32)
    starts = np.ones((rows, length), dtype=bool)
    starts[:, 1:] = seg_in[:, 1:] != seg_in[:, :-1]
    start_index = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    positions = np.where(seg_in > 0, index - start_index, 0).astype(np.int32)
    loss_mask = ((segments[:, 1:] == seg_in) & (seg_in > 0)).astype(np.float32)
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
        "loss_mask": loss_mask,
        "positions": positions,
        "segment_ids": np.ascontiguousarray(seg_in),
        "source_ids": np.where(seg_in > 0, source_ids[:, None], -1).astype(np.int32),
    }
