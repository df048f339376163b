"""`cptjax merge`: interpolated weights, exact at the ends, and a sweep that agrees with `cptjax eval`."""

import json
import shutil

import hf_models
import numpy as np
import pytest
import tiny_configs
from data_helpers import STDLIB, corpus_files, tokenizer_dir

from cptjax.cli import main
from cptjax.io.weights import open_weights
from cptjax.measure.merge import merge_tensor, slerp_weights

CODE = f"code=text:{STDLIB}/json/decoder.py"


def _wiki():
    return "wiki={type: jsonl, paths: [%s], max_docs: 2}" % corpus_files()["wiki_jsonl"]


def _hf(root, name, seed, **overrides):
    folder = hf_models.save_hf_model(dict(tiny_configs.shrunk_config("llama-3.2-1b"), **overrides),
                                     root / name, seed=seed)
    for f in tokenizer_dir("llama", 512).iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base (HF folder) and a 'tuned' model of the same shapes as a cptjax checkpoint."""
    root = tmp_path_factory.mktemp("merge")
    base = _hf(root, "base", seed=0)
    assert main(["convert", "hf-to-orbax", "--hf-dir", str(_hf(root, "tuned_hf", seed=1)),
                 "--out", str(root / "tuned")]) == 0
    return base, root / "tuned"


def _params(path):
    with open_weights(path) as weights:
        return weights.read()


def _leaves(params, prefix=()):
    for key, value in params.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


@pytest.mark.parametrize("fmt", ["hf", "checkpoint"])
@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_alpha_0_and_1_reproduce_the_models_bit_for_bit(fmt, method, models, tmp_path):
    base, tuned = models
    for alpha, source in (("0", base), ("1", tuned)):
        out = tmp_path / f"alpha{alpha}"
        assert main(["merge", "--base", str(base), "--tuned", str(tuned), "--alpha", alpha, "--method", method,
                     "--format", fmt, "--out", str(out)]) == 0
        merged, expected = dict(_leaves(_params(out))), dict(_leaves(_params(source)))
        assert merged.keys() == expected.keys()
        for path, array in expected.items():
            assert merged[path].dtype == array.dtype and np.array_equal(merged[path], array), path


def test_midpoints_linear_and_slerp(models, tmp_path):
    base, tuned = models
    b, t = dict(_leaves(_params(base))), dict(_leaves(_params(tuned)))
    for method in ("linear", "slerp"):
        out = tmp_path / method
        assert main(["merge", "--base", str(base), "--tuned", str(tuned), "--alpha", "0.3", "--method", method,
                     "--format", "hf", "--out", str(out)]) == 0
        merged = dict(_leaves(_params(out)))
        for path, array in merged.items():
            x, y = b[path].astype(np.float64).ravel(), t[path].astype(np.float64).ravel()
            if method == "linear":
                expected = 0.7 * x + 0.3 * y
            else:  # the textbook formula, in float64
                theta = np.arccos(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y))
                expected = (np.sin(0.7 * theta) * x + np.sin(0.3 * theta) * y) / np.sin(theta)
            np.testing.assert_allclose(array.ravel(), expected, rtol=1e-5, atol=1e-6, err_msg=str(path))
    assert (tmp_path / "linear" / "tokenizer.json").is_file()


def test_slerp_keeps_the_norm_of_orthogonal_unit_vectors_and_falls_back_when_parallel():
    a, b = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    np.testing.assert_allclose(merge_tensor(a, b, 0.5, "slerp", np.float32), [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    np.testing.assert_allclose(merge_tensor(a, b, 0.5, "linear", np.float32), [0.5, 0.5])
    parallel = 2 * a + 1e-4 * b
    assert slerp_weights(a, parallel, 0.5) is None
    assert np.array_equal(merge_tensor(a, parallel, 0.5, "slerp", np.float32),
                          merge_tensor(a, parallel, 0.5, "linear", np.float32))
    assert slerp_weights(np.zeros(3), np.ones(3), 0.5) is None  # biases and norms can be all zeros


@pytest.mark.slow
def test_sweep_agrees_with_cptjax_eval_on_the_same_merges(models, tmp_path, capsys):
    base, tuned = models
    sets = ["--eval", CODE, "--eval", _wiki(), "--seq-len", "48", "--batch-size", "2"]
    assert main(["merge", "--base", str(base), "--tuned", str(tuned), "--alpha", "0.5,1", "--method", "slerp",
                 "--max-forgetting", "0.5", *sets, "--out", str(tmp_path / "sweep")]) == 0
    numbers = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["alpha"] for p in numbers["points"]] == [0.0, 0.5, 1.0]  # the base is always measured
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Best alpha" in (tmp_path / "sweep" / "sweep.md").read_text()

    assert main(["merge", "--base", str(base), "--tuned", str(tuned), "--alpha", "0.5", "--method", "slerp",
                 "--format", "hf", "--out", str(tmp_path / "half")]) == 0
    for model, alpha in ((tmp_path / "half", 0.5), (base, 0.0), (tuned, 1.0)):
        out = tmp_path / f"eval{alpha}"
        assert main(["eval", "--model", str(model), "--data", CODE, "--data", _wiki(), "--seq-len", "48",
                     "--batch-size", "2", "--out", str(out)]) == 0
        evaluated = json.loads((out / "eval.json").read_text())["models"][str(model)]
        point = next(p for p in numbers["points"] if p["alpha"] == alpha)
        for name in ("code", "wiki"):
            # Same weights, same batches, same jitted eval step: equal up to float summation order.
            ours, theirs = point["results"][name], evaluated[name]
            assert ours["tokens"] == theirs["tokens"]
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6), (alpha, name)
            assert ours["bits_per_byte"] == pytest.approx(theirs["bits_per_byte"], rel=1e-6), (alpha, name)

    losses = {p["alpha"]: p["results"] for p in numbers["points"]}
    assert losses[0.5]["code"]["loss"] != losses[1.0]["code"]["loss"]  # the merges differ
    for p in numbers["points"]:
        assert p["adaptation"] == pytest.approx(losses[0.0]["code"]["loss"] - losses[p["alpha"]]["code"]["loss"])
        assert p["forgetting"] == pytest.approx(losses[p["alpha"]]["wiki"]["loss"] - losses[0.0]["wiki"]["loss"])
    allowed = [p for p in numbers["points"] if p["forgetting"] <= 0.5]
    assert numbers["best"]["alpha"] == max(allowed, key=lambda p: (p["adaptation"], p["alpha"]))["alpha"]


def _bad_inputs(models, root):
    base, tuned = models
    other_vocab = _hf(root, "vocab", seed=2, vocab_size=600)
    other_shape = _hf(root, "shape", seed=2, intermediate_size=96)
    (root / "empty").mkdir(exist_ok=True)
    (root / "empty" / "empty.py").write_text("")
    return [
        (["--base", str(root / "nothing"), "--tuned", str(tuned), "--alpha", "0.5"], "--base"),
        (["--base", str(root / "empty"), "--tuned", str(tuned), "--alpha", "0.5"],
         "neither an HF model folder (no config.json) nor a cptjax checkpoint"),
        (["--base", str(base), "--tuned", str(other_vocab), "--alpha", "0.5"],
         "vocabulary of 600 tokens, but --base has 512"),
        (["--base", str(base), "--tuned", str(other_shape), "--alpha", "0.5"],
         "intermediate_size is 96, but 160 in --base"),
        (["--base", str(base), "--tuned", str(tuned), "--alpha", "1.5"], "--alpha 1.5: must be in [0, 1]"),
        (["--base", str(base), "--tuned", str(tuned), "--alpha=-0.1,0.5"], "--alpha -0.1: must be in [0, 1]"),
        (["--base", str(base), "--tuned", str(tuned), "--alpha", "half"], "--alpha 'half': expected a number"),
        (["--base", str(base), "--tuned", str(tuned), "--alpha", "0,1"], "several alphas need --eval"),
        (["--base", str(base), "--tuned", str(tuned), "--alpha", "0,1", "--eval", f"code=text:{root}/empty/*.py",
          "--eval", _wiki()], "--eval code: no documents with text"),
        # the sweep's set-up is cptjax eval's (prepare_eval): the same checks, naming --eval
        (["--base", str(base), "--tuned", str(tuned), "--alpha", "0,1", "--eval", f"code=text:{root}/empty/*.py",
          "--eval", f"code=text:{root}/empty/*.py"], "--eval code: the name is used twice"),
        (["--base", str(base), "--tuned", str(tuned), "--alpha", "0,1", "--eval", _wiki().replace("wiki=", "code="),
          "--eval", _wiki(), "--seq-len", "100000"], "--seq-len 100000: exceeds --base's max_position_embeddings"),
        (["--base", str(base), "--tuned", str(tuned), "--alpha", "0,1", "--eval", _wiki()],
         "every eval set is a domain set"),
    ]


@pytest.mark.slow
def test_bad_merge_input_gets_one_line_and_writes_nothing(models, tmp_path, capsys):
    for args, expected in _bad_inputs(models, tmp_path):
        out = tmp_path / "out"
        capsys.readouterr()
        assert main(["merge", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cptjax: error: ") and expected in err[0], (args, err)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.slow
def test_eval_refuses_models_with_different_vocabularies(models, tmp_path, capsys):
    other = _hf(tmp_path, "vocab", seed=2, vocab_size=600)
    capsys.readouterr()
    assert main(["eval", "--model", str(models[0]), "--model", str(other), "--data", CODE,
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocabulary of 600 tokens, but" in err[0] and "cannot be compared" in err[0]
    assert not (tmp_path / "out").exists()
