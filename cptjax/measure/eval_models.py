"""`cptjax eval`: held-out loss, perplexity and bits per byte of saved models on eval sets.

Models are HF folders or cptjax checkpoints (PATH, or PATH@STEP for a step of a checkpoint or
run). Eval sets are the `data.eval_sets` entries of training, given on the command line as
NAME=SPEC, where SPEC is
  - TYPE:PATHS   a source type and comma-separated files or globs: `code=text:heldout/*.py`,
                 `general=jsonl:heldout/wiki.jsonl`;
  - a YAML mapping of the entry's other keys, for options and TFDS:
                 `code={type: jsonl, paths: [heldout/code.jsonl], text_field: content, max_docs: 200}`,
                 `wiki={type: tfds, dataset: wikitext, split: test, data_dir: ~/tfds}`;
or as a YAML file (`--data-config`) whose `eval_sets` list sits at the top or under `data:`, as in
a run's config.yaml (whose training seq_len and batch_size then become the defaults).

The sets are tokenized and packed once, exactly as during training (cptjax.data.eval_sets), with
the first model's tokenizer; every model must share it. Each model is read onto the devices and
scored by the trainer's own eval step (train_step.build_eval_setup) through evaluation.evaluate.
The first model is the reference: every other one is compared with it (adaptation on the domain
sets, forgetting on the others).

Each set's loss is also given by position bucket (`--position-buckets`, evaluation.position_edges),
and `--retrieval` adds the pass-key probe (cptjax.train.retrieval): accuracy by prompt length and
needle depth, its prompts made with the models' tokenizer; `--data-config` with a run's
config.yaml takes both from its `eval` section.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import yaml

from cptjax.core.atomic_dir import atomic_output_dir, check_output_dir
from cptjax.core.config_tree import from_dict, read_yaml_mapping, yaml_error
from cptjax.core.dtypes import float_dtype
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import user_path
from cptjax.core.progress import progress_bar
from cptjax.data.config import EvalSetConfig, StageConfig, eval_shape, stage_shapes
from cptjax.data.eval_sets import pack_eval_sets
from cptjax.data.passkey import Prompt, RetrievalConfig, make_prompts
from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec
from cptjax.io.weights import Weights, open_weights, parse_model_arg
from cptjax.measure.eval_tasks import TaskSettings, run_model_tasks, tasks_table
from cptjax.measure.model_tokenizers import NOT_COMPARABLE, check_tokenizers, check_vocabulary, tokenizer_groups
from cptjax.model.sharding import MeshConfig
from cptjax.train.config import check_position_buckets
from cptjax.train.evaluation import (
    compare,
    comparison_table,
    domain_sets,
    evaluate,
    position_edges,
    position_table,
    results_table,
)
from cptjax.train.model_on_mesh import ModelOnMesh
from cptjax.train.retrieval import build_probe, retrieval_table
from cptjax.train.step import EvalSetup, build_eval_setup

DEFAULT_SEQ_LEN = 2048
DEFAULT_BATCH_SIZE = 8


def parse_eval_spec(text: str, flag: str = "--data") -> EvalSetConfig:
    """NAME=TYPE:PATHS or NAME={yaml mapping} -> an eval set entry (local paths made absolute)."""
    name, sep, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name or not spec:
        raise CptjaxError(f"{flag} {text!r}: expected NAME=SPEC, e.g. code=text:heldout/*.py or "
                          "code={type: jsonl, paths: [heldout.jsonl], max_docs: 100}")
    key = f"{flag} {name}"
    if spec.startswith("{"):
        try:
            entry = yaml.safe_load(spec)
        except yaml.YAMLError as err:
            raise CptjaxError(f"{key}: not a valid YAML mapping ({yaml_error(err)})") from None
        if not isinstance(entry, dict):
            raise CptjaxError(f"{key}: expected a YAML mapping such as {{type: jsonl, paths: [...]}}")
        if "name" in entry:
            raise CptjaxError(f"{key}: the name comes before '='; leave 'name' out of the mapping")
    else:
        kind, colon, paths = spec.partition(":")
        if not colon or not paths:
            raise CptjaxError(f"{key}: expected TYPE:PATHS (e.g. text:heldout/*.py) or a YAML mapping")
        entry = {"type": kind, "paths": [p for p in paths.split(",") if p]}
    return _eval_set({"name": name, **entry}, key)


def eval_sets_from_file(path: str) -> tuple[list[EvalSetConfig], dict]:
    """The eval sets of a YAML file (top-level or `data:` `eval_sets`), and the defaults it sets
    ({"seq_len", "batch_size"} from a training config: the shape its own evaluations use, that of
    its `training` section or of its longest length stage)."""
    file = user_path(path, "--data-config")
    raw = read_yaml_mapping(file, "--data-config")
    section = raw.get("data", raw)
    entries = section.get("eval_sets") if isinstance(section, dict) else None
    if not isinstance(entries, list) or not entries:
        raise CptjaxError(f"--data-config {file}: no eval_sets list (at the top level or under data:)")
    sets = [_eval_set(e, f"{file}: eval_sets[{i}]") for i, e in enumerate(entries)]
    training = raw.get("training") if isinstance(raw.get("training"), dict) else {}
    defaults = {k: training[k] for k in ("seq_len", "batch_size") if isinstance(training.get(k), int)}
    stages = section.get("stages") if isinstance(section, dict) and "training" in raw else None
    if len(defaults) == 2 and isinstance(stages, list) and stages:
        steps = training.get("steps") if isinstance(training.get("steps"), int) else None
        stages = [from_dict(StageConfig, e, f"{file}: data.stages[{i}]") for i, e in enumerate(stages)]
        shape = eval_shape(stage_shapes(tuple(stages), defaults["seq_len"], defaults["batch_size"], steps))
        defaults = {"seq_len": shape.seq_len, "batch_size": shape.batch_size}
    evaluation = raw.get("eval") if isinstance(raw.get("eval"), dict) else {}
    if evaluation.get("position_buckets") is not None:
        defaults["position_buckets"] = parse_position_buckets(evaluation["position_buckets"], f"{file}: eval")
    if evaluation.get("retrieval") is not None:
        defaults["retrieval"] = parse_retrieval(evaluation["retrieval"], f"{file}: eval.retrieval")
    return sets, defaults


def parse_position_buckets(value, key: str = "--position-buckets") -> tuple[int, ...]:
    """'1024,4096' (or a YAML list) -> the bucket edges, checked as eval.position_buckets is; ''
    gives none."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        edges = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise CptjaxError(f"{key} {value!r}: expected token positions such as 1024,4096") from None
    check_position_buckets(edges, key)
    return edges


def parse_retrieval(value, key: str = "--retrieval") -> RetrievalConfig:
    """A YAML mapping (text or parsed) -> the probe's config, e.g. {lengths: [1024, 4096], samples: 8}."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise CptjaxError(f"{key}: not a valid YAML mapping ({yaml_error(err)})") from None
    if not isinstance(value, dict):
        raise CptjaxError(f"{key}: expected a YAML mapping such as {{lengths: [1024, 4096], depths: [0, 0.5, 1]}}")
    try:
        return from_dict(RetrievalConfig, value, key)
    except CptjaxError as err:  # the config's own checks name eval.retrieval
        raise CptjaxError(str(err).replace("eval.retrieval", key)) from None


def _eval_set(entry: dict, key: str) -> EvalSetConfig:
    config = from_dict(EvalSetConfig, entry, key)  # local paths made absolute here
    config.validate(key)
    return config


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How saved models are scored, by `cptjax eval` and by `cptjax merge --eval` alike: the sets,
    which of them measure adaptation, and their packing. `flag` is the option the sets came from."""

    sets: tuple[EvalSetConfig, ...]
    domain: tuple[str, ...] = ()
    seq_len: int | None = None  # default: min(DEFAULT_SEQ_LEN, every model's max_position_embeddings)
    batch_size: int = DEFAULT_BATCH_SIZE
    dtype: str = "float32"
    tokenizer: str | None = None  # default: the models' own
    flag: str = "--data"
    position_buckets: tuple[int, ...] | None = None  # edges; default: evaluation.position_edges's doubling
    retrieval: RetrievalConfig | None = None  # the pass-key probe, if any
    tasks: TaskSettings | None = None  # lm-eval tasks, if any

    def check(self) -> tuple[str, ...]:
        """The checks that need no model; returns the domain sets' names."""
        if not self.sets and self.retrieval is None and self.tasks is None:
            raise CptjaxError(f"{self.flag}: no eval set given; add {self.flag} NAME=SPEC, --data-config FILE "
                              "or --tasks NAMES")
        names = [s.name for s in self.sets]
        for name in names:
            if names.count(name) > 1:
                raise CptjaxError(f"{self.flag} {name}: the name is used twice; give each set its own name")
        if (self.seq_len is not None and self.seq_len < 1) or self.batch_size < 1:
            raise CptjaxError(f"--seq-len {self.seq_len} / --batch-size {self.batch_size}: both must be >= 1")
        float_dtype(self.dtype, "--dtype")
        return domain_sets(names, self.domain)


@dataclasses.dataclass
class EvalData:
    """Eval sets tokenized and packed once, for every model evaluated with them."""

    sets: dict[str, list[dict]]
    tokenizer: DocumentTokenizer
    seq_len: int
    batch_size: int
    domain: tuple[str, ...] = ()
    position_edges: tuple[int, ...] = ()
    retrieval: RetrievalConfig | None = None
    prompts: list[Prompt] = dataclasses.field(default_factory=list)  # the retrieval probe's
    tasks: TaskSettings | None = None
    task_specs: tuple = ()  # (lm-eval's TaskManager, the resolved specs) of `tasks`


def prepare_eval(settings: EvalSettings, models: Sequence[Weights], labels: Sequence[str]) -> EvalData:
    """The one set-up of an evaluation of opened models: every check that models, tokenizer, length
    and sets fit together, then the sets tokenized and packed with the models' tokenizer."""
    domain = settings.check()
    for model, label in zip(models, labels):
        check_vocabulary(models[0].config, model.config, (labels[0], label))
    check_tokenizers(models, labels)
    folder = user_path(settings.tokenizer, "--tokenizer") if settings.tokenizer else next(
        (m.tokenizer_dir for m in models if m.tokenizer_dir is not None), None)
    if folder is None:
        raise CptjaxError(f"{labels[0]}: no tokenizer files beside the weights; pass --tokenizer")
    length = settings.seq_len or min(DEFAULT_SEQ_LEN, *(m.config.max_position_embeddings for m in models))
    for model, label in zip(models, labels):
        if length > model.config.max_position_embeddings:
            raise CptjaxError(f"--seq-len {length}: exceeds {label}'s max_position_embeddings "
                              f"({model.config.max_position_embeddings})")
    if settings.retrieval is not None:
        settings.retrieval.check_length(length, "--retrieval", "raise --seq-len or drop the longer lengths")
    data = load_eval_data(settings.sets, folder, seq_len=length, batch_size=settings.batch_size,
                          flag=settings.flag)
    top = max((int(b["inputs"].max()) for batches in data.sets.values() for b in batches), default=0)
    if top >= models[0].config.num_tokens:
        raise CptjaxError(f"--tokenizer {folder}: gives token id {top}, beyond the models' vocabulary "
                          f"of {models[0].config.num_tokens}; use the models' own tokenizer")
    data.domain = domain
    data.position_edges = position_edges(length, settings.position_buckets)
    if settings.retrieval is not None:
        data.retrieval = settings.retrieval
        data.prompts = make_prompts(settings.retrieval, data.tokenizer, "--retrieval")
    if settings.tasks is not None:
        data.tasks, data.task_specs = settings.tasks, settings.tasks.resolved()
    return data


def load_eval_data(sets: Sequence[EvalSetConfig], tokenizer_dir, *, seq_len: int, batch_size: int,
                   flag: str = "--data") -> EvalData:
    """The sets tokenized with the tokenizer in `tokenizer_dir` and packed, as in training."""
    if sets:
        EvalSettings(tuple(sets), seq_len=seq_len, batch_size=batch_size, flag=flag).check()
    tokenizer = DocumentTokenizer(load_tokenizer_spec(tokenizer_dir))
    packed = pack_eval_sets(sets, [f"{flag} {s.name}" for s in sets], tokenizer, seq_len=seq_len,
                            batch_size=batch_size, process_index=jax.process_index(),
                            process_count=jax.process_count())
    return EvalData(packed, tokenizer, seq_len, batch_size)


def evaluate_weights(weights: Weights, data: EvalData, dtype: str = "float32",
                     label: str = "") -> tuple[dict, dict | None, dict | None]:
    """({set: summarize(...)}, the retrieval probe's results or None, the lm-eval tasks'
    `task_scores` or None) of one model, read straight onto the devices in `dtype`."""
    mesh_config = MeshConfig()
    setup = build_eval_setup(weights.config, float_dtype(dtype, "--dtype"), mesh_config,
                             position_edges=data.position_edges)
    params = weights.read_onto(setup.abstract_params)
    label = label or weights.describe()
    results = _evaluate(setup, params, data, label)
    probe = None
    if data.retrieval is not None:
        probe = build_probe(data.retrieval, data.prompts, graphdef=setup.graphdef, mesh=setup.mesh,
                            rules=mesh_config.rules, param_shardings=jax.tree.map(lambda a: a.sharding,
                                                                                  setup.abstract_params),
                            batch_sharding=setup.batch_sharding, seq_len=data.seq_len,
                            batch_size=data.batch_size).run(params)
    tasks = None
    if data.tasks is not None:
        model = ModelOnMesh(weights.config, setup.graphdef, params, setup.mesh, mesh_config.rules, data.batch_size)
        tasks = run_model_tasks(model, data.tokenizer.spec.path, data.tasks, data.task_specs)
    return results, probe, tasks


def evaluate_host_params(setup: EvalSetup, params: dict, data: EvalData, label: str) -> dict:
    """{set: summarize(...)} of parameters held on the host (NumPy), e.g. a merge in memory."""
    def place(array, abstract):
        array = np.asarray(array).astype(abstract.dtype, copy=False)
        return jax.make_array_from_callback(array.shape, abstract.sharding, lambda index: array[index])
    return _evaluate(setup, jax.tree.map(place, params, setup.abstract_params), data, label)


def _evaluate(setup: EvalSetup, params, data: EvalData, label: str) -> dict:
    sets = {name: progress_bar(f"evaluating {label} on {name}")(batches)
            for name, batches in data.sets.items()}
    return evaluate(setup.eval_fn, params, sets, setup.to_global, position_edges=setup.position_edges)


@dataclasses.dataclass
class EvalReport:
    results: dict[str, dict[str, dict]]  # {model label: {set: summary}}
    domain: tuple[str, ...]
    seq_len: int
    batch_size: int
    dtype: str
    retrieval: dict[str, dict] = dataclasses.field(default_factory=dict)  # {model label: probe results}
    tasks: dict[str, dict] = dataclasses.field(default_factory=dict)  # {model label: task_scores(...)}
    tokenizers: dict[str, str] = dataclasses.field(default_factory=dict)  # {model label: tokenizer fingerprint}

    @property
    def comparisons(self) -> dict[str, list[dict]]:
        """{model label: compare(reference, model)} for every model after the first; in bits per byte
        where the model's tokenizer is not the reference's."""
        labels = list(self.results)
        return {label: compare(self.results[labels[0]], self.results[label], self.domain,
                               per_byte=self.tokenizers.get(label) != self.tokenizers.get(labels[0]))
                for label in labels[1:]}

    def to_json(self) -> dict:
        return {"models": self.results, "domain_sets": list(self.domain), "seq_len": self.seq_len,
                "batch_size": self.batch_size, "dtype": self.dtype,
                "reference": next(iter(self.results)), "comparisons": self.comparisons,
                "retrieval": self.retrieval, "tasks": self.tasks, "tokenizers": self.tokenizers}

    def markdown(self) -> str:
        if any(self.results.values()):
            text = (f"# Held-out evaluation\n\nseq_len {self.seq_len}, batch {self.batch_size}, {self.dtype}; "
                    f"domain sets (adaptation): {', '.join(self.domain)}; the others measure forgetting.\n\n"
                    + (f"Note: {NOT_COMPARABLE}.\n\n" if len(set(self.tokenizers.values())) > 1 else "")
                    + results_table(self.results))
        else:  # --retrieval or --tasks alone
            text = f"# Evaluation\n\nseq_len {self.seq_len}, batch {self.batch_size}, {self.dtype}; no held-out sets.\n"
        if positions := position_table(self.results):
            text += ("\n## Loss by position in the document\n\nnats/token of the targets whose input sits at "
                     "these positions (tokens from the document's start in the row)\n\n" + positions)
        for label, probe in self.retrieval.items():
            text += (f"\n## Pass-key retrieval: {label}\n\ngreedy exact match of the key, {probe['samples']} "
                     f"prompts per cell, in brackets the answer's mean NLL in nats/token; {probe['accuracy']:.0%} "
                     "overall\n\n" + retrieval_table(probe))
        if self.tasks:
            text += ("\n## lm-evaluation-harness tasks\n\nscores of lm-eval's metrics (higher is better for "
                     "accuracies, lower for perplexities), and each model's difference from the first\n\n"
                     + tasks_table(self.tasks))
        reference = next(iter(self.results))
        for label, rows in self.comparisons.items():
            if not rows:  # no held-out sets
                continue
            unit = rows[0]["unit"] + ("" if rows[0]["unit"] == "nats/token" else " (the tokenizers differ)")
            text += (f"\n## {label} against {reference}\n\nadaptation = domain loss drop, forgetting = "
                     f"general loss rise, in {unit}\n\n"
                     + comparison_table(rows, before="reference", after="model"))
        return text


def evaluate_models(models: Sequence[str], sets: Sequence[EvalSetConfig], *, domain: Sequence[str] = (),
                    seq_len: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    dtype: str = "float32", tokenizer: str | None = None,
                    position_buckets: tuple[int, ...] | None = None,
                    retrieval: RetrievalConfig | None = None, tasks: TaskSettings | None = None) -> EvalReport:
    """Every model (PATH, PATH@STEP, either with :ema) on every set and task; the first is the reference."""
    settings = EvalSettings(tuple(sets), tuple(domain), seq_len, batch_size, dtype, tokenizer,
                            position_buckets=position_buckets, retrieval=retrieval, tasks=tasks)
    if not models:
        raise CptjaxError("--model: give at least one model (an HF folder or a cptjax checkpoint)")
    settings.check()
    labels = _labels(models)
    opened: list[Weights] = []
    try:
        for text in models:
            path, step, ema = parse_model_arg(text)
            opened.append(open_weights(path, step, flag="--model", step_flag="--model PATH@STEP", ema=ema))
        # each model on the sets tokenized by its own tokenizer, all at the shortest model's length
        length = settings.seq_len or min(DEFAULT_SEQ_LEN, *(w.config.max_position_embeddings for w in opened))
        settings, datas = dataclasses.replace(settings, seq_len=length), {}
        for group in tokenizer_groups(opened, settings.tokenizer):
            data = prepare_eval(settings, [opened[i] for i in group], [f"--model {labels[i]}" for i in group])
            datas.update(dict.fromkeys(group, data))
        both = {label: evaluate_weights(w, datas[i], dtype, label) for i, (w, label) in enumerate(zip(opened, labels))}
    finally:
        for w in opened:
            w.close()
    return EvalReport({label: sets for label, (sets, _, _) in both.items()}, data.domain, data.seq_len, batch_size,
                      dtype, {label: probe for label, (_, probe, _) in both.items() if probe is not None},
                      {label: tasks for label, (_, _, tasks) in both.items() if tasks is not None},
                      {label: datas[i].tokenizer.spec.fingerprint for i, label in enumerate(labels)})


def _labels(models: Sequence[str]) -> list[str]:
    labels = [m.rstrip("/") for m in models]
    for label in labels:
        if labels.count(label) > 1:
            raise CptjaxError(f"--model {label}: given twice")
    return labels


def write_report(report: EvalReport, out: str) -> Path:
    """eval.json and eval.md in a new folder `out` (written whole or not at all)."""
    folder = check_output_dir(user_path(out, "--out"))
    with atomic_output_dir(folder) as tmp:
        (tmp / "eval.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
        (tmp / "eval.md").write_text(report.markdown())
    return folder
