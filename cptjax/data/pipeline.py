"""The training stream: sources -> shuffled documents -> tokens -> packed rows -> mixture -> batches.

Per source and process, Grain gives the document order: the process's share of document indices
(`[process_index::process_count]`), shuffled with a seed derived from `data.seed` and the source's
name, reshuffled every epoch (`shuffle().repeat()`). Reading and tokenizing are one-to-one maps, so
Grain can run them in worker processes (`mp_prefetch`) and in threads (`ReadOptions`) without
changing the order. A source's length options (`min_tokens`, `long_upsample`: `LengthFilter`) then
leave documents out as a pure function of their length and place in the order. Packing and mixing
are stateful and run after it in this process, as Grain advises for pipelines that must not depend
on the worker count.

Length stages (`data.stages` entries with `seq_len` or `batch_size`) change the rows' length and
count from their start step on: the packers cut the next rows at the new length from where they
stand, so nothing is lost or repeated at the boundary, and the state needs nothing new.

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
from cptjax.data.config import DataConfig, SourceConfig, shape_at
from cptjax.data.mixture import StagedSelectionMap
from cptjax.data.packing import SKIP_REASONS, RowPacker, Skipped, rows_per_process, rows_to_batch
from cptjax.data.read import open_source, probe_documents, read_documents
from cptjax.data.sources import DocumentSource
from cptjax.data.tokenize import DocumentTokenizer, TokenizerSpec, load_data_tokenizer

STATE_VERSION = 2
# What to do when a run cannot continue its data stream exactly (three messages give it).
_FRESH_START = "start a new run (another run_dir) with model.init_from set to this run's checkpoints"


def source_seed(seed: int, name: str) -> int:
    """A 32-bit shuffle seed per source: adding or reordering sources changes no other's order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


class LengthFilter:
    """A source's `min_tokens` and `long_upsample`: whether the document at a place in this
    process's order is left out, as a pure function of its length and that place (so a resumed
    stream leaves out exactly the same ones). `long_upsample` keeps a document shorter than its
    min_tokens with probability 1 / factor, by a hash of (seed, place): a new draw every epoch."""

    def __init__(self, config: SourceConfig, seed: int):
        self.min_tokens, self.upsample, self.seed = config.min_tokens, config.long_upsample, seed

    @property
    def active(self) -> bool:
        return self.min_tokens is not None or self.upsample is not None

    def reason(self, length: int, place: int) -> str | None:
        """Why the document of `length` tokens at `place` is left out ("short", "downsampled"),
        or None if it is kept."""
        if self.min_tokens is not None and length < self.min_tokens:
            return "short"
        if self.upsample is not None and length < self.upsample.min_tokens:
            digest = hashlib.sha256(f"{self.seed}/{place}".encode()).digest()
            if int.from_bytes(digest[:8], "little") / 2**64 >= 1 / self.upsample.factor:
                return "downsampled"
        return None


def document_stream(source: DocumentSource, tokenizer: DocumentTokenizer | None, *, seed: int,
                    process_index: int, process_count: int, repeat: bool, start: int,
                    num_workers: int, invalid_utf8: str, length_filter: LengthFilter | None = None) -> Iterator:
    """This process's documents of one source in epoch order, from position `start` on; those
    `length_filter` leaves out come as `Skipped` markers (counted by the packer)."""
    order = grain.MapDataset.range(len(source))[process_index::process_count].shuffle(seed=seed)
    if repeat:
        order = order.repeat()  # each epoch reshuffled (Grain reseeds the shuffle per epoch)
    place = start
    for items in read_documents(source, tokenizer, order[start:], num_workers=num_workers,
                                invalid_utf8=invalid_utf8):
        for item in items:
            if length_filter is not None and not isinstance(item, Skipped) and len(item):
                reason = length_filter.reason(len(item), place)
                item = item if reason is None else Skipped(reason)
            yield item
            place += 1


class TrainPipeline:
    """This process's batches: `next(pipeline)` -> dict of [rows, seq_len] arrays (packing.py).

    rows = batch_size // process_count, with seq_len and batch_size those of the batch's step
    (`shape_at(self.shapes, step)`: training's, or a length stage's). Not thread-safe; call from the
    training loop only.
    """

    def __init__(self, config: DataConfig, spec: TokenizerSpec, sources: list[DocumentSource], *,
                 seq_len: int, batch_size: int, process_index: int, process_count: int):
        self.config = config
        self.source_names: tuple[str, ...] = config.source_names
        self.seq_len, self.batch_size = seq_len, batch_size  # the first stage's
        self.shapes = config.stage_shapes(seq_len, batch_size)
        self.process_index, self.process_count = process_index, process_count
        self.rows = rows_per_process(batch_size, process_index, process_count)
        self._spec = spec
        self._sources = sources
        self._tokenizer = DocumentTokenizer(spec)
        rows = [rows_per_process(s.batch_size, process_index, process_count) for s in self.shapes]
        self._selection = StagedSelectionMap(config.stage_weights(), rows)
        docs_per_process = [len(range(process_index, len(s), process_count)) for s in sources]
        self._packers = [RowPacker(self._opener(i), seq_len, name=self._where(i),
                                   # two epochs' worth: the run then holds a whole epoch
                                   max_skips_in_a_row=max(2 * docs_per_process[i] - 1, 1))
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
        seed = source_seed(self.config.seed, source_config.name)
        lengths = LengthFilter(source_config, source_seed(seed, f"lengths/{self.process_index}"))

        def open_docs(start: int) -> Iterator:
            return document_stream(
                self._sources[i], None if prepared else self._tokenizer, seed=seed,
                process_index=self.process_index, process_count=self.process_count,
                repeat=source_config.on_exhaustion == "repeat", start=start,
                num_workers=self.config.num_workers, invalid_utf8=self.config.invalid_utf8,
                length_filter=lengths if lengths.active else None)
        return open_docs

    # -- batches --------------------------------------------------------------------------------

    def _build_batch(self) -> dict:
        for s, packer in enumerate(self._packers):
            if packer.exhausted and self.config.sources[s].on_exhaustion == "stop":
                raise CptjaxError(
                    f"{self._where(s)}: all of this source's documents have been used "
                    f"(on_exhaustion: stop), before step {self._step}; the run ends here. Set "
                    "on_exhaustion: repeat for another epoch, add documents, or train fewer steps")
        step = self._step + 1
        shape = shape_at(self.shapes, step)
        rows = rows_per_process(shape.batch_size, self.process_index, self.process_count)
        chosen = self._selection.sources_of(self._selection.first_row(step), rows)
        tokens = np.zeros((rows, shape.seq_len + 1), dtype=np.int32)
        segments = np.zeros((rows, shape.seq_len + 1), dtype=np.int32)
        for r, s in enumerate(chosen):
            row = self._packers[s].next_row(shape.seq_len)
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
        shape = shape_at(self.shapes, self._step)  # the last batch's (before any: the first stage's)
        return {
            "version": STATE_VERSION,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "batch_size": shape.batch_size,
            "seq_len": shape.seq_len,
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

        {"version", "process_index", "process_count", "batch_size" and "seq_len" (the last batch's
         shape), "seed", "tokenizer" (fingerprint), "sources" (names), "num_docs" (per source),
         "step" (batches returned), "streams" (per source: {"doc", "offset", "skipped" (documents
         left out, by packing.SKIP_REASONS), "exhausted"}),
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
        shape = shape_at(self.shapes, int(state["step"]))
        stage = ("" if shape.start_step == 1 else
                 f" (or the seq_len and batch_size of the data.stages entry of step {shape.start_step})")
        for key, name, now, fix in (
                ("sources", "data.sources", list(self.source_names), "keep the same sources in the same order"),
                ("num_docs", "the documents per source", [len(s) for s in self._sources],
                 "keep the same files (documents were added or removed)"),
                ("tokenizer", "the tokenizer", self._spec.fingerprint, "use the same tokenizer"),
                ("seed", "data.seed", self.config.seed, "keep data.seed"),
                ("seq_len", f"training.seq_len{stage}", shape.seq_len, "keep the rows' length"),
                ("batch_size", f"training.batch_size{stage}", shape.batch_size, "keep the rows per step")):
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

    def document_counts(self) -> dict[str, dict[str, int]]:
        """Per source with length options: documents passed so far on this process, and of them
        kept and left out (by reason: `document_counts(state)` of a checkpoint's state too)."""
        return document_counts(self._state, self.config)


def document_counts(state: dict, config: DataConfig) -> dict[str, dict[str, int]]:
    """{source: {"passed", "kept", "short", "downsampled"}} from a data state, for the sources that
    set min_tokens or long_upsample (what the trainer logs: what those options did)."""
    counts = {}
    for source, stream in zip(config.sources, state["streams"]):
        if source.min_tokens is None and source.long_upsample is None:
            continue
        skipped = {**dict.fromkeys(SKIP_REASONS, 0), **stream["skipped"]}
        passed = int(stream["doc"])
        counts[source.name] = {"passed": passed, "kept": passed - sum(skipped.values()),
                               "short": skipped["short"], "downsampled": skipped["downsampled"]}
    return counts


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
    for shape in config.stage_shapes(seq_len, batch_size):
        rows_per_process(shape.batch_size, process_index, process_count)
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
