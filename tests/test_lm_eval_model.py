"""The "cptjax" lm-evaluation-harness model against lm-eval's own `hf` backend (transformers' PyTorch
model): the same tiny random model, the same local tasks (multiple choice with few-shot examples,
rolling log-likelihood over texts longer than max_length, greedy generation with stop sequences)."""

import json
import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import hf_models
import numpy as np
import pytest
import tiny_configs
from data_helpers import tokenizer_dir
from lm_eval_tasks import write_tasks
from run_helpers import ENV, cli
from transformers import AutoTokenizer

from cptjax.measure.generate import generate_ids
from cptjax.model.decode import Sampling, decode
from cptjax.train.lm_eval_model import CptjaxLM
from cptjax.train.model_on_mesh import ModelOnMesh, bucket_length

MAX_LENGTH = 48  # short: contexts are truncated from the left and texts span several rolling windows
TASKS = ("tiny_mc", "tiny_rolling", "tiny_gen")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama in an HF folder, with a BOS-adding tokenizer."""
    tok_dir = tokenizer_dir("llama")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    hf = dict(tiny_configs.shrunk_config("llama-3.2-1b"), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = hf_models.save_hf_model(hf, tmp_path_factory.mktemp("lm_eval") / "hf")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three YAML tasks over JSON Lines files, all written here."""
    return write_tasks(tmp_path_factory.mktemp("tasks"))


def _run(model, model_args, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS),
                           task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                           log_samples=True, bootstrap_iters=0, batch_size=4, device="cpu")


def _responses(results, task):
    return {s["doc_id"]: s["resps"] for s in results["samples"][task]}


@pytest.mark.slow
def test_cptjax_matches_the_hf_backend(model_dir, task_dir):
    pytest.importorskip("accelerate", reason="lm-eval's hf backend (the ground truth) imports accelerate; "
                        "pip install -e '.[test]'")
    ours = _run("cptjax", f"path={model_dir},dtype=float32,max_length={MAX_LENGTH}", task_dir)
    hf = _run("hf", f"pretrained={model_dir},dtype=float32,max_length={MAX_LENGTH}", task_dir)

    mc_ours, mc_hf = _responses(ours, "tiny_mc"), _responses(hf, "tiny_mc")
    assert sorted(mc_ours) == sorted(mc_hf) == list(range(8))
    for doc in mc_hf:  # one [(log-likelihood, is_greedy)] per choice
        assert len(mc_ours[doc]) == len(mc_hf[doc]) == 3
        for [(a, greedy_a)], [(b, greedy_b)] in zip(mc_ours[doc], mc_hf[doc]):
            assert abs(a - b) < 1e-4, (doc, a, b)
            assert greedy_a == greedy_b
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == hf["results"]["tiny_mc"][metric]

    rolling_ours, rolling_hf = _responses(ours, "tiny_rolling"), _responses(hf, "tiny_rolling")
    for doc in rolling_hf:
        a, b = rolling_ours[doc][0][0], rolling_hf[doc][0][0]
        assert abs(a - b) < 1e-4, (doc, a, b)
    assert min(len(t["doc"]["text"]) for t in ours["samples"]["tiny_rolling"]) > 3 * MAX_LENGTH  # several windows

    gen_ours, gen_hf = _responses(ours, "tiny_gen"), _responses(hf, "tiny_gen")
    assert gen_ours == gen_hf
    assert any(r[0][0].strip() for r in gen_ours.values())  # something was generated, not only stops
    assert ours["results"]["tiny_gen"]["exact_match,none"] == hf["results"]["tiny_gen"]["exact_match,none"]


def test_left_padded_batches_decode_as_single_prompts(model_dir):
    """Prompts of different lengths in one batch (left-padded, padding at position -1) give the
    tokens each gives alone."""
    import jax.numpy as jnp
    from flax import nnx

    from cptjax import load_model

    model = load_model(model_dir)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 500, size=n) for n in (5, 11, 16)]
    sampling = Sampling(max_new_tokens=8)
    alone = [generate_ids(model, p[None], sampling)[0] for p in prompts]
    padded = np.zeros((3, 16), np.int32)
    for row, p in enumerate(prompts):
        padded[row, 16 - len(p):] = p
    out, steps = decode(nnx.merge(*nnx.split(model.model)), jnp.asarray(padded),
                        jnp.asarray([len(p) for p in prompts], jnp.int32), sampling=sampling, eos=())
    assert np.asarray(out)[:, :int(steps)].tolist() == alone


def test_bucket_lengths_are_few():
    assert [bucket_length(n, 200) for n in (1, 16, 17, 33, 100, 129, 200)] == [16, 16, 32, 64, 128, 200, 200]


def test_in_process_model_scores_as_the_loaded_one(model_dir):
    """A trainer's live parameters (ModelOnMesh built from arrays in memory) score as `path=` does."""
    loaded = CptjaxLM(path=str(model_dir), max_length=MAX_LENGTH, batch_size=2)
    live = CptjaxLM(model=ModelOnMesh(loaded.model.config, loaded.model.graphdef, loaded.model.params,
                                      loaded.model.mesh, batch_size=4), tokenizer=loaded.tokenizer,
                    max_length=MAX_LENGTH)
    assert live.model.batch_size == 4
    sequences = [list(range(3, 3 + n)) for n in (10, 30, 49)]
    assert loaded.model.score(sequences, [3, 5, 48]) == live.model.score(sequences, [3, 5, 48])


@pytest.mark.slow
def test_lm_eval_command_line_runs_the_cptjax_model(model_dir, task_dir, tmp_path):
    """lm-eval's own command line (its argument parsing, model lookup and output files) with the
    "cptjax" model: through `cptjax lm-eval` (lm-eval 0.4.13 has no plugin discovery)."""
    out = cli("lm-eval", "--model", "cptjax", "--model_args", f"path={model_dir},max_length={MAX_LENGTH}",
              "--tasks", "tiny_mc", "--include_path", task_dir, "--limit", 3, "--output_path", tmp_path / "out",
              "--log_samples")
    assert "tiny_mc" in out and "acc" in out
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    assert results["config"]["model"] == "cptjax" and 0 <= results["results"]["tiny_mc"]["acc,none"] <= 1


def test_entry_point_names_the_model_class():
    """pyproject.toml's `lm_eval.models` entry point (how lm-eval releases after 0.4.13 discover
    plugins) names CptjaxLM, as installed package metadata says."""
    code = ("from importlib.metadata import entry_points, EntryPoint;"
            "print(entry_points(group='lm_eval.models')['cptjax'].value)")
    venv_python = Path(__file__).parents[1] / ".venv" / "bin" / "python"
    if venv_python.exists():  # the editable install of this checkout (README: tests from a venv)
        value = subprocess.run([str(venv_python), "-c", code], capture_output=True, text=True, env=ENV,
                               check=True).stdout.strip()
    else:
        value = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
            "project"]["entry-points"]["lm_eval.models"]["cptjax"]
    assert value == "cptjax.train.lm_eval_model:CptjaxLM"
    assert EntryPoint("cptjax", value, "lm_eval.models").load() is CptjaxLM


@pytest.mark.slow
def test_cptjax_eval_tasks_compares_models_side_by_side(model_dir, task_dir, tmp_path):
    """`cptjax eval --tasks`: two models (the base and another with different weights) on a task
    YAML; the table gives each score and the difference from the base, as eval.json records."""
    other = hf_models.save_hf_model(json.loads((model_dir / "config.json").read_text()), tmp_path / "other", seed=1)
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(other)
    out = cli("eval", "--model", model_dir, "--model", other, "--tasks", task_dir / "tiny_mc.yaml", "--limit", 4,
              "--num-fewshot", 1, "--out", tmp_path / "report")
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    base, tuned = (report["tasks"][str(m)]["tiny_mc"]["acc"] for m in (model_dir, other))
    assert f"| tiny_mc | acc | {base:.4f} | {tuned:.4f} | {tuned - base:+.4f} |" in out
    assert set(report["tasks"][str(model_dir)]["tiny_mc"]) == {"acc", "acc_norm"}


@pytest.mark.slow  # lm-eval indexes its ~10k built-in task files for each check (20-40 s here)
@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "--tasks no_such_task: not an lm-eval task"),
    (["--tasks", "missing.yaml"], "--tasks missing.yaml: no such task file"),
    (["--limit", "3"], "--limit / --num-fewshot: only with --tasks"),
])
def test_cptjax_eval_tasks_bad_input_is_one_line(model_dir, args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "cptjax.cli", "eval", "--model", str(model_dir), *args],
                            capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"cptjax: error: {lines[-1].removeprefix('cptjax: error: ')}" and message in lines[-1]
    assert len([line for line in lines if "error" in line.lower()]) == 1
