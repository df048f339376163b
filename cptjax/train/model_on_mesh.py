"""A model on a device mesh, scoring token sequences and generating from prompts in batches of
fixed shapes: the device side of cptjax's lm-evaluation-harness model (lm_eval_model.py), with no
lm-eval in it, so a training run can hold one over its live parameters.

Batches have `batch_size` rows (a multiple of the mesh's data-parallel ways) of a length rounded up
to a power of two (at least MIN_BUCKET, at most the model's length), so each jitted program compiles
for a handful of shapes only. Scores come from the final hidden states one chunk of positions at a
time (never [B, L, V] logits); generation is `generate.decode`, the KV-cache loop of `cptjax
generate`, over left-padded prompts. Every process holds every request (one program over the whole
mesh), and every process gets the same numbers back.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cptjax.core.dtypes import float_dtype
from cptjax.io.weights import open_weights, parse_model_arg
from cptjax.model.config import ModelConfig
from cptjax.model.decode import Sampling, cut_at_eos, decode
from cptjax.model.loss import DEFAULT_LOSS_CHUNK
from cptjax.model.sharding import MeshConfig, batch_sharding, with_activation_sharding
from cptjax.train.step import build_eval_setup

DEFAULT_BATCH_SIZE = 8
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

    def score(h, t):  # [B, C, D], [B, C] -> ([B, C], [B, C])
        logits = model.head_logits(h)  # [B, C, V], soft-capped where the config says
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
    param_shardings: Any = None  # default: the params' own (give it when params come later)

    def __post_init__(self):
        self.rows = batch_sharding(self.mesh, self.rules)
        ways = int(np.prod([self.mesh.shape[a] for a in _axes(self.rows.spec[0])]))
        self.batch_size = -(-max(1, self.batch_size) // ways) * ways
        self.per_row = NamedSharding(self.mesh, PartitionSpec(self.rows.spec[0]))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        p_shardings = self.param_shardings or jax.tree.map(lambda a: a.sharding, self.params)
        self._score = jax.jit(with_activation_sharding(
            functools.partial(token_scores, graphdef=self.graphdef), self.mesh, self.rules),
            in_shardings=(p_shardings, self.rows, self.rows), out_shardings=self.replicated)
        self._p_shardings = p_shardings
        self._decoders: dict[tuple, Any] = {}

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", batch_size: int = DEFAULT_BATCH_SIZE,
             mesh_config: MeshConfig = MeshConfig(), flag: str = "path") -> tuple[ModelOnMesh, Any]:
        """(the model at `path` (an HF folder or a cptjax checkpoint or run, PATH@STEP for a step,
        either followed by :ema for training.ema's weights) read straight onto the devices in
        `dtype`, its tokenizer folder or None)."""
        folder, step, ema = parse_model_arg(path, flag)
        with open_weights(folder, step, flag=flag, step_flag=f"{flag} PATH@STEP", ema=ema) as weights:
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
            got = self.score_batch(tokens)
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
            new, steps = self.decode_batch(tokens, lengths, sampling, eos)
            for row, ids in zip(batch, cut_at_eos(new[:len(batch)], steps, eos)):
                out[row] = ids
        return out

    def score_batch(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """The device call of `score`: tokens [batch_size, L + 1] -> {"logprob", "greedy"} [batch_size, L]."""
        return jax.device_get(self._score(self.params, self._place(tokens[:, :-1], self.rows),
                                          self._place(tokens[:, 1:], self.rows)))

    def decode_batch(self, tokens: np.ndarray, lengths: np.ndarray, sampling: Sampling,
                     eos: tuple[int, ...]) -> tuple[np.ndarray, int]:
        """The device call of `generate`: left-padded prompts [batch_size, P] and their lengths ->
        (new tokens [batch_size, N], how many steps ran)."""
        new, steps = jax.device_get(self._decoder(sampling, eos)(
            self.params, self._place(tokens, self.rows), self._place(lengths, self.per_row)))
        return new, int(steps)

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
