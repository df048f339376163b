"""The training loop's evaluations: which a step is due, which a (re)start still owes, running them.

Two kinds, each on its own schedule: `eval` (the held-out sets, and the pass-key probe with them)
every eval.every steps, and `tasks` (lm-evaluation-harness, harness.py) every eval.tasks.every
steps; both at step 0 with eval.at_start. A kind is logged whole or not at all: a SIGTERM stops it
between batches, the step is saved, and the next start runs the kinds that step has no record of.
The functions take the trainer's `Loop`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from cptjax.train.evaluation import evaluate_each, format_results

EVAL_KINDS = ("eval", "tasks")  # held-out sets (and the probe), and lm-eval tasks: each its own schedule


def eval_due(loop, step: int) -> tuple[str, ...]:
    """The evaluations due at `step`: at step 0 (the model as it starts) with eval.at_start, then
    held-out sets every eval.every steps and tasks every eval.tasks.every steps."""
    due = []
    if loop.eval_sets or loop.probe is not None:
        due.append(("eval", loop.config.eval.every))
    if loop.tasks is not None:
        due.append(("tasks", loop.config.eval.tasks.every or loop.config.eval.every))
    return tuple(kind for kind, every in due if (loop.config.eval.at_start if step == 0 else step % every == 0))


def eval_owed(loop, step: int) -> tuple[str, ...]:
    """The evaluations the run, starting from `step`, still owes that step: scheduled, and the
    history in metrics.jsonl (the records up to `step`) has no record of their kind. That is step
    0's at a new start, and a resumed step's whose evaluation a SIGTERM cut short: that step was
    saved, so no later step's is missing. Process 0 keeps the log and answers for every process."""
    scheduled = eval_due(loop, step)
    missing = np.array([kind in scheduled and step not in loop.logger.logged_steps(kind) for kind in EVAL_KINDS])
    if jax.process_count() > 1:
        missing = np.asarray(multihost_utils.broadcast_one_to_all(missing.astype(np.int32))).astype(bool)
    return tuple(kind for kind, owed in zip(EVAL_KINDS, missing) if owed)


def run_evaluations(loop, step: int, kinds: tuple[str, ...]) -> dict | None:
    """Runs and logs the evaluations of `kinds` (EVAL_KINDS); on SIGTERM it stops between batches
    and logs nothing more (the save comes first): a kind already logged is not run again."""
    with loop.goodput.timing("eval"):
        return _run_evaluations(loop, step, kinds)


def _run_evaluations(loop, step: int, kinds: tuple[str, ...]) -> dict | None:
    stop = lambda: loop.preemption.requested  # noqa: E731
    done = {}
    if "eval" in kinds:  # with eval.ema, the EMA too (`eval_ema`), from its start_step (before it, the weights)
        on_ema = loop.config.eval.ema and step >= loop.config.training.ema.start_step
        ema = {"eval_ema": loop.state["ema"]} if on_ema else {}
        results = evaluate_each(loop.setup.eval_fn, {**ema, "eval": loop.state["params"]}, loop.eval_sets,
                                loop.setup.to_global, stop=stop, position_edges=loop.setup.position_edges)
        probe = None if results is None or loop.probe is None else loop.probe.run(loop.state["params"], stop)
        if results is None or (loop.probe is not None and probe is None):
            loop.logger.message(f"step {step} eval: interrupted by SIGTERM, not logged (the next start runs it first)")
            return None
        if probe is not None:  # before the eval record, which marks the step's evaluation done
            loop.logger.log(step, "retrieval", probe)
            loop.logger.message(f"step {step} retrieval: pass-key accuracy {probe['accuracy']:.0%}")
        for kind, values in results.items():  # "eval" last: its record marks the step's evaluation done
            loop.logger.log(step, kind, values)
            loop.logger.message(format_results(step, values, kind))
        loop.logger.flush()
        done["eval"] = results["eval"]
    if "tasks" in kinds:
        scores = loop.tasks.run(loop.state["params"], stop)
        if scores is None:
            loop.logger.message(f"step {step} tasks: interrupted by SIGTERM, not logged "
                                "(the next start runs them first)")
            return None
        loop.logger.log(step, "tasks", scores)
        loop.logger.message(loop.tasks.summary(step, scores))
        loop.logger.flush()
        done["tasks"] = scores
    return done
