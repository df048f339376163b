"""Real public HF configs (tests/fixtures/hf_configs) and their shrunk versions: no torch needed,
so worker subprocesses can import this."""

from __future__ import annotations

import copy
import json
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
# Published config.json files of the models the recipes in configs/ continue from, for `cptjax plan`
# only (each one's structure is a fixture's or BUILT's: Gemma 2 9B is gemma-2-2b's). Written by hand
# where the hub could not be reached, as BUILT's are.
RECIPE_MODELS = Path(__file__).parent / "fixtures" / "recipe_models"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))
SEQ_LEN = 48  # longer than both of the next two
ROPE_ORIGINAL_LEN = 16
SLIDING_WINDOW = 12
# The last id: torch's nn.Embedding gives its padding row no gradient, so gradient tests draw below it.
PAD_TOKEN = 511

# Published shapes this machine could not download (no model hub here), written by hand: the sizes
# and keys of allenai/OLMo-2-1124-7B, microsoft/Phi-3-mini-4k-instruct and google/gemma-3-1b-pt's
# config.json as published (from memory; the structural fields agree with transformers' Olmo2Config,
# Phi3Config and Gemma3TextConfig defaults: Olmo2Config's sizes are the 7B's, Phi3Config's the
# mini's, Gemma3TextConfig's RoPE bases, query_pre_attn_scalar and pattern the 1B's). Phi-3's
# auto_map (remote code, never used) is left out. Replace them with the hub files when a session can.
BUILT = {
    "olmo-2-1124-7b": {
        "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "olmo2",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 100277,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 500000, "tie_word_embeddings": False,
        "torch_dtype": "float32", "use_cache": True, "vocab_size": 100352},
    "phi-3-mini-4k-instruct": {
        "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu", "hidden_size": 3072,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
        "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32064},
    "gemma-3-1b-pt": {
        "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
        "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152, "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
        "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
        "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
        "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 262144},
}

# Structures the public fixtures do not cover but the model claims: Llama with attention and MLP
# biases, and Qwen2 with its sliding window switched on for every layer or for some.
VARIANTS = {
    "llama-biases": ("llama-2-7b", {"attention_bias": True, "mlp_bias": True}),
    "qwen2-sliding": ("qwen2.5-0.5b", {"use_sliding_window": True, "max_window_layers": 0}),
    # Qwen2 with its first layer full and the later two sliding (max_window_layers below the depth).
    "qwen2-mixed": ("qwen2.5-0.5b", {"use_sliding_window": True, "max_window_layers": 1}),
    # Phi-3 with fewer kv heads than query heads (Phi-3-medium's kind): the fused qkv_proj's parts differ in size.
    "phi3-gqa": ("phi-3-mini-4k-instruct", {"num_key_value_heads": 2}),
    # Gemma 3 as its 4B-27B text models are: linear RoPE scaling (8) on the global layers only; six
    # layers, so the 5:1 pattern has a global one.
    "gemma3-scaled": ("gemma-3-1b-pt", {"num_hidden_layers": 6,
                                        "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
}


def full_config(name: str) -> dict:
    if name in BUILT:
        return copy.deepcopy(BUILT[name])
    return json.loads(config_file(name).read_text())


def config_file(name: str) -> Path:
    """The config.json file of a fixture or a recipe's model, for commands that take a path."""
    path = FIXTURES / f"{name}.json"
    return path if path.is_file() else RECIPE_MODELS / f"{name}.json"


def shrunk_config(name: str) -> dict:
    """Sizes shrunk to ~200k parameters (an MoE model's experts fewer and smaller); heads vs kv
    heads, explicit head_dim, rope scaling, biases, norms, tied embeddings, sliding window and
    routing kept."""
    base, overrides = VARIANTS.get(name, (name, {}))
    hf = copy.deepcopy(full_config(base))
    mha = hf["num_key_value_heads"] == hf["num_attention_heads"]
    hf.update(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=4 if mha else 2, vocab_size=512, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2)
    if (hf.get("pad_token_id") or 0) >= hf["vocab_size"]:  # OLMo 2, Phi-3: inside the shrunk vocabulary
        hf["pad_token_id"] = PAD_TOKEN
    if hf.get("head_dim") is not None:
        hf["head_dim"] = 24  # differs from hidden_size / num_attention_heads = 16, as in the real ones
    if hf.get("rope_scaling"):
        hf["rope_scaling"] = dict(hf["rope_scaling"], original_max_position_embeddings=ROPE_ORIGINAL_LEN)
    if hf.get("sliding_window") is not None:
        hf["sliding_window"] = SLIDING_WINDOW
    if hf.get("moe_intermediate_size"):  # Qwen3-MoE: 128 experts of 768, 8 per token -> 16 of 32, 4
        hf.update(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32)
    hf.update(overrides)
    return hf
