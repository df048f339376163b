"""`load_model`: an HF folder or a cptjax checkpoint, ready to give logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cptjax.core.dtypes import float_dtype
from cptjax.core.paths import PathLike
from cptjax.io.weights import Weights, open_weights
from cptjax.model.config import ModelConfig
from cptjax.model.transformer import Llama, model_from_params


class PretrainedModel:
    """A loaded model: `.logits(tokens [B, L]) -> float32 [B, L, V]`, jitted once per shape."""

    def __init__(self, config: ModelConfig, model: Llama):
        self.config = config
        self.model = model
        graphdef, state = nnx.split(model)
        self._state = state
        self._logits = jax.jit(lambda state, tokens, positions, segment_ids:
                               nnx.merge(graphdef, state)(tokens, positions, segment_ids))

    def logits(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens must be an integer array [B, L], got {tokens.dtype}{list(tokens.shape)}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.num_tokens):
            raise ValueError(f"token ids must lie in [0, {self.config.num_tokens}), got "
                             f"[{tokens.min()}, {tokens.max()}]")
        as_int = lambda a: None if a is None else jnp.asarray(a, jnp.int32)  # noqa: E731
        return self._logits(self._state, as_int(tokens), as_int(positions), as_int(segment_ids))


def params_to_dtype(params: dict, dtype) -> dict:
    return jax.tree.map(lambda a: np.asarray(a).astype(dtype, copy=False), params)


def load_model(path: PathLike, dtype: str = "float32", step: int | None = None, ema: bool = False,
               **model_kwargs) -> PretrainedModel:
    """Loads an HF model folder (config.json + safetensors) or a cptjax checkpoint folder.

    `dtype` sets both the parameter and compute dtype; `step` picks a checkpoint step (latest
    by default); `ema` the EMA of a training run's weights (training.ema) instead of the weights.
    Extra keyword arguments go to `Llama` (remat, attention).
    """
    with open_weights(path, step, flag="path", step_flag="step", ema=ema) as weights:
        return model_from_weights(weights, dtype, **model_kwargs)


def model_from_weights(weights: Weights, dtype: str = "float32", **model_kwargs) -> PretrainedModel:
    """The model of opened weights, parameters and compute in `dtype` (a name of cptjax.core.dtypes)."""
    target = float_dtype(dtype, "dtype")
    params = params_to_dtype(weights.read(), target)
    return PretrainedModel(weights.config, model_from_params(weights.config, params, dtype=target,
                                                             **model_kwargs))
