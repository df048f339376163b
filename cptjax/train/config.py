"""The one config tree of `cptjax train`: model / data / optimizer / schedule / mesh / training /
checkpoint / eval / logging / distributed. Loaded from YAML, `--set a.b=value` overrides applied,
validated before anything heavy starts (`check_environment` adds the checks that need the files
and the devices, still before any output folder is touched).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import yaml

from cptjax.core.config_tree import apply_overrides, from_dict, read_yaml_mapping, to_dict
from cptjax.core.dtypes import FloatName
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, UserPath, is_remote, user_path
from cptjax.data.config import DataConfig, StageShape, eval_shape, stage_shapes
from cptjax.data.passkey import RetrievalConfig
from cptjax.io.run_layout import RunPaths
from cptjax.model.attention import Attention
from cptjax.model.config import ModelConfig, extend_context
from cptjax.model.context_parallel import ContextParallel
from cptjax.model.loss import DEFAULT_LOSS_CHUNK
from cptjax.model.rope import RopeOverrides
from cptjax.model.sharding import MeshConfig
from cptjax.model.transformer import Remat
from cptjax.train.ema import EmaConfig
from cptjax.train.optimizer import OptimizerConfig
from cptjax.train.schedules import ScheduleConfig


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """Where the weights come from. `init_from`: an HF folder or a cptjax checkpoint (weights only,
    fresh optimizer, step 0: the CPT default). `hf_config`: a config.json to initialise from scratch.
    A run's own latest checkpoint always wins over both (resume). `rope` and
    `max_position_embeddings` change the loaded model's for this run (to extend its context); its
    checkpoints and exports carry the new values."""

    init_from: UserPath | None = None  # an HF folder or a cptjax checkpoint to continue from
    init_step: int | None = None  # checkpoint step for init_from (default: its latest)
    hf_config: UserPath | None = None  # a config.json to start from scratch instead
    tokenizer: UserPath | None = None  # HF tokenizer folder (default: init_from's tokenizer files)
    param_dtype: FloatName = "float32"  # the master weights' precision
    compute_dtype: FloatName = "bfloat16"  # matmuls' precision; norms, softmax and loss stay float32
    remat: Remat = "none"  # what the backward pass recomputes per layer, to save memory
    attention: Attention = "auto"  # the attention kernel; auto picks per backend
    context_parallel: ContextParallel = "all_gather"  # rows split by mesh.sequence: gather K/V, or pass them round
    loss_chunk: int | None = DEFAULT_LOSS_CHUNK  # positions per row whose logits exist at once; null: all
    max_position_embeddings: int | None = None  # the run's context limit (null: the model's); raise to train longer
    rope: RopeOverrides = RopeOverrides()  # the run's changes to the model's RoPE (base, scaling)
    router_aux_loss_coef: float | None = None  # MoE: load-balancing loss weight (null: config.json's; 0: off)
    router_z_loss: float = 0.0  # MoE: weight of the router logits' mean squared log-partition (ST-MoE)

    def __post_init__(self):
        if (self.init_from is None) == (self.hf_config is None):
            raise CptjaxError("model: set exactly one of init_from (an HF folder or cptjax checkpoint "
                              "to continue from) and hf_config (a config.json to start from scratch)")
        if self.loss_chunk is not None and self.loss_chunk < 1:
            raise CptjaxError(f"model.loss_chunk: must be >= 1 or null (whole rows), got {self.loss_chunk}")
        for name in ("router_aux_loss_coef", "router_z_loss"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise CptjaxError(f"model.{name}: must be >= 0, got {value}")
        if self.max_position_embeddings is not None and self.max_position_embeddings < 1:
            raise CptjaxError(f"model.max_position_embeddings: must be >= 1, got {self.max_position_embeddings}")

    def run_model_config(self, loaded: ModelConfig) -> ModelConfig:
        """The run's model config: `loaded` (the weights', the checkpoint's or hf_config's) with
        `rope` and `max_position_embeddings` applied. Every caller that builds a run asks this."""
        return extend_context(loaded, self.rope, self.max_position_embeddings)


@dataclasses.dataclass(frozen=True)
class TrainingSection:
    steps: int  # optimizer updates in the whole run (the schedule's length)
    batch_size: int  # global rows per optimizer step (until a data stage sets another)
    seq_len: int  # tokens per row (until a data stage sets another)
    seed: int = 0  # initialisation from scratch
    on_nan: Literal["stop", "skip"] = "stop"  # a non-finite loss: stop the run, or skip that update
    ema: EmaConfig | None = None  # a float32 EMA of the weights, for eval.ema and exports (null: none)

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise CptjaxError(f"training.{name}: must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 1000  # save every this many steps (and at the end, and on SIGTERM)
    keep_last: int = 3  # finished checkpoints kept
    keep_every: int | None = None  # also keep every step that is a multiple of this, forever
    async_save: bool = True  # write in the background while training goes on

    def __post_init__(self):
        if self.every < 1:
            raise CptjaxError(f"checkpoint.every: must be >= 1, got {self.every}")
        if self.keep_last < 1:
            raise CptjaxError(f"checkpoint.keep_last: must be >= 1, got {self.keep_last}")
        if self.keep_every is not None and (self.keep_every < 1 or self.keep_every % self.every):
            raise CptjaxError(f"checkpoint.keep_every: must be a positive multiple of checkpoint.every "
                              f"({self.every}), got {self.keep_every}")


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """Held-out loss, also by position bucket: [0, e0), [e0, e1), ... up to seq_len, positions
    counted from the start of each document (default: 8 buckets, the last [seq_len/2, seq_len),
    each half the next). `retrieval`: the pass-key probe (cptjax.data.passkey), accuracy by
    prompt length and needle depth, logged as a `retrieval` record beside each evaluation."""

    every: int = 500  # evaluate data.eval_sets every this many steps
    at_start: bool = True  # measure the base model before any update: the reference for forgetting
    position_buckets: tuple[int, ...] | None = None  # loss by position in a document: edges; null: 8 doubling
    retrieval: RetrievalConfig | None = None  # a pass-key probe at each evaluation (null: none)
    tasks: TasksConfig | None = None  # lm-evaluation-harness tasks during training (null: none)
    ema: bool = False  # also evaluate training.ema's weights: `eval_ema` records beside `eval`

    def __post_init__(self):
        if self.every < 1:
            raise CptjaxError(f"eval.every: must be >= 1, got {self.every}")
        check_position_buckets(self.position_buckets, "eval.position_buckets")


@dataclasses.dataclass(frozen=True)
class TasksConfig:
    """Downstream tasks scored by lm-evaluation-harness on the training mesh, between steps: at
    step 0 with eval.at_start (the reference for forgetting), then every `every` steps. Process 0
    drives the harness; every process computes. Logged as `tasks` records."""

    names: tuple[str, ...]  # lm-eval task or group names, or paths to local task YAML files
    every: int | None = None  # steps between task evaluations (null: eval.every)
    limit: int | None = None  # at most this many documents per task (null: all)
    num_fewshot: int | None = None  # few-shot examples per prompt (null: each task's own)
    seed: int | None = None  # every lm-eval seed (few-shot picks); null: lm-eval's defaults, as `cptjax eval --tasks`

    def __post_init__(self):
        if not self.names or any(not isinstance(n, str) or not n.strip() for n in self.names):
            raise CptjaxError("eval.tasks.names: give one or more lm-eval task names or task YAML paths, "
                              "e.g. [hellaswag, arc_easy]")
        for key in ("every", "limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise CptjaxError(f"eval.tasks.{key}: must be >= 1, got {getattr(self, key)}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise CptjaxError(f"eval.tasks.num_fewshot: must be >= 0, got {self.num_fewshot}")


def check_position_buckets(edges, key: str) -> None:
    if edges and (edges[0] < 1 or any(b <= a for a, b in zip(edges, edges[1:]))):
        raise CptjaxError(f"{key} {list(edges)}: give increasing positive token positions, e.g. [1024, 4096]")


@dataclasses.dataclass(frozen=True)
class WandbSection:
    """Weights & Biases (`pip install 'cptjax[wandb]'`): every record of metrics.jsonl, the resolved
    config, and `cptjax report`'s figures (train/wandb_run.py). A restarted run continues the same
    W&B run. The environment variable WANDB_MODE, when set, wins over `mode`; `dir` defaults to
    WANDB_DIR, else the run folder's logs/ (local run folders), else W&B's own ./wandb."""

    project: str  # the W&B project
    entity: str | None = None  # the team or user (null: your W&B default)
    name: str | None = None  # the run's display name (null: the run folder's name)
    tags: tuple[str, ...] = ()  # labels for the run in W&B
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: files to `wandb sync`; WANDB_MODE wins
    dir: UserPath | None = None  # a local folder for W&B's files (null: WANDB_DIR, else RUN_DIR/logs)

    def __post_init__(self):
        for name in ("project", "entity", "name"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise CptjaxError(f"logging.wandb.{name}: must not be empty; give a name or leave the key out")
        bad = [tag for tag in self.tags if not tag.strip() or len(tag) > 64]
        if bad:
            raise CptjaxError(f"logging.wandb.tags: {bad[0]!r} is not a W&B tag; give 1 to 64 characters")
        if self.dir is not None and is_remote(self.dir):
            raise CptjaxError(f"logging.wandb.dir {self.dir}: W&B writes local files; give a local folder")


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    every: int = 10  # a train record every this many steps
    tensorboard: bool = True  # also write TensorBoard event files
    progress: Literal["auto", "bar", "lines"] = "auto"  # console: a bar on a terminal, lines elsewhere
    peak_flops_per_device: float | None = None  # for MFU on chips cptjax does not know
    wandb: WandbSection | None = None  # also log to Weights & Biases (null: not)

    def __post_init__(self):
        if self.every < 1:
            raise CptjaxError(f"logging.every: must be >= 1, got {self.every}")


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    """`auto`: jax.distributed.initialize() on TPU VMs and SLURM jobs of several tasks; `off`;
    `manual`: the coordinator settings below (GPU clusters without SLURM)."""

    mode: Literal["auto", "off", "manual"] = "auto"  # auto: TPU VM slices and SLURM jobs join by themselves
    coordinator_address: str | None = None  # manual: host:port of process 0
    num_processes: int | None = None  # manual: how many processes in all
    process_id: int | None = None  # manual: this process's index

    def __post_init__(self):
        manual = (self.coordinator_address, self.num_processes, self.process_id)
        if self.mode == "manual" and None in manual:
            raise CptjaxError("distributed: mode 'manual' needs coordinator_address, num_processes "
                              "and process_id")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: UserPath  # the run's folder: config, checkpoints, logs (local or gs://)
    model: ModelSection  # where the weights come from, and how the model computes
    data: DataConfig  # sources and their mixture, held-out sets
    training: TrainingSection  # steps, batch, sequence length
    schedule: ScheduleConfig  # the learning rate by step
    optimizer: OptimizerConfig = OptimizerConfig()  # AdamW
    mesh: MeshConfig = MeshConfig()  # how devices split the work
    checkpoint: CheckpointSection = CheckpointSection()  # saves and what is kept
    eval: EvalSection = EvalSection()  # held-out evaluation
    logging: LoggingSection = LoggingSection()  # records, TensorBoard, W&B, console
    distributed: DistributedSection = DistributedSection()  # several hosts
    compile_cache: bool | UserPath = True  # compiled programs: true: in run_dir (or JAX's, if set); a folder; false

    def __post_init__(self):
        assert self.schedule.total_steps == self.training.steps, "config_from_dict sets it"
        starts = tuple(stage.start_step for stage in self.data.stages)
        if self.schedule.kind == "cycles" and starts and self.schedule.stage_boundaries != starts:
            raise CptjaxError(f"schedule.stage_boundaries {list(self.schedule.stage_boundaries)} differ "
                              f"from the start steps of data.stages {list(starts)}; leave "
                              "schedule.stage_boundaries out to re-warm at each data stage")
        vocab = self.optimizer.vocab
        if vocab is not None and vocab.first_stage != "everything" and not self.data.stages:
            raise CptjaxError(f"optimizer.vocab.first_stage {vocab.first_stage!r}: the first stage ends where "
                              "data.stages[0] starts, and there are no data.stages; add one (e.g. "
                              "data.stages: [{start_step: 500, weights: [...]}]) or set first_stage: everything")
        if self.eval.ema and self.training.ema is None:
            raise CptjaxError("eval.ema: there is no EMA to evaluate; set training.ema (e.g. "
                              "training.ema.decay=0.999) or drop eval.ema")
        if self.eval.retrieval is not None:
            self.eval.retrieval.check_length(self.eval_shape.seq_len, "eval.retrieval",  # the longest stage's
                                             "raise training.seq_len or drop the longer lengths")
        accum = self.optimizer.grad_accum_steps
        for shape in self.stage_shapes:
            if shape.batch_size % accum:
                raise CptjaxError(f"{self.shape_key(shape, 'batch_size')} {shape.batch_size} is not divisible "
                                  f"by optimizer.grad_accum_steps {accum}")

    @property
    def paths(self) -> RunPaths:
        return RunPaths(user_path(self.run_dir, "run_dir"))

    @property
    def stage_shapes(self) -> list[StageShape]:
        """The batch shape of each stage the run reaches: training.seq_len and batch_size, then each
        length stage's up to training.steps (`cptjax.data.config.shape_at` picks a step's)."""
        return stage_shapes(self.data.stages, self.training.seq_len, self.training.batch_size, self.training.steps)

    @property
    def eval_shape(self) -> StageShape:
        """The held-out batches' shape for the whole run (`cptjax.data.config.eval_shape`)."""
        return eval_shape(self.stage_shapes)

    def shape_key(self, shape: StageShape, name: str) -> str:
        """The key that sets `name` ("seq_len", "batch_size") of `shape`, for messages."""
        if shape.start_step == 1:
            return f"training.{name}"
        index = next(i for i, s in enumerate(self.data.stages) if s.start_step == shape.start_step)
        return f"data.stages[{index}].{name} (step {shape.start_step} on)"


def load_config(path: PathLike, overrides: list[str] = ()) -> TrainConfig:
    """Reads a YAML config, applies `--set` overrides, and builds the validated tree."""
    raw = apply_overrides(read_yaml_mapping(path, "--config"), list(overrides))
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> TrainConfig:
    """Builds the tree from plain data. Local paths are made absolute, relative to the working
    directory (remote ones, gs://..., are kept as they are).

    The schedule's length is training.steps (`schedule.total_steps` is no key of its own); for kind
    "cycles", `stage_boundaries` defaults to the start steps of data.stages (one re-warm per data
    stage).
    """
    raw = dict(raw)
    schedule = dict(raw.get("schedule") or {})
    training = raw.get("training") or {}
    if "total_steps" in schedule:
        raise CptjaxError(f"schedule.total_steps ({schedule['total_steps']}): not a key; the schedule's length "
                          "is training.steps: remove it and set training.steps")
    if isinstance(training, dict) and "steps" in training:
        schedule["total_steps"] = training["steps"]
    data = raw.get("data") or {}
    if schedule.get("kind") == "cycles" and "stage_boundaries" not in schedule and isinstance(data, dict):
        stages = data.get("stages") or []
        schedule["stage_boundaries"] = [s.get("start_step") if isinstance(s, dict) else s for s in stages]
    raw["schedule"] = schedule
    return from_dict(TrainConfig, raw)


def dump_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def load_run_config(path: PathLike) -> TrainConfig:
    """A run folder's config.yaml. Those written before schedule.total_steps stopped being a key
    carry it, equal to training.steps: it is dropped here."""
    raw = read_yaml_mapping(path, "RUN_DIR")
    schedule, training = raw.get("schedule"), raw.get("training")
    legacy = isinstance(schedule, dict) and isinstance(training, dict)
    if legacy and schedule.get("total_steps") == training.get("steps"):
        raw["schedule"] = {k: v for k, v in schedule.items() if k != "total_steps"}
    return config_from_dict(raw)
