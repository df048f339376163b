"""Decoding with a KV cache: the loop of `cptjax generate`, and of lm-eval's `generate_until` on a mesh.

The prompt is prefilled in one call (`Llama.extend`), then `jax.lax.while_loop` adds one token per
step, positions continuing after each row's own prompt, until `max_new_tokens` or until every row
has produced an end-of-sequence token. Prompts of different lengths are padded on the left; padding
takes position -1, which the cache never writes (kv_cache.py).

Temperature 0 is greedy decoding (the argmax, as transformers' greedy `generate`). Otherwise the
logits are divided by the temperature, cut to the smallest set of most likely tokens whose
probability reaches `top_p` (nucleus sampling), and sampled with a key folded in by step from
`seed`: the same seed gives the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from cptjax.core.errors import CptjaxError
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


def decode(model, prompt, lengths, *, sampling: Sampling, eos: tuple[int, ...]):
    """The decoding loop, a pure function for any jit (one device here, a mesh in lm_eval_model.py):
    prompt [B, P] left-padded, each row's last `lengths` [B] tokens real -> (new tokens [B, N],
    how many steps ran). Padding takes position -1, which the cache ignores (kv_cache.py), and each
    row's positions continue after its own prompt."""
    rows, length = prompt.shape
    total = sampling.max_new_tokens
    key = jax.random.key(sampling.seed)
    eos_ids = jnp.asarray(eos, jnp.int32)
    pick = functools.partial(sample_next, temperature=sampling.temperature, top_p=sampling.top_p)

    cache = KVCache.empty(model.config, rows, length + total, model.dtype)
    positions = jnp.arange(length, dtype=jnp.int32)[None, :] - (length - lengths)[:, None]  # [B, P]
    positions = jnp.maximum(positions, -1)
    logits, cache = model.extend(prompt, positions, cache)
    first = pick(logits, jax.random.fold_in(key, 0))
    out = jnp.zeros((rows, total), jnp.int32).at[:, 0].set(first)

    def running(carry):
        step, _, _, _, done = carry
        return (step < total) & ~jnp.all(done)

    def one_token(carry):
        step, token, cache, out, done = carry
        at = (lengths - 1 + step)[:, None]  # [B, 1]: the position of `token`
        logits, cache = model.extend(token[:, None], at, cache)
        token = jnp.where(done, 0, pick(logits, jax.random.fold_in(key, step)))
        return step + 1, token, cache, out.at[:, step].set(token), done | jnp.isin(token, eos_ids)

    steps, _, _, out, _ = jax.lax.while_loop(
        running, one_token, (jnp.int32(1), first, cache, out, jnp.isin(first, eos_ids)))
    return out, steps


def cut_at_eos(out: np.ndarray, steps: int, eos: tuple[int, ...]) -> list[list[int]]:
    """`decode`'s new tokens per row, each up to and including its first end-of-sequence token."""
    rows = []
    for row in np.asarray(out)[:, :int(steps)].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        rows.append(row[:ends[0] + 1] if ends else row)
    return rows
