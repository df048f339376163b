"""The pure training and evaluation steps.

`train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch) -> sums` are pure
functions of arrays; `build_setup` jits them once with explicit shardings and buffer donation, for
the trainer and every other caller. The state is a plain dict
{"step", "params", "opt_state"} with params as a nested dict of arrays (Orbax and optax masks need
nothing more), and "ema" (float32, laid out like params) when `training.ema` is set.

A batch is the data pipeline's dict of [B, L] arrays: inputs, targets, loss_mask, positions,
segment_ids, source_ids. The loss is the token-weighted mean of the next-token negative
log-likelihood over loss_mask, in float32. Gradient accumulation sums per-micro-batch token sums
and divides once, so it equals the full-batch gradient exactly (up to float summation order).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cptjax.core.dtypes import float_dtype
from cptjax.core.errors import CptjaxError
from cptjax.data.packing import BATCH_KEYS  # the batch contract, defined once
from cptjax.model.attention import check_kernel
from cptjax.model.context_parallel import context_kernel
from cptjax.model.loss import DEFAULT_LOSS_CHUNK, loss_sums
from cptjax.model.moe import expert_load, load_balancing_loss
from cptjax.model.sharding import (
    MeshConfig,
    batch_sharding,
    make_mesh,
    optimizer_state_shardings,
    param_shardings,
    with_activation_sharding,
)
from cptjax.model.transformer import abstract_model
from cptjax.train.ema import EmaConfig, update_ema
from cptjax.train.evaluation import position_edges as position_bucket_edges
from cptjax.train.optimizer import TrainedRows, build_optimizer, check_freeze, trained_rows
from cptjax.train.schedules import make_schedule


@dataclasses.dataclass(frozen=True)
class StepConfig:
    num_sources: int
    z_loss: float = 0.0
    grad_accum_steps: int = 1
    loss_chunk: int | None = DEFAULT_LOSS_CHUNK  # positions per row per chunk of the loss; None: dense
    position_edges: tuple[int, ...] = ()  # the eval step's position buckets (evaluation.position_edges)
    ema: EmaConfig | None = None  # the train step also updates state["ema"] (cptjax.train.ema)
    router_aux_loss: float = 0.0  # MoE: the load-balancing loss's coefficient (moe.load_balancing_loss)
    router_z_loss: float = 0.0  # MoE: coefficient of the router logits' mean squared log-partition
    trained_rows: TrainedRows | None = None  # optimizer.vocab: rows and stages left untrained


def _sums(graphdef, params, batch, config: StepConfig):
    """Sums over tokens (so micro-batches add up exactly): loss, z-loss, counts, per source. The
    logits exist one chunk of `config.loss_chunk` positions at a time (cptjax.model.loss)."""
    model = nnx.merge(graphdef, params)
    hidden, router = model.hidden_states_and_router(batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    sums = loss_sums(hidden, model.output_head(), batch["targets"], mask, batch["source_ids"],
                     config.num_sources, config.loss_chunk, model.config.final_logit_softcapping,
                     model.config.real_vocab_size)
    sources = jax.nn.one_hot(batch["source_ids"], config.num_sources, dtype=jnp.float32)  # [B, L, S]
    out = {
        **sums,  # nll, z, source_nll
        "tokens": mask.sum(),
        "input_tokens": (batch["segment_ids"] > 0).sum().astype(jnp.float32),  # not padding
        "source_tokens": jnp.einsum("BL,BLS->S", mask, sources),
    }
    if router is not None:  # MoE: each MoE layer's router statistics over the batch's tokens, [layers, ...]
        moe_layers = np.asarray(model.config.moe_layers)
        out["router"] = router if len(moe_layers) == model.config.num_layers else \
            jax.tree.map(lambda a: a[moe_layers], router)
    return out


def _objective(sums: dict, config: StepConfig) -> jax.Array:
    """The summed objective of one micro-batch: next-token NLL, and the z-loss, load-balancing loss
    and router z-loss where configured. The MoE terms are means over the micro-batch's tokens (as
    transformers computes the load-balancing loss), weighted by its target tokens so that the step,
    which divides by all of them, averages them over micro-batches."""
    total = sums["nll"] + config.z_loss * sums["z"]
    if "router" in sums and (config.router_aux_loss or config.router_z_loss):
        router = sums["router"]
        total = total + sums["tokens"] * (
            config.router_aux_loss * load_balancing_loss(router, router["counts"].shape[-1])
            + config.router_z_loss * jnp.sum(router["z"]) / jnp.maximum(jnp.sum(router["tokens"]), 1.0))
    return total


def summed_over_micro_batches(fn, batch: dict, accum: int):
    """fn(batch) summed over `accum` equal slices of the batch's rows, one after the other (a
    scan), so only one micro-batch's activations are alive at a time."""
    if accum == 1:
        return fn(batch)
    micro_batches = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def add(carry, micro):
        return jax.tree.map(jnp.add, carry, fn(micro)), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro_batches)))
    total, _ = jax.lax.scan(add, zeros, micro_batches)
    return total


def loss_and_grads(graphdef, params, batch, config: StepConfig):
    """Mean loss over the batch's target tokens and its gradient, accumulated over micro-batches."""
    def objective(p, micro):
        sums = _sums(graphdef, p, micro, config)
        return _objective(sums, config), sums

    grad_fn = jax.grad(objective, has_aux=True)
    grads, sums = summed_over_micro_batches(lambda micro: grad_fn(params, micro), batch,
                                            config.grad_accum_steps)
    count = jnp.maximum(sums["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    return sums["nll"] / count, grads, sums


def train_step(state: dict, batch: dict, *, graphdef, optimizer: optax.GradientTransformation,
               schedule, config: StepConfig) -> tuple[dict, dict[str, Any]]:
    """One optimizer update, step number state["step"] + 1 (steps count updates from 1).

    The update is `optimizer`'s direction times -schedule(state["step"]): the learning rate of
    step N is the schedule at N - 1 (its 0-based update count), logged as applied. A non-finite
    loss or gradient leaves params, optimizer state and the EMA as they were (the step counter
    still advances, so the schedule does too), and the metrics say so."""
    loss, grads, sums = loss_and_grads(graphdef, state["params"], batch, config)
    untrained = config.trained_rows
    if untrained is not None:  # clipping, Adam and the logged grad_norm see the trained part only
        grads = untrained.where_trained(grads, None, state["step"] + 1)
    grad_norm = optax.tree.norm(grads)
    learning_rate = schedule(state["step"])
    direction, new_opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    updates = jax.tree.map(lambda u: jnp.asarray(-learning_rate, u.dtype) * u, direction)
    new_params = optax.apply_updates(state["params"], updates)
    if untrained is not None:  # nor do Adam's momentum and weight decay move them: the old values
        new_params = untrained.where_trained(new_params, state["params"], state["step"] + 1)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = {
        "step": state["step"] + 1,
        "params": keep(new_params, state["params"]),
        "opt_state": keep(new_opt_state, state["opt_state"]),
    }
    if config.ema is not None:
        new_ema = update_ema(state["ema"], new_params, state["step"] + 1, config.ema)
        new_state["ema"] = keep(new_ema, state["ema"])
    count = jnp.maximum(sums["tokens"], 1.0)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": learning_rate,
        "tokens": sums["tokens"],
        "input_tokens": sums["input_tokens"],
        "source_loss": sums["source_nll"] / jnp.maximum(sums["source_tokens"], 1.0),
        "source_tokens": sums["source_tokens"],
        "skipped": jnp.logical_not(finite),
    }
    if config.z_loss:  # the term the objective adds, only when it adds one
        metrics["z_loss"] = config.z_loss * sums["z"] / count
    if "router" in sums:  # MoE: the router's losses (unweighted) and each layer's expert load
        router = sums["router"]
        metrics["router"] = {
            "aux_loss": load_balancing_loss(router, router["counts"].shape[-1]),
            "z_loss": jnp.sum(router["z"]) / jnp.maximum(jnp.sum(router["tokens"]), 1.0),
            "expert_load": expert_load(router),  # [Ly, E]
        }
    return new_state, metrics


def eval_step(params: dict, batch: dict, *, graphdef, config: StepConfig) -> dict[str, jax.Array]:
    """Token sums for held-out evaluation (loss, perplexity and bits per byte are ratios of these),
    in the training step's micro-batches: evaluation never needs more memory than training.

    With `config.position_edges`, also "position_nll" and "position_tokens" [buckets]: the sums
    grouped by the bucket of each input's position in its document. They are the per-source sums
    of `_sums` with the bucket in place of the source (an eval set is one source), so the same
    chunked loss computes them in the same pass."""
    edges = config.position_edges
    if edges:
        config = dataclasses.replace(config, num_sources=len(edges))

    def sums(micro):
        if edges:  # bucket k holds positions in [edges[k - 1], edges[k]); padding keeps source -1
            bucket = jnp.searchsorted(jnp.asarray(edges, jnp.int32), micro["positions"], side="right")
            micro = {**micro, "source_ids": jnp.where(micro["source_ids"] >= 0, bucket, -1).astype(jnp.int32)}
        out = _sums(graphdef, params, micro, config)
        result = {"nll": out["nll"], "tokens": out["tokens"]}
        if edges:
            result.update(position_nll=out["source_nll"], position_tokens=out["source_tokens"])
        return result
    return summed_over_micro_batches(sums, batch, config.grad_accum_steps)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """The run's model and steps laid out on the mesh: what the trainer, `cptjax plan` and the
    mesh tests share. `step_fn(state, batch) -> (state, metrics)` donates `state`;
    `eval_fn(params, batch) -> sums`; both take global batches laid out by `batch_sharding`."""

    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    optimizer: optax.GradientTransformation
    param_dtype: Any
    abstract_state: dict  # {"params", "opt_state"[, "ema"]}: ShapeDtypeStructs carrying their shardings
    state_shardings: dict  # {"step", "params", "opt_state"[, "ema"]}
    batch_sharding: jax.sharding.NamedSharding
    step_fn: Any
    eval_fn: Any
    position_edges: tuple[int, ...] = ()  # eval_fn's position buckets

    def to_global(self, batch: dict) -> dict:
        """This process's rows of a batch -> global arrays on the mesh (the training keys only)."""
        return batch_to_global(self.batch_sharding, batch)


def batch_to_global(sharding: jax.sharding.NamedSharding, batch: dict) -> dict:
    """This process's rows of a batch -> global arrays laid out by `sharding` (the training keys)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in BATCH_KEYS}


def check_layout(config, model_config, devices) -> str:
    """The checks of `config` (a TrainConfig) that need the model config and the devices it will
    run on (the trainer's, or a TPU topology's for `cptjax plan`), for every stage's batch shape;
    returns the attention kernel (of the longest rows)."""
    data, fsdp, expert, sequence, tensor = config.mesh.axis_sizes(len(devices))
    data_ways, accum = data * fsdp * expert, config.optimizer.grad_accum_steps
    if expert > 1 and model_config.num_experts % expert:
        raise CptjaxError(f"mesh.expert {expert} must divide the model's {model_config.num_experts or 'no'} experts"
                          + ("" if model_config.num_experts else " (it is for mixture-of-experts models)"))
    dtype = float_dtype(config.model.compute_dtype, "model.compute_dtype")
    kernels = {}
    for shape in config.stage_shapes:
        seq_len, rows = shape.seq_len, shape.batch_size
        length_key, rows_key = config.shape_key(shape, "seq_len"), config.shape_key(shape, "batch_size")
        if seq_len > model_config.max_position_embeddings:
            raise CptjaxError(f"{length_key} {seq_len} exceeds the model's max_position_embeddings "
                              f"({model_config.max_position_embeddings}); to extend the context, raise "
                              "model.max_position_embeddings, with a larger RoPE base (model.rope.theta) or "
                              "model.rope.type: yarn (docs/training.md, 'Extending the context')")
        if rows % (data_ways * accum):
            free, micro_rows = len(devices) // tensor, rows // accum  # devices for rows and their tokens
            hint = f"e.g. mesh: {{data: 1, fsdp: {micro_rows}, sequence: {free // micro_rows}}}" \
                if rows % accum == 0 and free % micro_rows == 0 else "mesh.sequence > 1"
            raise CptjaxError(
                f"{rows_key} {rows} must be divisible by the data-parallel ways (mesh.data x mesh.fsdp x "
                f"mesh.expert = {data_ways}) times optimizer.grad_accum_steps ({accum}); with fewer rows than "
                f"devices, split each row over devices with mesh.sequence (context parallelism, {hint})")
        if sequence == 1:
            kernels[seq_len] = check_kernel(config.model.attention, devices[0].platform, dtype, seq_len,
                                            model_config.sliding_window, length_key,
                                            model_config.attn_logit_softcapping)
            continue
        if seq_len % (2 * sequence):
            raise CptjaxError(f"{length_key} {seq_len} must be divisible by 2 x mesh.sequence ({2 * sequence}): "
                              "each row is cut into two chunks per sequence shard (load balancing)")
        if len({d.process_index for d in devices}) > 1:
            _check_hosts_hold_whole_rows(config, devices, (rows, seq_len))
        kernels[seq_len] = context_kernel(config.model.attention, devices[0].platform, dtype, seq_len,
                                          model_config.sliding_window, sequence, config.model.context_parallel,
                                          length_key, model_config.attn_logit_softcapping)
    return kernels[max(kernels)]


def _check_hosts_hold_whole_rows(config, devices, shape: tuple[int, int]) -> None:
    """Each host reads its own rows (the pipeline splits rows by process), so the devices that
    split one row over the sequence axis must all be on one host. `shape`: a batch's [B, L]."""
    mesh = make_mesh(config.mesh, devices)
    hosts_of_rows: dict[tuple, set] = {}
    for device, index in batch_sharding(mesh, config.mesh.rules).devices_indices_map(shape).items():
        hosts_of_rows.setdefault(index[0].indices(shape[0]), set()).add(device.process_index)
    if any(len(hosts) > 1 for hosts in hosts_of_rows.values()):
        per_host = sum(d.process_index == devices[0].process_index for d in devices)
        raise CptjaxError(f"mesh.sequence {config.mesh.sequence}: one row's devices span several hosts, but each "
                          f"host reads its own rows; keep mesh.sequence x mesh.tensor within a host's {per_host} "
                          "devices")


def build_setup(config, model_config, num_sources: int, devices=None) -> TrainSetup:
    """Builds the mesh, the abstract state with its shardings, and the jitted steps of `config`
    (a TrainConfig) for `model_config`; allocates nothing."""
    mesh, rules = make_mesh(config.mesh, devices), config.mesh.rules
    param_dtype = float_dtype(config.model.param_dtype, "model.param_dtype")
    abstract = abstract_model(model_config, param_dtype=param_dtype,
                              dtype=float_dtype(config.model.compute_dtype, "model.compute_dtype"),
                              remat=config.model.remat, attention=config.model.attention,
                              context_parallel=config.model.context_parallel)
    graphdef = nnx.graphdef(abstract)
    p_shardings, abstract_params = _sharded_params(abstract, mesh, rules)
    optimizer = build_optimizer(config.optimizer)
    check_freeze(config.optimizer.freeze, abstract_params)
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = optimizer_state_shardings(abstract_opt_state, p_shardings, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = {"step": replicated, "params": p_shardings, "opt_state": opt_shardings}
    abstract_state = {"params": abstract_params, "opt_state": _with_shardings(abstract_opt_state, opt_shardings)}
    ema = config.training.ema
    if ema is not None:  # float32 whatever the parameters' dtype, on the parameters' shardings
        state_shardings["ema"] = p_shardings
        abstract_state["ema"] = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding),
                                             abstract_params)

    step_config = StepConfig(num_sources=num_sources, z_loss=config.optimizer.z_loss,
                             grad_accum_steps=config.optimizer.grad_accum_steps,
                             loss_chunk=config.model.loss_chunk,
                             position_edges=position_bucket_edges(config.eval_shape.seq_len,  # the held-out rows'
                                                                  config.eval.position_buckets),
                             ema=ema, **router_losses(config.model, model_config),
                             trained_rows=trained_rows(config.optimizer.vocab, _first_stage_end(config),
                                                       model_config.num_tokens))
    b_sharding = batch_sharding(mesh, rules)
    step_fn = jax.jit(
        with_activation_sharding(functools.partial(
            train_step, graphdef=graphdef, optimizer=optimizer, schedule=make_schedule(config.schedule),
            config=step_config), mesh, rules),
        in_shardings=(state_shardings, b_sharding), out_shardings=(state_shardings, None),
        donate_argnums=0)
    eval_fn = _jit_eval_step(graphdef, step_config, mesh, rules, p_shardings, b_sharding)
    return TrainSetup(mesh, graphdef, optimizer, param_dtype, abstract_state, state_shardings,
                      b_sharding, step_fn, eval_fn, step_config.position_edges)


def _first_stage_end(config) -> int:
    return config.data.stages[0].start_step if config.data.stages else 1


def router_losses(model_section, model_config) -> dict[str, float]:
    """StepConfig's MoE coefficients: the run's keys, else the model's own load-balancing one."""
    if not model_config.num_experts:
        if model_section.router_aux_loss_coef or model_section.router_z_loss:
            raise CptjaxError("model.router_aux_loss_coef and model.router_z_loss are for mixture-of-experts "
                              "models; this model has dense MLPs (leave them out)")
        return {}
    aux = model_section.router_aux_loss_coef
    return {"router_aux_loss": model_config.router_aux_loss_coef if aux is None else aux,
            "router_z_loss": model_section.router_z_loss}


def _with_shardings(abstract, shardings):
    """ShapeDtypeStructs of `abstract` carrying `shardings` (trees of the same structure)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def _sharded_params(abstract_module, mesh, rules) -> tuple[dict, dict]:
    """(the parameters' shardings, their abstract arrays carrying them) of an abstract model."""
    p_shardings = param_shardings(abstract_module, mesh, rules)
    params = nnx.to_pure_dict(nnx.state(abstract_module, nnx.Param))
    return p_shardings, _with_shardings(params, p_shardings)


def _jit_eval_step(graphdef, step_config: StepConfig, mesh, rules, p_shardings, b_sharding):
    return jax.jit(
        with_activation_sharding(functools.partial(eval_step, graphdef=graphdef, config=step_config),
                                 mesh, rules),
        in_shardings=(p_shardings, b_sharding))


@dataclasses.dataclass(frozen=True)
class EvalSetup:
    """A model's eval step on a mesh, outside a training run (`cptjax eval`, merge sweeps):
    `eval_fn(params, batch) -> sums`, the trainer's own eval step jitted the same way."""

    mesh: jax.sharding.Mesh
    abstract_params: dict  # ShapeDtypeStructs carrying their shardings
    batch_sharding: jax.sharding.NamedSharding
    eval_fn: Any
    graphdef: nnx.GraphDef  # the model, for other programs on the same parameters (the retrieval probe)
    position_edges: tuple[int, ...] = ()  # eval_fn's position buckets

    def to_global(self, batch: dict) -> dict:
        return batch_to_global(self.batch_sharding, batch)


def build_eval_setup(model_config, dtype, mesh_config: MeshConfig = MeshConfig(), devices=None,
                     position_edges: tuple[int, ...] = ()) -> EvalSetup:
    """The eval step of `model_config` with parameters and compute in `dtype`, on a mesh of
    `devices` (all by default) laid out by `mesh_config`, with loss sums by `position_edges`
    buckets; allocates nothing."""
    mesh, rules = make_mesh(mesh_config, devices), mesh_config.rules
    abstract = abstract_model(model_config, param_dtype=dtype, dtype=dtype)
    p_shardings, abstract_params = _sharded_params(abstract, mesh, rules)
    b_sharding = batch_sharding(mesh, rules)
    graphdef = nnx.graphdef(abstract)
    eval_fn = _jit_eval_step(graphdef, StepConfig(num_sources=1, position_edges=tuple(position_edges)), mesh,
                             rules, p_shardings, b_sharding)
    return EvalSetup(mesh, abstract_params, b_sharding, eval_fn, graphdef, tuple(position_edges))
