"""The decoder's gated MLP: down(act(gate(h)) * up(h)) with SiLU (SwiGLU) or GELU's tanh form (GeGLU)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from cptjax.model.config import ModelConfig
from cptjax.model.sharding import constrain


def gated_mlp(h: jax.Array, w: dict[str, jax.Array], cfg: ModelConfig, dt: Any) -> jax.Array:
    """h [B, L, D] -> [B, L, D] through one layer's gate_proj, up_proj and down_proj (and biases)."""
    # One matmul for both projections (one pass over h, and one for its gradient), stacked on a
    # new axis rather than concatenated along F, so an F-sharded mesh needs no data movement.
    gate_up = jnp.einsum("BLD,TFD->BLTF", h, jnp.stack([w["gate_proj"], w["up_proj"]]).astype(dt))
    gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
    if cfg.mlp_bias:
        gate = gate + w["gate_proj_bias"].astype(dt)
        up = up + w["up_proj_bias"].astype(dt)
    if cfg.hidden_act == "silu":
        down = _swiglu_down(gate, up, w["down_proj"].astype(dt))
    else:  # gelu_pytorch_tanh: GeGLU with GELU's tanh approximation
        act = constrain(jax.nn.gelu(gate, approximate=True) * up,
                        ("activation_batch", "activation_length", "activation_mlp"))
        down = jnp.einsum("BLF,DF->BLD", act, w["down_proj"].astype(dt))
    if cfg.mlp_bias:
        down = down + w["down_proj_bias"].astype(dt)
    return down


def _swiglu(gate, up):
    return jax.nn.silu(gate) * up


@jax.custom_vjp
def _swiglu_down(gate, up, down_proj):
    """The MLP's output: silu(gate) * up [B, L, F] through down_proj [D, F]. The backward
    recomputes silu(gate) * up from gate and up, which it needs anyway, instead of keeping it:
    one [B, L, F] tensor per layer less held between forward and backward, and one sigmoid for
    both gradients (autodiff of silu(gate) * up evaluates it more than once)."""
    return _swiglu_down_forward(gate, up, down_proj)[0]


def _swiglu_down_forward(gate, up, down_proj):
    act = constrain(_swiglu(gate, up), ("activation_batch", "activation_length", "activation_mlp"))
    return jnp.einsum("BLF,DF->BLD", act, down_proj), (gate, up, down_proj)


def _swiglu_down_backward(residuals, d_out):
    gate, up, down_proj = residuals
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    act = constrain(silu * up, ("activation_batch", "activation_length", "activation_mlp"))
    d_act = jnp.einsum("BLD,DF->BLF", d_out, down_proj)
    d_down = jnp.einsum("BLF,BLD->DF", act, d_out)
    return d_act * up * (sig + silu * (1 - sig)), d_act * silu, d_down


_swiglu_down.defvjp(_swiglu_down_forward, _swiglu_down_backward)
