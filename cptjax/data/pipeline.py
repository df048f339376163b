"""The training stream: sources -> shuffled documents -> tokens -> packed rows -> mixture -> batches.

Per source and process, Grain gives the document order: the process's share of document indices
(`[process_index::process_count]`), shuffled with a seed derived from `data.seed` and the source's
name, reshuffled every epoch (`shuffle().repeat()`). Reading and tokenizing are one-to-one maps, so
Grain can run them in worker processes (`mp_prefetch`) and in threads (`ReadOptions`) without
changing the order. Packing and mixing are stateful and run after it in this process, as Grain
advises for pipelines that must not depend on the worker count.

The state is therefore ours and tiny: the step, and for each source the index of the next document
in its order and the token offset in it (see `TrainPipeline.get_state`). Restoring rebuilds each
Grain stream from that index, so the batches continue exactly, with any number of workers.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Iterator

import grain
import numpy as np

from cptjax.core.errors import CptjaxError
from cptjax.data.config import DataConfig
from cptjax.data.mixture import StagedSelectionMap
from cptjax.data.packing import RowPacker, rows_per_process, rows_to_batch
from cptjax.data.read import open_source, probe_documents, read_documents
from cptjax.data.sources import DocumentSource
from cptjax.data.tokenize import DocumentTokenizer, TokenizerSpec, load_data_tokenizer

STATE_VERSION = 2
# What to do when a run cannot continue its data stream exactly (three messages give it).
_FRESH_START = "start a new run (another run_dir) with model.init_from set to this run's checkpoints"


def source_seed(seed: int, name: str) -> int:
    """A 32-bit shuffle seed per source: adding or reordering sources changes no other's order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


def document_stream(source: DocumentSource, tokenizer: DocumentTokenizer | None, *, seed: int,
                    process_index: int, process_count: int, repeat: bool, start: int,
                    num_workers: int, invalid_utf8: str) -> Iterator:
    """This process's documents of one source in epoch order, from position `start` on."""
    order = grain.MapDataset.range(len(source))[process_index::process_count].shuffle(seed=seed)
    if repeat:
        order = order.repeat()  # each epoch reshuffled (Grain reseeds the shuffle per epoch)
    for items in read_documents(source, tokenizer, order[start:], num_workers=num_workers,
                                invalid_utf8=invalid_utf8):
        yield from items


class TrainPipeline:
    """This process's batches: `next(pipeline)` -> dict of [rows, seq_len] arrays (packing.py).

    rows = batch_size // process_count. Not thread-safe; call from the training loop only.
    """

    def __init__(self, config: DataConfig, spec: TokenizerSpec, sources: list[DocumentSource], *,
                 seq_len: int, batch_size: int, process_index: int, process_count: int):
        self.config = config
        self.source_names: tuple[str, ...] = config.source_names
        self.seq_len, self.batch_size = seq_len, batch_size
        self.process_index, self.process_count = process_index, process_count
        self.rows = rows_per_process(batch_size, process_index, process_count)
        self._spec = spec
        self._sources = sources
        self._tokenizer = DocumentTokenizer(spec)
        self._selection = StagedSelectionMap(config.stage_weights(), self.rows)
        docs_per_process = [len(range(process_index, len(s), process_count)) for s in sources]
        self._packers = [RowPacker(self._opener(i), seq_len, name=self._where(i),
                                   max_skips_in_a_row=max(docs_per_process[i], 1))
                         for i in range(len(sources))]
        self._step = 0
        self._tokens = np.zeros(len(sources), dtype=np.int64)
        self._state = self._snapshot()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _opener(self, i: int):
        source_config = self.config.sources[i]
        prepared = source_config.type == "prepared"

        def open_docs(start: int) -> Iterator:
            return document_stream(
                self._sources[i], None if prepared else self._tokenizer,
                seed=source_seed(self.config.seed, source_config.name),
                process_index=self.process_index, process_count=self.process_count,
                repeat=source_config.on_exhaustion == "repeat", start=start,
                num_workers=self.config.num_workers, invalid_utf8=self.config.invalid_utf8)
        return open_docs

    # -- batches --------------------------------------------------------------------------------

    def _build_batch(self) -> dict:
        for s, packer in enumerate(self._packers):
            if packer.exhausted and self.config.sources[s].on_exhaustion == "stop":
                raise CptjaxError(
                    f"{self._where(s)}: all of this source's documents have been used "
                    f"(on_exhaustion: stop), before step {self._step}; the run ends here. Set "
                    "on_exhaustion: repeat for another epoch, add documents, or train fewer steps")
        first_row = self._step * self.rows
        chosen = self._selection.sources_of(first_row, self.rows)
        tokens = np.zeros((self.rows, self.seq_len + 1), dtype=np.int32)
        segments = np.zeros((self.rows, self.seq_len + 1), dtype=np.int32)
        for r, s in enumerate(chosen):
            row = self._packers[s].next_row()
            if row is None:  # a "stop" source ran out: padding now, the error at the next batch
                continue
            tokens[r], segments[r] = row[0], row[1]
            real = int((row[1][:-1] > 0).sum())
            self._tokens[s] += real
        self._step += 1
        return rows_to_batch(tokens, segments, chosen)

    def _where(self, s: int) -> str:
        return f"data.sources[{s}] ({self.source_names[s]})"

    def _snapshot(self) -> dict:
        return {
            "version": STATE_VERSION,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "seed": self.config.seed,
            "tokenizer": self._spec.fingerprint,
            "sources": list(self.source_names),
            "num_docs": [len(s) for s in self._sources],
            "step": self._step,
            "streams": [p.get_state() for p in self._packers],
            "tokens": [int(t) for t in self._tokens],
        }

    def _produce(self) -> None:
        """Background thread: batches (with the state after each) into the queue."""
        while not self._stop.is_set():
            try:
                item = (self._build_batch(), self._snapshot())
            except BaseException as err:  # noqa: BLE001 - handed to the consumer thread, raised there
                item = err
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __iter__(self) -> TrainPipeline:
        return self

    def __next__(self) -> dict:
        if self.config.prefetch == 0:
            batch = self._build_batch()
            self._state = self._snapshot()
            return batch
        if self._thread is None:
            self._stop.clear()
            self._queue = queue.Queue(maxsize=self.config.prefetch)
            self._thread = threading.Thread(target=self._produce, daemon=True,
                                            name="cptjax-data")
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._halt()
            raise item
        batch, self._state = item
        return batch

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None

    def close(self) -> None:
        """Stops the prefetch thread and any Grain worker processes."""
        self._halt()
        for packer in self._packers:
            packer.close()

    # -- state ----------------------------------------------------------------------------------

    def get_state(self) -> dict:
        """After the last batch returned: a small JSON-serializable dict for the checkpoint.

        {"version", "process_index", "process_count", "batch_size", "seq_len", "seed",
         "tokenizer" (fingerprint), "sources" (names), "num_docs" (per source), "step" (batches
         returned), "streams" (per source: {"doc", "offset", "skipped", "exhausted"}),
         "tokens" (per source, non-padding tokens returned)}. Each process saves its own; the
         trainer keeps every process's (`cptjax.train.distributed.gather_states`).
        """
        return _copy_state(self._state)

    def set_state(self, state: dict | list[dict]) -> None:
        """Continues exactly after the batch the state was taken at; refuses a state it cannot honour.

        `state` is this process's own state, or the list of every process's,
        from which it takes its own: a checkpoint written by one process can restore them all.
        """
        if isinstance(state, list):  # its own entry, else any: _check_state names the mismatch
            state = next((s for s in state if isinstance(s, dict)
                          and s.get("process_index") == self.process_index),
                         state[0] if state else None)
        self._check_state(state)
        self._halt()
        for packer, stream in zip(self._packers, state["streams"]):
            packer.set_state(stream)
        self._step = int(state["step"])
        self._tokens = np.asarray(state["tokens"], dtype=np.int64)
        self._state = _copy_state(state)

    def _check_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CptjaxError("data state: not a cptjax data state of version "
                              f"{STATE_VERSION} (got {str(state)[:80]}); {_FRESH_START}")
        saved, now = state["process_count"], self.process_count
        if saved != now:
            raise CptjaxError(
                f"data state: saved with {saved} data-loading processes (hosts), this run has "
                f"{now}; each process reads its own share of the documents, so the stream cannot "
                f"continue exactly. Resume on {saved} processes, or {_FRESH_START} (a new document "
                "order; some documents will be seen again)")
        if state["process_index"] != self.process_index:
            raise CptjaxError(f"data state: belongs to process {state['process_index']}, this is "
                              f"process {self.process_index}; restore each process's own state")
        for key, name, now, fix in (
                ("sources", "data.sources", list(self.source_names), "keep the same sources in the same order"),
                ("num_docs", "the documents per source", [len(s) for s in self._sources],
                 "keep the same files (documents were added or removed)"),
                ("tokenizer", "the tokenizer", self._spec.fingerprint, "use the same tokenizer"),
                ("seed", "data.seed", self.config.seed, "keep data.seed"),
                ("seq_len", "training.seq_len", self.seq_len, "keep training.seq_len"),
                ("batch_size", "training.batch_size", self.batch_size, "keep training.batch_size")):
            if state[key] != now:
                raise CptjaxError(f"cannot resume: {name} was {state[key]!r} when the checkpoint was "
                                  f"saved, now {now!r}; to resume exactly, {fix}, or {_FRESH_START}")

    # -- reporting ------------------------------------------------------------------------------

    def token_counts(self) -> dict[str, int]:
        """Non-padding tokens per source in the batches returned so far, on this process."""
        return dict(zip(self.source_names, self._state["tokens"]))

    def realized_shares(self) -> dict[str, float]:
        """Each source's share of the tokens returned so far, on this process (weights to compare)."""
        total = sum(self._state["tokens"]) or 1
        return {name: count / total for name, count in self.token_counts().items()}

    def skipped_documents(self) -> dict[str, dict[str, int]]:
        return {name: dict(s["skipped"]) for name, s in zip(self.source_names,
                                                            self._state["streams"])}


def _copy_state(state: dict) -> dict:
    return json.loads(json.dumps(state))


def build_train_pipeline(config: DataConfig, tokenizer, *, seq_len: int, batch_size: int,
                         process_index: int, process_count: int) -> TrainPipeline:
    """The training batches of process `process_index`: `batch_size // process_count` rows each.

    `batch_size` is the global number of rows per step; `tokenizer` is the model's tokenizer
    folder (or its loaded TokenizerSpec), used unless `data.tokenizer` names another. The first
    documents of every source are read here (read.probe_documents), then the line indexes of JSONL
    files that had none are stored beside them (line_index.py).
    """
    if seq_len < 1:
        raise CptjaxError(f"seq_len: must be >= 1, got {seq_len}")
    rows_per_process(batch_size, process_index, process_count)
    spec = load_data_tokenizer(config.tokenizer, tokenizer)
    document_tokenizer = DocumentTokenizer(spec)
    sources = []
    for i, source_config in enumerate(config.sources):
        key = f"data.sources[{i}] ({source_config.name})"
        source = open_source(source_config, f"data.sources[{i}]", document_tokenizer)
        probe_documents(source, None if source_config.type == "prepared" else document_tokenizer, key,
                        config.invalid_utf8)
        if len(source) < process_count:
            raise CptjaxError(f"{key}: {len(source)} documents cannot be shared by {process_count} "
                              "processes; add documents")
        sources.append(source)
    for source in sources:  # all checked: now keep what a later run can reuse
        source.store_indexes()
    return TrainPipeline(config, spec, sources, seq_len=seq_len, batch_size=batch_size,
                         process_index=process_index, process_count=process_count)
