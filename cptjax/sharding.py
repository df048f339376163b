"""Logical axis names and the one table that maps them to mesh axes.

Model code names logical axes only. `DEFAULT_RULES` maps each logical name to a mesh axis (or a
tuple of them, or None for replicated). Every logical name the model uses must have exactly one
rule: unlike Flax NNX's own resolution (last match wins, unknown names pass through as mesh axes),
`logical_to_spec` refuses unknown names, so a typo cannot silently shard on the wrong axis.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from cptjax.errors import CptjaxError

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Parameters: V vocab, D embed, N q_heads, K kv_heads, H head_dim, F mlp, Ly layers.
PARAM_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "layers", "norm")
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed", "activation_heads",
                   "activation_kv_heads", "activation_head_dim", "activation_mlp", "activation_vocab")

DEFAULT_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def check_rules(rules: Rules) -> None:
    """Each logical name has exactly one rule, and every name the model uses is covered."""
    names = [name for name, _ in rules]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CptjaxError(f"sharding rules: logical axes {repeated} have more than one rule; keep one each")
    missing = sorted(set(PARAM_AXES + ACTIVATION_AXES) - set(names))
    if missing:
        raise CptjaxError(f"sharding rules: logical axes {missing} have no rule; map each to a mesh "
                          "axis or to null")


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis used twice is an error."""
    table = dict(rules)
    spec, used = [], set()
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise CptjaxError(f"sharding rules: no rule for logical axis {name!r}")
        axes = table[name]
        flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
        clash = used.intersection(flat)
        if clash:
            raise CptjaxError(f"sharding rules: mesh axes {sorted(clash)} used twice in {tuple(names)}")
        used.update(flat)
        spec.append(axes if not isinstance(axes, list) else tuple(axes))
    return PartitionSpec(*spec)


_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, Rules] | None] = contextvars.ContextVar(
    "cptjax_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """While active (at trace time), `constrain` pins activations to the mesh by logical name."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """A sharding constraint by logical names; a no-op when no mesh is active (one device)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
