"""`cptjax train` end to end, as users run it: the real CLI in a subprocess, the real Grain pipeline
on real text (Python's own sources and WikiText-2), a real tokenizer."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer

import hf_models
import tiny_configs
from data_helpers import STDLIB, corpus_files, tokenizer_dir


def _cli(*args, cwd=None):
    result = subprocess.run([sys.executable, "-m", "cptjax.cli", *args], capture_output=True, text=True,
                            cwd=cwd, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def cpt_config(tmp_path_factory):
    """A config for a small CPT run on real text: a tiny Llama, code with English replay."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = tokenizer_dir("llama")
    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    model = hf_models.save_hf_model(dict(tiny_configs.shrunk_config("llama-3.2-1b"), vocab_size=vocab),
                                    root / "hf")
    raw = {
        "run_dir": "unset",
        "model": {"init_from": str(model), "tokenizer": str(tokenizer), "compute_dtype": "float32"},
        "data": {"sources": [
            {"name": "code", "type": "text", "paths": [str(STDLIB / "json" / "*.py")], "weight": 0.9},
            {"name": "english", "type": "jsonl", "paths": [str(corpus_files()["wiki_jsonl"])], "weight": 0.1}],
            "eval_sets": [{"name": "code", "type": "text", "paths": [str(STDLIB / "email" / "mime" / "*.py")]}],
            "seed": 3},
        "training": {"steps": 40, "batch_size": 4, "seq_len": 64},
        "schedule": {"peak_lr": 3e-3, "warmup": 4, "end_lr": 3e-4},
        "checkpoint": {"every": 10, "keep_last": 5},
        "eval": {"every": 20},
        "logging": {"every": 1, "progress": "lines"},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _records(run_dir, kind):
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_resume_through_the_cli_and_real_pipeline_is_bit_exact(cpt_config, tmp_path):
    """20 steps, stop, 20 more gives the same run as 40 straight: every logged loss, every eval,
    every parameter and the optimizer state, bit for bit (the same program on the same machine)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    _cli("train", "--config", str(cpt_config), "--set", f"run_dir={straight}")
    paused = _cli("train", "--config", str(cpt_config), "--set", f"run_dir={split}", "--until-step", "20")
    assert "stopped at step 20" in paused
    resumed = _cli("train", "--config", str(cpt_config), "--set", f"run_dir={split}")
    assert "resumed from step 20" in resumed and "finished at step 40" in resumed

    def losses(run_dir):
        return [(r["step"], r["loss"], r["source_loss"], r["source_tokens"]) for r in _records(run_dir, "train")]
    assert losses(straight) == losses(split)
    assert [s for s, *_ in losses(split)] == list(range(1, 41))
    evals = lambda d: [(r["step"], r["code"]) for r in _records(d, "eval")]  # noqa: E731
    assert evals(straight) == evals(split) and [s for s, _ in evals(split)] == [0, 20, 40]
    # the run learned: real text, real mixture
    assert evals(split)[-1][1]["loss"] < evals(split)[0][1]["loss"]

    for item in ("params", "opt_state"):
        a, b = (_restore(d / "checkpoints" / "40" / item) for d in (straight, split))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)


def _restore(path) -> list[np.ndarray]:
    """Every array of one saved item, as NumPy, in a fixed order."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.restore(path)
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_one_step_convention_for_logs_stages_and_schedule(cpt_config, tmp_path):
    """Step N is the N-th update everywhere: a data stage with start_step 6 and the re-warm that
    cycles derives from it both show first in the record labelled step 6."""
    run_dir = tmp_path / "run"
    out = _cli("train", "--config", str(cpt_config), "--set", f"run_dir={run_dir}",
               "--set", "training.steps=8", "--set", "data.stages=[{start_step: 6, weights: [0, 2]}]",
               "--set", "schedule={kind: cycles, peak_lr: 0.001, warmup: 2, end_lr: 0.0001}",
               "--set", "eval.at_start=false")
    # weights that do not sum to 1 are normalized, and the run says so
    assert "data.stages[0].weights: 0 + 2 = 2, normalized to 0, 1" in out
    train = {r["step"]: r for r in _records(run_dir, "train")}
    assert sorted(train) == list(range(1, 9))
    assert train[5]["source_share"]["code"] > 0.5 and train[6]["source_share"] == {"code": 0.0, "english": 1.0}
    # stage 1 (steps 1-5): warmup 2 -> steps 1, 2 at peak/2, peak; stage 2 re-warms at step 6
    assert train[1]["learning_rate"] == pytest.approx(5e-4, rel=1e-6)
    assert train[2]["learning_rate"] == pytest.approx(1e-3, rel=1e-6)
    assert train[5]["learning_rate"] == pytest.approx(1e-4, rel=1e-6)
    assert train[6]["learning_rate"] == pytest.approx(5e-4, rel=1e-6)
    assert train[7]["learning_rate"] == pytest.approx(1e-3, rel=1e-6)
    assert "z_loss" not in train[6]  # optimizer.z_loss is 0: no such term, no such field
