"""The read stage: a source config -> documents by index -> token ids, through one Grain chain.

`open_source` turns a source config into a `DocumentSource` of the right type. `read_documents`
reads a given order of document indices in chunks of DOCS_PER_READ, tokenizing each chunk in one
batched call, optionally in Grain worker processes, and stops at the first document that cannot be
read (naming its file and line). Training (pipeline.py, a shuffled order per epoch) and `cptjax data
prepare` (prepare.py, file order) both read through it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grain
import numpy as np

from cptjax.core.errors import CptjaxError
from cptjax.data.config import InputConfig
from cptjax.data.packing import Failed, Skipped, all_skipped
from cptjax.data.records import ArrayRecordTextSource, PreparedSource, TfdsSource
from cptjax.data.sources import DocumentSource, InvalidUtf8, JsonlSource, ParquetSource, TextSource, expand_paths
from cptjax.data.tokenize import DocumentTokenizer

DOCS_PER_READ = 32  # documents per Grain element: amortizes the per-element cost, batches the tokenizer
PROBE_DOCS = 256  # documents of each source read, in file order, before a run touches anything


def open_source(config: InputConfig, key: str, tokenizer: DocumentTokenizer | None = None) -> DocumentSource:
    """Opens `config`'s documents; `key` ("data.sources[0]") prefixes messages about its paths.

    `tokenizer` is needed for "prepared", to refuse another tokenizer's ids.
    """
    if config.type == "tfds":
        return TfdsSource(config.dataset, config.split, config.data_dir, config.text_field)
    files = expand_paths(config.paths, key)
    if config.type == "prepared":
        return PreparedSource(files, tokenizer, key)
    directories = [f for f in files if f.is_dir()]
    if directories:
        raise CptjaxError(f"{key}.paths: {directories[0]} is a folder; give files or a glob such "
                          f"as '{directories[0]}/*'")
    if config.type == "jsonl":
        return JsonlSource(files, config.text_field)
    if config.type == "text":
        return TextSource(files, config.delimiter)
    if config.type == "parquet":
        return ParquetSource(files, config.text_field)
    if config.type == "arrayrecord":
        return ArrayRecordTextSource(files)
    raise CptjaxError(f"{key}.type: unknown source type {config.type!r}")


class ReadDocuments:
    """Grain map: document indices -> token ids (or Skipped/Failed markers), in order."""

    def __init__(self, source: DocumentSource, tokenizer: DocumentTokenizer | None, invalid_utf8: str):
        self._source = source
        self._tokenizer = tokenizer
        self._invalid_utf8 = invalid_utf8

    def __call__(self, indices: np.ndarray) -> list:
        indices = [int(i) for i in indices]
        if self._tokenizer is None:  # prepared: the records are token ids already
            return self._source.read_batch(indices)
        items: list = []
        for index in indices:
            try:
                items.append(self._source[index])
            except InvalidUtf8 as err:
                items.append(Skipped("invalid_utf8") if self._invalid_utf8 == "skip"
                             else Failed(str(err)))
            except CptjaxError as err:
                items.append(Failed(str(err)))
        texts = [(i, t) for i, t in enumerate(items) if isinstance(t, str)]
        if texts:
            encoded = self._tokenizer.encode_batch([t for _, t in texts])
            for (i, _), ids in zip(texts, encoded):
                items[i] = ids
        return items


def read_documents(source: DocumentSource, tokenizer: DocumentTokenizer | None, order: grain.MapDataset,
                   *, num_workers: int = 0, invalid_utf8: str = "fail") -> Iterator[list]:
    """Chunks (lists) of token-id arrays or `Skipped` markers for the document indices in `order`,
    in that order. `tokenizer` None means the source holds token ids already (prepared)."""
    chunks = order.batch(DOCS_PER_READ).map(ReadDocuments(source, tokenizer, invalid_utf8))
    dataset = chunks.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=8))
    if num_workers and tokenizer is not None:
        dataset = with_workers(dataset, num_workers)
    iterator = iter(dataset)
    try:
        for items in iterator:
            for item in items:  # fail as soon as a bad document is read, not when it is used
                if isinstance(item, Failed):
                    raise CptjaxError(item.message)
            yield items
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def probe_documents(source: DocumentSource, tokenizer: DocumentTokenizer | None, key: str,
                    invalid_utf8: str = "fail") -> None:
    """Reads the first PROBE_DOCS documents in file order, so a bad file (unreadable, not JSON, a
    missing field, invalid UTF-8, nothing but empty documents) stops a run before it writes
    anything, naming the file and line. The rest is checked as it is read (`cptjax data prepare`
    checks every document up front)."""
    if len(source) == 0:
        raise CptjaxError(f"{key}: no documents; check its paths (empty files hold none)")
    count = min(len(source), PROBE_DOCS)
    found = False
    for items in read_documents(source, tokenizer, grain.MapDataset.range(count), invalid_utf8=invalid_utf8):
        found = found or any(not isinstance(item, Skipped) and len(item) > 0 for item in items)
    if not found and count == len(source):
        raise CptjaxError(all_skipped(key))


def worker_processes(num_workers: int) -> int:
    """The tokenizer processes `num_workers` asks for, at most one per CPU core this process may
    use: more only add start-up time and memory (on a 2-core notebook, `--workers 8` starts 2).
    The documents and their order do not depend on it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        cores = os.cpu_count() or 1
    return max(1, min(num_workers, cores))


def with_workers(dataset: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """`dataset` computed by Grain processes (`worker_processes(num_workers)`), elements still in order."""
    from absl import flags

    if not flags.FLAGS.is_parsed():  # Grain reads absl flags; outside absl.app nobody parses them
        flags.FLAGS.mark_as_parsed()
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_processes(num_workers),
                                                            per_worker_buffer_size=4))
