"""`cptjax eval`: models on held-out sets given on the command line, against transformers."""

import json
import math
import shutil

import hf_models
import numpy as np
import pytest
import torch
from data_helpers import STDLIB, corpus_files, tokenizer_dir

from cptjax.cli import main
from cptjax.measure.eval_models import load_eval_data, parse_eval_spec

CODE = f"code=text:{STDLIB}/json/decoder.py,{STDLIB}/json/scanner.py"


def _wiki():
    return "wiki={type: jsonl, paths: [%s], max_docs: 3}" % corpus_files()["wiki_jsonl"]


@pytest.fixture(scope="module")
def model_dirs(tiny_hf, tmp_path_factory):
    """Two tiny Llamas (different seeds) with a real 512-token BPE tokenizer beside the weights."""
    root = tmp_path_factory.mktemp("eval")
    tokenizer = tokenizer_dir("llama", 512)
    config = json.loads((tiny_hf("llama-3.2-1b") / "config.json").read_text())
    dirs = []
    for seed in (0, 1):
        folder = hf_models.save_hf_model(config, root / f"model{seed}", seed=seed)
        for f in tokenizer.iterdir():
            shutil.copy(f, folder / f.name)
        dirs.append(folder)
    return dirs


def _transformers_sums(hf_dir, batches):
    """NLL (nats), targets and bytes of transformers' model on exactly the packed tokens: each
    packed document (segment) run alone, its positions restarting at 0 as in the row."""
    model = hf_models.load_hf_model(hf_dir)
    nll = tokens = num_bytes = 0.0
    for batch in batches:
        num_bytes += float(np.sum(batch["num_bytes"]))
        for r in range(batch["inputs"].shape[0]):
            for seg in np.unique(batch["segment_ids"][r]):
                if seg == 0:
                    continue
                where = batch["segment_ids"][r] == seg
                assert np.array_equal(batch["positions"][r][where], np.arange(where.sum()))
                with torch.no_grad():
                    logits = model(torch.as_tensor(batch["inputs"][r][where][None], dtype=torch.long)).logits
                logp = torch.log_softmax(logits[0].double(), dim=-1).numpy()
                targets = batch["targets"][r][where]
                mask = batch["loss_mask"][r][where]
                nll -= float(np.sum(logp[np.arange(len(targets)), targets] * mask))
                tokens += float(mask.sum())
    return nll, tokens, num_bytes


@pytest.mark.slow
def test_eval_of_an_hf_folder_matches_transformers_on_the_same_tokens(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model_dirs[0]), "--data", CODE, "--data", _wiki(),
                 "--seq-len", "64", "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    results = report["models"][str(model_dirs[0])]
    assert (out / "eval.md").read_text() in printed

    data = load_eval_data([parse_eval_spec(CODE), parse_eval_spec(_wiki())], model_dirs[0], seq_len=64,
                          batch_size=4)
    for name in ("code", "wiki"):
        nll, tokens, num_bytes = _transformers_sums(model_dirs[0], data.sets[name])
        assert results[name]["tokens"] == tokens > 1000
        assert abs(results[name]["loss"] - nll / tokens) <= 1e-4 * nll / tokens, name
        bpb = nll / math.log(2) / num_bytes
        assert abs(results[name]["bits_per_byte"] - bpb) <= 1e-4 * bpb, name
    # Rows hold several documents, and documents continue across rows: the packing was exercised.
    batches = data.sets["wiki"]
    assert any(b["segment_ids"].max() > 1 for b in batches)
    assert sum(float(b["loss_mask"].sum()) for b in batches) == results["wiki"]["tokens"]


@pytest.mark.slow
def test_two_models_are_compared_and_each_result_is_its_own_eval(model_dirs, tmp_path, capsys):
    base, other = map(str, model_dirs)
    common = ["--data", _wiki(), "--data", CODE, "--domain", "code", "--seq-len", "32", "--batch-size", "2"]
    assert main(["eval", "--model", base, "--model", other, *common, "--out", str(tmp_path / "both")]) == 0
    assert main(["eval", "--model", other, *common, "--out", str(tmp_path / "alone")]) == 0
    both = json.loads((tmp_path / "both" / "eval.json").read_text())
    alone = json.loads((tmp_path / "alone" / "eval.json").read_text())
    assert both["models"][other] == alone["models"][other]  # the same program on the same weights
    assert both["reference"] == base and both["domain_sets"] == ["code"]
    rows = {r["set"]: r for r in both["comparisons"][other]}
    code, wiki = both["models"], rows["wiki"]
    assert rows["code"]["measure"] == "adaptation" and wiki["measure"] == "forgetting"
    assert rows["code"]["amount"] == pytest.approx(code[base]["code"]["loss"] - code[other]["code"]["loss"])
    assert wiki["amount"] == pytest.approx(code[other]["wiki"]["loss"] - code[base]["wiki"]["loss"])
    assert abs(wiki["amount"]) > 1e-3  # different weights: the comparison is not vacuous
    markdown = (tmp_path / "both" / "eval.md").read_text()
    assert "adaptation" in markdown and "forgetting" in markdown and f"{wiki['amount']:+.4f}" in markdown


def test_eval_specs_short_and_yaml_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    short = parse_eval_spec("code=text:held/*.py,more/a.py")
    assert short.name == "code" and short.type == "text"
    assert short.paths == (str(tmp_path / "held/*.py"), str(tmp_path / "more/a.py"))  # absolute
    long = parse_eval_spec("web={type: jsonl, paths: [w.jsonl], text_field: body, max_docs: 7}")
    assert (long.type, long.text_field, long.max_docs) == ("jsonl", "body", 7)
    tfds = parse_eval_spec("wiki={type: tfds, dataset: wikitext, split: test}")
    assert tfds.dataset == "wikitext" and tfds.paths == ()


@pytest.mark.parametrize("spec, expected", [
    ("code", "expected NAME=SPEC"),
    ("code=", "expected NAME=SPEC"),
    ("code=held/*.py", "expected TYPE:PATHS"),
    ("code=csv:held.csv", "code.type"),
    ("code={type: jsonl, paths: [a.jsonl], max_doc: 3}", "did you mean 'max_docs'"),
    ("code={type: jsonl", "not a valid YAML mapping"),
    ("code={type: jsonl, paths: [a], max_docs: 0}", "max_docs: must be a positive integer"),
])
def test_bad_eval_specs_get_one_line(spec, expected, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--data", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cptjax: error: ") and expected in err[0], err


@pytest.mark.slow
def test_bad_models_and_empty_sets_get_one_line_and_write_nothing(model_dirs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.py").write_text("")
    (tmp_path / "not_a_model").mkdir()
    cases = [
        (["--model", str(tmp_path / "not_a_model"), "--data", CODE],
         "neither an HF model folder (no config.json) nor a cptjax checkpoint"),
        (["--model", str(model_dirs[0]), "--data", f"code=text:{tmp_path}/empty/*.py"],
         "--data code: no documents with text"),
        (["--model", str(model_dirs[0]), "--data", f"code=text:{tmp_path}/nowhere/*.py"], "--data code.paths"),
        (["--model", f"{model_dirs[0]}@3", "--data", CODE], "is an HF folder, which has no steps"),
        (["--model", str(model_dirs[0]), "--data", CODE, "--domain", "wiki"], "--domain wiki: no eval set"),
    ]
    for args, expected in cases:
        capsys.readouterr()
        assert main(["eval", *args, "--out", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cptjax: error: ") and expected in err[0], (args, err)
        assert not (tmp_path / "out").exists()
