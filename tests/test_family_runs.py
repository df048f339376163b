"""A continued-pretraining run of each model family beyond Llama, through the real CLI: it starts
from the family's HF folder, is killed with SIGKILL mid-run, resumes and ends bit-identical to a run
never killed, its export loads in transformers with the logits cptjax computes for that step, and
(where a family's tensors differ: tied, fused, experts) `cptjax merge` and `cptjax report` work on it.

The tiny models are test_families.py's shapes (Gemma 2 with its published caps, Gemma 3 with its
5:1 pattern and two RoPE bases, OLMo 2, Phi-3 with fused tensors, Qwen2 with max_window_layers
below its depth), with rows (32 tokens) longer than their sliding window (12); and a Mixtral on 4
simulated devices with its 8 experts split over them (mesh.expert 4), logging the router's
losses and each layer's expert loads.
"""

import json
import signal

import hf_models
import numpy as np
import pytest
import tiny_configs
import yaml
from data_helpers import STDLIB, tokenizer_dir
from run_helpers import Watcher, cli, records, restore_arrays, start, steps
from tokenizers import Tokenizer

from cptjax import load_model

FAMILIES = {"gemma2": "gemma-2-2b", "gemma3": "gemma3-scaled", "olmo2": "olmo-2-1124-7b", "phi3": "phi3-gqa",
            "qwen2-mixed": "qwen2-mixed", "mixtral": "mixtral-8x7b-v0.1"}
STEPS = 6
# The families whose tensors a merge handles its own way: tied embeddings (Gemma), fused q/k/v and
# gate/up (Phi-3), experts (Mixtral); the report's Experts section (Mixtral). The others' merges and
# reports are Llama's, tested in test_merge.py and test_report.py.
MERGED_AND_REPORTED = ("gemma2", "gemma3", "phi3", "mixtral")
# The MoE run: 4 simulated devices, the 8 experts split over them (mesh.expert 4), a row each.
MOE = {"env": {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
       "config": {"mesh": {"data": 1, "expert": 4}, "training": {"batch_size": 4}}}


def _config(tmp_path, model, tokenizer, run_dir, moe: bool) -> str:
    raw = {
        "run_dir": str(run_dir),
        "model": {"init_from": str(model), "tokenizer": str(tokenizer), "compute_dtype": "float32"},
        "data": {"sources": [{"name": "code", "type": "text", "paths": [str(STDLIB / "json" / "*.py")]}], "seed": 5},
        "training": {"steps": STEPS, "batch_size": 2, "seq_len": 32},
        "schedule": {"peak_lr": 3e-3, "warmup": 2, "end_lr": 3e-4},
        "checkpoint": {"every": 2, "keep_last": 3},
        "logging": {"every": 1, "progress": "lines"},
    }
    for section, values in (MOE["config"] if moe else {}).items():
        raw[section] = {**raw.get(section, {}), **values}
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cpt_run_resumes_exactly_after_a_kill_and_exports_for_transformers(family, tmp_path):
    tokenizer = tokenizer_dir("llama")
    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    hf = dict(tiny_configs.shrunk_config(FAMILIES[family]), vocab_size=vocab)
    model = hf_models.save_hf_model(hf, tmp_path / "hf")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    moe = family == "mixtral"
    env = MOE["env"] if moe else None
    out = cli("train", "--config", _config(tmp_path, model, tokenizer, straight, moe), env=env)
    assert f"finished at step {STEPS}" in out

    config = _config(tmp_path, model, tokenizer, killed, moe)
    watcher = Watcher(start("train", "--config", config, env=env))
    assert watcher.wait_for(f"step 5/{STEPS}"), "".join(watcher.lines)[-3000:]
    watcher.process.kill()
    code, out = watcher.finish()
    assert code == -signal.SIGKILL, out[-3000:]  # killed mid-run, not after it ended
    assert steps(killed / "checkpoints")[-1] < STEPS
    out = cli("train", "--config", config, env=env)
    assert "resum" in out.lower() and f"finished at step {STEPS}" in out

    key = lambda run: [(r["step"], r["loss"], r.get("router")) for r in records(run, "train")]  # noqa: E731
    assert key(killed) == key(straight) and [s for s, _, _ in key(killed)] == list(range(1, STEPS + 1))
    if moe:  # the router's losses and each layer's expert loads, every step
        router = records(killed, "train")[-1]["router"]
        load = np.asarray(router["expert_load"])
        assert load.shape == (hf["num_hidden_layers"], hf["num_local_experts"])
        assert np.allclose(load.sum(-1), 1, atol=1e-4)
        assert router["aux_loss"] >= 1 - 1e-4 and len(router["load_entropy"]) == hf["num_hidden_layers"]
    for item in ("params", "opt_state"):
        a, b = (restore_arrays(run / "checkpoints" / str(STEPS) / item) for run in (straight, killed))
        assert len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    export = tmp_path / "export"
    cli("convert", "orbax-to-hf", "--ckpt", killed, "--out", export, env=env)
    exported = json.loads((export / "config.json").read_text())
    assert exported["model_type"] == hf["model_type"] and exported["architectures"] == hf["architectures"]
    tokens = np.random.default_rng(0).integers(3, vocab, size=(2, 40))  # longer than the window
    theirs = hf_models.hf_logits(hf_models.load_hf_model(export), tokens)
    ours = np.asarray(load_model(killed, dtype="float32").logits(tokens))
    assert np.max(np.abs(ours - theirs)) < 1e-4
    before = hf_models.hf_logits(hf_models.load_hf_model(model), tokens)
    assert np.max(np.abs(theirs - before)) > 1e-2  # the run trained the model the export holds

    if family not in MERGED_AND_REPORTED:
        return
    # Merging back toward the base (tied, fused and per-expert tensors) and the run's report.
    merged = tmp_path / "merged"
    cli("merge", "--base", model, "--tuned", killed, "--alpha", "0.5", "--format", "hf", "--out", merged, env=env)
    halfway = hf_models.load_hf_model(merged).state_dict()
    ends = [hf_models.load_hf_model(folder).state_dict() for folder in (model, export)]
    for name, value in halfway.items():  # the linear merge, tensor by tensor (fused ones included)
        expected = (ends[0][name].double() + ends[1][name].double()) / 2
        assert np.allclose(value.double().numpy(), expected.numpy(), rtol=0, atol=1e-6), name
    cli("report", killed, env=env)
    report = killed / f"report-step{STEPS}"
    assert list(report.glob("*.png"))
    if moe:  # the routing section and its figure
        assert "## Experts" in (report / "report.md").read_text() and (report / "experts.png").is_file()
