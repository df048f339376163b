"""The pure training and evaluation steps.

`train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch) -> sums` are pure
functions of arrays; `trainer.py` jits them once with explicit shardings. The state is a plain dict
{"step", "params", "opt_state"} with params as a nested dict of arrays (Orbax and optax masks need
nothing more).

A batch is the data pipeline's dict of [B, L] arrays: inputs, targets, loss_mask, positions,
segment_ids, source_ids. The loss is the token-weighted mean of the next-token negative
log-likelihood over loss_mask, in float32. Gradient accumulation sums per-micro-batch token sums
and divides once, so it equals the full-batch gradient exactly (up to float summation order).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class StepConfig:
    num_sources: int
    z_loss: float = 0.0
    grad_accum_steps: int = 1


def token_losses(graphdef: nnx.GraphDef, params: dict, batch: dict[str, jax.Array]):
    """Per-token float32 NLL and log-partition [B, L]."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])  # [B, L, V] f32
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def _sums(graphdef, params, batch, config: StepConfig):
    """Sums over tokens (so micro-batches add up exactly): loss, z-loss, counts, per source."""
    nll, log_z = token_losses(graphdef, params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)
    sources = jax.nn.one_hot(batch["source_ids"], config.num_sources, dtype=jnp.float32)  # [B, L, S]
    weighted = nll * mask
    return {
        "nll": weighted.sum(),
        "z": (jnp.square(log_z) * mask).sum(),
        "tokens": mask.sum(),
        "source_nll": jnp.einsum("BL,BLS->S", weighted, sources),
        "source_tokens": jnp.einsum("BL,BLS->S", mask, sources),
    }


def loss_and_grads(graphdef, params, batch, config: StepConfig):
    """Mean loss over the batch's target tokens and its gradient, accumulated over micro-batches."""
    def objective(p, micro):
        sums = _sums(graphdef, p, micro, config)
        return sums["nll"] + config.z_loss * sums["z"], sums

    grad_fn = jax.grad(objective, has_aux=True)
    accum = config.grad_accum_steps
    if accum == 1:
        grads, sums = grad_fn(params, batch)
    else:
        micro_batches = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

        def add(carry, micro):
            grads, sums = grad_fn(params, micro)
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0],
                                                                                           micro_batches)))
        (grads, sums), _ = jax.lax.scan(add, zeros, micro_batches)
    count = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    return sums["nll"] / count, grads, sums


def train_step(state: dict, batch: dict, *, graphdef, optimizer: optax.GradientTransformation,
               schedule, config: StepConfig) -> tuple[dict, dict[str, Any]]:
    """One optimizer update. A non-finite loss or gradient leaves params and optimizer state as
    they were (the step counter still advances), and the metrics say so."""
    loss, grads, sums = loss_and_grads(graphdef, state["params"], batch, config)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, state["params"]),
        "opt_state": keep(new_opt_state, state["opt_state"]),
    }
    count = jnp.maximum(sums["tokens"], 1.0)
    metrics = {
        "loss": loss,
        "z_loss": sums["z"] / count,
        "grad_norm": grad_norm,
        "learning_rate": schedule(state["step"]),
        "tokens": sums["tokens"],
        "source_loss": sums["source_nll"] / jnp.maximum(sums["source_tokens"], 1.0),
        "source_tokens": sums["source_tokens"],
        "skipped": jnp.logical_not(finite),
    }
    return new_state, metrics


def eval_step(params: dict, batch: dict, *, graphdef, config: StepConfig) -> dict[str, jax.Array]:
    """Token sums for held-out evaluation (loss, perplexity and bits per byte are ratios of these)."""
    sums = _sums(graphdef, params, batch, config)
    return {"nll": sums["nll"], "tokens": sums["tokens"]}
