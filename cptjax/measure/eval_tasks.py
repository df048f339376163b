"""`cptjax eval --tasks`: lm-evaluation-harness tasks on saved models, their scores side by side.

The tasks (names of lm-eval's registry or local YAML files) are checked before any model is read;
each model then runs them through cptjax's lm-eval model (lm_eval_model.py) on the parameters
eval_models.py has already laid out on the mesh, and the report shows every metric per model with
each model's difference from the first.
"""

from __future__ import annotations

import dataclasses

from cptjax.core.errors import CptjaxError
from cptjax.train.evaluation import markdown_table
from cptjax.train.model_on_mesh import ModelOnMesh


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """lm-evaluation-harness tasks to run on every model (cptjax.train.lm_eval_model): names or
    local YAML files, checked by `resolved` before any model is read."""

    names: tuple[str, ...]
    limit: float | None = None  # documents per task (lm-eval's --limit; below 1: a fraction)
    num_fewshot: int | None = None  # default: each task's own

    def resolved(self):
        """(lm-eval's TaskManager, the task specs); one error naming an unknown task or missing file."""
        from cptjax.train.lm_eval_model import resolve_tasks
        if self.limit is not None and self.limit <= 0:
            raise CptjaxError(f"--limit {self.limit:g}: must be > 0 (a count, or a fraction below 1)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise CptjaxError(f"--num-fewshot {self.num_fewshot}: must be >= 0")
        return resolve_tasks(self.names)


def parse_tasks(text: str, limit: float | None = None, num_fewshot: int | None = None) -> TaskSettings:
    """--tasks NAME_OR_YAML[,...] and its options."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise CptjaxError(f"--tasks {text!r}: give task names or YAML files, comma-separated")
    return TaskSettings(names, limit, num_fewshot)


def tasks_table(scores: dict[str, dict[str, dict[str, float]]]) -> str:
    """{model: task_scores(...)} as Markdown: one row per task and metric, a column per model and,
    for every model after the first, its difference from the first."""
    labels = list(scores)
    base = scores[labels[0]]
    header = ["task", "metric", *labels, *(f"{label} - {labels[0]}" for label in labels[1:])]
    rows = []
    for task, metrics in base.items():
        for metric, value in metrics.items():
            others = [scores[label].get(task, {}).get(metric) for label in labels[1:]]
            rows.append([task, metric, f"{value:.4f}", *("n/a" if v is None else f"{v:.4f}" for v in others),
                         *("n/a" if v is None else f"{v - value:+.4f}" for v in others)])
    return markdown_table(header, rows)


def run_model_tasks(model: ModelOnMesh, tokenizer_dir, settings: TaskSettings, specs: tuple) -> dict:
    """`task_scores` of one model on the tasks `specs` (TaskSettings.resolved's), with the
    models' tokenizer folder."""
    from cptjax.train.lm_eval_model import CptjaxLM, load_hf_tokenizer, run_tasks, task_scores

    lm = CptjaxLM(model=model, tokenizer=load_hf_tokenizer(tokenizer_dir, "--tokenizer"))
    manager, resolved = specs
    return task_scores(run_tasks(lm, resolved, limit=settings.limit, num_fewshot=settings.num_fewshot,
                                 manager=manager))
