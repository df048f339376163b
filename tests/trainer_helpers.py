"""A deterministic stand-in for the data pipeline, and configs for short trainer runs."""

import numpy as np

from test_train_step import packed_batch


class CountingData:
    """Batch k is a function of (seed, k) alone; the state is k. Same contract as the pipeline."""

    source_names = ("domain", "replay")

    def __init__(self, vocab, rows, seq_len, seed=0):
        self.vocab, self.rows, self.seq_len, self.seed, self.k = vocab, rows, seq_len, seed, 0

    def batch(self, k):
        rng = np.random.default_rng([self.seed, k])
        # Zipf-distributed tokens: learnable (unigram statistics), unlike uniform noise.
        weights = 1.0 / np.arange(1, self.vocab + 1)
        docs = [[rng.choice(self.vocab, size=n, p=weights / weights.sum()) for n in (self.seq_len // 2 + 1, self.seq_len // 2)]
                for _ in range(self.rows)]
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
        self.k = state["batches"]


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
