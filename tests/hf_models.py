"""Tiny random HF checkpoints built with transformers' PyTorch models (the ground truth). Needs
torch; worker subprocesses use tiny_configs.py and data_helpers.py instead."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers


def hf_config_object(hf: dict):
    rest = {k: v for k, v in hf.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(hf["model_type"], **rest)


def randomize_(model, seed: int = 0) -> None:
    """Every parameter random: HF's own init leaves norms at 1 and biases at 0, hiding map bugs."""
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
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config_object(hf), attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def save_hf_model(hf: dict, out: Path, seed: int = 0, **save_kwargs) -> Path:
    # quietly: tests that read a command's stderr may build their model first (transformers' bar)
    transformers.utils.logging.disable_progress_bar()
    try:
        make_hf_model(hf, seed).save_pretrained(out, **save_kwargs)
    finally:
        transformers.utils.logging.enable_progress_bar()
    return out


def load_hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", trust_remote_code=False).eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
