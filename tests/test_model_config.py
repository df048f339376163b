"""config.json in both spellings found in the wild, and what is refused."""

import json

import hf_models
import numpy as np
import pytest
import tiny_configs

from cptjax.core.errors import CptjaxError
from cptjax.model.config import ModelConfig
from cptjax.model.rope import rope_inverse_frequencies


@pytest.mark.parametrize("name", tiny_configs.NAMES + sorted(tiny_configs.BUILT))
def test_hf_config_round_trips(name):
    hf = tiny_configs.full_config(name)
    cfg = ModelConfig.from_hf_config(hf)
    again = ModelConfig.from_hf_config(json.loads(json.dumps(cfg.to_hf_config())))
    assert again == cfg
    carried = [key for key in ("initializer_range", "use_cache") if key in hf]  # Mixtral's has no use_cache
    assert carried
    for key in carried:  # keys cptjax does not model are carried through
        assert cfg.to_hf_config()[key] == hf[key]


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-2-7b", "qwen3-0.6b", "phi-3-mini-4k-instruct",
                                  "olmo-2-1124-7b"])
def test_transformers_5_rope_parameters_spelling_reads_the_same(name):
    """transformers 5 writes `rope_parameters` (theta inside); the hub's files have rope_theta/rope_scaling."""
    hub = tiny_configs.full_config(name)
    written = hf_models.hf_config_object(hub).to_dict()
    assert "rope_parameters" in written
    v5 = {k: v for k, v in written.items() if k not in ("rope_theta", "rope_scaling")}
    assert ModelConfig.from_hf_config(v5).rope == ModelConfig.from_hf_config(hub).rope


def test_llama3_frequencies_match_transformers():
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = tiny_configs.full_config("llama-3.1-8b")
    cfg = ModelConfig.from_hf_config(hf)
    reference, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_models.hf_config_object(hf), torch.device("cpu"))
    ours = rope_inverse_frequencies(cfg.rope, cfg.head_dim)
    # theta ** (i / H) in float32 goes through NumPy's and torch's own pow, whose last bits differ
    # between CPUs (2 ulps on an AMD EPYC, 0 on the Intel machine this was written on). 4 ulps is
    # 5e-7 relative, far below what the 1e-4 logit parity tests could see.
    np.testing.assert_array_max_ulp(ours, reference.numpy(), maxulp=4)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' .* is refused: its frequencies change"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
    ({"vocab_size": "many"}, "key 'vocab_size' must be an integer"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "only causal-LM checkpoints"),
    ({"model_type": "gemma"}, "unsupported architecture: model_type 'gemma'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
])
def test_bad_configs_name_the_key(change, message):
    hf = dict(tiny_configs.full_config("llama-3.1-8b"), **change)
    with pytest.raises(CptjaxError, match=message) as err:
        ModelConfig.from_hf_config(hf, "some/config.json")
    assert str(err.value).startswith("some/config.json: ")


def test_mixed_sliding_and_full_layers_load_per_layer():
    """Layers from max_window_layers on slide (test_families.py checks more patterns against transformers)."""
    hf = dict(tiny_configs.full_config("qwen2.5-0.5b"), use_sliding_window=True, max_window_layers=12)
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.layer_windows == (None,) * 12 + (hf["sliding_window"],) * 12
    hf["max_window_layers"] = hf["num_hidden_layers"]  # no layer reaches the window: full attention
    assert ModelConfig.from_hf_config(hf).sliding_window is None
