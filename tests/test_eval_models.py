"""`cptjax eval`: models on held-out sets given on the command line, against transformers."""

import json
import math
import shutil

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from data_helpers import STDLIB, corpus_files, tokenizer_dir

from cptjax.cli import main
from cptjax.data.passkey import RetrievalConfig, make_prompts, probe_batches
from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec
from cptjax.io.pretrained import load_model
from cptjax.io.weights import open_weights
from cptjax.measure.eval_models import load_eval_data, parse_eval_spec, parse_retrieval
from cptjax.measure.generate import Sampling, generate_ids
from cptjax.model.sharding import MeshConfig
from cptjax.train.retrieval import build_probe
from cptjax.train.step import build_eval_setup

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


def _transformers_sums(model, batches, edges):
    """NLL (nats), targets and bytes of transformers' model on exactly the packed tokens: each
    packed document (segment) run alone, its positions restarting at 0 as in the row; and the NLL
    and targets per position bucket (upper `edges`), counted position by position."""
    nll = tokens = num_bytes = 0.0
    bucket_nll, bucket_tokens = np.zeros(len(edges)), np.zeros(len(edges))
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
                bucket = np.searchsorted(edges, np.arange(len(targets)), side="right")  # by position
                np.add.at(bucket_nll, bucket, -logp[np.arange(len(targets)), targets] * mask)
                np.add.at(bucket_tokens, bucket, mask)
    return nll, tokens, num_bytes, bucket_nll, bucket_tokens


def _transformers_probe(model, prompts):
    """Per prompt: whether transformers' argmax is every answer token (fed the prompt), and the
    answer's mean NLL per token."""
    out = []
    for p in prompts:
        with torch.no_grad():
            logits = model(torch.as_tensor(p.ids[None, :-1], dtype=torch.long)).logits[0, -p.answer:]
        logp = torch.log_softmax(logits.double(), dim=-1).numpy()
        answer = p.ids[-p.answer:]
        out.append((bool(np.all(logp.argmax(-1) == answer)), -float(np.mean(logp[np.arange(p.answer), answer]))))
    return out


@pytest.mark.slow
def test_eval_of_an_hf_folder_matches_transformers_on_the_same_tokens(model_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    probe = "{lengths: [48, 64], depths: [0, 0.5, 1], samples: 2}"
    assert main(["eval", "--model", str(model_dirs[0]), "--data", CODE, "--data", _wiki(), "--position-buckets",
                 "8,40", "--retrieval", probe, "--seq-len", "64", "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "eval.json").read_text())
    results = report["models"][str(model_dirs[0])]
    assert (out / "eval.md").read_text() in printed

    data = load_eval_data([parse_eval_spec(CODE), parse_eval_spec(_wiki())], model_dirs[0], seq_len=64,
                          batch_size=4)
    model = hf_models.load_hf_model(model_dirs[0])
    for name in ("code", "wiki"):
        nll, tokens, num_bytes, bucket_nll, bucket_tokens = _transformers_sums(model, data.sets[name], (8, 40, 64))
        assert results[name]["tokens"] == tokens > 1000
        assert abs(results[name]["loss"] - nll / tokens) <= 1e-4 * nll / tokens, name
        bpb = nll / math.log(2) / num_bytes
        assert abs(results[name]["bits_per_byte"] - bpb) <= 1e-4 * bpb, name
        # Loss by position in the document: the same targets, bucket by bucket.
        labels = ["0-8", "8-40", "40-64"]
        assert list(results[name]["position_loss"]) == labels
        assert [results[name]["position_tokens"][b] for b in labels] == bucket_tokens.tolist(), name
        assert bucket_tokens.min() > 0 and sum(bucket_tokens) == tokens
        for label, n, t in zip(labels, bucket_nll, bucket_tokens):
            assert abs(results[name]["position_loss"][label] - n / t) <= 1e-4 * n / t, (name, label)
        assert f"| {results[name]['position_loss']['40-64']:.4f} |" in printed

    # The pass-key probe: accuracy and answer NLL per cell, as transformers scores the same prompts.
    tokenizer = DocumentTokenizer(load_tokenizer_spec(model_dirs[0]))
    prompts = make_prompts(parse_retrieval(probe), tokenizer)
    expected = _transformers_probe(model, prompts)
    cells = report["retrieval"][str(model_dirs[0])]["cells"]
    assert [(c["length"], c["depth"]) for c in cells] == [(n, d) for n in (48, 64) for d in (0, 0.5, 1)]
    for cell in cells:
        mine = [e for p, e in zip(prompts, expected) if (p.length, p.depth) == (cell["length"], cell["depth"])]
        assert cell["accuracy"] == np.mean([ok for ok, _ in mine])
        nll = np.mean([n for _, n in mine])
        assert abs(cell["answer_nll"] - nll) <= 1e-4 * nll, cell
    assert "## Pass-key retrieval" in printed and "| depth 0 | depth 0.5 | depth 1 |" in printed
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


def test_models_with_different_tokenizers_are_compared_in_bits_per_byte(model_dirs, tmp_path, capsys):
    """A model with an extended vocabulary (`cptjax vocab extend`) beside its base: each scores the sets
    tokenized by its own tokenizer, and the comparison is per byte, with a note on loss per token."""
    base = str(model_dirs[0])
    assert main(["vocab", "extend", "--tokenizer", base, "--corpus", f"{STDLIB}/json/*.py", "--new-tokens", "32",
                 "--out", str(tmp_path / "tokenizer")]) == 0
    vocab_size = json.loads((tmp_path / "tokenizer" / "vocab_extension.json").read_text())["vocab_size"]
    config = dict(json.loads((model_dirs[0] / "config.json").read_text()), vocab_size=vocab_size)
    other = hf_models.save_hf_model(config, tmp_path / "extended", seed=1)
    for f in (tmp_path / "tokenizer").iterdir():
        shutil.copy(f, other / f.name)
    common = ["--data", CODE, "--seq-len", "32", "--batch-size", "2"]
    capsys.readouterr()
    assert main(["eval", "--model", base, "--model", str(other), *common, "--out", str(tmp_path / "both")]) == 0
    assert "loss per token and perplexity are not comparable" in capsys.readouterr().out
    both = json.loads((tmp_path / "both" / "eval.json").read_text())
    ours, theirs = both["models"][base]["code"], both["models"][str(other)]["code"]
    assert theirs["tokens"] < ours["tokens"]  # its own, longer tokens
    (row,) = both["comparisons"][str(other)]
    assert row["unit"] == "bits/byte"
    assert row["amount"] == pytest.approx(ours["bits_per_byte"] - theirs["bits_per_byte"])
    assert main(["eval", "--model", base, *common, "--out", str(tmp_path / "alone")]) == 0
    assert json.loads((tmp_path / "alone" / "eval.json").read_text())["models"][base]["code"] == ours


def test_the_probe_retrieves_exactly_what_greedy_decoding_generates(model_dirs):
    """A constructed case: with the model's own greedy continuation (KV-cache decoding, generate.py)
    as each prompt's answer, every prompt is retrieved; with the true keys, which a random model does
    not produce, none is. Two prompts per row, the batch run in two micro-batches."""
    config = RetrievalConfig(lengths=(64,), depths=(0.0, 0.5, 1.0), samples=2)
    with open_weights(model_dirs[0]) as weights:
        setup = build_eval_setup(weights.config, jnp.float32)
        params = weights.read_onto(setup.abstract_params)
    prompts = make_prompts(config, DocumentTokenizer(load_tokenizer_spec(model_dirs[0])))
    probe = build_probe(config, prompts, graphdef=setup.graphdef,
                        mesh=setup.mesh, rules=MeshConfig().rules,
                        param_shardings=jax.tree.map(lambda a: a.sharding, setup.abstract_params),
                        batch_sharding=setup.batch_sharding, seq_len=128, batch_size=4, micro_batches=2)
    truth = probe.run(params)
    model = load_model(model_dirs[0])
    greedy = [None] * len(probe.prompts)
    for answer in {p.answer for p in probe.prompts}:  # one generation per prompt shape
        rows = [i for i, p in enumerate(probe.prompts) if p.answer == answer]
        prompts = np.stack([probe.prompts[i].ids[:-answer] for i in rows])
        for i, new in zip(rows, generate_ids(model, prompts, Sampling(max_new_tokens=answer))):
            greedy[i] = np.asarray(new, np.int32)
    assert all(len(g) == p.answer for g, p in zip(greedy, probe.prompts))
    probe.batches = probe_batches(probe.prompts, seq_len=128, batch_size=4, answers=greedy)
    own = probe.run(params)
    assert own["accuracy"] == 1.0 and all(c["accuracy"] == 1.0 for c in own["cells"])
    assert truth["accuracy"] == 0.0
    for mine, true in zip(own["cells"], truth["cells"]):  # the argmax tokens are far likelier than a key
        assert mine["answer_nll"] < true["answer_nll"] - 1.0


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


@pytest.mark.parametrize("flags, expected", [
    (["--position-buckets", "40,8"], "--position-buckets [40, 8]: give increasing positive token positions"),
    (["--position-buckets", "4k"], "expected token positions such as 1024,4096"),
    (["--retrieval", "{lengths: [64], depth: [0]}"], "--retrieval.depth: unknown key; did you mean 'depths'?"),
    (["--retrieval", "{lengths: []}"], "--retrieval.lengths: give one or more prompt lengths"),
    (["--retrieval", "[64]"], "--retrieval: expected a YAML mapping"),
])
def test_bad_long_context_flags_get_one_line(flags, expected, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--data", CODE, *flags]) == 2
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
        (["--model", str(model_dirs[0]), "--data", CODE, "--seq-len", "32", "--retrieval", "{lengths: [48]}"],
         "--retrieval.lengths [48]: longer than the rows (32 tokens); raise --seq-len"),
        (["--model", str(model_dirs[0]), "--data", CODE, "--retrieval", "{lengths: [30]}"],
         "--retrieval.lengths: 30 tokens cannot hold the pass-key needle and question (48 tokens"),
    ]
    for args, expected in cases:
        capsys.readouterr()
        assert main(["eval", *args, "--out", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cptjax: error: ") and expected in err[0], (args, err)
        assert not (tmp_path / "out").exists()
