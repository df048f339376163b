"""Attention kernels: the one function the decoder block calls, and which kernel runs it.

  xla         plain XLA einsums, any backend, any length. Float32 scores exist within one layer's
              forward and again within its backward, not between them: the backward recomputes
              them from q, k and each row's log-sum-exp, as flash attention does. The queries go
              in up to 8 blocks, each scoring only the keys up to its own end (and from its
              window's start), so most of the causal mask's empty half is never computed; the
              packed-document mask is built from segment ids within each block.
  cudnn       `jax.nn.dot_product_attention` through cuDNN flash attention (GPU, 16-bit
              compute); the segment mask still reaches cuDNN as a dense [B, 1, L, S] bias. It has
              no attention-logit soft cap.
  splash      TPU splash attention (Pallas, Mosaic): segment ids, the causal or sliding-window mask,
              the logit soft cap and GQA inside the kernel, nothing of size L x S in memory.
  pallas_gpu  the Pallas GPU flash kernel (Triton) with segment ids, nothing of size L x S in
              memory; it has no GQA (kv heads are repeated), no sliding window and no soft cap.
  auto        splash on TPU; on GPU in 16-bit pallas_gpu, or cudnn when the model's sliding window
              is shorter than L, or xla with a soft cap; xla otherwise (CPU, or a length the Pallas
              kernels cannot take).

Every kernel takes the scale of q . k (`ModelConfig.attention_scale`) and one window; a model whose
layers mix windows chooses each layer's with `jax.lax.switch` inside the layer scan (transformer.py).

Rows split over the mesh's sequence axis (context parallelism) go through context_parallel.py,
which runs splash or the xla kernel's pieces per shard.

Both Pallas kernels need L to be a multiple of 128 (their blocks). With a mesh active they run
under `jax.shard_map` (batch over the data axes, heads over the tensor axis, as the rules say);
on a backend that cannot compile them (CPU) they run in Pallas interpret mode, which is how the
tests check them against xla.
"""

from __future__ import annotations

import functools
import typing
from typing import Literal

import jax
import jax.numpy as jnp

from cptjax.core.errors import CptjaxError
from cptjax.model.sharding import active_mesh, spec_for_shape

Attention = Literal["auto", "xla", "cudnn", "splash", "pallas_gpu"]
ATTENTION_KERNELS: tuple[str, ...] = typing.get_args(Attention)
PALLAS_BLOCK = 128  # both Pallas kernels cut L into blocks of (a multiple of) this
_NATIVE_PLATFORM = {"splash": "tpu", "pallas_gpu": "gpu", "cudnn": "gpu"}
Q_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")


def target_platform() -> str:
    """The platform the program being traced is compiled for: the active mesh's devices (a TPU
    topology when `cptjax plan` compiles ahead of time on a CPU host), else the default backend."""
    active = active_mesh()
    return active[0].devices.flat[0].platform if active is not None else jax.default_backend()


def effective_window(window: int | None, seq_len: int) -> int | None:
    """A sliding window at least as long as the sequence masks nothing beyond causality."""
    return None if window is None or window >= seq_len else window


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap), Gemma 2's soft cap of attention scores and output logits (None: x)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def resolve(choice: str, platform: str, dtype, seq_len: int, window: int | None,
            logit_cap: float | None = None) -> str:
    """The kernel that `choice` means on `platform` for this compute dtype and length."""
    if choice != "auto":
        return choice
    fits_blocks = seq_len % PALLAS_BLOCK == 0
    if platform == "tpu" and fits_blocks:
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and logit_cap is None:
        return "pallas_gpu" if fits_blocks and effective_window(window, seq_len) is None else "cudnn"
    return "xla"


def check_kernel(choice: str, platform: str, dtype, seq_len: int, window: int | None,
                 length_key: str = "sequence length", logit_cap: float | None = None) -> str:
    """The resolved kernel, or a CptjaxError saying why it cannot run this (`length_key` names the
    length in the message, e.g. 'training.seq_len'). `window`: the shortest layer window (None:
    no layer slides); `logit_cap`: the model's attn_logit_softcapping."""
    if choice not in ATTENTION_KERNELS:
        raise CptjaxError(f"model.attention {choice!r}: choose one of {', '.join(ATTENTION_KERNELS)}")
    name = resolve(choice, platform, dtype, seq_len, window, logit_cap)
    if name in ("cudnn", "pallas_gpu") and logit_cap is not None:
        raise CptjaxError(f"model.attention {name!r} has no attention-logit soft cap, and the model's "
                          f"config.json sets attn_logit_softcapping ({logit_cap}); use model.attention: "
                          "xla (or splash on TPU)")
    if name in ("splash", "pallas_gpu") and seq_len % PALLAS_BLOCK:
        up = -(-seq_len // PALLAS_BLOCK) * PALLAS_BLOCK
        raise CptjaxError(f"{length_key} {seq_len}: model.attention {name!r} needs a multiple of "
                          f"{PALLAS_BLOCK} (e.g. {up}); or set model.attention: xla")
    if name == "pallas_gpu" and effective_window(window, seq_len) is not None:
        raise CptjaxError(f"model.attention 'pallas_gpu' has no sliding window, and the model's "
                          f"config.json sliding_window ({window}, on some or all layers) is shorter than the "
                          f"{length_key} ({seq_len}); use model.attention: cudnn or xla")
    if name == "cudnn" and platform == "gpu" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise CptjaxError("model.attention 'cudnn' needs 16-bit compute; set model.compute_dtype: "
                          "bfloat16, or model.attention: xla")
    if name == "cudnn" and platform != "gpu":
        raise CptjaxError(f"model.attention 'cudnn' needs a GPU, and this runs on {platform}; use auto")
    return name


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
           choice: str, window: int | None, scale: float | None = None,
           logit_cap: float | None = None) -> jax.Array:
    """Causal attention of q [B, L, N, H] over k, v [B, L, K, H] -> [B, L, N, H]. `segment_ids`
    [B, L] keep packed documents apart (None: one document per row); `window` is the number of
    tokens a query sees, itself included (None: all earlier ones); `scale` multiplies q . k
    (None: H ** -0.5); `logit_cap` soft-caps the scaled scores (`soft_cap`)."""
    platform = target_platform()
    seq_len = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    name = check_kernel(choice, platform, q.dtype, seq_len, window, logit_cap=logit_cap)
    window = effective_window(window, seq_len)
    if name == "xla":
        return _xla(q, k, v, segment_ids, window, scale, logit_cap)
    if name == "cudnn":
        mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        return jax.nn.dot_product_attention(  # mask: [B, 1, L, S]
            q, k, v, mask=mask, is_causal=True, implementation=name, scale=scale,
            local_window_size=None if window is None else (window - 1, 0))
    interpret = platform != _NATIVE_PLATFORM[name]
    if name == "splash":
        local = functools.partial(_splash, window=window, scale=scale, logit_cap=logit_cap, interpret=interpret)
    else:
        local = functools.partial(_pallas_gpu, window=window, scale=scale, interpret=interpret)
    return _on_mesh(local, q, k, v, segment_ids)


_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # a score no query keeps: exp(_MASKED - max) == 0


def query_blocks(seq_len: int) -> int:
    """How many blocks the xla kernel cuts the queries into: block i attends to keys up to its own
    end only, which skips most of the causal mask's empty upper triangle (at 4 blocks, 62% of the
    scores remain). 128-query blocks, at most 8 of them; 1 when L does not divide."""
    blocks = max(1, min(8, seq_len // 128))
    return blocks if seq_len % blocks == 0 else 1


def _xla(q, k, v, segment_ids, window, scale, logit_cap):
    """Causal attention in query blocks; one head group's queries at a time per kv head:
    q [B, K, G, L, H] against k, v [B, K, S, H] (no kv head is repeated)."""
    rows, length, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    qt = q.reshape(rows, length, num_kv, num_heads // num_kv, head_dim).transpose(0, 2, 3, 1, 4)
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    size = length // query_blocks(length)
    outs = []
    for first in range(0, length, size):
        end = first + size
        # Keys before this block's window start are masked for all its queries: skip whole blocks.
        key_first = 0 if window is None else max(0, first - window + 1) // size * size
        q_seg, k_seg = (None, None) if segment_ids is None else (segment_ids[:, first:end],
                                                                  segment_ids[:, key_first:end])
        outs.append(_xla_attention(qt[:, :, :, first:end], kt[:, :, key_first:end], vt[:, :, key_first:end],
                                   q_seg, k_seg, jnp.arange(first, end), jnp.arange(key_first, end), window,
                                   scale, logit_cap))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)  # [B, K, G, L, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(q.shape)


def _allowed(q_segments, k_segments, q_index, k_index, window: int | None) -> jax.Array:
    """[B or 1, Lq, Lk]: whether query l may see key s: causal and within the window by their
    indexes in the row (q_index [Lq], k_index [Lk]), same document."""
    query, key = q_index[:, None], k_index[None, :]
    ok = key <= query
    if window is not None:
        ok &= query - key < window
    ok = ok[None]
    if q_segments is not None:
        ok = ok & (q_segments[:, :, None] == k_segments[:, None, :])
    return ok


def scores(spec: str, a, b, scale: float, logit_cap: float | None) -> jax.Array:
    """The float32 attention scores einsum(spec, a, b) * scale, soft-capped by `logit_cap`."""
    return soft_cap(jnp.einsum(spec, a, b, preferred_element_type=jnp.float32) * scale, logit_cap)


def capped_gradient(d_scores, capped, logit_cap: float | None):
    """The gradient at the scores before the soft cap, from the one after it and the capped scores
    (d/dx cap * tanh(x / cap) = 1 - tanh^2)."""
    return d_scores if logit_cap is None else d_scores * (1 - jnp.square(capped / logit_cap))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _xla_attention(q, k, v, q_segments, k_segments, q_index, k_index, window, scale, logit_cap):
    """q [B, K, G, Lq, H] against k, v [B, K, S, H]; queries and keys placed in the row by
    q_index [Lq] and k_index [S] (context parallelism reorders them)."""
    return _xla_forward(q, k, v, q_segments, k_segments, q_index, k_index, window, scale, logit_cap)[0]


def _xla_forward(q, k, v, q_segments, k_segments, q_index, k_index, window, scale, logit_cap):
    ok = _allowed(q_segments, k_segments, q_index, k_index, window)[:, None, None]
    scores_ = scores("BKGLH,BKSH->BKGLS", q, k, scale, logit_cap)
    scores_ = jnp.where(ok, scores_, _MASKED)
    peak = jnp.max(scores_, axis=-1, keepdims=True)
    weights = jnp.exp(scores_ - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = jnp.einsum("BKGLS,BKSH->BKGLH", (weights / total).astype(v.dtype), v)
    log_sum_exp = peak[..., 0] + jnp.log(total[..., 0])  # [B, K, G, L]
    return out, (q, k, v, q_segments, k_segments, q_index, k_index, out, log_sum_exp)


def _xla_backward(window, scale, logit_cap, residuals, d_out):
    # In the transposed score space [B, K, S, G, L]: each kv head's keys against all its group's
    # queries, which makes dk and dv plain matmuls over (G, L). With `out` and `log_sum_exp` of
    # all the keys, this is also one key block's share of the gradients (ring attention).
    q, k, v, q_segments, k_segments, q_index, k_index, out, log_sum_exp = residuals
    ok = _allowed(q_segments, k_segments, q_index, k_index, window)
    ok = jnp.swapaxes(ok, 1, 2)[:, None, :, None]  # [B, 1, S, 1, L]
    scores_ = scores("BKSH,BKGLH->BKSGL", k, q, scale, logit_cap)
    probs = jnp.where(ok, jnp.exp(scores_ - log_sum_exp[:, :, None]), 0.0)
    d_v = jnp.einsum("BKSGL,BKGLH->BKSH", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("BKSH,BKGLH->BKSGL", v, d_out, preferred_element_type=jnp.float32)
    # softmax backward: d_scores = probs * (d_probs - sum_s probs * d_probs), and that sum is <d_out, out>.
    row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, L]
    d_capped = probs * (d_probs - row_dot[:, :, None])
    d_scores = (capped_gradient(d_capped, scores_, logit_cap) * scale).astype(q.dtype)
    d_k = jnp.einsum("BKSGL,BKGLH->BKSH", d_scores, q)
    d_q = jnp.moveaxis(jnp.einsum("BKSH,BKSGL->BKHGL", k, d_scores), 2, 4)
    return d_q, d_k, d_v, None, None, None, None


_xla_attention.defvjp(_xla_forward, _xla_backward)


def _on_mesh(local, q, k, v, segment_ids):
    """Runs `local(q, k, v, segment_ids)` on each device's rows and heads under `jax.shard_map`
    (Pallas calls cannot be partitioned by the compiler), or directly without an active mesh."""
    active = active_mesh()
    if active is None:
        return local(q, k, v, segment_ids)
    mesh, rules = active
    q_spec = spec_for_shape(Q_AXES, q.shape, mesh, rules)
    kv_spec = spec_for_shape(KV_AXES, k.shape, mesh, rules)
    if q_spec[1] is not None:
        raise CptjaxError("mesh.rules: activation_length is sharded, but the Pallas attention kernels "
                          "need whole sequences on each device; map it to null or set model.attention: xla")
    batch, heads = q_spec[0], q_spec[2]
    num_heads, num_kv = q.shape[2], k.shape[2]
    kv_whole = heads is not None and kv_spec[2] != heads  # kv heads do not split like q heads
    kv_spec = jax.sharding.PartitionSpec(batch, None, None if kv_whole or heads is None else heads, None)

    def body(q, k, v, *segments):
        if kv_whole:  # this device's q heads use a slice of the (replicated) kv heads
            k, v = (_local_kv(x, jax.lax.axis_index(heads), q.shape[2], num_heads, num_kv) for x in (k, v))
        return local(q, k, v, segments[0] if segments else None)

    args, specs = (q, k, v), (q_spec, kv_spec, kv_spec)
    if segment_ids is not None:
        args, specs = args + (segment_ids,), specs + (jax.sharding.PartitionSpec(batch, None),)
    # check_vma=False: pallas_call's outputs carry no varying-axes annotation (jax 0.10).
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def _local_kv(x, index, local_heads: int, num_heads: int, num_kv: int):
    """The kv heads [B, L, k, H] that q heads [index * local_heads, ...) attend to."""
    group = num_heads // num_kv  # q heads per kv head
    first = index * local_heads
    if group % local_heads == 0:  # all local q heads share one kv head
        return jax.lax.dynamic_slice_in_dim(x, first // group, 1, axis=2)
    if local_heads % group == 0:
        return jax.lax.dynamic_slice_in_dim(x, first // group, local_heads // group, axis=2)
    return jax.lax.dynamic_slice_in_dim(jnp.repeat(x, group, axis=2), first, local_heads, axis=2)


def _block(seq_len: int) -> int:
    return next(b for b in (512, 256, PALLAS_BLOCK) if seq_len % b == 0)


@functools.lru_cache(maxsize=16)
def _splash_kernel(seq_len: int, num_heads: int, window: int | None, logit_cap: float | None, interpret: bool):
    # Building the kernel analyses the mask on the host (0.2 s at L=8192): once per shape.
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (seq_len, seq_len)
    mask = sa.CausalMask(shape) if window is None else sa.LocalMask(shape, (window - 1, 0), offset=0)
    b = _block(seq_len)
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    with jax.ensure_compile_time_eval():  # concrete mask arrays, even when first built under jit
        return sa.make_splash_mha(sa.MultiHeadMask([mask] * num_heads), block_sizes=sizes,
                                  attn_logits_soft_cap=logit_cap, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _splash(q, k, v, segment_ids, *, window, scale, logit_cap, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    kernel = _splash_kernel(q.shape[1], q.shape[2], window, logit_cap, interpret)
    # Splash does not scale the logits (it soft-caps what it gets), and takes one row at a time:
    # [N, L, H] and [K, L, H].
    q = q * jnp.asarray(scale, q.dtype)
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    if segment_ids is None:
        out = jax.vmap(kernel)(qt, kt, vt)
    else:
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=SegmentIds(q=s1, kv=s1)))(
            qt, kt, vt, segment_ids.astype(jnp.int32))
    return jnp.swapaxes(out, 1, 2)


def _pallas_gpu(q, k, v, segment_ids, *, window, scale, interpret):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    assert window is None, "check_kernel refuses pallas_gpu with a sliding window"
    group = q.shape[2] // k.shape[2]
    if group > 1:  # the kernel indexes k and v by the query head: repeat each kv head for its group
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    return gpu_attention.mha(q, k, v, seg, sm_scale=scale, causal=True,
                             block_sizes=gpu_attention.BlockSizes.get_default(), interpret=interpret)
