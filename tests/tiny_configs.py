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

# Structures the public fixtures do not cover but the model claims: Llama with attention and MLP
# biases, and Qwen2 with its sliding window switched on for every layer or for some.
VARIANTS = {
    "llama-biases": ("llama-2-7b", {"attention_bias": True, "mlp_bias": True}),
    "qwen2-sliding": ("qwen2.5-0.5b", {"use_sliding_window": True, "max_window_layers": 0}),
    # Qwen2 with its first layer full and the later two sliding (max_window_layers below the depth).
    "qwen2-mixed": ("qwen2.5-0.5b", {"use_sliding_window": True, "max_window_layers": 1}),
}


def full_config(name: str) -> dict:
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
    if hf.get("head_dim") is not None:
        hf["head_dim"] = 24  # differs from hidden_size / num_attention_heads = 16, as in the real ones
    if hf.get("rope_scaling"):
        hf["rope_scaling"] = dict(hf["rope_scaling"], original_max_position_embeddings=ROPE_ORIGINAL_LEN)
    if hf.get("sliding_window") is not None:
        hf["sliding_window"] = SLIDING_WINDOW
    hf.update(overrides)
    return hf
