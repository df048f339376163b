"""Held-out evaluation: loss, perplexity and bits per byte of one model on fixed eval sets.

Every number is a ratio of sums over the whole set (token-weighted NLL, bytes), so it does not
depend on the batch size or the number of hosts.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils


def summarize(nll: float, tokens: float, num_bytes: float) -> dict:
    """The reported numbers of one eval set from its sums (NLL in nats)."""
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
            "bits_per_byte": nll / math.log(2) / num_bytes if num_bytes else None, "tokens": tokens}


def evaluate(eval_fn, params, eval_sets: dict[str, list[dict]], to_global, stop=None) -> dict[str, dict] | None:
    """{set name: summarize(...)}: `eval_fn(params, batch) -> {"nll", "tokens"}` (global sums)
    on every batch; `to_global` lays this process's rows out on the mesh. `stop()` true between
    batches abandons the evaluation (None)."""
    results = {}
    for name, batches in eval_sets.items():
        nll = tokens = num_bytes = 0.0
        for batch in batches:
            if stop is not None and stop():
                return None
            sums = jax.device_get(eval_fn(params, to_global(batch)))
            nll += float(sums["nll"])
            tokens += float(sums["tokens"])
            num_bytes += float(np.sum(batch["num_bytes"]))
        if jax.process_count() > 1:  # nll and tokens are global sums; the bytes are this host's
            num_bytes = float(np.sum(multihost_utils.process_allgather(np.float64(num_bytes))))
        results[name] = summarize(nll, tokens, num_bytes)
    return results


def format_results(step: int, results: dict[str, dict]) -> str:
    return f"step {step} eval: " + ", ".join(
        f"{n} loss {r['loss']:.4f} bpb {r['bits_per_byte'] or float('nan'):.4f}" for n, r in results.items())
