"""The pass-key retrieval probe scored on the mesh: accuracy by prompt length and needle depth.

Scoring is greedy exact match computed in one forward pass: a prompt counts as retrieved when,
fed the prompt and the true key (teacher forcing), the model's argmax at every answer position is
the key's next token. That is exactly the condition for greedy decoding from the prompt to start
with the key, without a KV cache or a decoding loop, so it runs on any mesh with the trainer's
sharded parameters and costs one eval-sized forward pass per batch of prompts. Chance level is
about zero (a 5-digit key), unlike a choice among a few candidates. The answer's mean NLL per
token (nats) is kept as a smoother signal beside it.

The prompts (cptjax.data.passkey) are packed several to a row, one segment each; the logits exist
only at the answer positions ([B, M, V], M a few tokens per prompt).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cptjax.data.passkey import Prompt, RetrievalConfig, make_prompts, probe_batches
from cptjax.data.tokenize import DocumentTokenizer, load_data_tokenizer
from cptjax.model.sharding import with_activation_sharding
from cptjax.train.evaluation import markdown_table

ROW_KEYS = ("inputs", "targets", "positions", "segment_ids")  # [B, L], laid out as training batches
ANSWER_KEYS = ("answer_index", "answer_sample")  # [B, M], rows as the batch's


def retrieval_step(params: dict, batch: dict, *, graphdef) -> dict[str, jax.Array]:
    """Per answer slot [B, M]: the target's NLL (nats), whether it is the argmax, and its prompt."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])  # [B, L, D]
    where = batch["answer_index"]  # [B, M]
    picked = jnp.take_along_axis(hidden, where[..., None], axis=1)  # [B, M, D]
    logits = model.head_logits(picked)  # [B, M, V]
    targets = jnp.take_along_axis(batch["targets"], where, axis=1)  # [B, M]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return {"nll": jax.nn.logsumexp(logits, axis=-1) - target_logit,
            "correct": jnp.argmax(logits, axis=-1) == targets, "sample": batch["answer_sample"]}


def in_micro_batches(params: dict, batch: dict, *, graphdef, micro_batches: int) -> dict[str, jax.Array]:
    """`retrieval_step` over `micro_batches` equal slices of the rows, one after the other, as the
    eval step runs: the probe never needs more memory than training."""
    if micro_batches == 1:
        return retrieval_step(params, batch, graphdef=graphdef)
    split = jax.tree.map(lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch)
    out = jax.lax.map(lambda micro: retrieval_step(params, micro, graphdef=graphdef), split)
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)


@dataclasses.dataclass
class RetrievalProbe:
    """The probe's prompts packed into batches, and its jitted step on the mesh."""

    config: RetrievalConfig
    prompts: list[Prompt]
    batches: list[dict]  # this process's rows of each batch
    fn: Any  # (params, global batch) -> retrieval_step's arrays, replicated
    row_sharding: NamedSharding
    answer_sharding: NamedSharding

    def to_global(self, batch: dict) -> dict:
        def place(key, sharding):
            return jax.make_array_from_process_local_data(sharding, np.asarray(batch[key]))
        return {**{k: place(k, self.row_sharding) for k in ROW_KEYS},
                **{k: place(k, self.answer_sharding) for k in ANSWER_KEYS}}

    def run(self, params, stop=None) -> dict | None:
        """`retrieval_results` of `params`; None if `stop()` turned true between batches."""
        wrong = np.zeros(len(self.prompts))
        nll = np.zeros(len(self.prompts))
        for batch in self.batches:
            if stop is not None and stop():
                return None
            out = jax.device_get(self.fn(params, self.to_global(batch)))
            used = out["sample"] >= 0
            np.add.at(wrong, out["sample"][used], ~out["correct"][used])
            np.add.at(nll, out["sample"][used], out["nll"][used])
        return retrieval_results(self.config, self.prompts, wrong, nll)


def build_probe(config: RetrievalConfig, prompts: list[Prompt], *, graphdef, mesh, rules, param_shardings,
                batch_sharding: NamedSharding, seq_len: int, batch_size: int, micro_batches: int = 1
                ) -> RetrievalProbe:
    """The probe of `config` (its `make_prompts`) for a model laid out on `mesh` (the eval step's
    shardings), in batches of `batch_size` rows of `seq_len` run in `micro_batches` (the training
    step's gradient accumulation); allocates nothing on the devices."""
    batches = probe_batches(prompts, seq_len=seq_len, batch_size=batch_size, process_index=jax.process_index(),
                            process_count=jax.process_count())
    answer_sharding = NamedSharding(mesh, PartitionSpec(*batch_sharding.spec[:1]))
    in_batch = {**{k: batch_sharding for k in ROW_KEYS}, **{k: answer_sharding for k in ANSWER_KEYS}}
    replicated = NamedSharding(mesh, PartitionSpec())
    step = functools.partial(in_micro_batches, graphdef=graphdef, micro_batches=micro_batches)
    fn = jax.jit(with_activation_sharding(step, mesh, rules),
                 in_shardings=(param_shardings, in_batch), out_shardings=replicated)
    return RetrievalProbe(config, prompts, batches, fn, batch_sharding, answer_sharding)


def probe_for_run(config, setup, spec, tokenizer_dir) -> RetrievalProbe | None:
    """`config.eval.retrieval`'s probe (config: a TrainConfig; None without one) with the run's
    tokenizer (`spec`, or the one at `tokenizer_dir`), in the held-out batches' shape (the longest
    length stage's) and the train step's micro-batches."""
    if config.eval.retrieval is None:
        return None
    spec = spec or load_data_tokenizer(config.data.tokenizer, tokenizer_dir, "model.tokenizer")
    prompts = make_prompts(config.eval.retrieval, DocumentTokenizer(spec))
    shape = config.eval_shape
    return build_probe(config.eval.retrieval, prompts, graphdef=setup.graphdef, mesh=setup.mesh,
                       rules=config.mesh.rules, param_shardings=setup.state_shardings["params"],
                       batch_sharding=setup.batch_sharding, seq_len=shape.seq_len, batch_size=shape.batch_size,
                       micro_batches=config.optimizer.grad_accum_steps)


def retrieval_results(config: RetrievalConfig, prompts: list[Prompt], wrong: np.ndarray, nll: np.ndarray) -> dict:
    """The probe's record: overall accuracy, and per (length, depth) cell the share of prompts
    retrieved (every answer token the argmax) and the answer's mean NLL per token."""
    cells = []
    for length in config.lengths:
        for depth in config.depths:
            mine = [i for i, p in enumerate(prompts) if p.length == length and p.depth == depth]
            per_token = [nll[i] / prompts[i].answer for i in mine]
            cells.append({"length": length, "depth": depth, "accuracy": float(np.mean(wrong[mine] == 0)),
                          "answer_nll": float(np.mean(per_token))})
    return {"accuracy": float(np.mean(wrong == 0)), "samples": config.samples,
            "lengths": list(config.lengths), "depths": list(config.depths), "cells": cells}


def accuracy_grid(result: dict, value: str = "accuracy") -> np.ndarray:
    """`value` ("accuracy" or "answer_nll") [lengths, depths] of a `retrieval_results` record."""
    grid = np.full((len(result["lengths"]), len(result["depths"])), np.nan)
    for cell in result["cells"]:
        grid[result["lengths"].index(cell["length"]), result["depths"].index(cell["depth"])] = cell[value]
    return grid


def retrieval_table(result: dict) -> str:
    """A `retrieval_results` record as Markdown: one row per length, one column per depth, each
    cell the accuracy and, in brackets, the answer's mean NLL (nats/token)."""
    accuracy, nll = accuracy_grid(result), accuracy_grid(result, "answer_nll")
    return markdown_table(["prompt tokens", *(f"depth {d:g}" for d in result["depths"])],
                          [[f"{n:,}", *(f"{a:.0%} ({x:.2f})" for a, x in zip(accuracy[i], nll[i]))]
                           for i, n in enumerate(result["lengths"])])
