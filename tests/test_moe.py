"""Mixture-of-experts models (Mixtral, Qwen3-MoE) against transformers' PyTorch models.

Tiny models shrunk from the published mixtral-8x7b-v0.1.json (8 experts, 2 per token, the chosen
weights renormalised) and qwen3-30b-a3b.json (128 experts of 768, 8 per token -> 16 of 32, 4 per
token; norm_topk_prob, q/k norms). Their routers are scaled up (x20) so that every token's choice
is clear of ties: near-uniform router probabilities would let a 1e-7 rounding difference swap two
experts, which is not what these tests are about. test_parity.py and test_conversion.py also run
the unscaled models (logits, generation, the HF round trip) through tiny_configs.NAMES.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
import torch
from batches import packed_batch
from flax import nnx
from scipy.special import log_softmax

from cptjax import load_model
from cptjax.core.errors import CptjaxError
from cptjax.hf.keymap import key_map
from cptjax.hf.read import read_hf_params
from cptjax.measure.generate import Sampling, generate_ids
from cptjax.model.config import ModelConfig
from cptjax.model.moe import load_balancing_loss, route
from cptjax.model.transformer import abstract_model
from cptjax.train.metrics import training_flops_per_token
from cptjax.train.optimizer import OptimizerConfig, build_optimizer
from cptjax.train.step import StepConfig, loss_and_grads, train_step

MODELS = {"mixtral": tiny_configs.shrunk_config("mixtral-8x7b-v0.1"),
          "qwen3_moe": tiny_configs.shrunk_config("qwen3-30b-a3b"),
          # the middle layer a dense MLP (mlp_only_layers), as Qwen3-MoE's config allows
          "qwen3_moe-mixed": dict(tiny_configs.shrunk_config("qwen3-30b-a3b"), mlp_only_layers=[1])}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for name, hf in MODELS.items():
        model = hf_models.make_hf_model(hf)
        with torch.no_grad():
            for key, value in model.named_parameters():
                if key.endswith(".gate.weight"):  # the router: choices clear of ties
                    value.mul_(20)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _tokens(seed=0, shape=(2, tiny_configs.SEQ_LEN)):
    return np.random.default_rng(seed).integers(0, 512, size=shape)


def test_published_configs_read_as_transformers_reads_them():
    mixtral = ModelConfig.from_hf_config(tiny_configs.full_config("mixtral-8x7b-v0.1"))
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.expert_size) == (8, 2, 14336)
    assert mixtral.norm_topk_prob and mixtral.router_aux_loss_coef == 0.02 and mixtral.sliding_window is None
    qwen = ModelConfig.from_hf_config(tiny_configs.full_config("qwen3-30b-a3b"))
    assert (qwen.num_experts, qwen.experts_per_token, qwen.expert_size) == (128, 8, 768)
    assert qwen.norm_topk_prob and qwen.qk_norm and qwen.router_aux_loss_coef == 0.001
    mixed = ModelConfig.from_hf_config(MODELS["qwen3_moe-mixed"])
    assert mixed.dense_layers == (1,) and mixed.moe_layers == (0, 2)
    stepped = ModelConfig.from_hf_config(dict(MODELS["qwen3_moe"], decoder_sparse_step=2))  # experts on odd layers
    assert stepped.moe_layers == (1,) and stepped.to_hf_config()["mlp_only_layers"] == [0, 2]
    for name in MODELS:  # transformers' own config object, and the export read back, say the same
        theirs = hf_models.hf_config_object(MODELS[name])
        cfg = ModelConfig.from_hf_config(MODELS[name])
        experts = getattr(theirs, "num_local_experts", None) or theirs.num_experts
        assert (cfg.num_experts, cfg.experts_per_token) == (experts, theirs.num_experts_per_tok)
        assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize("change,message", [
    ({"mlp_only_layers": [0, 1, 2]}, r"every layer is a dense MLP \(mlp_only_layers \[0, 1, 2\], "
                                     r"decoder_sparse_step 1\)"),
    ({"mlp_only_layers": [5]}, r"mlp_only_layers must list layer indices below num_hidden_layers \(3\), got \[5\]"),
    ({"num_experts_per_tok": 32}, r"num_experts_per_tok \(32\) exceeds num_experts \(16\)"),
])
def test_bad_moe_layouts_are_refused_naming_the_field(change, message):
    with pytest.raises(CptjaxError, match="^x/config.json: " + message):
        ModelConfig.from_hf_config(dict(MODELS["qwen3_moe"], **change), "x/config.json")
    with pytest.raises(CptjaxError, match="^x/config.json: router_jitter_noise 0.1 is not supported"):
        ModelConfig.from_hf_config(dict(MODELS["mixtral"], router_jitter_noise=0.1), "x/config.json")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fp32_logits_and_router_choices_match_transformers(name, hf_dirs):
    model = load_model(hf_dirs[name], dtype="float32")
    tokens = _tokens()
    hf_model = hf_models.load_hf_model(hf_dirs[name])
    with torch.no_grad():
        out = hf_model(torch.as_tensor(tokens), output_router_logits=True)
    assert np.max(np.abs(np.asarray(model.logits(tokens)) - out.logits.numpy())) < 1e-4

    # Each layer's router, given transformers' own input to it, picks the same experts with the
    # same weights; the router's input is the post-attention norm of the layer's residual stream.
    cfg, k = model.config, model.config.experts_per_token
    captured = []
    hooks = [hf_model.model.layers[i].mlp.register_forward_pre_hook(
        lambda _, args: captured.append(args[0].reshape(-1, cfg.hidden_size))) for i in cfg.moe_layers]
    with torch.no_grad():
        hf_model(torch.as_tensor(tokens))
    for hook in hooks:
        hook.remove()
    params = nnx.to_pure_dict(nnx.state(model.model, nnx.Param))
    for layer, (h, their_logits) in enumerate(zip(captured, out.router_logits, strict=True)):
        logits, _, experts, weights = route(jnp.asarray(h.numpy()), params["layers"]["router"][layer], cfg,
                                            jnp.float32)
        assert np.max(np.abs(np.asarray(logits) - their_logits.numpy())) < 1e-5
        probs = torch.softmax(their_logits.float(), dim=-1)
        their_weights, their_experts = torch.topk(probs, k, dim=-1)
        their_weights = their_weights / their_weights.sum(-1, keepdim=True)
        # Every token's choice, except where its k-th and (k+1)-th router logits are within the 1e-5
        # they are held to above (two computations may order those either way; none here, seen).
        ranked = np.sort(their_logits.float().numpy(), axis=-1)[:, ::-1]
        clear = ranked[:, k - 1] - ranked[:, k] > 1e-5
        assert clear.mean() >= 0.95
        assert np.array_equal(np.asarray(experts)[clear], their_experts.numpy()[clear])
        # softmax moves a probability by at most the largest logit difference, held to 1e-5 above
        assert np.max(np.abs(np.asarray(weights) - their_weights.numpy())) < 1e-5


@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_with_load_balancing_and_gradients_match_pytorch_autograd(name, hf_dirs):
    """One 48-token document filling the row, as transformers' loss sees it: the mean next-token
    loss plus router_aux_loss_coef x its load-balancing loss (output_router_logits), and every
    parameter's gradient within 1e-4 relative (float32)."""
    cfg = ModelConfig.from_hf_config(MODELS[name])
    coefficient = 0.5  # well above the published 0.02: the term's gradient must show
    params = jax.tree.map(jnp.asarray, read_hf_params(hf_dirs[name], cfg))
    doc = np.random.default_rng(1).integers(0, tiny_configs.PAD_TOKEN, tiny_configs.SEQ_LEN + 1)
    batch = packed_batch([[doc]], tiny_configs.SEQ_LEN)
    step = StepConfig(num_sources=1, router_aux_loss=coefficient)
    loss, grads, sums = loss_and_grads(nnx.graphdef(abstract_model(cfg)), params, batch, step)
    without, _, _ = loss_and_grads(nnx.graphdef(abstract_model(cfg)), params, batch,
                                   dataclasses.replace(step, router_aux_loss=0.0))

    model = hf_models.load_hf_model(hf_dirs[name])
    out = model(torch.as_tensor(doc[None, :-1], dtype=torch.long), output_router_logits=True)
    nll = torch.nn.functional.cross_entropy(out.logits[0], torch.as_tensor(doc[1:], dtype=torch.long))
    (nll + coefficient * out.aux_loss).backward()
    assert abs(float(loss) - nll.item()) <= 1e-5 * nll.item()
    assert abs(float(load_balancing_loss(sums["router"], cfg.num_experts)) - out.aux_loss.item()) <= 1e-5
    # the NLL is reported alone; only the objective adds the term
    assert float(without) == pytest.approx(float(loss), rel=1e-6)
    hf_grads = dict(model.named_parameters())
    router_grads = 0.0
    for m in key_map(cfg):
        ours = grads["layers"][m.path[-1]] if m.path[0] == "layers" else grads[m.path[0]]
        ours = np.asarray(ours).reshape(-1, *m.shape)[m.layer] if m.layer is not None else np.asarray(ours)
        theirs = m.take(_in_memory_grad(hf_grads, m.hf_name, cfg.expert_size))
        assert np.linalg.norm(ours - theirs) <= 1e-4 * np.linalg.norm(theirs), m.hf_name
        if m.path[-1] == "router":
            router_grads += np.linalg.norm(theirs)
    assert router_grads > 0
    assert float(sums["router"]["tokens"].sum()) == len(cfg.moe_layers) * tiny_configs.SEQ_LEN


def _in_memory_grad(hf_grads: dict, hf_name: str, size: int) -> np.ndarray:
    """The gradient of a checkpoint tensor from transformers' model, whose MoE layers hold the
    router as mlp.gate and the experts fused ([E, 2M, D] gate_up_proj, [E, D, M] down_proj), while
    its files keep one tensor per expert (the hub's layout, which cptjax reads and writes)."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.(gate|experts\.(\d+)\.(\w+))\.weight",
                         hf_name)
    if match is None:
        return hf_grads[hf_name].grad.numpy()
    layer, _, expert, part = match.groups()
    prefix = f"model.layers.{layer}.mlp."
    if expert is None:
        return hf_grads[prefix + "gate.weight"].grad.numpy()
    if part in ("w2", "down_proj"):
        return hf_grads[prefix + "experts.down_proj"].grad.numpy()[int(expert)]
    rows = slice(0, size) if part in ("w1", "gate_proj") else slice(size, 2 * size)
    return hf_grads[prefix + "experts.gate_up_proj"].grad.numpy()[int(expert), rows]


def _kl(reference, other):
    log_p, log_q = (log_softmax(np.asarray(x, np.float64), axis=-1) for x in (reference, other))
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_stays_within_a_kl_bound_and_greedy_generation_matches(name, hf_dirs):
    """bf16 against transformers' float32: KL at most 1e-3 per position (as test_families holds
    the dense families); and greedy generation with the KV cache, token for token, in float32."""
    tokens = _tokens()
    hf_model = hf_models.load_hf_model(hf_dirs[name])
    reference = hf_models.hf_logits(hf_model, tokens)
    assert _kl(reference, load_model(hf_dirs[name], dtype="bfloat16").logits(tokens)).max() <= 1e-3

    prompt = np.random.default_rng(2).integers(3, 512, size=(1, 20))
    eos = MODELS[name]["eos_token_id"]
    ours = generate_ids(load_model(hf_dirs[name]), prompt, Sampling(max_new_tokens=24), eos=(eos,))
    with torch.no_grad():
        out = hf_model.generate(torch.as_tensor(prompt), max_new_tokens=24, do_sample=False, pad_token_id=0,
                                eos_token_id=eos)
    assert ours == [row[prompt.shape[1]:] for row in out.tolist()] and len(ours[0]) == 24


def test_a_frozen_router_stays_bit_identical_while_the_experts_train(hf_dirs):
    cfg = ModelConfig.from_hf_config(MODELS["mixtral"])
    params = jax.tree.map(jnp.asarray, read_hf_params(hf_dirs["mixtral"], cfg))
    optimizer = build_optimizer(OptimizerConfig(freeze=("router",)))
    state = {"step": jnp.asarray(0), "params": params, "opt_state": optimizer.init(params)}
    rng = np.random.default_rng(0)
    batch = packed_batch([[rng.integers(0, 500, 30), rng.integers(0, 500, 25)]], tiny_configs.SEQ_LEN)
    step = StepConfig(num_sources=1, router_aux_loss=0.02)
    for _ in range(2):
        state, metrics = train_step(state, batch, graphdef=nnx.graphdef(abstract_model(cfg)), optimizer=optimizer,
                                    schedule=lambda _: 1e-2, config=step)
    assert np.array_equal(state["params"]["layers"]["router"], params["layers"]["router"])
    assert not np.array_equal(state["params"]["layers"]["expert_up_proj"], params["layers"]["expert_up_proj"])
    load = np.asarray(metrics["router"]["expert_load"])
    assert load.shape == (cfg.num_layers, cfg.num_experts) and np.allclose(load.sum(-1), 1.0)
    assert float(metrics["router"]["aux_loss"]) >= 1.0 - 1e-6  # Switch's loss is 1 at a perfect balance


@pytest.mark.slow
def test_expert_parallel_step_equals_one_device():
    """Meshes of 4 and 8 simulated devices with an expert axis (alone, beside data, and beside fsdp
    and tensor; and a model with a dense layer among its MoE ones) against one device
    (tests/moe_worker.py): loss within 1e-5 relative and every
    gradient within 1e-4 (seen: <= 1e-6), the same experts chosen (expert loads within one
    routed token; seen equal), and the tokens reaching their experts by all-gather and reduce-scatter."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "moe_worker.py")],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["devices"] == 8 and len(found["errors"]) == 4
    for case, errors in found["errors"].items():
        assert errors[0] <= 1e-5 and max(errors[1:]) <= 1e-4, (case, errors)
        # routed-token counts: at most one token's choice may differ, at a near-tie between two
        # different computations (seen: 0 on every case)
        assert found["loads"][case] <= 1.0, case
        assert found["collectives"][case]["all_gather"] > 0 and found["collectives"][case]["reduce_scatter"] > 0


def test_mfu_counts_the_experts_a_token_runs():
    """Mixtral 8x7B runs 12.9B of its 46.7B parameters per token (Jiang et al. 2024), 0.13B of
    them the embedding lookup, which PaLM's count leaves out: 6 x 12.75B FLOPs per token, plus
    attention's (12 x 32 x 4096 x 4096 at 4096 tokens, 6.4 GFLOPs)."""
    cfg = ModelConfig.from_hf_config(tiny_configs.full_config("mixtral-8x7b-v0.1"))
    attention = 12 * 32 * 32 * 128 * 4096
    assert abs(training_flops_per_token(cfg, 4096) - attention - 6 * 12.75e9) <= 0.01 * 6 * 12.75e9
