"""Per-layer attention patterns, Gemma 2 and 3, OLMo 2 and Phi-3 against transformers' PyTorch models.

Tiny models, shrunk from published configs with their structure kept: Gemma 2 (gemma-2-2b.json:
alternating sliding and global layers, soft-caps, (1 + weight) sandwich norms, sqrt(D) embeddings,
GeGLU, query_pre_attn_scalar, tied embeddings), Qwen2 with max_window_layers (1) below its depth
(3) and use_sliding_window set, OLMo 2 (OLMo-2-1124-7B's shape: norms after attention and MLP
only, q/k RMSNorm over all heads, eps 1e-6, untied head) and Phi-3 (Phi-3-mini-4k-instruct's shape
with fewer kv heads: fused qkv_proj and gate_up_proj in the files, a sliding window on every
layer) and Gemma 3 (gemma-3-1b-pt's structure with six layers, so its 5:1 pattern has a global
layer, and the linear RoPE scaling (8) its 4B-27B models put on the global layers only: q/k
(1 + weight) RMSNorm, the sliding layers' own RoPE base); the last three shapes are written by
hand in tiny_configs.BUILT (no hub here). The sliding
window (12) is shorter than every prompt, so the interleave matters. The published attention cap
(50, on scores of order 0.1 here) moves the logits by 4e-5, under the 1e-4 tolerance, so the Gemma
model here has caps that bite (and a test says they do); the published configs are in
test_parity.py and test_conversion.py through tiny_configs.NAMES and BUILT.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import attention_cases as cases
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
from cptjax.io.pretrained import PretrainedModel
from cptjax.measure.generate import Sampling, generate_ids
from cptjax.model.attention import attend, check_kernel, resolve
from cptjax.model.config import ModelConfig, extend_context
from cptjax.model.kv_cache import KVCache
from cptjax.model.rope import RopeConfig, RopeOverrides
from cptjax.model.transformer import Llama, abstract_model, model_from_params
from cptjax.train.step import StepConfig, loss_and_grads

WINDOW = tiny_configs.SLIDING_WINDOW
# Caps at the scale of this tiny model's scores (~0.1) and logits (~2), as 50 and 30 are for the real one.
CAPS = {"attn_logit_softcapping": 0.05, "final_logit_softcapping": 1.0}
MODELS = {"gemma2": dict(tiny_configs.shrunk_config("gemma-2-2b"), **CAPS),
          "qwen2-mixed": tiny_configs.shrunk_config("qwen2-mixed"),
          "olmo2": tiny_configs.shrunk_config("olmo-2-1124-7b"),
          "phi3": tiny_configs.shrunk_config("phi3-gqa"),
          "gemma3": tiny_configs.shrunk_config("gemma3-scaled")}
# Config changes that must each move the logits far beyond the tolerance (none vacuous). OLMo 2's
# structure (which norms exist, the q/k norms' shapes) is in its weights, so it has none to change.
_WINDOWS = [{"layer_types": (), "sliding_window": None}, {"layer_types": (), "sliding_window": WINDOW}]
FEATURES = {"gemma2": _WINDOWS + [{"attn_logit_softcapping": None}, {"final_logit_softcapping": None},
                                  {"query_pre_attn_scalar": None}],
            "qwen2-mixed": _WINDOWS, "olmo2": [], "phi3": [{"sliding_window": None}],
            # Gemma 3: the sliding layers' own base, the global layers' scaling, the attention scale.
            "gemma3": _WINDOWS + [{"sliding_rope_theta": None}, {"rope": RopeConfig(theta=1e6)},
                                  {"query_pre_attn_scalar": None}]}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: hf_models.save_hf_model(hf, root / name) for name, hf in MODELS.items()}


def _tokens(batch=2, length=tiny_configs.SEQ_LEN, seed=0):
    return np.random.default_rng(seed).integers(0, 512, size=(batch, length))


@pytest.mark.parametrize("change", [
    {"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 2},
    {"model_type": "qwen2", "use_sliding_window": True},  # transformers' default max_window_layers: 28
    {"model_type": "qwen2", "use_sliding_window": False, "max_window_layers": 2},
    {"model_type": "qwen2", "use_sliding_window": True,
     "layer_types": ["sliding_attention", "full_attention"] * 16},
    {"model_type": "qwen3", "use_sliding_window": True, "max_window_layers": 30},
    {"model_type": "gemma2"},
    {"model_type": "gemma2", "layer_types": ["full_attention"] * 30 + ["sliding_attention"] * 2},
    {"model_type": "gemma2", "sliding_window_pattern": 4},  # Gemma 2 alternates whatever this says
    {"model_type": "gemma3_text"},  # five sliding layers to one global
    {"model_type": "gemma3_text", "sliding_window_pattern": 3},
    {"model_type": "mistral"},
], ids=lambda c: "-".join(f"{k}={v}" if k != "layer_types" else k for k, v in c.items()))
def test_which_layers_slide_is_what_transformers_reads(change):
    hf = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 32,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
          "rms_norm_eps": 1e-6, "sliding_window": WINDOW, **change}
    theirs = hf_models.hf_config_object(hf)
    kinds = getattr(theirs, "layer_types", None) or ["sliding_attention"] * 32  # mistral: every layer
    window = getattr(theirs, "sliding_window", None)
    expected = tuple(window if kind == "sliding_attention" else None for kind in kinds)
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.layer_windows == expected
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg  # the export says the same


def test_the_tiny_models_have_the_structure_claimed():
    gemma, qwen = (ModelConfig.from_hf_config(MODELS[n]) for n in ("gemma2", "qwen2-mixed"))
    assert gemma.layer_windows == (WINDOW, None, WINDOW)
    assert qwen.layer_windows == (None, WINDOW, WINDOW)
    assert gemma.gemma_norms and gemma.tie_word_embeddings and gemma.hidden_act == "gelu_pytorch_tanh"
    assert gemma.attention_scale == 256 ** -0.5 != gemma.head_dim ** -0.5
    assert WINDOW < tiny_configs.SEQ_LEN

    gemma3 = ModelConfig.from_hf_config(MODELS["gemma3"])
    assert gemma3.layer_windows == (WINDOW,) * 5 + (None,)
    assert gemma3.qk_norm and gemma3.gemma_norms and gemma3.tie_word_embeddings
    assert gemma3.attn_logit_softcapping is None is gemma3.final_logit_softcapping
    assert [gemma3.layer_ropes[i] for i in (0, 5)] == [RopeConfig(theta=1e4), RopeConfig(1e6, "linear", 8.0)]

    olmo, phi = (ModelConfig.from_hf_config(MODELS[n]) for n in ("olmo2", "phi3"))
    assert olmo.post_norms and olmo.qk_norm_all_heads and not olmo.tie_word_embeddings
    assert olmo.rms_norm_eps == 1e-6 and olmo.layer_windows == (None,) * 3
    shapes = {m.hf_name: m.hf_shape for m in key_map(olmo)}
    assert shapes["model.layers.0.self_attn.q_norm.weight"] == (olmo.num_heads * olmo.head_dim,)
    assert shapes["model.layers.0.self_attn.k_norm.weight"] == (olmo.num_kv_heads * olmo.head_dim,)
    assert "model.layers.0.input_layernorm.weight" not in shapes
    assert phi.fused_projections and phi.layer_windows == (WINDOW,) * 3 and phi.num_kv_heads < phi.num_heads
    names = {m.hf_name for m in key_map(phi)}
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= names
    assert not names & {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"}


@pytest.mark.parametrize("spelling", ["hub", "transformers5"])
def test_gemma3_layer_ropes_are_what_transformers_reads(spelling, tmp_path):
    """Each layer type's RoPE as transformers' Gemma3TextConfig has it, from the hub's spelling
    (rope_theta, rope_scaling, rope_local_base_freq) and from what transformers 5 writes
    (rope_parameters by layer type); the export is read back the same by both."""
    hf = MODELS["gemma3"]
    if spelling == "transformers5":
        hf_models.hf_config_object(hf).save_pretrained(tmp_path)
        hf = json.loads((tmp_path / "config.json").read_text())
        assert set(hf["rope_parameters"]) == {"full_attention", "sliding_attention"} and "rope_scaling" not in hf
    theirs = hf_models.hf_config_object(hf).rope_parameters
    cfg = ModelConfig.from_hf_config(hf)
    for kind, index in (("sliding_attention", 0), ("full_attention", 5)):
        rope = cfg.layer_ropes[index]
        assert (rope.type, rope.theta, rope.factor) == (theirs[kind]["rope_type"], theirs[kind]["rope_theta"],
                                                        theirs[kind].get("factor", 1.0))
        again = hf_models.hf_config_object(cfg.to_hf_config()).rope_parameters[kind]
        assert {k: again[k] for k in theirs[kind]} == theirs[kind]
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_unimplemented_layer_kinds_and_fields_are_refused_in_one_line():
    hf = dict(MODELS["gemma2"], layer_types=["sliding_attention", "chunked_attention", "full_attention"])
    with pytest.raises(CptjaxError, match=r"^x/config.json: layer_types must list one of full_attention, "
                       "sliding_attention for each of the 3 layers"):
        ModelConfig.from_hf_config(hf, "x/config.json")
    with pytest.raises(CptjaxError, match="^x/config.json: hidden_activation 'gelu' is not supported"):
        ModelConfig.from_hf_config(dict(MODELS["gemma2"], hidden_activation="gelu"), "x/config.json")
    with pytest.raises(CptjaxError, match="^x/config.json: use_bidirectional_attention is not supported"):
        ModelConfig.from_hf_config(dict(MODELS["gemma2"], use_bidirectional_attention=True), "x/config.json")
    with pytest.raises(CptjaxError, match=r"^x/config.json: unsupported architecture: model_type 'gemma3' \(it is "
                       "Gemma 3's multimodal checkpoint.*model_type 'gemma3_text'"):
        ModelConfig.from_hf_config(dict(MODELS["gemma3"], model_type="gemma3"), "x/config.json")
    local = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
             "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}
    with pytest.raises(CptjaxError, match=r"^x/config.json: rope_parameters.sliding_attention must be default RoPE"):
        ModelConfig.from_hf_config(dict(MODELS["gemma3"], rope_parameters=local, rope_scaling=None), "x/config.json")


@pytest.mark.parametrize("scaling", [
    {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
    {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
    {"rope_type": "yarn", "factor": 4.0},  # transformers' Phi-3 reads su and yarn as longrope
], ids=lambda s: s.get("type", s.get("rope_type")))
def test_phi3_rope_scaling_is_refused_naming_the_field(scaling):
    hf = dict(MODELS["phi3"], rope_scaling=scaling)
    kind = scaling.get("type", scaling.get("rope_type"))
    with pytest.raises(CptjaxError, match=rf"^x/config.json: rope_scaling.type '{kind}' is not supported "
                       "for model_type 'phi3'.*longrope$"):
        ModelConfig.from_hf_config(hf, "x/config.json")
    with pytest.raises(CptjaxError, match=r"^x/config.json: partial_rotary_factor 0.75 is not supported"):
        ModelConfig.from_hf_config(dict(MODELS["phi3"], partial_rotary_factor=0.75), "x/config.json")


def test_a_run_cannot_scale_phi3_rope_but_can_raise_its_base():
    cfg = ModelConfig.from_hf_config(MODELS["phi3"])
    with pytest.raises(CptjaxError, match=r"^model.rope.type: 'yarn' cannot be exported as a phi3 model"):
        extend_context(cfg, RopeOverrides(type="yarn", factor=4.0), 1024)
    longer = extend_context(cfg, RopeOverrides(theta=1e6), 1024)
    assert longer.rope.theta == 1e6 and longer.max_position_embeddings == 1024
    assert ModelConfig.from_hf_config(longer.to_hf_config()) == longer


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fp32_logits_match_transformers(name, hf_dirs):
    model = load_model(hf_dirs[name], dtype="float32")
    tokens = _tokens()
    ours = np.asarray(model.logits(tokens))
    reference = hf_models.hf_logits(hf_models.load_hf_model(hf_dirs[name]), tokens)
    assert ours.shape == reference.shape == (2, tiny_configs.SEQ_LEN, 512)
    assert np.max(np.abs(ours - reference)) < 1e-4

    # Each feature under test moves the logits far beyond the tolerance: none is vacuous here.
    cfg, params = model.config, nnx.to_pure_dict(nnx.state(model.model, nnx.Param))
    for change in FEATURES[name]:
        other = np.asarray(model_from_params(dataclasses.replace(cfg, **change), params)(jnp.asarray(tokens)))
        assert np.max(np.abs(other - reference)) > 1e-2, change


# The chunked loss matters where the final soft cap is (Gemma 2); for the others it runs with the slow tests.
@pytest.mark.parametrize("name,loss_chunk", [
    pytest.param(name, chunk, id=f"{name}-{'chunked' if chunk else 'dense'}-loss",
                 marks=[pytest.mark.slow] if chunk and name in ("olmo2", "phi3") else [])
    for name in sorted(MODELS) for chunk in (None, 16)])
def test_loss_and_gradients_match_pytorch_autograd(name, loss_chunk, hf_dirs):
    """As test_train_step.py does for Llama: packed documents longer than the window, every
    parameter's gradient within 1e-4 relative (float32; seen ~1e-6)."""
    cfg = ModelConfig.from_hf_config(MODELS[name])
    params = jax.tree.map(jnp.asarray, read_hf_params(hf_dirs[name], cfg))
    rng = np.random.default_rng(0)
    # Below the padding id: torch's embedding keeps that row out of the gradient (tiny_configs.PAD_TOKEN).
    docs = [rng.integers(0, tiny_configs.PAD_TOKEN, 21), rng.integers(0, tiny_configs.PAD_TOKEN, 27)]
    batch = packed_batch([docs], 48)
    loss, grads, _ = loss_and_grads(nnx.graphdef(abstract_model(cfg)), params, batch,
                                    StepConfig(num_sources=1, loss_chunk=loss_chunk))

    model = hf_models.load_hf_model(hf_dirs[name])
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
    for m in key_map(cfg):
        ours = grads
        for key in m.path:
            ours = ours[key]
        ours = np.asarray(ours[m.layer] if m.layer is not None else ours)
        theirs = m.take(hf_grads[m.hf_name].grad.numpy())  # Phi-3: this part of a fused tensor
        assert np.linalg.norm(ours - theirs) <= 1e-4 * np.linalg.norm(theirs), m.hf_name


def _kl(reference, other):
    """KL(softmax(reference) || softmax(other)) per position, in float64."""
    log_p, log_q = (log_softmax(np.asarray(x, np.float64), axis=-1) for x in (reference, other))
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_stays_within_a_kl_bound_of_transformers_fp32(name, hf_dirs):
    """bf16 parameters and compute against transformers in float32: KL at most 1e-3 at every
    position (MaxText's conversion bound is 0.015; seen here: 6e-5), and on average no more than
    twice what transformers' own bf16 model loses (seen: 1.0-1.1 times)."""
    tokens = _tokens()
    hf_model = hf_models.load_hf_model(hf_dirs[name])
    reference = hf_models.hf_logits(hf_model, tokens)
    ours = _kl(reference, load_model(hf_dirs[name], dtype="bfloat16").logits(tokens))
    with torch.no_grad():
        theirs = _kl(reference, hf_model.to(torch.bfloat16)(torch.as_tensor(tokens)).logits.float().numpy())
    assert ours.max() <= 1e-3
    assert ours.mean() <= 2 * theirs.mean()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_generation_matches_transformers(name, hf_dirs):
    model = load_model(hf_dirs[name])
    # Seed 0's prompt has the tiny OLMo 2 end its answer after 4 tokens; seed 1's runs all 32.
    prompt = np.random.default_rng(1 if name == "olmo2" else 0).integers(3, 512, size=(1, 20))  # > the window
    eos = MODELS[name]["eos_token_id"]
    ours = generate_ids(model, prompt, Sampling(max_new_tokens=32), eos=(eos,))
    with torch.no_grad():
        out = hf_models.load_hf_model(hf_dirs[name]).generate(
            torch.as_tensor(prompt), max_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert ours == [row[prompt.shape[1]:] for row in out.tolist()]
    assert len(ours[0]) == 32  # no early end-of-sequence: all 32 compared

    # Full layers keep every position in the cache, sliding ones a ring of the window; the
    # per-layer window is what the match checks: another window generates other tokens.
    windows = model.config.layer_windows
    assert KVCache.empty(model.config, 1, 52, np.float32).keys.shape[2] == (52 if None in windows else WINDOW)
    if set(windows) == {None}:
        return  # OLMo 2: no window to change
    change = {"layer_types": (), "sliding_window": None if set(windows) == {WINDOW} else WINDOW}
    cfg = dataclasses.replace(model.config, **change)
    params = nnx.to_pure_dict(nnx.state(model.model, nnx.Param))
    other = PretrainedModel(cfg, model_from_params(cfg, params))
    assert generate_ids(other, prompt, Sampling(max_new_tokens=32), eos=(eos,)) != ours


def test_layers_stay_one_scanned_body_with_a_switch_on_the_window():
    programs = []
    for layers in (2, 16):
        cfg = ModelConfig.from_hf_config(dict(MODELS["gemma2"], num_hidden_layers=layers))
        graphdef, state = nnx.split(abstract_model(cfg))
        jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, jax.ShapeDtypeStruct((1, 32), jnp.int32))
        programs.append(re.sub(r"\s+", " ", re.sub(r"\d+", "#", str(jaxpr))))  # shapes and line breaks differ
    assert programs[0] == programs[1]  # the program does not grow with depth
    assert programs[0].count(" scan[") == 1 and programs[0].count(" cond[") == 1


def _capped_reference(q, k, v, segment_ids, window, scale, cap):
    """Dense soft-capped attention, written out: the kernels' ground truth."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("BLNH,BSNH->BNLS", q, k) * scale
    scores = cap * jnp.tanh(scores / cap)
    query, key = jnp.arange(q.shape[1])[:, None], jnp.arange(q.shape[1])[None, :]
    ok = (key <= query) & (query - key < window) & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    probs = jax.nn.softmax(jnp.where(ok, scores, -jnp.inf), axis=-1)
    return jnp.einsum("BNLS,BSNH->BLNH", probs, v)


@pytest.mark.parametrize("kernel", ["xla", "splash"])
def test_kernels_soft_cap_and_scale_forward_and_backward(kernel):
    q, k, v, cotangent, seg, _ = cases.qkv("qwen2.5")
    window, scale, cap = 64, 0.3, 2.0  # scores of order 2: the cap bends them
    reference = cases.value_and_grads(lambda q, k, v: _capped_reference(q, k, v, seg, window, scale, cap),
                                      q, k, v, cotangent)
    ours = cases.value_and_grads(
        lambda q, k, v: attend(q, k, v, seg, choice=kernel, window=window, scale=scale, logit_cap=cap),
        q, k, v, cotangent)
    assert max(cases.relative_errors(ours, reference)) <= cases.TOLERANCE
    uncapped = cases.value_and_grads(
        lambda q, k, v: _capped_reference(q, k, v, seg, window, scale, 1e4), q, k, v, cotangent)
    assert cases.relative_errors(uncapped[:1], reference[:1])[0] > 100 * cases.TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_splash_honours_each_layers_window_and_the_cap_in_the_model(name):
    """Splash in interpret mode against xla, the whole model under remat: loss and gradients."""
    cfg = ModelConfig.from_hf_config(dict(MODELS[name], attn_logit_softcapping=2.0) if name == "gemma2"
                                     else MODELS[name])
    params = nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    rng = np.random.default_rng(0)
    batch = packed_batch([[rng.integers(0, cfg.vocab_size, n) for n in (70, 59)]], 128)

    def run(attention):
        graphdef = nnx.graphdef(Llama(cfg, remat="full", attention=attention, rngs=nnx.Rngs(0)))
        loss, grads, _ = loss_and_grads(graphdef, params, batch, StepConfig(num_sources=1))
        return [np.asarray(loss)] + [np.asarray(g) for g in jax.tree.leaves(grads)]

    for a, b in zip(run("splash"), run("xla"), strict=True):
        assert np.linalg.norm(a - b) <= cases.TOLERANCE * np.linalg.norm(b)


def test_kernels_without_a_soft_cap_refuse_it_and_auto_avoids_them():
    for kernel in ("cudnn", "pallas_gpu"):
        with pytest.raises(CptjaxError, match=f"^model.attention '{kernel}' has no attention-logit soft cap, "
                           r"and the model's config.json sets attn_logit_softcapping \(50.0\)"):
            check_kernel(kernel, "gpu", jnp.bfloat16, 4096, None, logit_cap=50.0)
    mixed = ModelConfig.from_hf_config(MODELS["qwen2-mixed"])  # the window is on its later layers only
    with pytest.raises(CptjaxError, match=r"^model.attention 'pallas_gpu' has no sliding window, and the model's "
                       r"config.json sliding_window \(12, on some or all layers\)"):
        check_kernel("pallas_gpu", "gpu", jnp.bfloat16, 128, mixed.sliding_window)
    assert resolve("auto", "gpu", jnp.bfloat16, 4096, None, logit_cap=50.0) == "xla"
    assert resolve("auto", "tpu", jnp.bfloat16, 4096, 4096, logit_cap=50.0) == "splash"


@pytest.mark.slow
def test_context_parallelism_keeps_the_caps_and_each_layers_window():
    """Rows split 4 ways (all_gather and ring; OLMo 2 and Phi-3, with nothing the ring treats apart,
    all_gather only) against one device, as test_context_parallel.py holds Mistral: loss within
    1e-5 relative, each gradient within 1e-4."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "context_worker.py"), "families"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["devices"] == 8
    assert set(found["errors"]) == {f"{f}/{s}" for f in MODELS for s in ("all_gather", "ring")} - {"olmo2/ring",
                                                                                                   "phi3/ring"}
    for case, errors in found["errors"].items():
        assert errors[0] <= 1e-5 and max(errors[1:]) <= 1e-4, (case, errors)
