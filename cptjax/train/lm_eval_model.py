"""cptjax as an lm-evaluation-harness model: `--model cptjax --model_args path=RUN_OR_HF_DIR[@STEP],dtype=float32`.

`CptjaxLM`, registered as "cptjax", puts lm-eval's requests to a `ModelOnMesh` (model_on_mesh.py:
the parameters on the device mesh, batched scoring and KV-cache generation). It follows lm-eval's
own `hf` backend (HFLM) wherever the numbers depend on it: the model folder's HF tokenizer with
HFLM's BOS rule, its left truncation to `max_length`, its rolling windows
(lm_eval.utils.get_rolling_token_windows), its stop sequences (the tokenizer's EOS text added) and
the decoding of generations. So the two backends give the same log-likelihoods and the same greedy
generations for the same weights.

lm-eval 0.4.13 finds models only in its own registry; the `lm_eval.models` entry point in
pyproject.toml is how its later releases find plugins. With 0.4.13, `cptjax lm-eval ARGS` runs
lm-eval's own command line after registering "cptjax", and `run_tasks` is the library call.
`path` is read as every cptjax command reads a model: an HF folder, a cptjax checkpoint or run,
PATH@STEP for one step.

In a training run: `CptjaxLM(model=ModelOnMesh(config, graphdef, params, mesh, rules),
tokenizer=folder_or_hf_tokenizer)`, then `run_tasks(lm, ["hellaswag"], limit=100)`; every process
runs the same requests (one program over the whole mesh) and gets the same results.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Sequence

from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, local_copy, user_path
from cptjax.data.tokenize import TOKENIZER_FILES
from cptjax.model.decode import Sampling
from cptjax.train.model_on_mesh import DEFAULT_BATCH_SIZE, ModelOnMesh

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:
    raise CptjaxError(f"lm-evaluation-harness is not installed ({err}); pip install 'cptjax[eval]'") from None

log = logging.getLogger(__name__)

def load_hf_tokenizer(folder: PathLike, key: str = "tokenizer", add_bos_token: bool | None = None):
    """The HF tokenizer of a model folder, loaded as lm-eval's `hf` backend loads it."""
    import transformers

    path = user_path(folder, key)
    kwargs = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    try:
        return transformers.AutoTokenizer.from_pretrained(str(local_copy(path, TOKENIZER_FILES)), **kwargs)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a broken folder
        raise CptjaxError(f"{key} {path}: transformers cannot load this tokenizer ({err})") from None


def _int_arg(value, key: str, default: int | None) -> int | None:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return default  # lm-eval's "auto" batch size: the fixed shapes here need a number
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CptjaxError(f"model_args {key}={value!r}: expected a whole number") from None


@register_model("cptjax")
class CptjaxLM(TemplateLM):
    """lm-eval's model interface over a `ModelOnMesh`: from `path` (lm-eval's --model_args), or
    from `model` (a training run's live parameters) with `tokenizer` a folder or a loaded HF
    tokenizer."""

    def __init__(self, path: str | None = None, dtype: str = "float32", batch_size: int | str | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 tokenizer=None, model: ModelOnMesh | None = None, device: str | None = None,
                 max_batch_size: int | None = None, **unknown):
        super().__init__()
        if unknown:
            raise CptjaxError(f"model_args {', '.join(sorted(unknown))}: not an argument of the cptjax model; "
                              "use path, dtype, batch_size, max_length, max_gen_toks, add_bos_token, tokenizer")
        del device, max_batch_size  # lm-eval passes them; JAX uses every device of the mesh
        rows = _int_arg(batch_size, "batch_size", DEFAULT_BATCH_SIZE)
        if (path is None) == (model is None):
            raise CptjaxError("model_args path: give path=RUN_OR_HF_DIR (PATH@STEP for a step)")
        if model is None:
            model, own_tokenizer = ModelOnMesh.load(str(path), dtype=str(dtype), batch_size=rows)
            tokenizer = tokenizer or own_tokenizer
            if tokenizer is None:
                raise CptjaxError(f"model_args path={path}: has no tokenizer files; add tokenizer=FOLDER")
        elif batch_size is not None:
            model = dataclasses.replace(model, batch_size=rows)
        self.model = model
        self.add_bos_token = add_bos_token
        self.tokenizer = tokenizer if not isinstance(tokenizer, (str, os.PathLike, epath.Path)) else load_hf_tokenizer(
            tokenizer, "model_args tokenizer", add_bos_token)
        self._max_length = _int_arg(max_length, "max_length", model.config.max_position_embeddings)
        if self._max_length > model.config.max_position_embeddings:
            raise CptjaxError(f"model_args max_length={self._max_length}: exceeds the model's "
                              f"max_position_embeddings ({model.config.max_position_embeddings})")
        self._max_gen_toks = _int_arg(max_gen_toks, "max_gen_toks", 256)
        eos = model.config.eos_token_id
        eos = (eos,) if isinstance(eos, int) else tuple(eos or ())
        self.eos = eos or (self.tokenizer.eos_token_id,)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False  # the text carries its BOS already
        elif add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        ids = self.tokenizer.encode(string, **({} if add_special_tokens is None else
                                               {"add_special_tokens": add_special_tokens}))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (log-likelihood, is_greedy), truncated from the
        left to max_length + 1 tokens as HFLM does."""
        sequences = [(list(context) + list(continuation))[-(self.max_length + 1):]
                     for _, context, continuation in requests]
        scored = [len(continuation) for _, _, continuation in requests]
        for (key, _, continuation) in requests:
            if not continuation or len(continuation) > self.max_length:
                raise CptjaxError(f"a continuation of {len(continuation)} tokens: lm-eval scores 1 to "
                                  f"max_length ({self.max_length}) tokens")
        answers = self.model.score(sequences, scored)
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in disjoint windows of max_length tokens, each window
        conditioned on the tokens before it (lm-eval's rolling windows, as HFLM)."""
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Texts generated for each context until a stop sequence (the tokenizer's EOS text among
        them) or max_gen_toks, by groups of equal generation settings."""
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results: list[str] = [""] * len(requests)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            new_tokens = kwargs.pop("max_gen_toks")
            temperature = float(kwargs.pop("temperature", 0.0))  # normalize_gen_kwargs: 0 unless do_sample
            kwargs.pop("do_sample", None)
            sampling = Sampling(new_tokens, temperature, float(kwargs.pop("top_p", 1.0)), int(kwargs.pop("seed", 0)))
            if kwargs:
                log.warning("cptjax model: generation settings %s are not supported and were ignored", sorted(kwargs))
            room = self.max_length - new_tokens
            if room < 1:
                raise CptjaxError(f"max_gen_toks {new_tokens}: leaves no room for a prompt in max_length "
                                  f"({self.max_length})")
            prompts = [self._prompt_ids(requests[i].args[0])[-room:] for i in members]
            for i, ids in zip(members, self.model.generate(prompts, sampling, self.eos)):
                text = postprocess_generated_text(self.tok_decode(ids), until, None)
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _prompt_ids(self, context: str) -> list[int]:
        # HFLM's batch encoding: no special tokens when the text starts with BOS, else add_bos_token's choice
        bos = self.tokenizer.bos_token
        if bos is not None and context.startswith(bos):
            return self.tokenizer.encode(context, add_special_tokens=False)
        if self.add_bos_token is not None:
            return self.tokenizer.encode(context, add_special_tokens=self.add_bos_token)
        return self.tokenizer.encode(context)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)


@functools.lru_cache(maxsize=8)
def _task_manager(with_registry: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=with_registry)  # lm-eval's own registry takes seconds to index


def resolve_tasks(specs: Sequence[str], flag: str = "--tasks"):
    """(a TaskManager, the task specs) for task names and local YAML files, each checked: an
    unknown name or a missing file is one error naming it. Local files alone skip lm-eval's
    registry."""
    specs = [spec.strip() for spec in specs]
    if not specs or not all(specs):
        raise CptjaxError(f"{flag}: no task given; e.g. {flag} hellaswag,arc_easy or {flag} my_task.yaml")
    manager = _task_manager(not all(spec.endswith((".yaml", ".yml")) for spec in specs))
    resolved = []
    for spec in specs:
        if spec.endswith((".yaml", ".yml")):
            path = user_path(spec, flag)
            if not path.is_file():
                raise CptjaxError(f"{flag} {spec}: no such task file")
            resolved.append(str(path))
        elif spec in manager.all_tasks:
            resolved.append(spec)
        else:
            raise CptjaxError(f"{flag} {spec}: not an lm-eval task, group or tag name, nor a .yaml task file "
                              "(`lm_eval ls tasks` lists the names)")
    return manager, resolved


def run_tasks(lm: CptjaxLM, tasks: Sequence[str], *, limit: int | float | None = None,
              num_fewshot: int | None = None, log_samples: bool = False, manager=None,
              flag: str = "--tasks", seed: int | None = None) -> dict:
    """lm-eval's `simple_evaluate` of `lm` on task names or YAML files (already resolved when
    `manager`, resolve_tasks's TaskManager, is given); its results dict. Standard errors are left
    out (no bootstrap). `seed` sets all of lm-eval's seeds (default: lm-eval's own)."""
    from lm_eval import simple_evaluate

    if manager is None:
        manager, tasks = resolve_tasks(tasks, flag)
    if limit is not None and limit >= 1:
        limit = int(limit)
    seeds = {} if seed is None else {k: seed for k in ("random_seed", "numpy_random_seed", "torch_random_seed",
                                                         "fewshot_random_seed")}
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                           log_samples=log_samples, bootstrap_iters=0, **seeds)


def task_scores(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results -> {task: {metric: value}}: the numbers only (no standard errors, names)."""
    scores = {}
    for task, metrics in results["results"].items():
        numbers = {k.removesuffix(",none"): float(v) for k, v in metrics.items()
                   if "_stderr" not in k and k != "sample_len" and isinstance(v, (int, float))}
        if numbers:
            scores[task] = numbers
    return scores


def lm_eval_main(argv: Sequence[str]) -> None:
    """`cptjax lm-eval ARGS`: lm-eval's own command line with the "cptjax" model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
