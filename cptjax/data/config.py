"""The `data` section of the config tree: sources, mixture stages, eval sets, and loader settings.

Every class is a frozen dataclass of plain types, so `cptjax.core.config_tree.from_dict(DataConfig, d,
"data")` builds it from YAML and checks the types. The checks on values live in
`DataConfig.__post_init__`, which knows each nested entry's place and so names the full dotted key
("data.sources[1].weight: ...").

A YAML example:

    data:
      seed: 0
      sources:
        - {name: domain, type: jsonl, paths: ["corpus/*.jsonl.zst"], weight: 0.95}
        - {name: replay, type: prepared, paths: ["prepared/fineweb"], weight: 0.05}
      stages:                      # from step 8000 on: 80% domain, 20% replay
        - {start_step: 8000, weights: [0.8, 0.2]}
        - {start_step: 9000, seq_len: 8192, batch_size: 32}   # then longer rows, the same weights
      eval_sets:
        - {name: domain, type: jsonl, paths: ["heldout/*.jsonl"], max_docs: 200}
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import UserPath

SourceType = Literal["jsonl", "text", "parquet", "arrayrecord", "tfds", "prepared"]
SOURCE_TYPES: tuple[str, ...] = typing.get_args(SourceType)


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """Where documents come from (shared by training sources and eval sets).

    type: "jsonl" (plain, .gz or .zst; one JSON object per line, text in `text_field`),
    "text" (one document per file, or split on `delimiter`), "parquet" (column `text_field`),
    "arrayrecord" (one UTF-8 document per record), "tfds" (`dataset` by name, `split`, `data_dir`,
    read with tfds.data_source: random access, no TensorFlow), "prepared" (folders written by
    `cptjax data prepare`: token ids, no tokenization at train time).
    """

    name: str  # names it in logs, metrics and messages (unique)
    type: SourceType  # jsonl (plain, .gz, .zst), text, parquet, arrayrecord, tfds, or prepared (by cptjax data prepare)
    paths: tuple[UserPath, ...] = ()  # files, folders or globs, local or gs://; unused for tfds
    text_field: str = "text"  # jsonl and parquet: the field holding the text; tfds: the feature
    delimiter: str | None = None  # text: split each file on this string (default: a file is a document)
    dataset: str | None = None  # tfds: the dataset's name
    split: str = "train"  # tfds: the split
    data_dir: UserPath | None = None  # tfds: where it is prepared

    def validate(self, key: str) -> None:
        if not self.name:
            raise CptjaxError(f"{key}.name: must not be empty")
        if self.type == "tfds":
            if not self.dataset:
                raise CptjaxError(f"{key}.dataset: a tfds source needs the TFDS dataset name "
                                  "(and data_dir, where it is prepared)")
        elif not self.paths:
            raise CptjaxError(f"{key}.paths: a {self.type} source needs at least one path or glob")
        for i, path in enumerate(self.paths):
            if not path:
                raise CptjaxError(f"{key}.paths[{i}]: must not be empty")
        if self.delimiter is not None and (self.type != "text" or not self.delimiter):
            raise CptjaxError(f"{key}.delimiter: only for type 'text', and must not be empty")
        if not self.text_field:
            raise CptjaxError(f"{key}.text_field: must not be empty")


@dataclasses.dataclass(frozen=True)
class LongUpsample:
    """Documents of at least `min_tokens` tokens become `factor` times as frequent as the shorter
    ones: each shorter document is kept with probability 1 / factor, a fixed draw per document and
    epoch. Nothing is repeated within an epoch (a repeat in the same long row would teach copying),
    and the source's share of the rows stays its weight."""

    min_tokens: int  # documents this long or longer (BOS and EOS included) count as long
    factor: float  # how many times as frequent they become, relative to the shorter ones (>= 1)


@dataclasses.dataclass(frozen=True)
class SourceConfig(InputConfig):
    """A training source: documents plus its mixture weight and what happens at its end."""

    weight: float = 1.0  # share of the rows until the first stage (normalized over sources)
    on_exhaustion: Literal["repeat", "stop"] = "repeat"  # another epoch in a new order, or end the run
    min_tokens: int | None = None  # keep only documents of at least this many tokens (BOS, EOS included)
    long_upsample: LongUpsample | None = None  # make long documents more frequent than short ones (below)

    def validate(self, key: str) -> None:
        super().validate(key)
        _check_weight(self.weight, f"{key}.weight")
        if self.min_tokens is not None and self.min_tokens < 1:
            raise CptjaxError(f"{key}.min_tokens: must be a positive integer or null, got {self.min_tokens!r}")
        upsample = self.long_upsample
        if upsample is not None:
            if upsample.min_tokens < 2:
                raise CptjaxError(f"{key}.long_upsample.min_tokens: must be >= 2, got {upsample.min_tokens!r}")
            if not (math.isfinite(upsample.factor) and upsample.factor >= 1):
                raise CptjaxError(f"{key}.long_upsample.factor: must be a finite number >= 1 (1 changes "
                                  f"nothing), got {upsample.factor!r}")
            if self.min_tokens is not None and self.min_tokens >= upsample.min_tokens:
                raise CptjaxError(f"{key}.long_upsample.min_tokens ({upsample.min_tokens}): min_tokens "
                                  f"({self.min_tokens}) already drops every shorter document; raise "
                                  "long_upsample.min_tokens above it or remove one of the two")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """The batches of step `start_step` and after mix the sources with `weights` (one per source,
    in order), in rows of `seq_len` tokens, `batch_size` rows a step. What a stage leaves out stays
    as the stage before set it (the first: training.seq_len and training.batch_size). Steps count
    optimizer updates from 1, as the logs do."""

    start_step: int  # the first step of this stage
    weights: tuple[float, ...] | None = None  # one per source, in order (normalized); null: as before
    seq_len: int | None = None  # tokens per row from start_step on; null: as before
    batch_size: int | None = None  # global rows per step from start_step on; null: as before


@dataclasses.dataclass(frozen=True)
class StageShape:
    """The batch shape of the steps from `start_step` on: what the trainer compiles its step for."""

    start_step: int
    seq_len: int
    batch_size: int


def shape_at(shapes: list[StageShape], step: int) -> StageShape:
    """The shape of step `step` (counted from 1; step 0, the start, has the first stage's)."""
    return [s for s in shapes if s.start_step <= max(step, 1)][-1]


def stage_shapes(stages: tuple[StageConfig, ...], seq_len: int, batch_size: int,
                 steps: int | None = None) -> list[StageShape]:
    """The batch shape of each stage, the first from step 1: `seq_len` and `batch_size` (the
    training section's) until a stage sets others; with `steps`, only the stages a run of that many
    steps reaches. The one answer to "how long are the rows of step N?" (with `shape_at`), for the
    pipeline, the trainer, `cptjax plan` and `cptjax eval`."""
    shapes = [StageShape(1, seq_len, batch_size)]
    for stage in stages:
        shapes.append(StageShape(stage.start_step, stage.seq_len or shapes[-1].seq_len,
                                 stage.batch_size or shapes[-1].batch_size))
    return [s for s in shapes if steps is None or s.start_step <= steps]


def eval_shape(shapes: list[StageShape]) -> StageShape:
    """The held-out batches' shape for a whole run: the longest stage's rows (the first such
    stage's row count), so every evaluation of a run measures the same thing, at the length the run
    trains for last. It needs less memory than that stage's train step."""
    return max(shapes, key=lambda s: s.seq_len)


@dataclasses.dataclass(frozen=True)
class EvalSetConfig(InputConfig):
    """A held-out set: the first `max_docs` documents (all if None), in file order, never shuffled."""

    max_docs: int | None = None  # the first this many documents (default: all)

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.max_docs is not None and self.max_docs < 1:
            raise CptjaxError(f"{key}.max_docs: must be a positive integer or null, "
                              f"got {self.max_docs!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data section. seq_len and the batch size are the trainer's, passed to the pipeline."""

    sources: tuple[SourceConfig, ...]  # what training reads, mixed by weight
    stages: tuple[StageConfig, ...] = ()  # new weights from given steps on (e.g. more replay later)
    eval_sets: tuple[EvalSetConfig, ...] = ()  # held-out sets: adaptation and forgetting
    seed: int = 0  # fixes the whole stream: every source's document order in every epoch
    num_workers: int = 0  # Grain tokenizer processes per source (0: in-process; at most one a core); same batches
    prefetch: int = 2  # batches built ahead in a background thread (0: on demand)
    tokenizer: UserPath | None = None  # HF tokenizer folder (default: the model's)
    invalid_utf8: Literal["fail", "skip"] = "fail"  # a document that is not UTF-8: stop naming it, or skip it

    def __post_init__(self):
        for name in ("sources", "stages", "eval_sets"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if not self.sources:
            raise CptjaxError("data.sources: at least one source is needed")
        names = set()
        for i, source in enumerate(self.sources):
            key = f"data.sources[{i}]"
            source.validate(key)
            if source.name in names:
                raise CptjaxError(f"{key}.name: {source.name!r} is used twice; names must be unique")
            names.add(source.name)
        _check_not_all_zero([s.weight for s in self.sources], "data.sources[*].weight")
        previous = 1
        for i, stage in enumerate(self.stages):
            key = f"data.stages[{i}]"
            if stage.start_step <= previous:
                raise CptjaxError(f"{key}.start_step: must be > {previous} (step 1 uses the sources' own "
                                  f"weights; stages come in increasing order), got {stage.start_step!r}")
            previous = stage.start_step
            if stage.weights is None and stage.seq_len is None and stage.batch_size is None:
                raise CptjaxError(f"{key}: changes nothing; give weights, seq_len or batch_size (or "
                                  "remove the stage)")
            for name in ("seq_len", "batch_size"):
                if getattr(stage, name) is not None and getattr(stage, name) < 1:
                    raise CptjaxError(f"{key}.{name}: must be >= 1 or null, got {getattr(stage, name)!r}")
            if stage.weights is None:
                continue
            if len(stage.weights) != len(self.sources):
                raise CptjaxError(f"{key}.weights: expected {len(self.sources)} weights, one per "
                                  f"source in order ({', '.join(s.name for s in self.sources)}), "
                                  f"got {len(stage.weights)}")
            for j, weight in enumerate(stage.weights):
                _check_weight(weight, f"{key}.weights[{j}]")
            _check_not_all_zero(stage.weights, f"{key}.weights")
        eval_names = set()
        for i, eval_set in enumerate(self.eval_sets):
            key = f"data.eval_sets[{i}]"
            eval_set.validate(key)
            if eval_set.name in eval_names:
                raise CptjaxError(f"{key}.name: {eval_set.name!r} is used twice")
            eval_names.add(eval_set.name)
        if not 0 <= self.seed < 2**32:
            raise CptjaxError(f"data.seed: must be an integer in [0, 2**32), got {self.seed!r}")
        for name in ("num_workers", "prefetch"):
            if getattr(self, name) < 0:
                raise CptjaxError(f"data.{name}: must be >= 0, got {getattr(self, name)!r}")

    @property
    def source_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sources)

    def stage_weights(self) -> list[tuple[int, tuple[float, ...]]]:
        """[(first step, normalized weights)]: the sources' own weights from step 1, then each stage
        (a stage without weights keeps the ones before it)."""
        stages = [(1, tuple(s.weight for s in self.sources))]
        for stage in self.stages:
            stages.append((stage.start_step, tuple(stage.weights) if stage.weights is not None else stages[-1][1]))
        return [(start, tuple(w / sum(weights) for w in weights)) for start, weights in stages]

    def stage_shapes(self, seq_len: int, batch_size: int) -> list[StageShape]:
        """`stage_shapes` of these stages."""
        return stage_shapes(self.stages, seq_len, batch_size)

    def weight_notes(self) -> list[str]:
        """One line per set of weights that does not sum to 1, saying what it is normalized to."""
        raw = [("data.sources[*].weight", [s.weight for s in self.sources])]
        raw += [(f"data.stages[{i}].weights", list(stage.weights)) for i, stage in enumerate(self.stages)
                if stage.weights is not None]
        return [f"{key}: {' + '.join(f'{w:g}' for w in weights)} = {sum(weights):g}, normalized to "
                f"{', '.join(f'{w / sum(weights):.4g}' for w in weights)}"
                for key, weights in raw if abs(sum(weights) - 1.0) > 1e-9]


def _check_weight(weight, key: str) -> None:
    if not math.isfinite(weight):
        raise CptjaxError(f"{key}: must be a finite number, got {weight!r}")
    if weight < 0:
        raise CptjaxError(f"{key}: must be >= 0, got {weight}")


def _check_not_all_zero(weights, key: str) -> None:
    if sum(weights) <= 0:
        raise CptjaxError(f"{key}: all weights are 0; give at least one source a positive weight")
