"""lm-evaluation-harness tasks during training (`eval.tasks`): scored on the training mesh.

Process 0 runs the harness (`lm_eval.simple_evaluate`): it builds the tasks' requests, batches
them and reads the scores. Every call that touches the model goes through `Lockstep`, so every
other process makes the same jitted call with the same arrays: all hosts compute, one drives.
The model is cptjax's lm-eval backend (cptjax.measure's `cptjax` model) over the live training
parameters, without a copy and without leaving the mesh.

A SIGTERM between two of the harness's model calls stops the evaluation (nothing is logged; the
next start runs it again first), as a held-out evaluation stops between batches.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from cptjax.core.errors import CptjaxError

PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "word_perplexity", "bits_per_byte")


class TasksInterrupted(Exception):
    """Raised between two model calls of the harness when the run was asked to stop."""


def headline_metric(scores: dict[str, float]) -> str:
    """The one metric of a task's scores a curve or a table shows: acc_norm, acc, exact_match,
    word_perplexity, bits_per_byte, whichever comes first, else the first one logged."""
    for name in PREFERRED_METRICS:
        if name in scores:
            return name
    return next(k for k in scores if not k.endswith("_stderr") and k != "samples")


def scores_from_results(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's `results` ({task: {"acc,none": x, "acc_stderr,none": s, "alias": ...}}) as
    {task: {"acc": x, "acc_stderr": s, ...}}: numbers only; a filter other than `none` kept in the
    name (`exact_match,strict-match` -> `exact_match[strict-match]`)."""
    out = {}
    for task, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            row[metric if filter_name == "none" else f"{metric}[{filter_name}]"] = float(value)
        if row:
            row["samples"] = float(results.get("n-samples", {}).get(task, {}).get("effective", 0))
            out[task] = row
    return out


def format_scores(step: int, scores: dict[str, dict[str, float]]) -> str:
    """One line: each task's headline score."""
    parts = [f"{task} {headline_metric(s)} {s[headline_metric(s)]:.4f}" for task, s in scores.items()]
    return f"step {step} tasks: " + ", ".join(parts)


@functools.lru_cache(maxsize=4)
def task_manager(names: tuple[str, ...], key: str = "eval.tasks.names"):
    """lm-eval's TaskManager for `names` (registered task names or local YAML files), after
    checking that each one exists: one error naming the first that does not. Only local files:
    the built-in index is not read (it takes seconds)."""
    from lm_eval.tasks import TaskManager

    files = [n for n in names if n.endswith((".yaml", ".yml"))]
    missing = [n for n in files if not Path(n).is_file()]
    if missing:
        raise CptjaxError(f"{key}: task file {missing[0]}: no such file (relative paths are from the "
                          "folder the run starts in)")
    manager = TaskManager(include_defaults=len(files) < len(names))
    unknown = [n for n in names if n not in files and n not in manager.all_tasks]
    if unknown:
        raise CptjaxError(f"{key}: {unknown[0]!r} is not an lm-eval task, group or tag; see `lm-eval ls tasks`, "
                          "or give the path of a task YAML file")
    return manager


@dataclasses.dataclass
class TaskHarness:
    """eval.tasks' harness: process 0's task manager, and the model calls every process makes."""

    config: Any  # a TasksConfig
    manager: Any  # lm-eval's TaskManager (process 0), None elsewhere
    lockstep: Any  # cptjax.train.lockstep.Lockstep over the model's jitted calls
    make_model: Any  # (params, stop) -> the lm-eval model whose calls go through `lockstep`


def harness_for_run(config, setup, tokenizer_dir) -> TaskHarness | None:
    """`config.eval.tasks`' harness (config: a TrainConfig; None without tasks) for the model laid
    out by `setup`, with the run's tokenizer; checks the task names first."""
    tasks = config.eval.tasks
    if tasks is None:
        return None
    import jax

    manager = task_manager(tasks.names) if jax.process_index() == 0 else None
    raise NotImplementedError("the model calls come with cptjax's lm-eval backend")
