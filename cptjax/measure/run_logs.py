"""A training run read back from its folder: logs/metrics.jsonl and config.yaml.

What the report (report.py) and the model card (model_card.py) both need, answered once: the train
and eval records in step order, the base's step-0 evaluation and the evaluation at a step, the
tokens each source supplied, and the configured mixture weights by stage.

A resumed run may log a step twice (the steps between its last checkpoint and the crash are run
again): the later record of a step replaces the earlier one. A last line cut short by a crash is
ignored; any other malformed line is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json

from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, user_path
from cptjax.io.run_layout import RunPaths
from cptjax.train.config import TrainConfig, load_run_config
from cptjax.train.evaluation import compare, markdown_table


@dataclasses.dataclass
class RunLog:
    run_dir: epath.Path
    config: TrainConfig
    train: list[dict]  # train records in step order, one per step
    evals: list[dict]  # eval records in step order: {"step", "kind", set name: summary, ...}
    retrieval: list[dict] = dataclasses.field(default_factory=list)  # pass-key probe records, step order
    tasks: list[dict] = dataclasses.field(default_factory=list)  # lm-eval task records: {task: {metric: value}}
    goodput: list[dict] = dataclasses.field(default_factory=list)  # each run segment's last goodput account

    @property
    def source_names(self) -> tuple[str, ...]:
        return self.config.data.source_names

    @property
    def eval_names(self) -> list[str]:
        names = []
        for record in self.evals:
            names += [k for k in record if isinstance(record[k], dict) and k not in names]
        return names

    @property
    def task_names(self) -> list[str]:
        names = []
        for record in self.tasks:
            names += [k for k in record if isinstance(record[k], dict) and k not in names]
        return names

    @property
    def last_step(self) -> int:
        steps = [r["step"] for r in self.train + self.evals]
        return max(steps) if steps else 0

    def base_eval(self) -> dict | None:
        """The evaluation of the model before any update (step 0), if the run made one."""
        return self.evals[0] if self.evals and self.evals[0]["step"] == 0 else None

    def eval_at(self, step: int | None = None) -> dict | None:
        """The latest evaluation at or before `step` (the last one if None)."""
        found = [r for r in self.evals if step is None or r["step"] <= step]
        return found[-1] if found else None

    def position_labels(self, name: str) -> list[str]:
        """The position buckets of set `name` in the evaluations, in order ([] if none logged them)."""
        labels = []
        for record in self.evals:
            labels += [b for b in record.get(name, {}).get("position_loss", {}) if b not in labels]
        return labels

    def sets_of(self, record: dict) -> dict[str, dict]:
        return {k: v for k, v in record.items() if isinstance(v, dict)}

    def source_tokens(self, up_to: int | None = None) -> tuple[dict[str, float], int]:
        """Tokens each source supplied as loss targets (summed over the logging windows up to step
        `up_to`), and how many steps those windows cover."""
        totals = {name: 0.0 for name in self.source_names}
        covered = 0
        for record in self.train:
            if up_to is not None and record["step"] > up_to:
                break
            for name, count in record.get("source_tokens", {}).items():
                totals[name] = totals.get(name, 0.0) + count
            covered += record.get("window_steps", 0)
        return totals, covered

    def before_after(self, domain: tuple[str, ...], step: int | None = None) -> tuple[list[dict], int | None]:
        """`evaluation.compare` of the base (step 0) with the evaluation at `step` (the last by
        default), and that evaluation's step; ([], None) without both."""
        base, after = self.base_eval(), self.eval_at(step)
        if base is None or after is None or after is base:
            return [], None
        return compare(self.sets_of(base), self.sets_of(after), domain), after["step"]

    def mixture(self, up_to: int | None = None) -> tuple[list[dict], int]:
        """Per source: configured weights by stage, realized share and target tokens up to step
        `up_to`; and the steps the token counts cover."""
        tokens, covered = self.source_tokens(up_to)
        total = sum(tokens.values()) or 1.0
        stages = self.stage_weights()
        rows = [{"source": name, "weights": [(start, weights[name]) for start, weights in stages],
                 "share": tokens[name] / total, "tokens": tokens[name]} for name in self.source_names]
        return rows, covered

    def stage_weights(self) -> list[tuple[int, dict[str, float]]]:
        """[(first step, {source: normalized weight})], as data.stages configures them."""
        return [(start, dict(zip(self.source_names, weights)))
                for start, weights in self.config.data.stage_weights()]


def read_run(run_dir: PathLike, flag: str = "RUN_DIR") -> RunLog:
    """Reads a run folder written by `cptjax train`."""
    run = RunPaths(user_path(run_dir, flag))
    root, metrics = run.root, run.metrics
    for path in (metrics, run.config):
        if not path.is_file():
            raise CptjaxError(f"{flag} {root}: no {path.relative_to(root)}; give the run_dir of a cptjax train run")
    config = load_run_config(run.config)
    records: dict[tuple[str, int], dict] = {}
    segments: dict[float, dict] = {}
    lines = metrics.read_bytes().splitlines()  # bytes: a damaged line may not even be UTF-8
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if number == len(lines):  # a write cut short by a crash
                continue
            raise CptjaxError(f"{metrics}:{number}: not a JSON record; the log is damaged") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or "kind" not in record:
            raise CptjaxError(f"{metrics}:{number}: not a cptjax metrics record (no step and kind)")
        if record["kind"] == "goodput":  # one account per segment (start), the latest written
            segments[record.get("segment_start")] = record
        else:
            records[(record["kind"], record["step"])] = record
    ordered = [records[k] for k in sorted(records, key=lambda k: k[1])]
    train = [r for r in ordered if r["kind"] == "train"]
    evals = [r for r in ordered if r["kind"] == "eval"]
    if not train and not evals:
        raise CptjaxError(f"{metrics}: no train or eval records yet; run some steps first")
    return RunLog(root, config, train, evals, [r for r in ordered if r["kind"] == "retrieval"],
                  [r for r in ordered if r["kind"] == "tasks"],
                  sorted(segments.values(), key=lambda r: r["segment_start"]))


def mixture_table(rows: list[dict]) -> str:
    """`RunLog.mixture` rows as Markdown."""
    def weights(row):
        if len(row["weights"]) == 1:
            return f"{row['weights'][0][1]:.1%}"
        return ", ".join(f"{w:.1%} from step {start}" for start, w in row["weights"])
    return markdown_table(["source", "configured weight", "realized share", "target tokens"],
                          [[r["source"], weights(r), f"{r['share']:.1%}", f"{r['tokens']:,.0f}"] for r in rows])


def run_summary(run: RunLog, step: int | None = None) -> list[str]:
    """Markdown bullet lines: where the weights came from, steps, batch, schedule."""
    config = run.config
    model, training, schedule = config.model, config.training, config.schedule
    origin = (f"continued from `{model.init_from}`" + (f" (step {model.init_step})" if model.init_step else "")
              if model.init_from else f"trained from scratch (`{model.hf_config}`)")
    done = run.last_step if step is None else step
    shapes = config.stage_shapes  # length stages: each shape from its start step on
    ends = [s.start_step - 1 for s in shapes[1:]] + [training.steps]
    positions = sum(max(0, min(done, end) - s.start_step + 1) * s.batch_size * s.seq_len
                    for s, end in zip(shapes, ends))
    shape_text = "; then ".join(
        f"{s.batch_size} rows x {s.seq_len} tokens = {s.batch_size * s.seq_len:,} tokens per step"
        + ("" if len(shapes) == 1 else f" (steps {s.start_step}-{end})") for s, end in zip(shapes, ends))
    return [
        f"- base model: {origin}",
        f"- steps: {done} of {training.steps}; {shape_text} ({positions:,} positions in all)",
        f"- schedule: `{schedule.kind}`, peak learning rate {schedule.peak_lr:g} after "
        f"{schedule.warmup_steps()} warmup steps, end learning rate {schedule.end_lr:g}",
        f"- held-out evaluation every {config.eval.every} steps"
        + (", and at step 0 on the base model" if config.eval.at_start else ""),
    ]
