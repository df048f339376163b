"""`cptjax train`: the continued-pretraining loop.

`run(config)` reads top to bottom: join the cluster, choose the start (start.py: resume, else
`model.init_from`, else from scratch), check what needs files and devices, lay the model and the
steps out on the mesh (train_step.build_setup), build the data, and only then touch the run folder,
load the state and train.

Each step: the next batch goes onto the mesh, the jitted step is dispatched, and only then are the
previous step's metrics fetched, so the host never stalls the device. A length stage (`data.stages`
with `seq_len` or `batch_size`) changes the batches' shape at its start step, and the jitted step
compiles once more for it. Held-out sets are evaluated every `eval.every` steps, in the longest
stage's shape all run (`TrainConfig.eval_shape`). Checkpoints are saved asynchronously every
`checkpoint.every` steps, at the end, and on SIGTERM (preemption), after which the run exits
cleanly; a step whose loss is not finite is never saved. An evaluation a SIGTERM cut short is run
first when the run starts again from that step, so metrics.jsonl ends with every scheduled
evaluation however often it was preempted.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from typing import Any

import jax
import numpy as np

from cptjax.core.atomic_dir import check_output_dir
from cptjax.core.config_tree import to_dict
from cptjax.core.errors import CptjaxError
from cptjax.data.config import shape_at
from cptjax.data.eval_sets import build_eval_sets
from cptjax.data.pipeline import build_train_pipeline, document_counts
from cptjax.data.tokenize import check_vocabulary, load_data_tokenizer
from cptjax.model.config import ModelConfig
from cptjax.train.compile_cache import CompileCache
from cptjax.train.config import TrainConfig, dump_yaml
from cptjax.train.distributed import gather_states, initialize
from cptjax.train.goodput import Goodput
from cptjax.train.harness import TaskHarness, check_tasks, harness_for_run
from cptjax.train.loop_evals import eval_due, eval_owed, run_evaluations
from cptjax.train.metrics import (
    MetricsLogger,
    StepTimer,
    peak_flops_per_device,
    router_record,
    throughput,
)
from cptjax.train.preemption import Preemption, StartInterrupted
from cptjax.train.retrieval import RetrievalProbe, probe_for_run
from cptjax.train.run_folder import RunCheckpointer, ensure_assets, fingerprint
from cptjax.train.schedules import make_schedule
from cptjax.train.start import RunStart, choose_start, initial_state
from cptjax.train.step import TrainSetup, build_setup, check_layout


@dataclasses.dataclass
class RunResult:
    final_step: int
    stopped_early: str | None  # why the run ended before training.steps (SIGTERM, NaN, until_step)
    origin: str  # "resumed from step N ...", "weights from PATH ...", "from scratch ..."
    state: dict | None  # None when a SIGTERM stopped the start-up before the state was ready
    failed: bool = False  # it stopped on an error (a non-finite loss), not on request
    programs: dict | None = None  # from the compile cache: {"loaded", "compiled", "saved_s"} (None: off)


def check_environment(config: TrainConfig, model_config: ModelConfig) -> None:
    """The checks that need the model config and the devices; all run before the run folder is
    touched."""
    check_layout(config, model_config, jax.devices())  # lengths, batch split, attention kernel
    if config.eval.tasks is not None:  # every process: they must all refuse, or none
        check_tasks(config)
    for shape in config.stage_shapes:
        if shape.batch_size % jax.process_count():
            raise CptjaxError(f"{config.shape_key(shape, 'batch_size')} {shape.batch_size} must be divisible "
                              f"by the {jax.process_count()} processes")
    root = config.paths.root
    if root.exists() and not config.paths.checkpoints.exists():
        check_output_dir(root, "run_dir")  # an existing folder must be this run's own


def run(config: TrainConfig, *, until_step: int | None = None, data=None, eval_sets=None,
        started: float | None = None) -> RunResult:
    """Trains until `training.steps`, or until `until_step` (saved, so the same run resumes there).

    `data` and `eval_sets` default to the pipelines built from `config.data`. Nothing is written
    before every check has passed: the run_start, the devices, the tokenizer against the model, the
    first documents of every source, the resume's data position, the weights or checkpoint read.
    A SIGTERM before then stops the start at the next phase boundary, with nothing written.
    `started`: when this segment of the run began (the CLI's process start), for its goodput account.
    """
    goodput = Goodput(started)
    with Preemption() as preemption, CompileCache.of(config) as cache:
        initialize(config.distributed)
        preemption.after_initialize()
        run_start = choose_start(config)
        cache.open(run_folder_ready=run_start.origin == "resume")  # a resume's folder is its own
        built = None  # the pipeline this call built: its Grain worker processes stop with the run
        try:
            check_environment(config, run_start.model_config)
            preemption.check("after the config checks")
            spec = None
            if data is None or eval_sets is None:
                spec = load_data_tokenizer(config.data.tokenizer, run_start.tokenizer_dir, "model.tokenizer"
                                           if config.model.tokenizer else "the model's tokenizer")
                check_vocabulary(spec, run_start.model_config.num_tokens)
            processes = dict(process_index=jax.process_index(), process_count=jax.process_count())
            if data is None:  # the first stage's shape; the pipeline follows data.stages from there
                data = built = build_train_pipeline(config.data, spec, seq_len=config.training.seq_len,
                                                    batch_size=config.training.batch_size, **processes)
            if eval_sets is None:
                eval_sets = build_eval_sets(config.data, spec, seq_len=config.eval_shape.seq_len,
                                            batch_size=config.eval_shape.batch_size, **processes)
            setup = build_setup(config, run_start.model_config, num_sources=len(data.source_names))
            probe = probe_for_run(config, setup, spec, run_start.tokenizer_dir)
            tasks = harness_for_run(config, setup, run_start.tokenizer_dir, run_start.model_config)
            preemption.check("before loading the weights")
            state = initial_state(run_start, config, setup, data, preemption)
            run_start.close()
            preemption.check("before the first compile")
            # Every check passed: only now is the run folder touched.
            _prepare_run_dir(config, run_start)
            cache.open(run_folder_ready=True)
            result = _run_loop(config, run_start, setup, data, eval_sets, state, until_step, preemption, probe,
                               tasks, cache, goodput)
            return dataclasses.replace(result, programs=cache.programs())
        except StartInterrupted as phase:
            stopped = f"SIGTERM during start-up ({phase}): nothing written, exiting"
            if jax.process_index() == 0:
                print(f"cptjax train: {stopped}", file=sys.stderr, flush=True)
            return RunResult(run_start.resume_step or 0, stopped, run_start.describe(config), None)
        finally:
            run_start.close()
            if built is not None:
                built.close()


def _run_loop(config, run_start: RunStart, setup, data, eval_sets, state, until_step, preemption,
              probe=None, tasks=None, cache: CompileCache | None = None, goodput: Goodput | None = None) -> RunResult:
    logger = MetricsLogger(config.paths, config.training.steps, start_step=run_start.resume_step or 0,
                           enabled=jax.process_index() == 0, tensorboard=config.logging.tensorboard,
                           progress=config.logging.progress, wandb=config.logging.wandb, config=to_dict(config))
    checkpointer = RunCheckpointer(config.paths.checkpoints, config.checkpoint.keep_last,
                                   config.checkpoint.keep_every, config.checkpoint.async_save)
    try:
        end = config.training.steps if until_step is None else min(config.training.steps, until_step)
        loop = Loop(config=config, setup=setup, run_start=run_start, data=data, eval_sets=eval_sets,
                    checkpointer=checkpointer, logger=logger, state=state, end=end, preemption=preemption,
                    probe=probe, tasks=tasks, goodput=goodput or Goodput())
        loop.goodput.restarted(loop.start, logger.discarded)
        logger.message(f"cptjax train: {loop.origin}; {loop.model_config.hf_architecture}, "
                       f"mesh {dict(setup.mesh.shape)}, {jax.device_count()} devices")
        for note in config.data.weight_notes():
            logger.message(f"cptjax train: {note}")
        result = _train(loop)
        with loop.goodput.timing("checkpoint"):
            checkpointer.wait()
        logger.log(result.final_step, "goodput", loop.goodput.record())
        logger.message(loop.goodput.summary())
        return result
    finally:  # the SIGTERM handler is still in place: a preempted final save completes
        checkpointer.wait()
        checkpointer.close()
        if cache is not None and cache.summary():
            logger.message(cache.summary())
        logger.close()


def _prepare_run_dir(config: TrainConfig, run_start: RunStart) -> None:
    """config.yaml and a complete hf_assets; the rest of the folder is written as the run goes."""
    if jax.process_index() == 0:
        ensure_assets(config.paths.checkpoints, run_start.asset_sources)
        config.paths.config.write_text(dump_yaml(config))


@dataclasses.dataclass
class _LogFields:
    """What a train record needs besides the step's own metrics, fixed for the run (per stage)."""

    config: TrainConfig
    model_config: ModelConfig
    source_names: tuple[str, ...]

    def __post_init__(self):
        self.shapes = self.config.stage_shapes
        self.peak = peak_flops_per_device(jax.devices()[0].device_kind,
                                          self.config.logging.peak_flops_per_device)

    def positions_per_step(self, step: int) -> int:
        shape = shape_at(self.shapes, step)
        return shape.batch_size * shape.seq_len

    def throughput(self, step: int, tokens_per_s: float) -> dict:
        return throughput(self.model_config, shape_at(self.shapes, step).seq_len, tokens_per_s, jax.device_count(),
                          self.peak)


@dataclasses.dataclass
class Window:
    """Sums over the steps since the last train record: realized source shares and packing are
    reported over the whole logging window, not only the logged step."""

    steps: int = 0
    source_tokens: np.ndarray | None = None
    input_tokens: float = 0.0
    positions: int = 0

    def add(self, values: dict, positions: int) -> None:
        tokens = np.asarray(values["source_tokens"], np.float64)
        self.source_tokens = tokens if self.source_tokens is None else self.source_tokens + tokens
        self.input_tokens += float(values["input_tokens"])
        self.positions += positions
        self.steps += 1

    def take(self, fields: _LogFields) -> dict:
        """The window's fields of a train record; starts a new window."""
        total = max(float(self.source_tokens.sum()), 1.0)
        record = {
            "window_steps": self.steps,
            "source_tokens": {n: float(c) for n, c in zip(fields.source_names, self.source_tokens)},
            "source_share": {n: float(c) / total for n, c in zip(fields.source_names, self.source_tokens)},
            "packing_efficiency": self.input_tokens / self.positions,
        }
        self.steps, self.source_tokens, self.input_tokens, self.positions = 0, None, 0.0, 0
        return record


@dataclasses.dataclass(kw_only=True)
class Loop:
    """The training loop's parts, and the state it advances (built by keyword)."""

    config: TrainConfig
    setup: TrainSetup
    run_start: RunStart  # where the run starts from: its step, model config and origin
    data: Any  # a TrainPipeline, or a stand-in with the same interface (tests)
    eval_sets: dict[str, list[dict]]
    checkpointer: RunCheckpointer
    logger: MetricsLogger
    state: dict
    end: int  # the last step this call trains
    preemption: Preemption
    probe: RetrievalProbe | None = None  # eval.retrieval's, run at each evaluation
    tasks: TaskHarness | None = None  # eval.tasks': lm-eval on the training mesh
    goodput: Goodput = dataclasses.field(default_factory=Goodput)  # where this segment's time goes
    window: Window = dataclasses.field(default_factory=Window)
    timer: StepTimer = dataclasses.field(default_factory=StepTimer)
    stopped: str | None = None
    failed: bool = False

    def __post_init__(self):
        self.start = self.run_start.resume_step or 0
        self.model_config = self.run_start.model_config
        self.origin = self.run_start.describe(self.config)
        self.fields = _LogFields(self.config, self.model_config, self.data.source_names)


def _train(loop: Loop) -> RunResult:
    config, preemption, start = loop.config, loop.preemption, loop.start
    loop.logger.start_at(start)
    batches = _batches(loop.data, loop.end - start, loop.goodput)
    first = list(itertools.islice(batches, 1))  # before any evaluation: bad data fails first
    loop.goodput.loop_started()
    if not _ready(loop, start):
        return RunResult(start, loop.stopped, loop.origin, loop.state)
    pending = None  # (step, metrics still on device, the data position after its batch)
    for step, (batch, data_state) in enumerate(itertools.chain(first, batches), start=start + 1):
        _announce_stage(loop, step)
        with loop.goodput.timing("step"):
            loop.state, metrics = loop.setup.step_fn(loop.state, loop.setup.to_global(batch))
        if pending is not None:
            previous, pending = pending, None
            if not _finish(loop, *previous):
                break
        pending = (step, metrics, data_state)
        preempted = preemption.agreed(step)
        due_save = step % config.checkpoint.every == 0 or step == loop.end or preempted
        due_eval = eval_due(loop, step)
        if due_save or due_eval:
            ok = _finish(loop, *pending)  # a checkpoint or eval must never follow an unchecked NaN
            pending = None
            if not ok:
                break
            if due_eval and run_evaluations(loop, step, due_eval) is None:
                preempted = True  # SIGTERM during the eval: this step is saved, and the run ends
            if due_save or preempted:
                _save(loop, step, data_state, force=preempted)
            loop.timer.restart()  # the next step's time must not include eval or save
        if preempted:
            loop.stopped = f"SIGTERM at step {step}: checkpoint saved, exiting"
            loop.logger.message(f"cptjax train: {loop.stopped}")
            break
    if pending is not None:
        _finish(loop, *pending)
    final = int(jax.device_get(loop.state["step"]))
    if loop.stopped is None and final < config.training.steps:
        loop.stopped = f"paused at step {final} as asked (checkpoint saved); run again to continue"
        loop.logger.message(f"cptjax train: {loop.stopped}")
    return RunResult(final, loop.stopped, loop.origin, loop.state, loop.failed)


def _announce_stage(loop: Loop, step: int) -> None:
    """At the first step of a run with length stages, and wherever the rows' shape changes: the
    shape from here on (the jitted step compiles once more for a new one)."""
    shapes = loop.fields.shapes
    shape, before = shape_at(shapes, step), shape_at(shapes, step - 1)
    changed = step == loop.start + 1 or (shape.seq_len, shape.batch_size) != (before.seq_len, before.batch_size)
    if len({(s.seq_len, s.batch_size) for s in shapes}) > 1 and changed:
        loop.logger.message(f"cptjax train: from step {step}: {shape.batch_size} rows of {shape.seq_len} "
                            "tokens a step")


def _batches(data, count: int, goodput: Goodput):
    """The next `count` batches, each with the data position after it (what a checkpoint of its
    step records)."""
    for _ in range(count):
        with goodput.timing("data"):
            batch, state = next(data), data.get_state()
        yield batch, state


def _ready(loop: Loop, start: int) -> bool:
    """Before the first step: the evaluation the start step still owes (see `_eval_missing`), then
    a last SIGTERM check before the train step compiles. False if a SIGTERM came first: the start
    step is already saved (or is the start itself), so the run stops with nothing new to save."""
    owed = eval_owed(loop, start)
    if owed and run_evaluations(loop, start, owed) is None:
        loop.stopped = f"SIGTERM during step {start}'s evaluation: nothing new to save, exiting"
    elif start < loop.end and loop.preemption.requested:
        loop.stopped = f"SIGTERM before step {start + 1}: nothing new to save, exiting"
    else:
        return True
    loop.logger.message(f"cptjax train: {loop.stopped}")
    return False


def _finish(loop: Loop, step: int, metrics, data_state: dict | None = None) -> bool:
    """Fetches and logs one step's metrics; False if the run must stop (NaN/Inf loss)."""
    with loop.goodput.timing("logging"):
        with loop.goodput.timing("step"):  # waiting for the step to finish on the devices
            values = jax.device_get(metrics)
        return _log_step(loop, step, values, data_state)


def _log_step(loop: Loop, step: int, values: dict, data_state: dict | None) -> bool:
    config, fields = loop.config, loop.fields
    elapsed = loop.timer.lap()
    loop.window.add(values, fields.positions_per_step(step))
    record = {
        "loss": float(values["loss"]), "grad_norm": float(values["grad_norm"]),
        "learning_rate": float(values["learning_rate"]),
        **({"z_loss": float(values["z_loss"])} if "z_loss" in values else {}),
        **({"router": router_record(values["router"], fields.model_config.moe_layers)} if "router" in values else {}),
        "tokens": float(values["tokens"]), "skipped": bool(values["skipped"]),
        "source_loss": {n: float(v) for n, v, c in zip(fields.source_names, values["source_loss"],
                                                        values["source_tokens"]) if c > 0},
    }
    if elapsed is not None:
        record.update(step_time_s=elapsed, **fields.throughput(step, fields.positions_per_step(step) / elapsed))
    if isinstance(data_state, dict) and "streams" in data_state:  # the real pipeline's (process 0's)
        counts = document_counts(data_state, config.data)
        if counts:  # what min_tokens and long_upsample did so far
            record["documents"] = counts
    if record["skipped"]:
        if config.training.on_nan == "stop":
            loop.stopped = f"loss or gradient not finite at step {step} (loss {record['loss']})"
            loop.failed = True
            loop.logger.message(f"cptjax train: stopping: {loop.stopped}; the last checkpoint is from "
                                "before it")
            loop.logger.log(step, "train", {**record, **loop.window.take(fields)})
            return False
        loop.logger.message(f"cptjax train: step {step} skipped: loss or gradient not finite")
    if step % config.logging.every == 0 or step == loop.end or record["skipped"]:
        record.update(loop.window.take(fields))
        loop.logger.log(step, "train", record)
        if not loop.logger.has_bar:
            loop.logger.message(f"step {step}/{config.training.steps} loss {record['loss']:.4f} "
                                f"lr {record['learning_rate']:.3g} grad_norm {record['grad_norm']:.3f}"
                                + (f" tok/s {record['tokens_per_s']:,.0f}" if "tokens_per_s" in record else ""))
    return True


def _save(loop: Loop, step: int, data_state: dict, force: bool = False) -> None:
    with loop.goodput.timing("checkpoint"):
        _save_checkpoint(loop, step, data_state, force)
    if step != loop.end and not force:  # the segment's last account is written as it ends
        loop.logger.log(step, "goodput", loop.goodput.record())


def _save_checkpoint(loop: Loop, step: int, data_state: dict, force: bool) -> None:
    # Orbax writes JSON from process 0 only: keep every process's data position.
    data_states = gather_states(data_state)
    meta = {"step": step, "data_state": data_states, "origin": loop.origin,
            "learning_rate_next": float(make_schedule(loop.config.schedule)(step)), "time": time.time(),
            "fingerprint": fingerprint(loop.state)}
    loop.checkpointer.save(step, loop.state, meta, loop.model_config, to_dict(loop.config), force=force)
    loop.logger.flush()
