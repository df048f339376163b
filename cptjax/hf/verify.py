"""Checks an exported HF folder against transformers' own PyTorch model (needs torch)."""

from __future__ import annotations

import numpy as np
from etils import epath

from cptjax.core.errors import CptjaxError


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def transformers_logits(hf_dir: epath.Path, tokens: np.ndarray) -> np.ndarray:
    """float32 logits of the HF folder's model as transformers loads it (never remote code)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, trust_remote_code=False, use_safetensors=True)
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def verify_export(hf_dir: epath.Path, reference_logits, vocab_size: int, seed: int = 0,
                  shape: tuple[int, int] = (2, 64)) -> float:
    """Max |logits| difference between transformers on `hf_dir` and `reference_logits(tokens)` over
    the first `vocab_size` ids (a padded vocabulary's export drops its padding rows: hf/write.py)."""
    if not torch_available():
        raise CptjaxError("--verify needs torch (pip install torch); the export itself needs no torch")
    tokens = np.random.default_rng(seed).integers(0, vocab_size, size=shape)
    reference = np.asarray(reference_logits(tokens))[..., :vocab_size]
    return float(np.max(np.abs(transformers_logits(hf_dir, tokens) - reference)))
