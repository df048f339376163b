"""Inputs and comparisons for the attention-kernel tests (no torch: the 8-device worker imports it).

Kernels are compared with `jax.nn.dot_product_attention` (XLA, a dense segment mask: the path
cptjax used before its own memory-lean XLA attention), on packed rows: 1-4 documents of random
lengths, then padding.
"""

import jax
import jax.numpy as jnp
import numpy as np

# (N, K, H, window): Qwen2.5-0.5B's heads (14 q, 2 kv, 64 dims, no window) and Mistral 7B's
# (32 q, 8 kv, 128 dims) with a sliding window shorter than the row.
SHAPES = {"qwen2.5": (14, 2, 64, None), "mistral": (32, 8, 128, 64)}
B, L = 2, 256  # the Pallas kernels need L to be a multiple of 128
# float32; the kernels sum blockwise (online softmax) in another order than XLA: about 1e-6 of the
# largest value in practice, so 1e-5 leaves room for other CPUs without hiding a real error
# (a window off by one, a missing scale or the wrong kv head are O(0.1-1) of it).
TOLERANCE = 1e-5


def packed_segment_ids(rng, rows: int, length: int, pad: int = 20) -> np.ndarray:
    """[rows, length] int32: documents 1, 2, ... of random lengths, then `pad` padding zeros."""
    out = np.zeros((rows, length), np.int32)
    for r in range(rows):
        docs = rng.integers(1, 5)
        cuts = np.sort(rng.choice(np.arange(1, length - pad), docs - 1, replace=False))
        ids = np.ones(length - pad, np.int32)
        for c in cuts:
            ids[c:] += 1
        out[r, :length - pad] = ids
    return out


def qkv(shape_name: str, seed: int = 0, rows: int = B):
    """q [B, L, N, H], k, v [B, L, K, H], a cotangent like q and packed segment ids [B, L]."""
    num_heads, num_kv, head_dim, window = SHAPES[shape_name]
    B = rows
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return (normal(B, L, num_heads, head_dim), normal(B, L, num_kv, head_dim), normal(B, L, num_kv, head_dim),
            normal(B, L, num_heads, head_dim), jnp.asarray(packed_segment_ids(rng, B, L)), window)


def reference(q, k, v, segment_ids, window):
    """jax.nn.dot_product_attention with the packed documents as a dense [B, 1, L, S] mask."""
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla",
                                        local_window_size=None if window is None else (window - 1, 0))


def value_and_grads(fn, q, k, v, cotangent):
    """fn(q, k, v) and the gradients of <fn(q, k, v), cotangent> with respect to q, k, v."""
    out = jax.jit(fn)(q, k, v)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cotangent), argnums=(0, 1, 2)))(q, k, v)
    return [np.asarray(out)] + [np.asarray(g) for g in grads]


def relative_errors(ours, reference) -> list[float]:
    """max |ours - reference| / max |reference|, per array."""
    return [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(ours, reference, strict=True)]
