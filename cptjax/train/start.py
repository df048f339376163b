"""How a training run starts, decided once: where its model config, tokenizer and weights come from.

The start order:
  1. "resume": the run has a finished checkpoint of its own -> params, optimizer state, EMA, step
     and data position from its latest step; model config and tokenizer from that checkpoint too, so
     `model.init_from` may be gone by then (unless the run's copy of the tokenizer is incomplete:
     a crash while it was first written; then it is rewritten from the source).
  2. "init": `model.init_from` (an HF folder or a cptjax checkpoint, `model.init_step`) -> its
     weights, a fresh optimizer, step 0: the CPT default.
  3. "scratch": `model.hf_config` -> random weights, step 0.
`model.tokenizer`, when set, overrides where the tokenizer comes from.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import user_path
from cptjax.core.progress import progress_bar
from cptjax.io.checkpoint import ASSETS_DIR, EMA, finished_steps, has_item
from cptjax.io.weights import Weights, open_weights
from cptjax.model.config import ModelConfig, read_hf_config_file
from cptjax.model.transformer import Llama
from cptjax.train.config import TrainConfig
from cptjax.train.ema import init_ema
from cptjax.train.preemption import Preemption
from cptjax.train.run_folder import assets_complete, read_meta, restore_run


@dataclasses.dataclass
class RunStart:
    """The answer to "where does this run come from?", used by everything that starts the run."""

    origin: Literal["resume", "init", "scratch"]
    model_config: ModelConfig
    tokenizer_dir: epath.Path | None
    asset_sources: list[epath.Path | None]  # what checkpoints/hf_assets is (re)written from, if needed
    weights: Weights | None = None  # "init": model.init_from, open until the weights are loaded
    resume_step: int | None = None  # "resume": the run's latest finished step
    resume_meta: dict | None = None  # "resume": that step's train_meta (data position...)

    def describe(self, config: TrainConfig) -> str:
        if self.origin == "resume":
            return f"resumed from step {self.resume_step} of {config.paths.checkpoints}"
        if self.origin == "init":
            return f"weights from {self.weights.describe()} (fresh optimizer, step 0)"
        return f"from scratch ({config.model.hf_config}, seed {config.training.seed})"

    def close(self) -> None:
        if self.weights is not None:
            self.weights.close()


def choose_start(config: TrainConfig) -> RunStart:
    """Works out the start order for `config`; reads configs, headers and metadata, no weights."""
    own = config.paths.checkpoints
    chosen = user_path(config.model.tokenizer, "model.tokenizer") if config.model.tokenizer else None
    steps = finished_steps(own)
    if steps:
        with open_weights(own, steps[-1], flag="run_dir", step_flag=None) as weights:
            model_config = config.model.run_model_config(weights.config)
        meta = read_meta(own, steps[-1])
        _check_ema(config, own, steps[-1])
        if assets_complete(own / ASSETS_DIR):
            tokenizer = chosen or weights.tokenizer_dir
            sources = []
        else:  # a crash while the run's copy was first written: rewrite it from the source
            source = _init_from_assets(config)
            sources = [source, chosen]
            tokenizer = chosen or (source if source is not None and (source / "tokenizer.json").is_file()
                                   else None)
            if not any(s is not None for s in sources) and (own / ASSETS_DIR).exists():
                raise CptjaxError(f"{own / ASSETS_DIR}: incomplete (a crash while it was written) and "
                                  "model.init_from no longer has the files to rewrite it; set "
                                  "model.tokenizer to the tokenizer's folder")
        return RunStart("resume", model_config, tokenizer, sources, resume_step=steps[-1], resume_meta=meta)
    if config.model.init_from is not None:
        weights = open_weights(config.model.init_from, config.model.init_step,
                               flag="model.init_from", step_flag="model.init_step")
        return RunStart("init", config.model.run_model_config(weights.config), chosen or weights.tokenizer_dir,
                         [weights.assets_dir, chosen], weights)
    path = user_path(config.model.hf_config, "model.hf_config")
    if not path.is_file():
        raise CptjaxError(f"model.hf_config {path}: no such file")
    return RunStart("scratch", config.model.run_model_config(read_hf_config_file(path)), chosen, [chosen])


def _check_ema(config: TrainConfig, checkpoints: epath.Path, step: int) -> None:
    """A resume with training.ema from a step saved without an EMA (the key was added to a running
    run) works only where the EMA is still the weights themselves: before its start_step."""
    ema = config.training.ema
    if ema is not None and step >= ema.start_step and not has_item(checkpoints, step, EMA):
        raise CptjaxError(f"training.ema: step {step} of {checkpoints} was saved without an EMA (the run had no "
                          f"training.ema then), so there is no average to continue; set training.ema.start_step "
                          f"to {step + 1} or later to start one from here")


def _init_from_assets(config: TrainConfig) -> epath.Path | None:
    """model.init_from's tokenizer and generation files, if it is still there."""
    if config.model.init_from is None:
        return None
    try:
        with open_weights(config.model.init_from, config.model.init_step, flag="model.init_from",
                          step_flag="model.init_step") as weights:
            return weights.assets_dir
    except CptjaxError:
        return None


def initial_state(start: RunStart, config: TrainConfig, setup, data, preemption: Preemption) -> dict:
    """The train state on its shardings: restored (resume: `data`'s position first, so a resume it
    cannot honour is refused before the arrays are read), loaded from `start.weights`, or
    initialised; `setup` is the run's `TrainSetup`. With training.ema, the EMA is restored, or starts
    as the parameters (what it is before training.ema.start_step). Writes nothing. A SIGTERM
    (`preemption`) stops an HF weight load between two tensors, with StartInterrupted."""
    shardings = setup.state_shardings
    if start.origin == "resume":
        data.set_state(start.resume_meta["data_state"])
        state, _ = restore_run(config.paths.checkpoints, start.resume_step, setup.abstract_state)
        state["step"] = jax.device_put(jnp.int32(start.resume_step), shardings["step"])
        if "ema" in shardings and "ema" not in state:  # allowed by _check_ema: before its start_step
            state["ema"] = jax.jit(init_ema, out_shardings=shardings["ema"])(state["params"])
        return state
    if start.origin == "init":
        bar = progress_bar("loading weights")
        params = start.weights.read_onto(setup.abstract_state["params"], progress=lambda tensors: preemption.between(
            bar(tensors), "loading the weights"))
        preemption.check("after loading the weights")  # before the optimizer state's compile
    else:
        seed, param_dtype = config.training.seed, setup.param_dtype

        @functools.partial(jax.jit, out_shardings=shardings["params"])
        def init():
            model = Llama(start.model_config, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
            return nnx.to_pure_dict(nnx.state(model, nnx.Param))
        params = init()
    opt_state = jax.jit(setup.optimizer.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.int32(0), shardings["step"])
    state = {"step": step, "params": params, "opt_state": opt_state}
    if "ema" in shardings:
        state["ema"] = jax.jit(init_ema, out_shardings=shardings["ema"])(params)
    return state
