"""cptjax as an lm-evaluation-harness model: `--model cptjax --model_args path=RUN_OR_HF_DIR[@STEP],dtype=float32`.

Two layers. `ModelOnMesh` is the device side and knows nothing of lm-eval: a model's parameters on a
mesh (read from a path, or the live ones of a training run), scoring token sequences and
generating from prompts in batches of fixed shapes: `batch_size` rows (a multiple of the mesh's
data-parallel ways) of a length rounded up to a power of two (at least MIN_BUCKET, at most the
model's length), so each jitted program compiles for a handful of shapes only. Scores come from the
final hidden states one chunk of positions at a time (never [B, L, V] logits); generation is
`generate.decode`, the KV-cache loop of `cptjax generate`, over left-padded prompts.

`CptjaxLM` is the lm-eval side, registered as "cptjax". It follows lm-eval's own `hf` backend
(HFLM) wherever the numbers depend on it: the model folder's HF tokenizer with HFLM's BOS rule,
its left truncation to `max_length`, its rolling windows (lm_eval.utils.get_rolling_token_windows),
its stop sequences (the tokenizer's EOS text added) and the decoding of generations. So the two
backends give the same log-likelihoods and the same greedy generations for the same weights.

lm-eval 0.4.13 finds models only in its own registry; the `lm_eval.models` entry point in
pyproject.toml is how its later releases find plugins. With 0.4.13, `cptjax lm-eval ARGS` runs
lm-eval's own command line after registering "cptjax", and `run_tasks` is the library call.
Every process computes every request (one program over the whole mesh); only the numbers that
come back are the same everywhere.

In a training run: `CptjaxLM(model=ModelOnMesh(config, graphdef, params, mesh, rules),
tokenizer=folder)`, then `run_tasks(lm, ["hellaswag"], limit=100)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cptjax.core.dtypes import float_dtype
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, local_copy, user_path
from cptjax.data.tokenize import TOKENIZER_FILES
from cptjax.io.weights import open_weights, split_step
from cptjax.measure.generate import Sampling, cut_at_eos, decode
from cptjax.model.config import ModelConfig
from cptjax.model.loss import DEFAULT_LOSS_CHUNK
from cptjax.model.sharding import MeshConfig, batch_sharding, with_activation_sharding
from cptjax.train.step import build_eval_setup

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:
    raise CptjaxError(f"lm-evaluation-harness is not installed ({err}); pip install 'cptjax[eval]'") from None

log = logging.getLogger(__name__)

MIN_BUCKET = 16  # the shortest padded length; the others double up to the model's length
DEFAULT_BATCH_SIZE = 8


def bucket_length(length: int, limit: int) -> int:
    """The padded length of a batch whose longest row has `length` tokens: the next power of two
    (at least MIN_BUCKET), or `limit` when that is shorter."""
    return min(limit, max(MIN_BUCKET, 1 << max(0, length - 1).bit_length()))


def token_scores(params, inputs, targets, *, graphdef, chunk: int = DEFAULT_LOSS_CHUNK) -> dict[str, jax.Array]:
    """Per position of inputs [B, L]: the log-probability of the next token `targets` [B, L] and
    whether it is the argmax, float32; the logits exist `chunk` positions at a time."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(inputs)  # [B, L, D]
    head = model.output_head()  # [V, D]

    def score(h, t):  # [B, C, D], [B, C] -> ([B, C], [B, C])
        logits = jnp.einsum("BCD,VD->BCV", h, head, preferred_element_type=jnp.float32)
        target = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return target - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == t

    rows, length = targets.shape
    if length <= chunk:
        logprob, greedy = score(hidden, targets)
    else:
        count = -(-length // chunk)
        pad = count * chunk - length
        h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(rows, count, chunk, -1).swapaxes(0, 1)
        t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(rows, count, chunk).swapaxes(0, 1)
        logprob, greedy = jax.lax.map(lambda xs: score(*xs), (h, t))  # [count, B, C]
        logprob = logprob.swapaxes(0, 1).reshape(rows, -1)[:, :length]
        greedy = greedy.swapaxes(0, 1).reshape(rows, -1)[:, :length]
    return {"logprob": logprob, "greedy": greedy}


@dataclasses.dataclass
class ModelOnMesh:
    """A model's parameters on a mesh and the programs lm-eval's requests need: `score` and
    `generate`. `params` is the nested dict of arrays (sharded as `graphdef`'s model lays them out
    on `mesh` with `rules`), e.g. a training run's live parameters."""

    config: ModelConfig
    graphdef: nnx.GraphDef
    params: dict
    mesh: jax.sharding.Mesh
    rules: tuple = MeshConfig().rules
    batch_size: int = DEFAULT_BATCH_SIZE  # rows per call, rounded up to the data-parallel ways

    def __post_init__(self):
        self.rows = batch_sharding(self.mesh, self.rules)
        ways = int(np.prod([self.mesh.shape[a] for a in _axes(self.rows.spec[0])]))
        self.batch_size = -(-max(1, self.batch_size) // ways) * ways
        self.per_row = NamedSharding(self.mesh, PartitionSpec(self.rows.spec[0]))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        p_shardings = jax.tree.map(lambda a: a.sharding, self.params)
        self._score = jax.jit(with_activation_sharding(
            functools.partial(token_scores, graphdef=self.graphdef), self.mesh, self.rules),
            in_shardings=(p_shardings, self.rows, self.rows), out_shardings=self.replicated)
        self._p_shardings = p_shardings
        self._decoders: dict[tuple, Any] = {}

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", batch_size: int = DEFAULT_BATCH_SIZE,
             mesh_config: MeshConfig = MeshConfig(), flag: str = "path") -> tuple[ModelOnMesh, Any]:
        """(the model at `path` (an HF folder or a cptjax checkpoint or run, PATH@STEP for a step)
        read straight onto the devices in `dtype`, its tokenizer folder or None)."""
        folder, step = split_step(path, flag)
        with open_weights(folder, step, flag=flag, step_flag=f"{flag} PATH@STEP") as weights:
            setup = build_eval_setup(weights.config, float_dtype(dtype, "dtype"), mesh_config)
            params = weights.read_onto(setup.abstract_params)
            model = cls(weights.config, setup.graphdef, params, setup.mesh, mesh_config.rules, batch_size)
            return model, weights.tokenizer_dir

    def _place(self, array: np.ndarray, sharding: NamedSharding) -> jax.Array:
        # Every process holds the whole batch (the same requests everywhere) and gives its devices their part.
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def score(self, sequences: Sequence[Sequence[int]], scored: Sequence[int]) -> list[tuple[float, bool]]:
        """For each token sequence (at most the model's length + 1 tokens), the summed
        log-probability of its last `scored` tokens given the ones before, and whether each was
        the argmax: lm-eval's (loglikelihood, is_greedy)."""
        limit = self.config.max_position_embeddings
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            length = bucket_length(max(len(sequences[i]) - 1 for i in batch), limit)
            tokens = np.zeros((self.batch_size, length + 1), np.int32)
            for row, i in enumerate(batch):
                seq = sequences[i]
                if not 0 < scored[i] < len(seq) or len(seq) - 1 > limit:
                    raise ValueError(f"request {i}: {len(seq)} tokens with {scored[i]} scored does not fit "
                                     f"the model's {limit} positions")
                tokens[row, :len(seq)] = seq
            got = jax.device_get(self._score(self.params, self._place(tokens[:, :-1], self.rows),
                                             self._place(tokens[:, 1:], self.rows)))
            for row, i in enumerate(batch):
                end = len(sequences[i]) - 1
                span = slice(end - scored[i], end)
                out[i] = (float(got["logprob"][row, span].sum(dtype=np.float64)), bool(got["greedy"][row, span].all()))
        return out

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling, eos: tuple[int, ...]) -> list[list[int]]:
        """New token ids per prompt (each up to and including its first `eos` token), in batches of
        left-padded prompts; prompt + new tokens must fit the model's length."""
        limit = self.config.max_position_embeddings
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[list[int]] = [[] for _ in prompts]
        fn = self._decoder(sampling, eos)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            longest = max(len(prompts[i]) for i in batch)
            if not 0 < longest <= limit - sampling.max_new_tokens:
                raise ValueError(f"a prompt of {longest} tokens and {sampling.max_new_tokens} new ones do not "
                                 f"fit the model's {limit} positions")
            length = bucket_length(longest, limit)
            tokens = np.zeros((self.batch_size, length), np.int32)
            lengths = np.ones(self.batch_size, np.int32)  # rows past the batch: one padding token
            for row, i in enumerate(batch):
                tokens[row, length - len(prompts[i]):] = prompts[i]
                lengths[row] = len(prompts[i])
            new, steps = jax.device_get(fn(self.params, self._place(tokens, self.rows),
                                           self._place(lengths, self.per_row)))
            for row, ids in zip(batch, cut_at_eos(new[:len(batch)], steps, eos)):
                out[row] = ids
        return out

    def _decoder(self, sampling: Sampling, eos: tuple[int, ...]):
        key = (sampling, eos)
        if key not in self._decoders:
            def run(params, prompt, lengths):
                return decode(nnx.merge(self.graphdef, params), prompt, lengths, sampling=sampling, eos=eos)
            self._decoders[key] = jax.jit(with_activation_sharding(run, self.mesh, self.rules),
                                          in_shardings=(self._p_shardings, self.rows, self.per_row),
                                          out_shardings=self.replicated)
        return self._decoders[key]


def _axes(spec) -> tuple[str, ...]:
    return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


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
            model.batch_size = rows
            model.__post_init__()
        self.model = model
        self.add_bos_token = add_bos_token
        self.tokenizer = tokenizer if not isinstance(tokenizer, (str, *_path_types())) else load_hf_tokenizer(
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


def _path_types() -> tuple[type, ...]:
    import os

    from etils import epath
    return (os.PathLike, epath.Path)


def resolve_tasks(specs: Sequence[str], flag: str = "--tasks"):
    """(a TaskManager, the task specs) for task names and local YAML files, each checked: an
    unknown name or a missing file is one error naming it."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    resolved = []
    for spec in specs:
        spec = spec.strip()
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
    if not resolved:
        raise CptjaxError(f"{flag}: no task given; e.g. {flag} hellaswag,arc_easy or {flag} my_task.yaml")
    return manager, resolved


def run_tasks(lm: CptjaxLM, tasks: Sequence[str], *, limit: int | float | None = None,
              num_fewshot: int | None = None, log_samples: bool = False, flag: str = "--tasks") -> dict:
    """lm-eval's `simple_evaluate` of `lm` on task names or YAML files; its results dict."""
    from lm_eval import simple_evaluate

    manager, resolved = resolve_tasks(tasks, flag)
    return simple_evaluate(model=lm, tasks=resolved, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                           log_samples=log_samples, bootstrap_iters=0)


def lm_eval_main(argv: Sequence[str]) -> None:
    """`cptjax lm-eval ARGS`: lm-eval's own command line with the "cptjax" model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
