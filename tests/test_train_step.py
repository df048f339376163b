"""Loss and gradients against transformers' PyTorch autograd; accumulation and the NaN guard."""

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
import torch
from batches import packed_batch
from flax import nnx

from cptjax.hf.keymap import key_map
from cptjax.hf.read import read_hf_params
from cptjax.model.config import read_hf_config
from cptjax.model.transformer import abstract_model
from cptjax.train.optimizer import OptimizerConfig, build_optimizer, decay_mask
from cptjax.train.schedules import ScheduleConfig
from cptjax.train.step import StepConfig, loss_and_grads, train_step


@pytest.mark.parametrize("loss_chunk", [None, 16], ids=["dense-loss", "chunked-loss"])
@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-0.5b", "mistral-7b-v0.1"])
def test_loss_and_gradients_match_pytorch_autograd(name, loss_chunk, tiny_hf):
    hf_dir = tiny_hf(name)
    cfg = read_hf_config(hf_dir)
    params = jax.tree.map(jnp.asarray, read_hf_params(hf_dir, cfg))
    graphdef = nnx.graphdef(abstract_model(cfg))
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, cfg.vocab_size, 21), rng.integers(0, cfg.vocab_size, 27)]
    batch = packed_batch([docs], 48)
    loss, grads, _ = loss_and_grads(graphdef, params, batch, StepConfig(num_sources=1, loss_chunk=loss_chunk))

    model = hf_models.load_hf_model(hf_dir)
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.as_tensor(doc[None], dtype=torch.long)
        logits = model(ids[:, :-1]).logits
        total = total + torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum")
        count += len(doc) - 1
    reference = total / count
    reference.backward()
    assert abs(float(loss) - reference.item()) <= 1e-4 * abs(reference.item())

    hf_grads = dict(model.named_parameters())
    checked = 0
    for m in key_map(cfg):
        ours = grads
        for key in m.path:
            ours = ours[key]
        ours = np.asarray(ours[m.layer] if m.layer is not None else ours)
        theirs = m.take(hf_grads[m.hf_name].grad.numpy())
        rel = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        assert rel <= 1e-4, (m.hf_name, rel)
        checked += 1
    assert checked == len(key_map(cfg))


def _tiny_state(name="qwen3-0.6b"):
    from cptjax.model.config import ModelConfig
    from cptjax.model.transformer import Llama

    cfg = ModelConfig.from_hf_config(tiny_configs.shrunk_config(name))
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    return cfg, graphdef, nnx.to_pure_dict(state)


def test_gradient_accumulation_equals_the_full_batch():
    cfg, graphdef, params = _tiny_state()
    rng = np.random.default_rng(1)
    docs = [[rng.integers(0, cfg.vocab_size, n) for n in lengths] for lengths in ([9, 20], [33], [5, 5, 5], [30])]
    batch = packed_batch(docs, 40, sources=[0, 1, 0])
    full = loss_and_grads(graphdef, params, batch, StepConfig(num_sources=2))
    accumulated = loss_and_grads(graphdef, params, batch, StepConfig(num_sources=2, grad_accum_steps=4))
    np.testing.assert_allclose(full[0], accumulated[0], rtol=1e-6)
    # Only the float32 summation order differs, so compare whole tensors (relative norm), as the
    # parity test does; entries near zero make an elementwise relative tolerance meaningless.
    for a, b in zip(jax.tree.leaves(full[1]), jax.tree.leaves(accumulated[1]), strict=True):
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= 1e-5 * np.linalg.norm(np.asarray(a))
    # Token-weighted: rows with more target tokens weigh more, as in the full batch.
    np.testing.assert_allclose(full[2]["tokens"], sum(len(d) - 1 for row in docs for d in row))


def test_non_finite_loss_leaves_params_untouched():
    cfg, graphdef, params = _tiny_state()
    optimizer = build_optimizer(OptimizerConfig())
    state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}
    batch = packed_batch([[np.arange(10)]], 16)
    bad = dict(params, norm=params["norm"] * jnp.nan)
    step = lambda s: train_step(s, batch, graphdef=graphdef, optimizer=optimizer,  # noqa: E731
                                schedule=lambda i: 1e-3, config=StepConfig(num_sources=1))
    new_state, metrics = step(dict(state, params=bad))
    assert bool(metrics["skipped"]) and int(new_state["step"]) == 1
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in
               zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(bad), strict=True))
    good_state, metrics = step(state)
    assert not bool(metrics["skipped"])
    assert not np.array_equal(good_state["params"]["norm"], params["norm"])


def test_decay_mask_spares_norms_and_biases():
    cfg, graphdef, params = _tiny_state("qwen2.5-0.5b")
    mask = decay_mask(params)
    assert mask["layers"]["q_proj"] and mask["embed_tokens"] and mask["layers"]["down_proj"]
    assert not mask["norm"] and not mask["layers"]["input_layernorm"] and not mask["layers"]["q_proj_bias"]
    assert all(jax.tree.leaves(decay_mask(params, decay_norms_and_biases=True)))
    optimizer = build_optimizer(OptimizerConfig(weight_decay=0.5))
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero, optimizer.init(params), params)
    assert float(jnp.abs(updates["layers"]["input_layernorm"]).max()) == 0.0  # no decay on norms
    assert float(jnp.abs(updates["layers"]["q_proj"]).max()) > 0.0


def test_z_loss_adds_its_term_to_the_objective():
    cfg, graphdef, params = _tiny_state()
    batch = packed_batch([[np.arange(1, 12)], [np.arange(20, 35)]], 16)

    def reference(p, coefficient):
        # from the whole [B, L, V] logits, independently of the chunked loss the step uses
        logits = nnx.merge(graphdef, p)(batch["inputs"], batch["positions"], batch["segment_ids"])
        log_z = jax.nn.logsumexp(logits, axis=-1)
        nll = log_z - jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
        mask = batch["loss_mask"]
        return ((nll + coefficient * log_z ** 2) * mask).sum() / mask.sum()

    for coefficient in (0.0, 1e-2):
        loss, grads, sums = loss_and_grads(graphdef, params, batch, StepConfig(num_sources=1, z_loss=coefficient))
        expected = jax.grad(reference)(params, coefficient)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
            assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= 1e-5 * np.linalg.norm(np.asarray(b))
        assert float(sums["z"]) > 0
    # the reported loss is the plain NLL, with or without the z-loss term in the gradient
    assert float(loss) == pytest.approx(float(reference(params, 0.0)), rel=1e-6)


def _steps(state, batches, optimizer, schedule, graphdef):
    metrics = []
    for batch in batches:
        state, m = train_step(state, batch, graphdef=graphdef, optimizer=optimizer, schedule=schedule,
                              config=StepConfig(num_sources=1))
        metrics.append(m)
    return state, metrics


def test_updates_equal_optax_adamw_with_the_same_schedule():
    """The step applies -lr(step) to the optimizer's direction itself; that is optax.adamw."""
    import optax

    from cptjax.train.schedules import make_schedule

    cfg, graphdef, params = _tiny_state("qwen2.5-0.5b")
    config = OptimizerConfig(weight_decay=0.1, grad_clip_norm=1.0)
    schedule = make_schedule(ScheduleConfig(total_steps=10, peak_lr=1e-2, warmup=2))
    rng = np.random.default_rng(0)
    batches = [packed_batch([[rng.integers(0, cfg.vocab_size, 12)]], 16) for _ in range(3)]
    ours = build_optimizer(config)
    state, _ = _steps({"step": jnp.int32(0), "params": params, "opt_state": ours.init(params)}, batches,
                      ours, schedule, graphdef)
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=0.1,
        mask=lambda p: decay_mask(p)))
    ref_params, ref_state = params, reference.init(params)
    for batch in batches:
        _, grads, _ = loss_and_grads(graphdef, ref_params, batch, StepConfig(num_sources=1))
        updates, ref_state = reference.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
    # Two programs with the same operations: XLA may fuse them differently, hence a tolerance.
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)


def test_after_a_skipped_step_the_logged_lr_is_the_applied_one():
    """Step 1 is skipped (NaN); step 2 applies lr(1), logs lr(1), and moves the weights exactly as
    a first Adam step with that lr does."""
    import optax

    cfg, graphdef, params = _tiny_state()
    optimizer = build_optimizer(OptimizerConfig(weight_decay=0.0, grad_clip_norm=None))
    lrs = [1e-3, 5e-3, 1e-2]
    schedule = lambda step: jnp.asarray(lrs, jnp.float32)[step]  # noqa: E731
    good = packed_batch([[np.arange(10)]], 16)
    bad = dict(good, loss_mask=good["loss_mask"] * jnp.nan)
    state = {"step": jnp.int32(0), "params": params, "opt_state": optimizer.init(params)}
    state, metrics = _steps(state, [bad, good], optimizer, schedule, graphdef)
    assert bool(metrics[0]["skipped"]) and not bool(metrics[1]["skipped"])
    assert float(metrics[1]["learning_rate"]) == np.float32(lrs[1])
    _, grads, _ = loss_and_grads(graphdef, params, good, StepConfig(num_sources=1))
    reference = optax.adam(lrs[1], b1=0.9, b2=0.95, eps=1e-8)
    updates, _ = reference.update(grads, reference.init(params), params)
    expected = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
