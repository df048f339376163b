"""`cptjax train`: the continued-pretraining loop.

Start order, written once (`_initial_state`): resume this run's own latest checkpoint if there is
one; else load weights from `model.init_from` (an HF folder or a cptjax checkpoint: fresh optimizer,
step 0); else initialise from `model.hf_config`. Every tensor is placed straight onto its shards.

Each step: the next batch goes onto the mesh, the jitted `train_step` is dispatched, and only then
are the previous step's metrics fetched, so the host never stalls the device. Held-out sets are
evaluated every `eval.every` steps (loss, perplexity, bits per byte). Checkpoints are saved
asynchronously every `checkpoint.every` steps, at the end, and on SIGTERM (preemption), after which
the run exits cleanly; a step whose loss is not finite is never saved.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cptjax.atomic_dir import check_output_dir
from cptjax.checkpoint import ASSETS_DIR, CheckpointReader, RunCheckpointer
from cptjax.errors import CptjaxError
from cptjax.hf_convert import copy_assets, load_hf_params_sharded
from cptjax.metrics import MetricsLogger, StepTimer, peak_flops_per_device, training_flops_per_token
from cptjax.model import Llama, abstract_model
from cptjax.model_config import ModelConfig, read_hf_config, read_hf_config_file
from cptjax.optimizer import build_optimizer
from cptjax.progress import progress_bar
from cptjax.schedules import make_schedule
from cptjax.sharding import (batch_sharding, make_mesh, optimizer_state_shardings, param_shardings,
                             with_activation_sharding)
from cptjax.config_tree import to_dict
from cptjax.data.packing import BATCH_KEYS  # the batch contract, defined once
from cptjax.train_config import TrainConfig, dump_yaml
from cptjax.train_step import StepConfig, eval_step, train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class RunResult:
    final_step: int
    stopped_early: str | None  # why the run ended before training.steps (SIGTERM, NaN), if it did
    origin: str  # "resumed from step N", "weights from PATH", "from scratch"
    state: dict


def model_config_for(config: TrainConfig) -> ModelConfig:
    """The model's config: from the run's own latest checkpoint when resuming, else from
    model.init_from, else from model.hf_config."""
    own = config.paths.checkpoints
    if own.is_dir() and any(p.name.isdigit() for p in own.iterdir()):
        reader = CheckpointReader(own)
        reader.close()
        return reader.config
    source = config.model.init_from
    if source is None:
        path = Path(config.model.hf_config)
        if not path.is_file():
            raise CptjaxError(f"model.hf_config {path}: no such file")
        return read_hf_config_file(path)
    if not Path(source).exists():
        raise CptjaxError(f"model.init_from {source}: no such folder; give an HF model folder or a "
                          "cptjax checkpoint")
    if (Path(source) / "config.json").is_file():
        return read_hf_config(source)
    reader = CheckpointReader(source, config.model.init_step)
    reader.close()
    return reader.config


def check_environment(config: TrainConfig) -> ModelConfig:
    """The checks that need files and devices; all run before the run folder is touched."""
    model_config = model_config_for(config)
    if config.training.seq_len > model_config.max_position_embeddings:
        raise CptjaxError(f"training.seq_len {config.training.seq_len} exceeds the model's "
                          f"max_position_embeddings ({model_config.max_position_embeddings})")
    sizes = config.mesh.axis_sizes(jax.device_count())
    data_ways = sizes[0] * sizes[1]
    if config.training.batch_size % (data_ways * config.optimizer.grad_accum_steps):
        raise CptjaxError(
            f"training.batch_size {config.training.batch_size} must be divisible by the data-parallel "
            f"ways (mesh.data x mesh.fsdp = {data_ways}) times optimizer.grad_accum_steps "
            f"({config.optimizer.grad_accum_steps})")
    if config.training.batch_size % jax.process_count():
        raise CptjaxError(f"training.batch_size {config.training.batch_size} must be divisible by the "
                          f"{jax.process_count()} processes")
    root = Path(config.run_dir)
    if root.exists() and not (root / "checkpoints").exists():
        check_output_dir(root, "run_dir")  # an existing folder must be this run's own
    return model_config


def _tokenizer_dir(config: TrainConfig) -> Path | None:
    """model.tokenizer, else the run's own copy (a resumed run), else init_from's files."""
    if config.model.tokenizer:
        return Path(config.model.tokenizer)
    own = config.paths.checkpoints / ASSETS_DIR
    if (own / "tokenizer_config.json").is_file() or (own / "tokenizer.json").is_file():
        return own
    source = config.model.init_from
    if source is None:
        return None
    if (Path(source) / "config.json").is_file():
        return Path(source)
    return Path(source) / ASSETS_DIR


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (save, then exit cleanly)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption saves
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        """True on every process once any process got SIGTERM (they must save the same step)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run(config: TrainConfig, *, max_steps: int | None = None, data=None, eval_sets=None) -> RunResult:
    """Trains until `training.steps` (or `max_steps` steps in this call, for tests and demos).

    `data` and `eval_sets` default to the pipelines built from `config.data`.
    """
    from cptjax.distributed import initialize

    initialize(config.distributed)
    model_config = check_environment(config)
    paths = config.paths
    mesh = make_mesh(config.mesh)
    rules = config.mesh.rules
    param_dtype, compute_dtype = DTYPES[config.model.param_dtype], DTYPES[config.model.compute_dtype]
    model_kwargs = dict(dtype=compute_dtype, remat=config.model.remat, attention=config.model.attention)
    abstract = abstract_model(model_config, param_dtype=param_dtype, **model_kwargs)
    graphdef = nnx.graphdef(abstract)
    p_shardings = param_shardings(abstract, mesh, rules)
    abstract_params = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(nnx.state(abstract, nnx.Param)), p_shardings)
    optimizer = build_optimizer(config.optimizer, config.schedule)
    schedule = make_schedule(config.schedule)
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = optimizer_state_shardings(abstract_opt_state, p_shardings, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = {"step": replicated, "params": p_shardings, "opt_state": opt_shardings}
    abstract_state = {"params": abstract_params, "opt_state": jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt_state, opt_shardings)}

    tokenizer_dir = _tokenizer_dir(config)
    if data is None:
        from cptjax.data.pipeline import build_train_pipeline
        data = build_train_pipeline(config.data, tokenizer_dir, seq_len=config.training.seq_len,
                                    batch_size=config.training.batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    if eval_sets is None:
        from cptjax.data.eval_sets import build_eval_sets
        eval_sets = build_eval_sets(config.data, tokenizer_dir, seq_len=config.training.seq_len,
                                    batch_size=config.training.batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count())

    # Nothing was written before this point: every check above fails with the run folder untouched.
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        paths.config.write_text(dump_yaml(config))
        assets = paths.checkpoints / ASSETS_DIR
        if not assets.exists() and tokenizer_dir is not None:
            assets.mkdir()
            copy_assets(tokenizer_dir, assets)
    checkpointer = RunCheckpointer(paths.checkpoints, config.checkpoint.keep_last,
                                   config.checkpoint.keep_every, config.checkpoint.async_save)
    logger = MetricsLogger(paths.logs, config.training.steps, enabled=jax.process_index() == 0,
                           tensorboard=config.logging.tensorboard, progress=config.logging.progress)
    try:
        state, origin = _initial_state(config, checkpointer, data, optimizer, abstract, abstract_state,
                                       state_shardings, param_dtype)
        logger.message(f"cptjax train: {origin}; {model_config.hf_architecture}, "
                       f"mesh {dict(mesh.shape)}, {jax.device_count()} devices")
        return _loop(config, model_config, state, origin, data, eval_sets, graphdef, optimizer, schedule,
                     mesh, state_shardings, checkpointer, logger, max_steps)
    finally:
        checkpointer.wait()
        checkpointer.close()
        logger.close()


def _initial_state(config, checkpointer, data, optimizer, abstract, abstract_state, state_shardings,
                   param_dtype):
    latest = checkpointer.latest_step()
    if latest is not None:
        state, meta = checkpointer.restore(latest, abstract_state)
        state["step"] = jax.device_put(jnp.int32(latest), state_shardings["step"])
        data.set_state(meta["data_state"])
        return state, f"resumed from step {latest} of {checkpointer.directory}"
    init_from = config.model.init_from
    if init_from is not None:
        if (Path(init_from) / "config.json").is_file():
            params = load_hf_params_sharded(init_from, abstract.config, state_shardings["params"],
                                            param_dtype, progress=progress_bar("loading weights"))
        else:  # Orbax reads each shard onto its device, cast to the target's dtype
            reader = CheckpointReader(init_from, config.model.init_step)
            try:
                params = reader.restore_onto(abstract_state["params"])
            finally:
                reader.close()
        origin = f"weights from {init_from} (fresh optimizer, step 0)"
    else:
        seed = config.training.seed

        @functools.partial(jax.jit, out_shardings=state_shardings["params"])
        def init():
            model = Llama(abstract.config, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
            return nnx.to_pure_dict(nnx.state(model, nnx.Param))
        params = init()
        origin = f"from scratch ({config.model.hf_config}, seed {seed})"
    opt_state = jax.jit(optimizer.init, out_shardings=state_shardings["opt_state"])(params)
    step = jax.device_put(jnp.int32(0), state_shardings["step"])
    return {"step": step, "params": params, "opt_state": opt_state}, origin


def _loop(config, model_config, state, origin, data, eval_sets, graphdef, optimizer, schedule, mesh,
          state_shardings, checkpointer, logger, max_steps) -> RunResult:
    step_config = StepConfig(num_sources=len(data.source_names), z_loss=config.optimizer.z_loss,
                             grad_accum_steps=config.optimizer.grad_accum_steps)
    rules = config.mesh.rules
    b_sharding = batch_sharding(mesh, rules)
    step_fn = jax.jit(
        with_activation_sharding(functools.partial(train_step, graphdef=graphdef, optimizer=optimizer,
                                                   schedule=schedule, config=step_config), mesh, rules),
        in_shardings=(state_shardings, b_sharding), out_shardings=(state_shardings, None),
        donate_argnums=0)
    eval_fn = jax.jit(
        with_activation_sharding(functools.partial(eval_step, graphdef=graphdef, config=step_config),
                                 mesh, rules),
        in_shardings=(state_shardings["params"], b_sharding))

    def to_global(batch):
        return {k: jax.make_array_from_process_local_data(b_sharding, np.asarray(batch[k])) for k in BATCH_KEYS}

    def evaluate(step):
        results = {}
        for name, batches in eval_sets.items():
            nll = tokens = num_bytes = 0.0
            for batch in batches:
                sums = jax.device_get(eval_fn(state["params"], to_global(batch)))
                nll += float(sums["nll"])
                tokens += float(sums["tokens"])
                num_bytes += float(np.sum(batch["num_bytes"]))
            if jax.process_count() > 1:  # nll and tokens are global sums; the bytes are this host's
                from jax.experimental import multihost_utils
                num_bytes = float(np.sum(multihost_utils.process_allgather(np.float64(num_bytes))))
            loss = nll / max(tokens, 1.0)
            results[name] = {"loss": loss, "perplexity": math.exp(min(loss, 80.0)),
                             "bits_per_byte": nll / math.log(2) / num_bytes if num_bytes else None,
                             "tokens": tokens}
        logger.log(step, "eval", results)
        logger.message(f"step {step} eval: " + ", ".join(
            f"{n} loss {r['loss']:.4f} bpb {r['bits_per_byte'] or float('nan'):.4f}" for n, r in results.items()))
        return results

    start = int(jax.device_get(state["step"]))
    end = config.training.steps if max_steps is None else min(config.training.steps, start + max_steps)
    source_names = list(data.source_names)
    flops_per_token = training_flops_per_token(model_config, config.training.seq_len)
    peak = peak_flops_per_device(jax.devices()[0].device_kind, config.logging.peak_flops_per_device)
    timer = StepTimer()
    logger.start_at(start)
    if config.eval.at_start and start == 0 and eval_sets:
        evaluate(0)

    pending = None  # (step, metrics still on device)
    stopped = None

    def finish(entry) -> bool:
        """Fetches and logs one step's metrics; False if the run must stop (NaN/Inf loss)."""
        nonlocal stopped
        step, metrics = entry
        values = jax.device_get(metrics)
        elapsed = timer.lap()
        record = {
            "loss": float(values["loss"]), "grad_norm": float(values["grad_norm"]),
            "learning_rate": float(values["learning_rate"]), "z_loss": float(values["z_loss"]),
            "tokens": float(values["tokens"]), "skipped": bool(values["skipped"]),
            "source_loss": {n: float(v) for n, v, c in zip(source_names, values["source_loss"],
                                                            values["source_tokens"]) if c > 0},
            "source_tokens": {n: float(c) for n, c in zip(source_names, values["source_tokens"])},
        }
        if elapsed is not None:
            tokens_per_s = config.training.batch_size * config.training.seq_len / elapsed
            record.update(step_time_s=elapsed, tokens_per_s=tokens_per_s)
            if peak:
                record["mfu"] = tokens_per_s * flops_per_token / (peak * jax.device_count())
        if record["skipped"]:
            if config.training.on_nan == "stop":
                stopped = f"loss or gradient not finite at step {step} (loss {record['loss']})"
                logger.message(f"cptjax train: stopping: {stopped}; the last checkpoint is from before it")
                logger.log(step, "train", record)
                return False
            logger.message(f"cptjax train: step {step} skipped: loss or gradient not finite")
        if step % config.logging.every == 0 or step == end or record["skipped"]:
            logger.log(step, "train", record)
            if not logger.has_bar:
                logger.message(f"step {step}/{config.training.steps} loss {record['loss']:.4f} "
                               f"lr {record['learning_rate']:.3g} grad_norm {record['grad_norm']:.3f}"
                               + (f" tok/s {record['tokens_per_s']:,.0f}" if "tokens_per_s" in record else ""))
        return True

    def save(step, data_state, force=False):
        if jax.process_count() > 1:
            # Orbax writes JSON from process 0 only: keep every process's data position.
            from cptjax.data.pipeline import gather_states
            data_state = gather_states(data_state)
        meta = {"step": step, "data_state": data_state, "origin": origin,
                "learning_rate_next": float(schedule(step)), "time": time.time()}
        checkpointer.save(step, state, meta, model_config, to_dict(config), force=force)

    with _Preemption() as preemption:
        for step in range(start + 1, end + 1):
            batch = next(data)
            data_state = data.get_state()
            state, metrics = step_fn(state, to_global(batch))
            if pending is not None and not finish(pending):
                break
            pending = (step, metrics)
            last = step == end
            preempted = preemption.agreed()
            due_save = step % config.checkpoint.every == 0 or last or preempted
            if due_save or step % config.eval.every == 0:
                ok = finish(pending)  # a checkpoint or eval must never follow an unchecked NaN
                pending = None
                if not ok:
                    break
                if step % config.eval.every == 0 and eval_sets:
                    evaluate(step)
                if due_save:
                    save(step, data_state, force=preempted)
                timer.restart()  # the next step's time must not include eval or save
            if preempted:
                stopped = f"SIGTERM at step {step}: checkpoint saved, exiting"
                logger.message(f"cptjax train: {stopped}")
                break
        if pending is not None:
            finish(pending)
    final = int(jax.device_get(state["step"]))
    return RunResult(final, stopped, origin, state)
