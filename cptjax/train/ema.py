"""The weight EMA (`training.ema`): an exponential moving average of the parameters, for
evaluation (`eval.ema`) and export (`cptjax convert orbax-to-hf --ema`, `PATH@STEP:ema`).

Kept in float32 whatever `model.param_dtype`, laid out like the parameters, updated inside the
jitted train step (no host round trip) and saved with each checkpoint (item "ema", covered by
the step's fingerprint), so a resumed run continues it bit for bit.

The average is bias-corrected (what `optax.ema(decay, debias=True)` returns, and Adam's moments
use), counted from `start_step`. For update n = step - start_step + 1 >= 1, with d the decay:

    ema_n = (1 - w_n) ema_{n-1} + w_n params_n,    w_n = (1 - d) / (1 - d^n)

so w_1 = 1 and ema_n is the normalised average sum_i d^(n-i) params_i / sum_i d^(n-i) of the
weights trained from `start_step` on: early in a run it is close to their plain mean, later an
EMA of about 1 / (1 - d) steps. Levanter's EMA (`EmaModelAveraging`) instead starts from the
weights at the start and never corrects, so after 1000 steps at d = 0.999 a continued-pretraining
run's EMA is still 37% the base model; here the base model has no weight, and `start_step` leaves
out the steps before it (a re-warm). Before `start_step` the EMA is the parameters themselves.

A step whose loss or gradient is not finite (skipped with `training.on_nan: skip`) leaves the EMA
as it was; later steps keep their w_n, so the EMA stays a convex combination of trained weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cptjax.core.errors import CptjaxError


@dataclasses.dataclass(frozen=True)
class EmaConfig:
    """An EMA of the weights, for evaluation and export; bias-corrected from `start_step`."""

    decay: float = 0.999  # weight of the previous average per step: it spans about 1 / (1 - decay) steps
    start_step: int = 1  # the first step averaged; before it the EMA is the weights themselves

    def __post_init__(self):
        if not 0 < self.decay < 1:
            raise CptjaxError(f"training.ema.decay: must be in (0, 1), e.g. 0.999, got {self.decay}")
        if self.start_step < 1:
            raise CptjaxError(f"training.ema.start_step: must be >= 1, got {self.start_step}")


def init_ema(params: dict) -> dict:
    """The EMA at the start of a run: the parameters, in float32."""
    return jax.tree.map(lambda p: p.astype(jnp.float32), params)


def ema_weight(step: jax.Array, config: EmaConfig) -> jax.Array:
    """w, the weight of step `step`'s parameters in the EMA (float32; 1 before start_step)."""
    n = (jnp.asarray(step, jnp.int32) - config.start_step + 1).astype(jnp.float32)
    decay = jnp.float32(config.decay)
    # n <= 1 by its own branch: XLA's pow(d, 1) need not be exactly d, and w_1 must be exactly 1.
    return jnp.where(n <= 1, jnp.float32(1), (1 - decay) / (1 - decay ** jnp.maximum(n, 1)))


def update_ema(ema: dict, params: dict, step: jax.Array, config: EmaConfig) -> dict:
    """The EMA after step `step` (1-based) produced `params`. (1 - w) ema + w params: with w = 1
    this is exactly the parameters (ema is always finite)."""
    w = ema_weight(step, config)
    return jax.tree.map(lambda e, p: (1 - w) * e + w * p.astype(jnp.float32), ema, params)
