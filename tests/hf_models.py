"""Tiny random HF checkpoints with the structure of real public configs (the ground truth)."""

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
# biases, and Qwen2 with its sliding window switched on for every layer.
VARIANTS = {
    "llama-biases": ("llama-2-7b", {"attention_bias": True, "mlp_bias": True}),
    "qwen2-sliding": ("qwen2.5-0.5b", {"use_sliding_window": True, "max_window_layers": 0}),
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


def hf_config_object(hf: dict):
    import transformers

    rest = {k: v for k, v in hf.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(hf["model_type"], **rest)


def randomize_(model, seed: int = 0) -> None:
    """Every parameter random: HF's own init leaves norms at 1 and biases at 0, hiding map bugs."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def make_hf_model(hf: dict, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config_object(hf), attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def save_hf_model(hf: dict, out: Path, seed: int = 0, **save_kwargs) -> Path:
    make_hf_model(hf, seed).save_pretrained(out, **save_kwargs)
    return out


def load_hf_model(path: Path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", trust_remote_code=False).eval()


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def save_tokenizer(out: Path, texts: list[str]) -> None:
    """A small byte-level BPE tokenizer trained here, saved as HF tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)
