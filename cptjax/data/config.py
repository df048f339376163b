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
class SourceConfig(InputConfig):
    """A training source: documents plus its mixture weight and what happens at its end."""

    weight: float = 1.0  # share of the rows until the first stage (normalized over sources)
    on_exhaustion: Literal["repeat", "stop"] = "repeat"  # another epoch in a new order, or end the run

    def validate(self, key: str) -> None:
        super().validate(key)
        _check_weight(self.weight, f"{key}.weight")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """The batches of step `start_step` and after mix the sources with `weights` (one per source,
    in order). Steps count optimizer updates from 1, as the logs do."""

    start_step: int  # the first step with these weights
    weights: tuple[float, ...]  # one per source, in order (normalized)


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
        """[(first step, normalized weights)]: the sources' own weights from step 1, then each stage."""
        stages = [(1, tuple(s.weight for s in self.sources))]
        stages += [(stage.start_step, tuple(stage.weights)) for stage in self.stages]
        return [(start, tuple(w / sum(weights) for w in weights)) for start, weights in stages]

    def weight_notes(self) -> list[str]:
        """One line per set of weights that does not sum to 1, saying what it is normalized to."""
        raw = [("data.sources[*].weight", [s.weight for s in self.sources])]
        raw += [(f"data.stages[{i}].weights", list(stage.weights)) for i, stage in enumerate(self.stages)]
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
