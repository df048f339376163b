"""`cptjax generate`: text from a model (an HF folder or a cptjax checkpoint), with a KV cache.

One jitted program per prompt shape and settings: the prompt is prefilled in one call
(`Llama.extend`), then `jax.lax.while_loop` adds one token per step, positions continuing after the
prompt, until `max_new_tokens` or until every row has produced an end-of-sequence token (the model
config's `eos_token_id`, else the tokenizer's). The cache (kv_cache.py) holds K kv heads per layer
and, for sliding-window models, only the window.

Temperature 0 is greedy decoding (the argmax, as transformers' greedy `generate`). Otherwise the
logits are divided by the temperature, cut to the smallest set of most likely tokens whose
probability reaches `top_p` (nucleus sampling), and sampled with a key folded in by step from
`seed`: the same seed gives the same tokens. Runs on one device; the loop itself is
cptjax.model.decode's, which lm-eval's model (cptjax.train.lm_eval_model) also runs on a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cptjax.core.errors import CptjaxError
from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec
from cptjax.io.pretrained import PretrainedModel, model_from_weights
from cptjax.io.weights import open_weights
from cptjax.model.decode import Sampling, cut_at_eos, decode


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "eos"))
def _generate(graphdef, state, prompt, *, sampling: Sampling, eos: tuple[int, ...]):
    """prompt [B, P], every row P real tokens -> (new tokens [B, N], how many steps ran)."""
    lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)
    return decode(nnx.merge(graphdef, state), prompt, lengths, sampling=sampling, eos=eos)


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
    eos = tuple(int(e) for e in eos)
    out, steps = jax.device_get(_generate(graphdef, state, jnp.asarray(prompts), sampling=sampling, eos=eos))
    return cut_at_eos(out, steps, eos)


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
        if ids.max(initial=0) >= self.model.config.num_tokens:
            raise CptjaxError(f"--tokenizer: gives token id {int(ids.max())}, beyond the model's "
                              f"vocabulary of {self.model.config.num_tokens}; use the model's own tokenizer")
        new = generate_ids(self.model, ids[None], sampling, self.eos)[0]
        ended = bool(new) and new[-1] in self.eos
        return Generation(self.described, prompt, self.tokenizer.decode(new), len(new), ended)
