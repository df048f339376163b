"""Real public HF configs (tests/fixtures/hf_configs) and their shrunk versions: no torch needed,
so worker subprocesses can import this."""

from __future__ import annotations

import copy
import json
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))
SEQ_LEN = 48  # longer than both of the next two
ROPE_ORIGINAL_LEN = 16
SLIDING_WINDOW = 12
# The last id: torch's nn.Embedding gives its padding row no gradient, so gradient tests draw below it.
PAD_TOKEN = 511

# Published shapes this machine could not download (no model hub here), written by hand: the sizes
# and keys of allenai/OLMo-2-1124-7B and microsoft/Phi-3-mini-4k-instruct's config.json as published
# (from memory; the structural fields agree with transformers' Olmo2Config and Phi3Config defaults,
# which are these models: Olmo2Config's sizes are the 7B's, Phi3Config's the mini's). Phi-3's
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
}


def full_config(name: str) -> dict:
    if name in BUILT:
        return copy.deepcopy(BUILT[name])
    return json.loads((FIXTURES / f"{name}.json").read_text())


def shrunk_config(name: str) -> dict:
    """Sizes shrunk to ~200k parameters; heads vs kv heads, explicit head_dim, rope scaling,
    biases, norms, tied embeddings and sliding window kept."""
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
    hf.update(overrides)
    return hf
