"""`cptjax demo`: the main job on an embedded default, runnable on any laptop in seconds.

For now it is the conversion round trip on a tiny random Llama-3.2-shaped model:
HF folder -> cptjax checkpoint -> HF folder, checking that the weights come back bit-exact and that
cptjax (and transformers, when torch is installed) give the same logits on every copy.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from cptjax.convert import hf_to_orbax, orbax_to_hf
from cptjax.hf_convert import write_hf_dir
from cptjax.hf_parity import torch_available
from cptjax.model import Llama
from cptjax.model_config import ModelConfig
from cptjax.pretrained import load_model
from cptjax.safetensors_io import SafetensorsFile

# Llama-3.2-1B's config.json with every size shrunk; the structure (GQA, head_dim, llama3 rope
# scaling, tied embeddings) is kept.
DEMO_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
    "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2,
}


def _lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _tensors_equal(dir_a: Path, dir_b: Path) -> int:
    """Compares every tensor of two HF folders byte for byte; returns how many were compared."""
    def load(folder):
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            st = SafetensorsFile(file)
            out.update({name: st.read(name) for name in st.tensors})
        return out
    a, b = load(dir_a), load(dir_b)
    if a.keys() != b.keys():
        raise AssertionError(f"tensor names differ: {sorted(a.keys() ^ b.keys())}")
    for name in a:
        if a[name].dtype != b[name].dtype or a[name].tobytes() != b[name].tobytes():
            raise AssertionError(f"tensor {name} differs after the round trip")
    return len(a)


def run_demo(workdir: str | Path | None = None, echo=print) -> dict:
    """Runs the round trip in `workdir` (a fresh temporary folder by default); returns the results."""
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="cptjax-demo-"))
    workdir = Path(workdir)
    config = ModelConfig.from_hf_config(DEMO_HF_CONFIG, "the demo config")
    model = Llama(config, rngs=nnx.Rngs(0))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    source = workdir / "hf_source"
    source.mkdir(parents=True)
    write_hf_dir(source, config, lambda path: _lookup(params, path), dtype="float32")
    echo(f"1. wrote a random {sum(a.size for a in jax.tree.leaves(params)):,}-parameter "
         f"{config.hf_architecture} to {source}")

    checkpoint = hf_to_orbax(source, workdir / "checkpoint")
    echo(f"2. converted it to a cptjax (Orbax) checkpoint: {checkpoint}")
    result = orbax_to_hf(checkpoint, workdir / "hf_export", dtype="float32", verify=torch_available())
    echo(f"3. exported it back to Hugging Face format: {result.out} ({', '.join(result.files)})")

    compared = _tensors_equal(source, result.out)
    echo(f"4. all {compared} tensors are bit-identical after HF -> Orbax -> HF")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(2, 96))
    logits = [np.asarray(load_model(p).logits(tokens)) for p in (source, checkpoint, result.out)]
    diff = max(float(np.max(np.abs(logits[0] - other))) for other in logits[1:])
    echo(f"5. cptjax logits from the source, the checkpoint and the export agree (max diff {diff:.1e})")
    if result.max_logit_diff is not None:
        echo(f"6. transformers loads the export; its logits differ from cptjax's by at most "
             f"{result.max_logit_diff:.1e}")
    else:
        echo("6. transformers check skipped: torch is not installed (pip install torch to run it)")
    return {"workdir": str(workdir), "tensors": compared, "cptjax_logit_diff": diff,
            "transformers_logit_diff": result.max_logit_diff}


if __name__ == "__main__":
    print(json.dumps(run_demo(), indent=2))
