"""Batches and short trainer runs for tests, without torch (worker subprocesses import this)."""

import jax.numpy as jnp
import numpy as np


def packed_batch(docs, length, sources=None):
    """One row per list of documents: inputs/targets within each document, padding after."""
    rows = {k: [] for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids", "source_ids")}
    for row_docs in docs:
        row = {k: [] for k in rows}
        for seg, doc in enumerate(row_docs, start=1):
            n = len(doc) - 1
            row["inputs"] += list(doc[:-1])
            row["targets"] += list(doc[1:])
            row["loss_mask"] += [1.0] * n
            row["positions"] += list(range(n))
            row["segment_ids"] += [seg] * n
            row["source_ids"] += [0 if sources is None else sources[seg - 1]] * n
        pad = length - len(row["inputs"])
        for key, fill in (("inputs", 0), ("targets", 0), ("loss_mask", 0.0), ("positions", 0),
                          ("segment_ids", 0), ("source_ids", -1)):
            rows[key].append(row[key] + [fill] * pad)
    return {k: jnp.asarray(np.array(v, np.float32 if k == "loss_mask" else np.int32)) for k, v in rows.items()}


class CountingData:
    """Batch k is a function of (seed, k) alone; the state is k. Same contract as the pipeline."""

    source_names = ("domain", "replay")

    def __init__(self, vocab, rows, seq_len, seed=0):
        self.vocab, self.rows, self.seq_len, self.seed, self.k = vocab, rows, seq_len, seed, 0

    def batch(self, k):
        rng = np.random.default_rng([self.seed, k])
        # Zipf-distributed tokens: learnable (unigram statistics), unlike uniform noise.
        weights = 1.0 / np.arange(1, self.vocab + 1)
        lengths = (self.seq_len // 2 + 1, self.seq_len // 2)
        docs = [[rng.choice(self.vocab, size=n, p=weights / weights.sum()) for n in lengths] for _ in range(self.rows)]
        batch = {key: np.asarray(v) for key, v in packed_batch(docs, self.seq_len, sources=[0, 1]).items()}
        batch["num_bytes"] = np.full((self.rows,), 4.0 * self.seq_len, np.float32)
        return batch

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch(self.k)
        self.k += 1
        return batch

    def get_state(self):
        return {"batches": self.k}

    def set_state(self, state):
        """This process's state, or the list of every process's (what the trainer checkpoints)."""
        self.k = (state[0] if isinstance(state, list) else state)["batches"]


def raw_config(run_dir, init_from, **sections):
    raw = {
        "run_dir": str(run_dir),
        "model": {"init_from": str(init_from), "compute_dtype": "float32"},
        "data": {"sources": [{"name": "domain", "type": "jsonl", "paths": ["unused.jsonl"], "weight": 0.9},
                             {"name": "replay", "type": "jsonl", "paths": ["unused.jsonl"], "weight": 0.1}]},
        "training": {"steps": 40, "batch_size": 4, "seq_len": 32},
        "schedule": {"peak_lr": 1e-3, "warmup": 4, "end_lr": 1e-4},
        "checkpoint": {"every": 10, "keep_last": 2},
        "eval": {"every": 20},
        "logging": {"every": 1, "progress": "lines"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return raw
