"""How a training run starts, decided once: where its model config, tokenizer and weights come from.

The start order:
  1. "resume": the run has a finished checkpoint of its own -> params, optimizer state, step and
     data position from its latest step; model config and tokenizer from that checkpoint too, so
     `model.init_from` may be gone by then.
  2. "init": `model.init_from` (an HF folder or a cptjax checkpoint, `model.init_step`) -> its
     weights, a fresh optimizer, step 0: the CPT default.
  3. "scratch": `model.hf_config` -> random weights, step 0.
`model.tokenizer`, when set, overrides where the tokenizer comes from.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from cptjax.checkpoint import RunCheckpointer
from cptjax.errors import CptjaxError
from cptjax.model import Llama
from cptjax.model_config import ModelConfig, read_hf_config_file
from cptjax.progress import progress_bar
from cptjax.train_config import TrainConfig
from cptjax.weights import Weights, find_kind, open_weights


@dataclasses.dataclass
class StartPlan:
    """The answer to "where does this run come from?", used by everything that starts the run."""

    origin: Literal["resume", "init", "scratch"]
    model_config: ModelConfig
    tokenizer_dir: Path | None
    weights: Weights | None = None  # "init": model.init_from, open until the weights are loaded
    resume_step: int | None = None  # "resume": the run's latest finished step

    @property
    def assets_dir(self) -> Path | None:
        """Where the run's tokenizer and generation files come from: the weights' own folder
        (`model.tokenizer`, when set, replaces the tokenizer files)."""
        return self.weights.assets_dir if self.weights is not None else None

    def describe(self, config: TrainConfig) -> str:
        if self.origin == "resume":
            return f"resumed from step {self.resume_step} of {config.paths.checkpoints}"
        if self.origin == "init":
            return f"weights from {self.weights.describe()} (fresh optimizer, step 0)"
        return f"from scratch ({config.model.hf_config}, seed {config.training.seed})"

    def close(self) -> None:
        if self.weights is not None:
            self.weights.close()


def plan_start(config: TrainConfig) -> StartPlan:
    """Works out the start order for `config`; reads configs and headers, no weights."""
    own = config.paths.checkpoints
    chosen = Path(config.model.tokenizer) if config.model.tokenizer else None
    if find_kind(own) is not None:
        with open_weights(own, flag="run_dir") as weights:
            return StartPlan("resume", weights.config, chosen or weights.tokenizer_dir,
                             resume_step=weights.step)
    if config.model.init_from is not None:
        weights = open_weights(config.model.init_from, config.model.init_step,
                               flag="model.init_from", step_flag="model.init_step")
        return StartPlan("init", weights.config, chosen or weights.tokenizer_dir, weights)
    path = Path(config.model.hf_config)
    if not path.is_file():
        raise CptjaxError(f"model.hf_config {path}: no such file")
    return StartPlan("scratch", read_hf_config_file(path), chosen)


def initial_state(plan: StartPlan, config: TrainConfig, setup, checkpointer: RunCheckpointer,
                  data) -> dict:
    """The train state on its shardings: restored (resume, which also restores `data`'s position),
    loaded from `plan.weights`, or initialised; `setup` is the run's `TrainSetup`."""
    shardings = setup.state_shardings
    if plan.origin == "resume":
        step = plan.resume_step
        state, meta = checkpointer.restore(step, setup.abstract_state)
        state["step"] = jax.device_put(jnp.int32(step), shardings["step"])
        data.set_state(meta["data_state"])
        return state
    if plan.origin == "init":
        params = plan.weights.read_onto(setup.abstract_state["params"],
                                        progress=progress_bar("loading weights"))
    else:
        seed, param_dtype = config.training.seed, setup.param_dtype

        @functools.partial(jax.jit, out_shardings=shardings["params"])
        def init():
            model = Llama(plan.model_config, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
            return nnx.to_pure_dict(nnx.state(model, nnx.Param))
        params = init()
    opt_state = jax.jit(setup.optimizer.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.int32(0), shardings["step"])
    return {"step": step, "params": params, "opt_state": opt_state}
