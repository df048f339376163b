"""lm-evaluation-harness tasks during training (`eval.tasks`): scored on the training mesh.

Process 0 runs the harness (`lm_eval.simple_evaluate` over cptjax's lm-eval model,
lm_eval_model.py): it builds the tasks' requests, batches them and reads the scores. Each batch's
device call (a scoring pass, or a KV-cache decode) goes through `Lockstep`, so every other process
makes the same jitted call with the same tokens: one process drives, all compute, as Levanter's
evaluation callback does. The model is the live training parameters, never copied.

A SIGTERM (the run's stop request) between two device calls stops the evaluation: nothing is
logged, and the next start runs it again first, as a held-out evaluation stops between batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cptjax.model.decode import Sampling
from cptjax.train.lockstep import Lockstep, led
from cptjax.train.model_on_mesh import ModelOnMesh

PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "word_perplexity", "bits_per_byte")


class TasksInterrupted(Exception):
    """Raised on process 0 between two device calls when the run was asked to stop."""


def headline_metric(scores: dict[str, float]) -> str:
    """The one metric of a task's scores a curve or a table shows: acc_norm, acc, exact_match,
    word_perplexity, bits_per_byte, whichever comes first, else the first one logged."""
    for name in PREFERRED_METRICS:
        if name in scores:
            return name
    return next(iter(scores))


def format_scores(step: int, scores: dict[str, dict[str, float]]) -> str:
    """One line: each task's headline score."""
    parts = [f"{task} {headline_metric(s)} {s[headline_metric(s)]:.4f}" for task, s in scores.items()]
    return f"step {step} tasks: " + ", ".join(parts)


def _sampling_array(sampling: Sampling) -> np.ndarray:
    """A Sampling as int32 words (the floats by their bits), for Lockstep's integer arrays."""
    floats = np.array([sampling.temperature, sampling.top_p], np.float32).view(np.int32)
    return np.array([sampling.max_new_tokens, sampling.seed, *floats], np.int32)


def _sampling_from(words: np.ndarray) -> Sampling:
    temperature, top_p = (float(x) for x in np.asarray(words[2:4], np.int32).view(np.float32))
    return Sampling(max_new_tokens=int(words[0]), seed=int(words[1]), temperature=temperature, top_p=top_p)


class LockstepModel(ModelOnMesh):
    """A ModelOnMesh whose device calls, made on process 0, are made by every process
    (`follow()` on the others); `stop()` true before a call raises TasksInterrupted."""

    def attach(self, lockstep: Lockstep, stop) -> None:
        self.lockstep, self.stop = lockstep, stop

    def ops(self) -> dict[str, Any]:
        """The device calls, as every process makes them."""
        return {"score": lambda tokens: ModelOnMesh.score_batch(self, tokens),
                "decode": lambda tokens, lengths, sampling, eos: ModelOnMesh.decode_batch(
                    self, tokens, lengths, _sampling_from(sampling), tuple(int(t) for t in eos))}

    def _check(self) -> None:
        if self.stop is not None and self.stop():
            raise TasksInterrupted

    def score_batch(self, tokens):
        self._check()
        return self.lockstep.call("score", tokens)

    def decode_batch(self, tokens, lengths, sampling, eos):
        self._check()
        return self.lockstep.call("decode", tokens, lengths, _sampling_array(sampling), np.array(eos, np.int32))


@dataclasses.dataclass
class TaskHarness:
    """eval.tasks' harness: the tasks (checked), the model on the training mesh, and on process 0
    the lm-eval model that drives it."""

    config: Any  # a TasksConfig
    model: LockstepModel
    lockstep: Lockstep
    tokenizer: Any  # the HF tokenizer (process 0), None elsewhere
    manager: Any  # lm-eval's TaskManager (process 0), None elsewhere
    tasks: list[str]  # the task specs as lm-eval takes them

    def summary(self, step: int, scores: dict) -> str:
        return format_scores(step, scores)

    def run(self, params, stop=None) -> dict[str, dict[str, float]] | None:
        """{task: {metric: value}} of `params` (every process calls this; process 0's numbers are
        the ones returned everywhere else as None too: only process 0 logs); None on every process
        if `stop()` turned true on process 0 between two device calls."""
        from cptjax.train.lm_eval_model import CptjaxLM, run_tasks, task_scores

        self.model.params = params
        self.model.attach(self.lockstep, stop)

        def drive():
            lm = CptjaxLM(model=self.model, tokenizer=self.tokenizer)
            results = run_tasks(lm, self.tasks, limit=self.config.limit, num_fewshot=self.config.num_fewshot,
                                manager=self.manager, seed=self.config.seed)
            return task_scores(results)

        scores, interrupted = led(self.lockstep, drive, TasksInterrupted)
        if interrupted:
            return None
        return scores if self.lockstep.lead else {}


def check_tasks(config) -> tuple[Any, list[str]]:
    """(lm-eval's TaskManager, the task specs) of `config.eval.tasks`: one error naming an unknown
    task or a missing file. Every process checks, so that all refuse or none does."""
    from cptjax.train.lm_eval_model import resolve_tasks

    return resolve_tasks(config.eval.tasks.names, "eval.tasks.names")


def harness_for_run(config, setup, tokenizer_dir, model_config) -> TaskHarness | None:
    """`config.eval.tasks`' harness (config: a TrainConfig; None without tasks) for the model laid
    out by `setup`, with the run's tokenizer, in rows of the held-out batches' size."""
    if config.eval.tasks is None:
        return None
    import jax

    from cptjax.train.lm_eval_model import load_hf_tokenizer

    manager, tasks = check_tasks(config)
    model = LockstepModel(model_config, setup.graphdef, None, setup.mesh, config.mesh.rules,
                          batch_size=config.eval_shape.batch_size, param_shardings=setup.state_shardings["params"])
    lockstep = Lockstep(model.ops())
    lead = jax.process_index() == 0
    folder, key = (tokenizer_dir, "model.tokenizer") if tokenizer_dir is not None else (config.data.tokenizer,
                                                                                        "data.tokenizer")
    tokenizer = load_hf_tokenizer(folder, key) if lead else None
    return TaskHarness(config.eval.tasks, model, lockstep, tokenizer, manager if lead else None, tasks)
