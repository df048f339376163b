"""`cptjax plan`: does a config's train step fit its hardware? Compiled, not estimated.

Compiles the step `cptjax train` runs (train_step.build_setup: the same mesh, shardings, donation,
remat, attention kernel and loss) ahead of time, for a TPU slice named by `--topology` from any
host with libtpu installed (the `tpu` extra; no TPU needed), or for this machine's devices. Reads
no weights and no data: the model's shape comes from its config.json. Reports per-device memory
(parameters, optimizer state, the EMA of the weights with training.ema, the compiler's temporaries
and peak) against the device's, whether it fits, and which knobs to turn if it does not. The TPU
compiler refuses a program that does not fit exactly as the chip would, so "fits" is the
compiler's answer, not a model of it. A run with
length stages (`data.stages` with `seq_len` or `batch_size`) compiles its step for each shape;
the plan reports the one that needs the most memory.

The compiler's answer is a function of the program, the devices and the compiler: `program_key`
hashes those, and `plan(..., memo=)` takes the figures of a program compiled before under the same
key instead of compiling it again (scripts/bench_plan.py records them; tests/test_plan.py reads the
records, and compiles whatever no record covers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import math
import os
import re
import time

import jax
import jax.numpy as jnp

from cptjax.core.dtypes import float_dtype
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import is_remote, user_path
from cptjax.data.packing import BATCH_KEYS
from cptjax.model.attention import check_kernel
from cptjax.model.config import ModelConfig, read_hf_config_file
from cptjax.model.transformer import abstract_model, param_count
from cptjax.train.config import TrainConfig
from cptjax.train.step import build_setup, check_layout

# Slice names (GCP's, e.g. v5p-128) -> libtpu's topology: (its type name, the slice name's count
# per chip (v5p counts TensorCores, two per chip), torus dimensions).
TPU_SLICES = {"v5p": ("v5p", 2, 3), "v5e": ("v5e", 1, 2), "v5litepod": ("v5e", 1, 2), "v6e": ("v6e", 1, 2)}
# Usable HBM per chip, by device_kind, as the TPU compiler states it in its out-of-memory error
# (libtpu 0.0.42; tests/test_plan.py checks each against the compiler). Topology devices cannot be
# asked (memory_stats needs a real chip).
TPU_HBM_GIB = {"TPU v5": 95.74, "TPU v5 lite": 15.75, "TPU v6 lite": 31.25}
GiB = 2**30


def topology_name(slice_name: str) -> str:
    """'v5p-128' -> 'v5p:4x4x4' (64 chips), 'v5e-256' -> 'v5e:16x16', 'v6e-64' -> 'v6e:8x8'; a
    libtpu name ('v5p:4x4x4') passes through."""
    if ":" in slice_name:
        return slice_name
    match = re.fullmatch(r"(v5p|v5e|v5litepod|v6e)-(\d+)", slice_name)
    if not match:
        raise CptjaxError(f"--topology {slice_name}: expected a TPU slice such as v5p-128, v5e-256 or "
                          f"v6e-64 ({', '.join(TPU_SLICES)}), or a libtpu topology such as v5p:4x4x4")
    kind, per_chip, dims = TPU_SLICES[match.group(1)]
    count = int(match.group(2))
    chips = count // per_chip
    if count % per_chip or chips < 4 or chips & (chips - 1):
        raise CptjaxError(f"--topology {slice_name}: cptjax knows slices of 4, 8, 16, ... chips "
                          f"({4 * per_chip}, {8 * per_chip}, ... in this name); give a libtpu "
                          f"topology such as {kind}:{'2x2x2' if dims == 3 else '4x4'} for others")
    # The standard slice shapes: 2x2(x1), then each axis doubled in turn (v5p: 2x2x2, 2x2x4, 2x4x4, 4x4x4...).
    grid = [2, 2, 2 if chips >= 8 else 1][:dims] if dims == 3 else [2, 2]
    order = [2, 1, 0] if dims == 3 else [1, 0]
    for i in range(int(math.log2(chips / math.prod(grid)))):
        grid[order[i % dims]] *= 2
    return f"{kind}:{'x'.join(map(str, grid))}"


def topology_devices(slice_name: str) -> list:
    """The compile-only devices of a TPU slice (needs libtpu; no TPU)."""
    from jax.experimental import topologies

    name = topology_name(slice_name)
    if importlib.util.find_spec("libtpu") is None:
        raise CptjaxError(f"--topology {slice_name}: needs libtpu; pip install 'cptjax[tpu]' (jax[tpu] "
                          f"for the installed jax {jax.__version__})")
    # Off a TPU VM, libtpu prints to stderr that it cannot find one unless told what it runs on;
    # the topology compiled for is `name` either way.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_name if ":" not in slice_name else "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compiling touches no chip, so libtpu's one-process-per-host lock is not needed: without this,
    # any other process that loaded libtpu (a run on this TPU VM, another plan) makes it fail.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except (RuntimeError, jax.errors.JaxRuntimeError) as err:
        raise CptjaxError(f"--topology {slice_name} ({name}): {str(err).splitlines()[0]}") from None


def device_memory(device) -> int | None:
    """Bytes one device can use: the runtime's limit on a real device, the compiler's figure for a
    TPU topology, this host's RAM shared by its devices on CPU."""
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
        if limit:
            return int(limit)
    except Exception:  # noqa: BLE001 (compile-only devices raise; some backends have no stats)
        pass
    if device.device_kind in TPU_HBM_GIB:
        return int(TPU_HBM_GIB[device.device_kind] * GiB)
    if device.platform == "cpu":
        import psutil
        return psutil.virtual_memory().total // jax.local_device_count()
    return None


def model_config_for(config: TrainConfig, hf_config: str | None = None) -> ModelConfig:
    """The run's model: --hf-config, else model.hf_config, else model.init_from's own config; then
    the run's RoPE and length keys (model.rope, model.max_position_embeddings) on top."""
    return config.model.run_model_config(_loaded_model_config(config, hf_config))


def _loaded_model_config(config: TrainConfig, hf_config: str | None) -> ModelConfig:
    if hf_config is not None:
        return read_hf_config_file(user_path(hf_config, "--hf-config"))
    if config.model.hf_config is not None:
        return read_hf_config_file(user_path(config.model.hf_config, "model.hf_config"))
    source = config.model.init_from
    if is_remote(source) or not user_path(source, "model.init_from").exists():
        raise CptjaxError(f"model.init_from {source}: not on this machine; pass --hf-config with the "
                          "model's config.json to plan without the weights")
    from cptjax.io.weights import open_weights
    with open_weights(user_path(source, "model.init_from"), config.model.init_step, flag="model.init_from",
                      step_flag="model.init_step") as weights:
        return weights.config


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one compile of the train step says, per device (bytes)."""

    target: str  # "v5p-128 (v5p:4x4x4)" or "local"
    devices: int
    device_kind: str
    mesh: dict[str, int]
    parameters: int  # model parameters in total (not bytes)
    attention: str
    params_bytes: int
    opt_state_bytes: int
    batch_bytes: int
    device_memory: int | None
    compile_s: float
    memory: dict[str, int] | None  # the compiler's memory_analysis(); None if it ran out of memory
    needed: int  # TPU: the compiler's peak; else arguments + outputs - aliased + temporaries + code
    error: str | None = None  # the compiler's out-of-memory message
    knobs: tuple[str, ...] = ()
    batch_size: int = 0  # the planned shape: global rows per step ...
    seq_len: int = 0  # ... of this many tokens (of the stage that needs the most memory)
    stage_key: str = "training.seq_len"  # the key that sets that shape's seq_len
    ema_bytes: int = 0  # training.ema's float32 copy of the parameters (part of the compiled state)
    program_key: str = ""  # program_key() of the planned shape's step
    recorded: bool = False  # memory and error taken from a memo of the same program_key, not compiled now

    @property
    def fits(self) -> bool:
        return self.error is None and (self.device_memory is None or self.needed <= self.device_memory)

    @property
    def headroom(self) -> float | None:
        """The share of device memory left free."""
        return None if not self.device_memory else 1 - self.needed / self.device_memory


def plan(config: TrainConfig, model_config: ModelConfig, topology: str | None = None,
         device_count: int | None = None, memo: dict[str, dict] | None = None) -> Plan:
    """Compiles `config`'s train step for `topology` (a TPU slice) or the local devices; with
    `device_count`, for that many of them (the tests' stand-in for a GPU node's devices). With
    `memo` (program_key -> the compiler's figures), a TPU program found there is not compiled
    again, and each TPU program compiled is added to it."""
    devices = topology_devices(topology) if topology else jax.devices()
    if device_count is not None:
        if device_count > len(devices):
            raise CptjaxError(f"{device_count} devices asked for; {topology or 'this machine'} has {len(devices)}")
        devices = devices[:device_count]
    check_layout(config, model_config, devices)
    setup = build_setup(config, model_config, num_sources=len(config.data.sources), devices=devices)
    shapes = {(s.batch_size, s.seq_len): s for s in reversed(config.stage_shapes)}  # each once, the first
    plans = [_plan_shape(config, model_config, setup, devices, topology, shape, memo) for shape in shapes.values()]
    return max(plans, key=lambda p: (not p.fits, p.needed))


def _plan_shape(config: TrainConfig, model_config: ModelConfig, setup, devices, topology, shape,
                memo: dict[str, dict] | None) -> Plan:
    """One compile of the train step for batches of `shape` (a StageShape)."""
    rows, length = shape.batch_size, shape.seq_len
    attention = check_kernel(config.model.attention, devices[0].platform,
                             float_dtype(config.model.compute_dtype, "model.compute_dtype"), length,
                             model_config.sliding_window, logit_cap=model_config.attn_logit_softcapping)
    batch = {k: jax.ShapeDtypeStruct((rows, length), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=setup.batch_sharding) for k in BATCH_KEYS}
    state = {**setup.abstract_state, "step": jax.ShapeDtypeStruct((), jnp.int32,
                                                                  sharding=setup.state_shardings["step"])}
    lowered = setup.step_fn.lower(state, batch)
    key = program_key(lowered, setup.mesh.devices.flat)
    remembered = memo is not None and devices[0].platform == "tpu"  # a CPU's code depends on the host
    recorded = remembered and key in memo
    compiled = memo[key] if recorded else _compile(lowered)
    if remembered:
        memo[key] = compiled
    memory, error, compile_s = compiled["memory"], compiled["error"], compiled["compile_s"]
    if memory is None:
        needed = _bytes_in(error)
    elif devices[0].platform == "tpu" and memory["peak"]:
        # What the TPU compiler checks against HBM: its liveness-aware peak (a step whose peak
        # exceeds HBM is refused, naming that figure); temp_size counts buffers that never coexist.
        needed = memory["peak"]
    else:  # elsewhere every buffer at once, the donated state counted once (CPU's peak is args + outputs)
        needed = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["generated_code"]
    target = f"{topology} ({topology_name(topology)})" if topology else "local"
    result = Plan(
        target=target, devices=len(devices), device_kind=devices[0].device_kind,
        mesh=dict(setup.mesh.shape), attention=attention,
        parameters=param_count(abstract_model(model_config)),
        params_bytes=_per_device(setup.abstract_state["params"]),
        opt_state_bytes=_per_device(setup.abstract_state["opt_state"]),
        ema_bytes=_per_device(setup.abstract_state.get("ema", {})),
        batch_bytes=_per_device(batch), device_memory=device_memory(devices[0]), compile_s=compile_s,
        memory=memory, needed=needed, error=error, batch_size=rows, seq_len=length,
        stage_key=config.shape_key(shape, "seq_len"), program_key=key, recorded=recorded)
    return dataclasses.replace(result, knobs=() if result.fits else knobs(config, result))


def _compile(lowered) -> dict:
    """The compiler's memory figures for a lowered step, or its out-of-memory message."""
    memory, error, start = None, None, time.perf_counter()
    try:
        analysis = lowered.compile().memory_analysis()
        memory = {f: int(getattr(analysis, f"{f}_size_in_bytes")) for f in
                  ("argument", "output", "alias", "temp", "generated_code")}
        memory["peak"] = int(getattr(analysis, "peak_memory_in_bytes", 0))
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise CptjaxError(f"compiling the train step failed: {str(err).splitlines()[0]}") from None
        error = str(err).splitlines()[0]
    return {"memory": memory, "error": error, "compile_s": round(time.perf_counter() - start, 1)}


def program_key(lowered, devices) -> str:
    """A digest of what the compiler's answer depends on: the program as lowered (without source
    locations, which move with any edit), the devices it is laid out on, the versions of jax, jaxlib
    and libtpu, and XLA's flags from the environment."""
    versions = {}
    for package in ("jax", "jaxlib", "libtpu"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    layout = [(d.platform, d.device_kind, d.id, getattr(d, "coords", None), getattr(d, "core_on_chip", None))
              for d in devices]
    flags = {name: os.environ.get(name, "") for name in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")}
    # how many CPU devices to simulate concerns this host's CPU client only
    flags["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+\s*", "", flags["XLA_FLAGS"]).strip()
    digest = hashlib.sha256(lowered.as_text(debug_info=False).encode())
    digest.update(repr((versions, layout, flags)).encode())
    return digest.hexdigest()


def _per_device(tree) -> int:
    """Bytes of one device's shards of a tree of ShapeDtypeStructs with shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def _bytes_in(message: str | None) -> int:
    """The first size in the compiler's message ('... temporaries (148.25G) exceeds ...')."""
    match = re.search(r"\(([\d.]+)([KMGT])\)", message or "")
    return int(float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024) if match else 0


def knobs(config: TrainConfig, result: Plan) -> tuple[str, ...]:
    """What to change when the step does not fit, the cheapest in speed first."""
    out = []
    if result.attention in ("xla", "cudnn") and result.device_kind.startswith(("TPU", "NVIDIA")):
        out.append("model.attention: auto, with training.seq_len a multiple of 128 (a flash kernel: "
                   "no [B, N, L, S] scores in memory)")
    if config.model.loss_chunk is None or config.model.loss_chunk > 256:
        out.append("model.loss_chunk: 256 (fewer float32 logits at once)")
    if config.model.remat != "full":
        out.append("model.remat: full (recompute each layer's activations in the backward pass)")
    accum = config.optimizer.grad_accum_steps * 2
    if all(s.batch_size % ((result.mesh["data"] * result.mesh["fsdp"]) * accum) == 0 for s in config.stage_shapes):
        out.append(f"optimizer.grad_accum_steps: {accum} (micro-batches of half the rows)")
    sequence = result.mesh.get("sequence", 1) * 2
    if config.training.seq_len % (2 * sequence) == 0 and result.devices % sequence == 0:
        out.append(f"mesh.sequence: {sequence} (context parallelism: each row's tokens split over {sequence} "
                   "devices, fewer activations per device; model.context_parallel picks all_gather or ring)")
    if result.mesh["data"] > 1:
        out.append("mesh: {data: 1, fsdp: -1} (shard parameters and optimizer state over every device)")
    elif result.mesh["tensor"] == 1:
        out.append("mesh.tensor: 2, 4 or 8 (split heads and MLP over devices as well)")
    rows_key = "training.batch_size" if result.stage_key == "training.seq_len" else result.stage_key.replace(
        ".seq_len", ".batch_size")
    out.append(f"a larger slice (--topology), or fewer rows per step ({rows_key})")
    return tuple(out)


def format_plan(result: Plan, config_path: str, model_config: ModelConfig, config: TrainConfig) -> str:
    mesh = " x ".join(f"{k} {v}" for k, v in result.mesh.items())
    gib = lambda n: f"{n / GiB:8.2f} GiB"  # noqa: E731
    lines = [
        f"cptjax plan: {config_path} on {result.target}: {result.devices} x {result.device_kind}, mesh {mesh}",
        f"  {model_config.hf_architecture}, {result.parameters / 1e9:.2f}B parameters; batch "
        f"{result.batch_size} x {result.seq_len}"
        + ("" if len(config.stage_shapes) == 1 else f" ({result.stage_key}: the stage needing the most memory)")
        + f" in {config.optimizer.grad_accum_steps} "
        f"micro-batch(es); remat {config.model.remat}; attention {result.attention}; loss chunk "
        f"{config.model.loss_chunk}; "
        + (f"the compiler's figures recorded for this program (compiled in {result.compile_s:.0f} s)"
           if result.recorded else f"compiled in {result.compile_s:.0f} s"),
        "  per device:",
        f"    parameters       {gib(result.params_bytes)}",
        f"    optimizer state  {gib(result.opt_state_bytes)}",
        *([f"    weight EMA       {gib(result.ema_bytes)}"] if result.ema_bytes else []),
        f"    batch            {gib(result.batch_bytes)}",
    ]
    if result.memory is not None:
        lines += [f"    temporaries      {gib(result.memory['temp'])}",
                  f"    code             {gib(result.memory['generated_code'])}",
                  f"    needed           {gib(result.needed)} ("
                  + ("the compiler's peak, what it checks against HBM)" if result.device_kind.startswith("TPU")
                     else "arguments + outputs - donated + temporaries + code)")]
    else:
        lines.append(f"    needed           {gib(result.needed)} (the compiler ran out of memory: {result.error})")
    capacity = "unknown" if result.device_memory is None else gib(result.device_memory).strip()
    if result.fits:
        headroom = "" if result.headroom is None else f", {result.headroom:.0%} headroom"
        lines.append(f"  fits: {gib(result.needed).strip()} of {capacity} per device{headroom}")
    else:
        lines.append(f"  does NOT fit: {gib(result.needed).strip()} needed of {capacity} per device; turn:")
        lines += [f"    - {knob}" for knob in result.knobs]
    return "\n".join(lines)
