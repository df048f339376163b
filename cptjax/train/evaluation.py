"""Held-out evaluation: loss, perplexity and bits per byte of one model on fixed eval sets, and the
tables that compare two evaluations (adaptation on the domain sets, forgetting on the others).

Every number is a ratio of sums over the whole set (token-weighted NLL, bytes), so it does not
depend on the batch size or the number of hosts.

Loss by position bucket: the targets are grouped by the position of their input token within its
document's segment of the row (the batch's `positions`, which restart at every document and at
every row a document continues into), so a target at position p is predicted from p + 1 tokens of
its own document: exactly the context the model had. Buckets [0, e0), [e0, e1), ... end at the
row length. For long-context evaluation use eval sets of documents at least a row long: each row
is then one document and the buckets cover every position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from cptjax.core.errors import CptjaxError

DEFAULT_POSITION_BUCKETS = 8  # doubling buckets when eval.position_buckets is not set


def position_edges(seq_len: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """The upper edges of the position buckets of rows of `seq_len`: the given edges below seq_len,
    then seq_len; by default (None) seq_len halved up to 7 times: [0, L/128), ..., [L/2, L)
    (fewer buckets for tiny L). An empty list gives no buckets."""
    if buckets is not None and not buckets:
        return ()
    if buckets is None:
        buckets = sorted({max(1, seq_len >> k) for k in range(1, DEFAULT_POSITION_BUCKETS)})
    return tuple(int(e) for e in buckets if e < seq_len) + (seq_len,)


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """'0-1024', '1024-2048', ...: positions from the first number up to (not including) the second."""
    return [f"{lo}-{hi}" for lo, hi in zip((0, *edges[:-1]), edges)]


def summarize(nll: float, tokens: float, num_bytes: float) -> dict:
    """The reported numbers of one eval set from its sums (NLL in nats)."""
    loss = nll / max(tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
            "bits_per_byte": nll / math.log(2) / num_bytes if num_bytes else None, "tokens": tokens}


def evaluate(eval_fn, params, eval_sets: dict[str, list[dict]], to_global, stop=None,
             position_edges: Sequence[int] = ()) -> dict[str, dict] | None:
    """{set name: summarize(...)}: `eval_fn(params, batch) -> {"nll", "tokens"}` (global sums)
    on every batch; `to_global` lays this process's rows out on the mesh. `stop()` true between
    batches abandons the evaluation (None). With `position_edges` (the eval step's, which then
    also returns "position_nll" and "position_tokens" per bucket), each summary has
    "position_loss" and "position_tokens": {bucket label: value}, the loss None where a bucket
    has no targets."""
    results = {}
    buckets = len(position_edges)
    for name, batches in eval_sets.items():
        nll = tokens = num_bytes = 0.0
        bucket_nll, bucket_tokens = np.zeros(buckets), np.zeros(buckets)
        for batch in batches:
            if stop is not None and stop():
                return None
            sums = jax.device_get(eval_fn(params, to_global(batch)))
            nll += float(sums["nll"])
            tokens += float(sums["tokens"])
            num_bytes += float(np.sum(batch["num_bytes"]))
            if buckets:
                bucket_nll += np.asarray(sums["position_nll"], np.float64)
                bucket_tokens += np.asarray(sums["position_tokens"], np.float64)
        if jax.process_count() > 1:  # nll and tokens are global sums; the bytes are this host's
            num_bytes = float(np.sum(multihost_utils.process_allgather(np.float64(num_bytes))))
        results[name] = summarize(nll, tokens, num_bytes)
        if buckets:
            labels = bucket_labels(position_edges)
            results[name]["position_loss"] = {label: float(n / t) if t else None
                                              for label, n, t in zip(labels, bucket_nll, bucket_tokens)}
            results[name]["position_tokens"] = dict(zip(labels, map(float, bucket_tokens)))
    return results


def evaluate_each(eval_fn, trees: dict[str, dict], eval_sets: dict[str, list[dict]], to_global, stop=None,
                  position_edges: Sequence[int] = ()) -> dict[str, dict] | None:
    """`evaluate` of each named tree of weights in turn ({"eval_ema": ema, "eval": params}): {name:
    results}, or None if `stop` cut one short."""
    results = {}
    for name, params in trees.items():
        results[name] = evaluate(eval_fn, params, eval_sets, to_global, stop, position_edges)
        if results[name] is None:
            return None
    return results


def format_results(step: int, results: dict[str, dict], kind: str = "eval") -> str:
    return f"step {step} {kind}: " + ", ".join(
        f"{n} loss {r['loss']:.4f} bpb {r['bits_per_byte'] or float('nan'):.4f}" for n, r in results.items())


# -- comparing results: `cptjax eval`, reports, model cards and merge sweeps share these tables ----

def domain_sets(names: Sequence[str], domain: Sequence[str] = (), flag: str = "--domain") -> tuple[str, ...]:
    """The eval sets that measure adaptation: `domain` if given, else the first set. The others
    measure forgetting."""
    for name in domain:
        if name not in names:
            raise CptjaxError(f"{flag} {name}: no eval set of that name; the sets are {', '.join(names)}")
    return tuple(domain) if domain else tuple(names[:1])


def compare(before: dict[str, dict], after: dict[str, dict], domain: Sequence[str],
            per_byte: bool = False) -> list[dict]:
    """Per set in both: losses before and after (nats/token), the change, and what it measures:
    adaptation (the domain loss drop) or forgetting (the general loss rise). `per_byte`: the change
    and amount in bits per byte, for models with different tokenizers (their losses per token are
    not comparable; bits per byte count the same text's bytes)."""
    rows, key = [], "bits_per_byte" if per_byte else "loss"
    for name in (n for n in before if n in after):
        b, a = before[name], after[name]
        role = "domain" if name in domain else "general"
        rows.append({"set": name, "role": role, "loss_before": b["loss"], "loss_after": a["loss"],
                     "change": a[key] - b[key], "bpb_before": b.get("bits_per_byte"),
                     "bpb_after": a.get("bits_per_byte"), "unit": "bits/byte" if per_byte else "nats/token",
                     "measure": "adaptation" if role == "domain" else "forgetting",
                     "amount": b[key] - a[key] if role == "domain" else a[key] - b[key]})
    return rows


def comparison_table(rows: list[dict], before: str = "before", after: str = "after") -> str:
    """`compare`'s rows as Markdown: adaptation and forgetting side by side."""
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    per_byte = any(r.get("unit") == "bits/byte" for r in rows)
    return markdown_table(
        ["held-out set", "role", f"loss {before}", f"loss {after}", "change (bits/byte)" if per_byte else "change",
         f"bits/byte {before}", f"bits/byte {after}", "adaptation", "forgetting"],
        [[r["set"], r["role"], fmt(r["loss_before"]), fmt(r["loss_after"]), f"{r['change']:+.4f}",
          fmt(r["bpb_before"]), fmt(r["bpb_after"]),
          f"{r['amount']:+.4f}" if r["measure"] == "adaptation" else "",
          f"{r['amount']:+.4f}" if r["measure"] == "forgetting" else ""] for r in rows])


def results_table(results: dict[str, dict[str, dict]]) -> str:
    """{model: {set: summarize(...)}} as Markdown, one row per model and set."""
    return markdown_table(
        ["model", "held-out set", "loss (nats/token)", "perplexity", "bits/byte", "tokens"],
        [[model, name, f"{r['loss']:.4f}", f"{r['perplexity']:.3f}",
          "n/a" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}", f"{r['tokens']:,.0f}"]
         for model, sets in results.items() for name, r in sets.items()])


def position_table(results: dict[str, dict[str, dict]]) -> str:
    """Loss by position bucket, {model: {set: summary}} as Markdown: one row per model and set,
    one column per bucket; '' when no summary has buckets."""
    rows, labels = [], []
    for model, sets in results.items():
        for name, r in sets.items():
            if "position_loss" in r:
                labels = labels or list(r["position_loss"])
                rows.append([model, name] + ["n/a" if r["position_loss"].get(b) is None else
                                             f"{r['position_loss'][b]:.4f}" for b in labels])
    return markdown_table(["model", "held-out set", *(f"positions {b}" for b in labels)], rows) if rows else ""


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
