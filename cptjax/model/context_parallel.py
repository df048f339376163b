"""Context parallelism: each row's tokens split over the mesh's `sequence` axis.

Layout (causal load balancing): with C shards, a row of L tokens is cut into 2C chunks and shard i
holds chunks i and 2C-1-i (MaxText's load-balanced layout): under a causal mask an early chunk
sees few keys and a late one many, so every shard has the same work. `Llama.hidden_states` puts
tokens, positions and segment ids in this order before the layers and its hidden states back in
row order after them, so the loss, the norms and every caller see rows as they are. Masks come
from each token's index in the row (`token_index`), never from where it sits, so causality,
sliding windows and packed documents survive the reorder.

Strategies (model.context_parallel):
  all_gather  each shard gathers every shard's keys and values (with their segment ids and
              indexes) and attends its own queries to them: one collective per layer, the whole
              row's keys and values in memory. On TPU the queries' two chunks run through splash.
  ring        keys and values go around the ring of shards (`ppermute`), one shard's block per
              step, folded in with an online softmax; the backward sends them round again, each
              block's gradient travelling with it back to its owner. One block in memory; XLA
              attention on every backend.
"""

from __future__ import annotations

import functools
import typing
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from cptjax.core.errors import CptjaxError
from cptjax.model.attention import (
    _MASKED,
    KV_AXES,
    PALLAS_BLOCK,
    Q_AXES,
    _allowed,
    _block,
    _local_kv,
    _xla_attention,
    _xla_backward,
    attend,
    check_kernel,
    effective_window,
    scores,
    target_platform,
)
from cptjax.model.sharding import active_mesh, spec_for_shape

ContextParallel = Literal["all_gather", "ring"]
STRATEGIES: tuple[str, ...] = typing.get_args(ContextParallel)


def sequence_ways() -> int:
    """How many shards the active mesh splits a row's tokens into (1 without a mesh)."""
    active = active_mesh()
    if active is None:
        return 1
    mesh, rules = active
    axes = dict(rules)["activation_length"]
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else tuple(axes or ()))]))


def balanced_ways(length: int) -> int:
    """The shards a row of `length` tokens is laid out for (1: row order, nothing to balance)."""
    ways = sequence_ways()
    return ways if ways > 1 and length % (2 * ways) == 0 else 1


def layout_order(length: int, ways: int) -> np.ndarray:
    """int32 [L]: the row index of the token at each position of the balanced layout."""
    chunk = length // (2 * ways)
    chunks = [j for i in range(ways) for j in (i, 2 * ways - 1 - i)]
    return (np.asarray(chunks)[:, None] * chunk + np.arange(chunk)).reshape(-1).astype(np.int32)


def to_layout(x: jax.Array, ways: int) -> jax.Array:
    """[B, L, ...] in row order -> the balanced layout (shard i: chunks i and 2C-1-i)."""
    rows, length = x.shape[:2]
    halves = x.reshape(rows, 2, ways, length // (2 * ways), *x.shape[2:])
    pairs = jnp.stack([halves[:, 0], jnp.flip(halves[:, 1], axis=1)], axis=2)  # [B, C, 2, c, ...]
    return pairs.reshape(x.shape)


def from_layout(x: jax.Array, ways: int) -> jax.Array:
    """The inverse of `to_layout`."""
    rows, length = x.shape[:2]
    pairs = x.reshape(rows, ways, 2, length // (2 * ways), *x.shape[2:])
    halves = jnp.stack([pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)], axis=1)  # [B, 2, C, c, ...]
    return halves.reshape(x.shape)


def context_kernel(choice: str, platform: str, dtype, seq_len: int, window: int | None, ways: int,
                   strategy: str, length_key: str = "sequence length", logit_cap: float | None = None) -> str:
    """The kernel attention runs with rows split `ways` ways: splash (TPU, all_gather) or xla;
    a CptjaxError for a model.attention choice that cannot."""
    if strategy not in STRATEGIES:
        raise CptjaxError(f"model.context_parallel {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    resolved = check_kernel(choice, platform, dtype, seq_len, window, length_key, logit_cap)
    chunk = seq_len // (2 * ways)
    splash_fits = strategy == "all_gather" and seq_len % (2 * ways) == 0 and chunk % PALLAS_BLOCK == 0
    if choice == "auto":
        return "splash" if resolved == "splash" and splash_fits else "xla"
    if resolved == "xla" or (resolved == "splash" and splash_fits):
        return resolved
    need = ("model.context_parallel: all_gather and a chunk (seq_len / 2 / mesh.sequence) that is a multiple "
            f"of {PALLAS_BLOCK}" if resolved == "splash" else "xla, or auto")
    raise CptjaxError(f"model.attention {resolved!r} cannot attend over rows split {ways} ways "
                      f"(mesh.sequence); it needs {need}")


def attend_rows(q, k, v, segment_ids, token_index=None, *, choice: str, strategy: str,
                window: int | None, scale: float | None = None, logit_cap: float | None = None) -> jax.Array:
    """`attention.attend`, or context-parallel attention when the active mesh splits the rows'
    tokens. `token_index` [L]: each position's index in the row (None: row order)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    active = active_mesh()
    if active is not None:
        mesh, rules = active
        q_spec = spec_for_shape(Q_AXES, q.shape, mesh, rules)
        if q_spec[1] is not None:
            return _context_attention(q, k, v, segment_ids, token_index, mesh, rules, q_spec, choice=choice,
                                      strategy=strategy, window=window, scale=scale, logit_cap=logit_cap)
    assert token_index is None, "rows are reordered only when their tokens are split over devices"
    return attend(q, k, v, segment_ids, choice=choice, window=window, scale=scale, logit_cap=logit_cap)


def _context_attention(q, k, v, segment_ids, token_index, mesh, rules, q_spec, *, choice, strategy, window,
                       scale, logit_cap):
    rows, seq_len, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    length = q_spec[1]
    if not isinstance(length, str):
        raise CptjaxError(f"mesh.rules: activation_length maps to {length}; context parallelism takes one "
                          "mesh axis (sequence)")
    ways = mesh.shape[length]
    kernel = context_kernel(choice, target_platform(), q.dtype, seq_len, window, ways, strategy,
                            logit_cap=logit_cap)
    window = effective_window(window, seq_len)
    balanced = token_index is not None
    segment_ids = jnp.zeros((rows, seq_len), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    token_index = jnp.arange(seq_len, dtype=jnp.int32) if token_index is None else token_index.astype(jnp.int32)
    batch, heads = q_spec[0], q_spec[2]
    kv_whole = heads is not None and spec_for_shape(KV_AXES, k.shape, mesh, rules)[2] != heads
    kv_spec = PartitionSpec(batch, length, None if kv_whole or heads is None else heads, None)
    def body(q, k, v, segments, index):
        if kv_whole:  # this device's q heads use a slice of the (replicated) kv heads
            k, v = (_local_kv(x, jax.lax.axis_index(heads), q.shape[2], num_heads, num_kv) for x in (k, v))
        if kernel == "splash":
            return _splash_gathered(q, k, v, segments, index, length, ways, balanced, window, scale, logit_cap)
        qt, kt, vt = _grouped(q, k.shape[2]), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        if strategy == "ring":
            out = _ring_attention(qt, kt, vt, segments, index, length, ways, window, scale, logit_cap)
        else:
            gather = lambda x, axis: jax.lax.all_gather(x, length, axis=axis, tiled=True)  # noqa: E731
            out = _xla_attention(qt, gather(kt, 2), gather(vt, 2), segments, gather(segments, 1), index,
                                 gather(index, 0), window, scale, logit_cap)
        return _ungrouped(out)

    specs = (q_spec, kv_spec, kv_spec, PartitionSpec(batch, length), PartitionSpec(length))
    # check_vma=False: pallas_call's outputs carry no varying-axes annotation (jax 0.10).
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=kernel != "splash")(
        q, k, v, segment_ids, token_index)


def _grouped(q, num_kv: int):
    """q [B, L, N, H] -> [B, K, G, L, H]: each kv head's group of query heads."""
    rows, length, num_heads, head_dim = q.shape
    return q.reshape(rows, length, num_kv, num_heads // num_kv, head_dim).transpose(0, 2, 3, 1, 4)


def _ungrouped(out):
    rows, num_kv, group, length, head_dim = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(rows, length, num_kv * group, head_dim)


def _varying(x, *like):
    """`x` typed as varying over the mesh axes `like` vary over (scan carries must keep one type
    under shard_map's check_vma)."""
    varying = lambda y: jax.typeof(y).manual_axis_type.varying  # noqa: E731
    axes = tuple(sorted(set().union(*(varying(y) for y in like)) - varying(x)))
    return jax.lax.pcast(x, axes, to="varying") if axes else x


def _shift(x, axis: str, ways: int):
    """Each shard's `x` to the next shard round the ring."""
    return jax.lax.ppermute(x, axis, [(i, (i + 1) % ways) for i in range(ways)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _ring_attention(q, k, v, segments, index, axis, ways, window, scale, logit_cap):
    """This shard's queries q [B, K, G, Lq, H] over every shard's keys k, v [B, K, S, H], which
    come round the ring one shard at a time; `segments` [B, L] and `index` [L] of the local
    tokens (queries and keys alike)."""
    return _ring_forward(q, k, v, segments, index, axis, ways, window, scale, logit_cap)[0]


def _ring_forward(q, k, v, segments, index, axis, ways, window, scale, logit_cap):
    def step(carry, _):
        (k, v, k_segments, k_index), (acc, peak, total) = carry
        ok = _allowed(segments, k_segments, index, k_index, window)[:, None, None]
        scores_ = jnp.where(ok, scores("BKGLH,BKSH->BKGLS", q, k, scale, logit_cap), _MASKED)
        # Online softmax: a row's blocks before its first visible key hold _MASKED scores, and
        # the first real score rescales them by exp(_MASKED - peak) == 0.
        new_peak = jnp.maximum(peak, jnp.max(scores_, axis=-1))
        weights = jnp.exp(scores_ - new_peak[..., None])
        rescale = jnp.exp(peak - new_peak)
        acc = acc * rescale[..., None] + jnp.einsum("BKGLS,BKSH->BKGLH", weights, v.astype(jnp.float32))
        total = total * rescale + jnp.sum(weights, axis=-1)
        # The last shift brings each block home: wasted here, kept for one scan body (the
        # backward needs all `ways` shifts to return the gradients).
        return (_shift((k, v, k_segments, k_index), axis, ways), (acc, new_peak, total)), None

    stats = tuple(_varying(x, q, k) for x in (jnp.zeros(q.shape, jnp.float32),
                                               jnp.full(q.shape[:-1], _MASKED, jnp.float32),
                                               jnp.zeros(q.shape[:-1], jnp.float32)))
    (_, (acc, peak, total)), _ = jax.lax.scan(step, ((k, v, segments, index), stats), None, length=ways)
    out = (acc / total[..., None]).astype(q.dtype)
    log_sum_exp = peak + jnp.log(total)
    return out, (q, k, v, segments, index, out, log_sum_exp)


def _ring_backward(axis, ways, window, scale, logit_cap, residuals, d_out):
    q, k, v, segments, index, out, log_sum_exp = residuals

    def step(carry, _):
        (k, v, k_segments, k_index, d_k, d_v), d_q = carry
        residuals = (q, k, v, segments, k_segments, index, k_index, out, log_sum_exp)
        block = _xla_backward(window, scale, logit_cap, residuals, d_out)
        d_q = d_q + block[0].astype(jnp.float32)
        d_k, d_v = d_k + block[1].astype(jnp.float32), d_v + block[2].astype(jnp.float32)
        return (_shift((k, v, k_segments, k_index, d_k, d_v), axis, ways), d_q), None

    zeros = lambda x: _varying(jnp.zeros(x.shape, jnp.float32), q, k, d_out)  # noqa: E731
    ((*_, d_k, d_v), d_q), _ = jax.lax.scan(step, ((k, v, segments, index, zeros(k), zeros(v)), zeros(q)),
                                            None, length=ways)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None, None


_ring_attention.defvjp(_ring_forward, _ring_backward)


def _splash_gathered(q, k, v, segments, index, axis, ways, balanced, window, scale, logit_cap):
    """all_gather through splash: the local queries are two runs of c consecutive tokens of the
    row (balanced layout or row order); each attends to the F keys that end with it, sliced from
    the gathered keys in row order with F - c padding keys in front, so one static mask (causal,
    or the window, at offset F - c) serves every run on every shard."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    seq_len, chunk = q.shape[1] * ways, q.shape[1] // 2
    gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)  # noqa: E731
    k, v, k_segments = gather(k), gather(v), gather(segments)
    if balanced:
        k, v, k_segments = (from_layout(x, ways) for x in (k, v, k_segments))
    frame = seq_len if window is None else min(seq_len, -(-(window - 1) // PALLAS_BLOCK) * PALLAS_BLOCK + chunk)
    pad = frame - chunk
    widths = lambda x: [(0, 0), (pad, 0)] + [(0, 0)] * (x.ndim - 2)  # noqa: E731
    # Padding keys are in document -1, which no query is in.
    k, v = jnp.pad(k, widths(k)), jnp.pad(v, widths(v))
    k_segments = jnp.pad(k_segments, widths(k_segments), constant_values=-1)
    kernel = _splash_frame_kernel(chunk, frame, q.shape[2], window, logit_cap, target_platform() != "tpu")
    q = q * jnp.asarray(scale, q.dtype)
    outs = []
    for run in range(2):
        start = index[run * chunk]  # the run's first token's index in the row
        part = lambda x: jax.lax.dynamic_slice_in_dim(x, start, frame, axis=1)  # noqa: E731
        qt = jnp.swapaxes(q[:, run * chunk:(run + 1) * chunk], 1, 2)
        kt, vt = jnp.swapaxes(part(k), 1, 2), jnp.swapaxes(part(v), 1, 2)
        outs.append(jax.vmap(lambda q1, k1, v1, sq, sk: kernel(q1, k1, v1, segment_ids=SegmentIds(q=sq, kv=sk)))(
            qt, kt, vt, segments[:, run * chunk:(run + 1) * chunk], part(k_segments)))
    return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2)


@functools.lru_cache(maxsize=16)
def _splash_frame_kernel(chunk: int, frame: int, num_heads: int, window: int | None, logit_cap: float | None,
                         interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (chunk, frame)
    mask = (sa.CausalMask(shape, offset=frame - chunk) if window is None
            else sa.LocalMask(shape, (window - 1, 0), offset=frame - chunk))
    bq, bk = _block(chunk), _block(frame)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                          block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(sa.MultiHeadMask([mask] * num_heads), block_sizes=sizes,
                                  attn_logits_soft_cap=logit_cap, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
