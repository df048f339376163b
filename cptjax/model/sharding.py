"""Logical axis names and the one table that maps them to mesh axes.

Model code names logical axes only. `DEFAULT_RULES` maps each logical name to a mesh axis (or a
tuple of them, or None for replicated). Every logical name the model uses must have exactly one
rule: unlike Flax NNX's own resolution (last match wins, unknown names pass through as mesh axes),
`logical_to_spec` refuses unknown names, so a typo cannot silently shard on the wrong axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cptjax.core.errors import CptjaxError

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Parameters: V vocab, D embed, N q_heads, K kv_heads, H head_dim, F mlp (and M, an expert's), Ly layers,
# E experts.
PARAM_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "layers", "norm", "experts")
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed", "activation_heads",
                   "activation_kv_heads", "activation_head_dim", "activation_mlp", "activation_vocab")

DEFAULT_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", ("fsdp", "sequence")),  # a row's shards hold different tokens, not copies of the weights
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("experts", "expert"),  # expert parallelism: each device holds E / mesh.expert experts (moe.py)
    ("activation_batch", ("data", "fsdp", "expert")),  # outside the experts, the expert axis splits rows
    ("activation_length", "sequence"),  # context parallelism (cptjax.model.context_parallel)
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


def with_activation_sharding(fn, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """`fn` with `activation_sharding` active while it runs. jit traces a function when it is first
    called, not when it is wrapped, so jit this wrapper (entering the context around `jax.jit(fn)`
    would leave the constraints out of the traced program)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with activation_sharding(mesh, rules):
            return fn(*args, **kwargs)
    return wrapped


def active_mesh() -> tuple[jax.sharding.Mesh, Rules] | None:
    """The mesh and rules that `constrain` uses at this point of tracing, or None (one device)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """A sharding constraint by logical names; a no-op when no mesh is active (one device)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


# Order: the last axes get the closest devices (tensor, then sequence: both talk every layer; then
# expert, whose devices exchange tokens in every MoE layer).
MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1: whatever the devices leave) and the logical-axis rules table."""

    data: int = -1  # data-parallel replicas (-1: whatever the other axes leave)
    fsdp: int = 1  # ways parameters and optimizer state are split (and batch rows)
    expert: int = 1  # MoE models: ways the experts are split (and, outside the experts, batch rows)
    sequence: int = 1  # ways each row's tokens are split (context parallelism, see model.context_parallel)
    tensor: int = 1  # ways heads and MLP columns are split
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES  # logical axis -> mesh axes

    def __post_init__(self):
        sizes = [getattr(self, a) for a in MESH_AXES]
        for axis, size in zip(MESH_AXES, sizes):
            if size == 0 or size < -1:
                raise CptjaxError(f"mesh.{axis}: must be a positive size or -1, got {size}")
        if sizes.count(-1) > 1:
            raise CptjaxError("mesh: at most one axis may be -1 (fill the rest)")
        for name, axes in self.rules:
            for axis in (axes,) if isinstance(axes, str) else tuple(axes or ()):
                if axis not in MESH_AXES:
                    raise CptjaxError(f"mesh.rules: {name!r} maps to unknown mesh axis {axis!r}; "
                                      f"mesh axes are {', '.join(MESH_AXES)}")
        try:
            check_rules(self.rules)
        except CptjaxError as err:
            raise CptjaxError(f"mesh.rules: {str(err).removeprefix('sharding rules: ')}") from None

    def axis_sizes(self, device_count: int) -> tuple[int, ...]:
        sizes = [getattr(self, a) for a in MESH_AXES]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if device_count % known:
                raise CptjaxError(f"mesh: the fixed axes ({self._describe()}) multiply to {known}, which "
                                  f"does not divide the {device_count} devices")
            sizes[sizes.index(-1)] = device_count // known
        if math.prod(sizes) != device_count:
            raise CptjaxError(f"mesh: {self._describe()} = {math.prod(sizes)} devices, but there are "
                              f"{device_count}; make the sizes multiply to {device_count} (or use -1)")
        return tuple(sizes)

    def _describe(self) -> str:
        return " x ".join(f"{a}={getattr(self, a)}" for a in MESH_AXES)


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """The one place meshes are built: named axes, Auto axis types (sharding by jit and constraints)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = config.axis_sizes(len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    hosts = len({d.process_index for d in devices})
    if sizes[MESH_AXES.index("sequence")] > 1 and hosts > 1:
        return Mesh(_rows_within_hosts(sizes, devices, hosts), MESH_AXES, axis_types=axis_types)
    try:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:  # e.g. tensor 4 on a TPU v6e 8x8 torus: split a physical axis
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _rows_within_hosts(sizes, devices, hosts: int):
    """The device grid when rows are split over the sequence axis on several hosts. Each host
    reads its own rows, so one row's devices (sequence x tensor) must be on one host: hosts take
    whole blocks of the grid, sequence and tensor inside, fsdp and data across."""
    from jax.experimental import mesh_utils

    data, fsdp, expert, sequence, tensor = sizes
    per_host = len(devices) // hosts
    local_fsdp = per_host // (sequence * tensor)
    if per_host % (sequence * tensor) or fsdp % local_fsdp:
        raise CptjaxError(f"mesh: sequence {sequence} x tensor {tensor} must divide a host's {per_host} devices, "
                          f"and fsdp ({fsdp}) be a multiple of what is left ({max(local_fsdp, 1)}): each host reads "
                          "its own rows, so one row's devices must be on one host")
    return mesh_utils.create_hybrid_device_mesh((1, local_fsdp, 1, sequence, tensor),
                                                (data, fsdp // local_fsdp, expert, 1, 1),
                                                devices, process_is_granule=True)


def spec_for_shape(names, shape, mesh: Mesh, rules: Rules) -> PartitionSpec:
    """`logical_to_spec`, replicating any dimension the mesh axes do not divide evenly."""
    spec = logical_to_spec(names, rules)
    fitted = []
    for dim, axes in zip(shape, spec):
        flat = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in flat)
        # Axes of size 1 are left out: ("fsdp", "sequence") reads "fsdp" when sequence is 1.
        fitted.append(None if size == 1 or dim % size else flat[0] if len(flat) == 1 else flat)
    return PartitionSpec(*fitted)


def param_shardings(abstract_model, mesh: Mesh, rules: Rules) -> dict:
    """NamedShardings for every parameter, as a nested dict shaped like the params."""
    from flax import nnx

    state = nnx.state(abstract_model, nnx.Param)
    shardings = jax.tree.map(
        lambda v: NamedSharding(mesh, spec_for_shape(v.get_metadata()["out_sharding"], v.shape, mesh, rules)),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Where a [B, L] batch array lives: rows over the data-parallel axes, each row whole (every
    host reads whole rows; the embedding's constraint splits them over the sequence axis)."""
    return NamedSharding(mesh, logical_to_spec(("activation_batch", None), rules))


def optimizer_state_shardings(abstract_opt_state, params_shardings: dict, mesh: Mesh):
    """Optimizer-state shardings by structure: every subtree shaped like the params (Adam's mu and
    nu) is sharded like them; everything else (step counts) is replicated on the mesh. Shardings
    propagated by the compiler can leave such scalars committed to one device."""
    params_def = jax.tree.structure(params_shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    like_params = lambda node: jax.tree.structure(node) == params_def  # noqa: E731
    return jax.tree.map(lambda node: params_shardings if like_params(node) else replicated,
                        abstract_opt_state, is_leaf=like_params)
