"""Held-out evaluation sets: the same packed tokens every time, with bytes for bits per byte.

Each `data.eval_sets` entry is read in file order (never shuffled), its first `max_docs` documents
tokenized and packed exactly as training rows are (packing.py), and cut into batches of the global
`batch_size` rows; the last batch is filled with all-padding rows, so every batch has one shape.
Process p gets rows [p * rows, (p + 1) * rows) of each batch, rows = batch_size // process_count.

Besides the training keys, each batch has `num_bytes` float32 [rows]: the UTF-8 bytes of the text
whose tokens are targets with loss_mask 1 in that row (BOS/EOS cover 0 bytes; see
`DocumentTokenizer.encode_with_bytes`). Summed over all rows of a set it is the byte count of all its
documents, less the text of each document's first token for tokenizers without BOS (that token is
never a target). So bits per byte = sum(loss_mask * nll_nats) / ln(2) / sum(num_bytes).
`source_ids` holds the eval set's index in `data.eval_sets`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cptjax.core.errors import CptjaxError
from cptjax.data.config import DataConfig, EvalSetConfig
from cptjax.data.packing import RowPacker, rows_per_process, rows_to_batch
from cptjax.data.read import open_source
from cptjax.data.sources import InvalidUtf8
from cptjax.data.tokenize import DocumentTokenizer, load_data_tokenizer


def build_eval_sets(config: DataConfig, tokenizer, *, seq_len: int, batch_size: int,
                    process_index: int, process_count: int) -> dict[str, list[dict]]:
    """{eval set name: [batch, ...]}, this process's rows of each batch; `tokenizer` as for
    `build_train_pipeline`."""
    rows_per_process(batch_size, process_index, process_count)
    if not config.eval_sets:
        return {}
    tokenizer = DocumentTokenizer(load_data_tokenizer(config.tokenizer, tokenizer))
    keys = [f"data.eval_sets[{i}]" for i in range(len(config.eval_sets))]
    return pack_eval_sets(config.eval_sets, keys, tokenizer, seq_len=seq_len, batch_size=batch_size,
                          process_index=process_index, process_count=process_count,
                          invalid_utf8=config.invalid_utf8)


def pack_eval_sets(eval_sets: Sequence[EvalSetConfig], keys: Sequence[str], tokenizer: DocumentTokenizer,
                   *, seq_len: int, batch_size: int, process_index: int = 0, process_count: int = 1,
                   invalid_utf8: str = "fail") -> dict[str, list[dict]]:
    """The batches of each eval set; `keys` name the sets in messages ("data.eval_sets[0]", or the
    `cptjax eval` flag that gave it)."""
    rows = rows_per_process(batch_size, process_index, process_count)
    sets = {}
    for index, (eval_config, key) in enumerate(zip(eval_sets, keys, strict=True)):
        if eval_config.type == "prepared":
            raise CptjaxError(f"{key}.type: eval sets need the text (to count bytes); give the "
                              "raw files, not a prepared folder")
        source = open_source(eval_config, key, tokenizer)
        count = min(len(source), eval_config.max_docs or len(source))

        def documents(start: int, source=source, count=count):
            for i in range(start, count):
                try:
                    text = source[i]
                except InvalidUtf8:
                    if invalid_utf8 == "skip":
                        continue
                    raise
                if text:
                    yield tokenizer.encode_with_bytes(text)

        packer = RowPacker(documents, seq_len, with_extra=True, name=key)
        packed = []
        while (row := packer.next_row()) is not None:
            packed.append(row)
        if not packed:
            raise CptjaxError(f"{key}: no documents with text; check its paths")
        empty = (np.zeros(seq_len + 1, np.int32), np.zeros(seq_len + 1, np.int32),
                 np.zeros(seq_len + 1))
        packed += [empty] * (-len(packed) % batch_size)
        batches = []
        for first in range(0, len(packed), batch_size):
            mine = packed[first + process_index * rows:first + (process_index + 1) * rows]
            tokens = np.stack([r[0] for r in mine])
            segments = np.stack([r[1] for r in mine])
            batch = rows_to_batch(tokens, segments, np.full(rows, index, np.int32))
            extra = np.stack([r[2] for r in mine])
            batch["num_bytes"] = (extra[:, 1:] * batch["loss_mask"]).sum(axis=1).astype(np.float32)
            batches.append(batch)
        sets[eval_config.name] = batches
    return sets
