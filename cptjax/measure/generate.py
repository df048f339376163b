"""`cptjax generate`: text from a model (an HF folder or a cptjax checkpoint), with a KV cache.

One jitted program per prompt shape and settings: the prompt is prefilled in one call
(`Llama.extend`), then `jax.lax.while_loop` adds one token per step, positions continuing after the
prompt, until `max_new_tokens` or until every row has produced an end-of-sequence token (the model
config's `eos_token_id`, else the tokenizer's). The cache (kv_cache.py) holds K kv heads per layer
and, for sliding-window models, only the window.

Temperature 0 is greedy decoding (the argmax, as transformers' greedy `generate`). Otherwise the
logits are divided by the temperature, cut to the smallest set of most likely tokens whose
probability reaches `top_p` (nucleus sampling), and sampled with a key folded in by step from
`seed`: the same seed gives the same tokens. Runs on one device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cptjax.core.errors import CptjaxError
from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec
from cptjax.io.pretrained import PretrainedModel, model_from_weights
from cptjax.io.weights import open_weights
from cptjax.model.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick each new token; the flags of `cptjax generate`."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise CptjaxError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise CptjaxError(f"--temperature {self.temperature}: must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise CptjaxError(f"--top-p {self.top_p}: must be in (0, 1]")


def sample_next(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """float32 logits [B, V] -> the next token ids [B] int32."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1:
        ranked = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V], most likely first
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above
        cutoff = jnp.min(jnp.where(before < top_p, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos"))
def _generate(graphdef, state, prompt, *, sampling: Sampling, eos: tuple[int, ...]):
    """prompt [B, P] -> (new tokens [B, N], how many steps ran)."""
    model = nnx.merge(graphdef, state)
    rows, length = prompt.shape
    total = sampling.max_new_tokens
    key = jax.random.key(sampling.seed)
    eos_ids = jnp.asarray(eos, jnp.int32)
    pick = functools.partial(sample_next, temperature=sampling.temperature, top_p=sampling.top_p)

    cache = KVCache.empty(model.config, rows, length + total, model.dtype)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
    logits, cache = model.extend(prompt, positions, cache)
    first = pick(logits, jax.random.fold_in(key, 0))
    out = jnp.zeros((rows, total), jnp.int32).at[:, 0].set(first)

    def running(carry):
        step, _, _, _, done = carry
        return (step < total) & ~jnp.all(done)

    def one_token(carry):
        step, token, cache, out, done = carry
        at = jnp.full((rows, 1), length - 1, jnp.int32) + step  # the position of `token`
        logits, cache = model.extend(token[:, None], at, cache)
        token = jnp.where(done, 0, pick(logits, jax.random.fold_in(key, step)))
        return step + 1, token, cache, out.at[:, step].set(token), done | jnp.isin(token, eos_ids)

    steps, _, _, out, _ = jax.lax.while_loop(
        running, one_token, (jnp.int32(1), first, cache, out, jnp.isin(first, eos_ids)))
    return out, steps


def generate_ids(model: PretrainedModel, prompts: np.ndarray, sampling: Sampling,
                 eos: tuple[int, ...] = ()) -> list[list[int]]:
    """New token ids per prompt row (int [B, P], equal lengths), each up to and including its
    first end-of-sequence token."""
    prompts = np.asarray(prompts, np.int32)
    if prompts.ndim != 2 or prompts.shape[1] == 0:
        raise CptjaxError("--prompt: no tokens to start from; give some text")
    cfg = model.config
    if prompts.shape[1] + sampling.max_new_tokens > cfg.max_position_embeddings:
        raise CptjaxError(f"--max-new-tokens {sampling.max_new_tokens}: the prompt ({prompts.shape[1]} "
                          f"tokens) plus the new tokens exceed the model's max_position_embeddings "
                          f"({cfg.max_position_embeddings})")
    graphdef, state = nnx.split(model.model)
    out, steps = jax.device_get(_generate(graphdef, state, jnp.asarray(prompts), sampling=sampling,
                                          eos=tuple(int(e) for e in eos)))
    rows = []
    for row in out[:, :int(steps)].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        rows.append(row[:ends[0] + 1] if ends else row)
    return rows


@dataclasses.dataclass(frozen=True)
class Generation:
    model: str  # what was loaded, as `Weights.describe` says
    prompt: str
    text: str  # the continuation only
    new_tokens: int
    ended: bool  # stopped at an end-of-sequence token (else at max_new_tokens)


class Generator:
    """A model and its tokenizer, loaded once: `.generate(prompt) -> Generation`."""

    def __init__(self, path: str | Path, step: int | None = None, *, dtype: str = "float32",
                 tokenizer: str | Path | None = None, flag: str = "--model", ema: bool = False):
        with open_weights(path, step, flag=flag, step_flag=f"{flag} PATH@STEP", ema=ema) as weights:
            folder = tokenizer or weights.tokenizer_dir
            if folder is None:
                raise CptjaxError(f"{flag} {path}: has no tokenizer files (tokenizer.json); pass "
                                  "--tokenizer with the model's tokenizer folder")
            self.tokenizer = DocumentTokenizer(load_tokenizer_spec(folder))
            self.described = weights.describe()
            self.model = model_from_weights(weights, dtype)
        eos = self.model.config.eos_token_id
        eos = (eos,) if isinstance(eos, int) else tuple(eos or ())
        self.eos = eos or (self.tokenizer.spec.eos_id,)

    def generate(self, prompt: str, sampling: Sampling = Sampling()) -> Generation:
        ids = self.tokenizer.encode_prompt(prompt)
        if ids.max(initial=0) >= self.model.config.vocab_size:
            raise CptjaxError(f"--tokenizer: gives token id {int(ids.max())}, beyond the model's "
                              f"vocabulary of {self.model.config.vocab_size}; use the model's own tokenizer")
        new = generate_ids(self.model, ids[None], sampling, self.eos)[0]
        ended = bool(new) and new[-1] in self.eos
        return Generation(self.described, prompt, self.tokenizer.decode(new), len(new), ended)
