"""RoPE and length controls for a run (model.rope, model.max_position_embeddings) and YaRN, against
transformers: its frequencies, and the logits of a run's HF export beyond the original context."""

import copy
import dataclasses
import json
import shutil

import hf_models
import jax
import numpy as np
import pytest
import tiny_configs
from batches import CountingData, raw_config

from cptjax.convert import orbax_to_hf
from cptjax.core.errors import CptjaxError
from cptjax.io.checkpoint import save_params_checkpoint
from cptjax.io.pretrained import load_model
from cptjax.measure.weight_change import weight_change
from cptjax.model.config import ModelConfig, extend_context
from cptjax.model.rope import RopeOverrides, rope_attention_factor, rope_inverse_frequencies
from cptjax.train.config import config_from_dict
from cptjax.train.plan import model_config_for
from cptjax.train.start import choose_start
from cptjax.train.step import check_layout
from cptjax.train.trainer import run

ORIGINAL = 32  # the tiny base's context: the runs below train at twice it and are checked at 4x
LONG = 4 * ORIGINAL
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}


@pytest.mark.parametrize("scaling, top_level", [
    (YARN, {}),
    (dict(YARN, truncate=False, beta_fast=16, beta_slow=2), {}),
    (dict(YARN, attention_factor=1.3), {}),
    (dict(YARN, mscale=1.0, mscale_all_dim=0.7), {}),  # DeepSeek's spelling of the cos/sin scale
    ({"type": "yarn", "factor": 8.0}, {}),  # the old key, no original length: max_position_embeddings
    (YARN, {"original_max_position_embeddings": 2048}),  # Phi-3 writes it at the top level, and it wins
], ids=["defaults", "no-truncate-betas", "attention-factor", "mscale", "implicit-original", "top-level-original"])
def test_yarn_frequencies_and_scale_match_transformers(scaling, top_level):
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for theta in (1e4, 8e6):
        hf = dict(tiny_configs.full_config("llama-2-7b"), rope_scaling=copy.deepcopy(scaling), rope_theta=theta,
                  **top_level)
        cfg = ModelConfig.from_hf_config(copy.deepcopy(hf))  # transformers edits the dict it is given
        reference, scale = ROPE_INIT_FUNCTIONS["yarn"](hf_models.hf_config_object(hf), torch.device("cpu"))
        # 2 ulps seen: theta ** (i / H) goes through NumPy's and torch's own pow (test_model_config).
        np.testing.assert_array_max_ulp(rope_inverse_frequencies(cfg.rope, cfg.head_dim), reference.numpy(),
                                        maxulp=4)
        assert rope_attention_factor(cfg.rope) == pytest.approx(scale, rel=1e-12)
        assert ModelConfig.from_hf_config(json.loads(json.dumps(cfg.to_hf_config()))) == cfg
    # Not vacuous: the blend sits strictly between the interpolated and the original frequencies.
    plain = rope_inverse_frequencies(dataclasses.replace(cfg.rope, type="default"), cfg.head_dim)
    ratio = rope_inverse_frequencies(cfg.rope, cfg.head_dim) / plain
    assert ratio[0] == 1 and ratio[-1] == pytest.approx(1 / cfg.rope.factor) and 0 < ratio.min() < ratio.max()


def test_run_keys_change_the_loaded_config_and_are_checked():
    llama31 = ModelConfig.from_hf_config(tiny_configs.full_config("llama-3.1-8b"))  # llama3 rope, 131072
    abf = extend_context(llama31, RopeOverrides(theta=8e6), 524288)
    assert abf.rope == dataclasses.replace(llama31.rope, theta=8e6) and abf.max_position_embeddings == 524288
    yarn = extend_context(llama31, RopeOverrides(type="yarn", factor=4.0), 524288)
    assert (yarn.rope.type, yarn.rope.factor, yarn.rope.theta) == ("yarn", 4.0, 500000.0)
    assert yarn.rope.original_max_position_embeddings == 131072  # the loaded model's context
    # A resumed run applies the keys again to its own checkpoint's config: nothing moves.
    assert extend_context(yarn, RopeOverrides(type="yarn", factor=4.0), 524288) == yarn
    assert extend_context(llama31, RopeOverrides(), None) == llama31

    for changes, message in [
        (RopeOverrides(type="yarn"), "model.rope.factor: required when model.rope.type changes from 'llama3'"),
        (RopeOverrides(beta_fast=16.0), "model.rope.beta_fast: used by rope type yarn, not 'llama3'"),
        (RopeOverrides(type="yarn", factor=4.0, beta_fast=0.5), "model.rope: yarn rope needs beta_fast >= beta_slow"),
        (RopeOverrides(low_freq_factor=8.0), "model.rope: llama3 rope needs high_freq_factor > low_freq_factor"),
    ]:
        with pytest.raises(CptjaxError, match=message):
            extend_context(llama31, changes, None)

    def section(**model):
        return config_from_dict(raw_config("run", "nowhere", model=model)).model

    for model, message in [
        ({"rope": {"type": "dynamic", "factor": 2.0}},
         r"^model.rope.type: rope type 'dynamic' \(dynamic NTK scaling\) is refused: its frequencies change with "
         r"the length .* raise the RoPE base \(model.rope.theta\) or use yarn \(model.rope.type: yarn\)$"),
        ({"rope": {"type": "ntk"}}, "^model.rope.type: unsupported rope type 'ntk': cptjax implements default, "
                                    "linear, llama3, yarn"),
        ({"rope": {"theta": "large"}}, "^model.rope.theta: expected a number, got 'large'$"),
        ({"rope": {"factor": -2}}, "^model.rope.factor: must be positive, got -2.0$"),
        ({"rope": {"truncate": "yes"}}, "^model.rope.truncate: expected true or false"),
        ({"rope": {"thetta": 1e6}}, "^model.rope.thetta: unknown key; did you mean 'theta'?"),
        ({"max_position_embeddings": 0}, "^model.max_position_embeddings: must be >= 1, got 0$"),
    ]:
        with pytest.raises(CptjaxError, match=message):
            section(**model)


def test_plan_and_layout_checks_see_the_raised_context():
    """The issue's command: Llama-3.1-8B at 512K answered 'exceeds max_position_embeddings' with no
    key to change it. The error names the key; with it raised, plan's model and the check agree."""
    fixture = str(tiny_configs.FIXTURES / "llama-3.1-8b.json")
    raw = raw_config("run", "nowhere", training={"seq_len": 524288, "batch_size": 16})
    devices = jax.devices()
    with pytest.raises(CptjaxError, match=r"exceeds the model's max_position_embeddings \(131072\); to extend "
                                          r"the context, raise model.max_position_embeddings"):
        check_layout(config_from_dict(raw), model_config_for(config_from_dict(raw), fixture), devices)
    raw["model"].update(max_position_embeddings=524288, rope={"theta": 1.28e8})
    config = config_from_dict(raw)
    model_config = model_config_for(config, fixture)
    assert model_config.max_position_embeddings == 524288 and model_config.rope.theta == 1.28e8
    assert check_layout(config, model_config, devices) == "xla"


@pytest.fixture(scope="module")
def short_base(tmp_path_factory):
    """A tiny GQA Llama with default RoPE and a context of ORIGINAL tokens."""
    hf = dict(tiny_configs.shrunk_config("tinyllama-1.1b"), num_hidden_layers=2, max_position_embeddings=ORIGINAL)
    return hf_models.save_hf_model(hf, tmp_path_factory.mktemp("short") / "hf")


def test_raised_theta_export_matches_transformers(short_base, tmp_path):
    """ABF: the trainer's own start (model.init_from + the run's keys) gives the model config; a
    checkpoint of it exports with the new rope_theta and max_position_embeddings."""
    raw = raw_config(tmp_path / "run", short_base, model={"rope": {"theta": 160000.0}, "max_position_embeddings": LONG},
                     training={"seq_len": 2 * ORIGINAL})
    start = choose_start(config_from_dict(raw))
    with start.weights:
        save_params_checkpoint(tmp_path / "ckpt", 0, start.model_config, start.weights.read())
    _check_export(tmp_path / "ckpt", tmp_path, short_base, theta=160000.0, rope_scaling=None)


def test_yarn_run_exports_what_transformers_reproduces(short_base, tmp_path):
    """A one-step run at 2x the base's context with yarn; its checkpoint's HF export carries the keys."""
    raw = raw_config(tmp_path / "run", short_base, model={"rope": {"type": "yarn", "factor": 4.0},
                                                          "max_position_embeddings": LONG},
                     training={"steps": 1, "batch_size": 2, "seq_len": 2 * ORIGINAL}, checkpoint={"every": 1},
                     schedule={"warmup": 0}, eval={"at_start": False})
    config = config_from_dict(raw)
    assert run(config, data=CountingData(512, 2, 2 * ORIGINAL), eval_sets={}).final_step == 1
    _check_export(config.paths.checkpoints, tmp_path, short_base, theta=10000.0,
                  rope_scaling=dict(YARN, beta_fast=32.0, beta_slow=1.0))
    # The extended run still compares to its base (same shapes, other RoPE): every layer moved.
    change = weight_change(str(short_base), str(config.paths.checkpoints))
    assert len(change.layers["q_proj"]) == 2 and min(change.layers["q_proj"]) > 0


def _check_export(ckpt, tmp_path, base, theta, rope_scaling):
    """Exports `ckpt`; its config.json holds the run's values, transformers loads it, and its float32
    logits equal cptjax's (of the checkpoint) at 4x the base's context."""
    orbax_to_hf(ckpt, tmp_path / "export")
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["max_position_embeddings"] == LONG and written["rope_scaling"] == rope_scaling
    assert written["rope_theta"] == theta
    exported = hf_models.load_hf_model(tmp_path / "export")
    expected_scale = 1 + 0.1 * np.log(4.0) if rope_scaling else 1.0
    assert exported.model.rotary_emb.attention_scaling == pytest.approx(expected_scale)

    tokens = np.random.default_rng(0).integers(0, 512, size=(1, LONG))
    ours = np.asarray(load_model(ckpt).logits(tokens))
    theirs = hf_models.hf_logits(exported, tokens)
    beyond = slice(ORIGINAL, None)
    # Random weights give logits of order 1, so 1e-4 absolute is ~1e-4 relative.
    assert np.max(np.abs(ours[:, beyond] - theirs[:, beyond])) < 1e-4
    assert np.max(np.abs(ours - theirs)) < 1e-4
    # The comparison sees a RoPE change: the same weights under the base's RoPE are far off.
    shutil.copytree(tmp_path / "export", tmp_path / "as_base")
    base_config = ModelConfig.from_hf_config(json.loads((base / "config.json").read_text())).to_hf_config()
    base_rope = {k: base_config[k] for k in ("rope_theta", "rope_scaling")}
    (tmp_path / "as_base" / "config.json").write_text(json.dumps({**written, **base_rope}))
    unchanged = hf_models.hf_logits(hf_models.load_hf_model(tmp_path / "as_base"), tokens)
    assert np.max(np.abs(unchanged[:, beyond] - ours[:, beyond])) > 1e-2
