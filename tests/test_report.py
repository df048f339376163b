"""`cptjax report` and the model card of an export, on a real short CPU run (the real pipeline on
real text: Python's sources with English replay, a mixture stage, held-out code and English)."""

import json
import re
import shutil

import hf_models
import numpy as np
import pytest
import tiny_configs
from data_helpers import STDLIB, corpus_files, tokenizer_dir
from matplotlib.image import imread
from tokenizers import Tokenizer

from cptjax.cli import main
from cptjax.train.config import config_from_dict, load_config
from cptjax.train.schedules import make_schedule
from cptjax.train.trainer import run

STEPS = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    tokenizer = tokenizer_dir("llama")
    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    model = hf_models.save_hf_model(dict(tiny_configs.shrunk_config("llama-3.2-1b"), vocab_size=vocab),
                                    root / "hf")
    wiki = str(corpus_files()["wiki_jsonl"])
    config = {
        "run_dir": str(root / "run"),
        "model": {"init_from": str(model), "tokenizer": str(tokenizer), "compute_dtype": "float32"},
        "data": {"sources": [
            {"name": "code", "type": "text", "paths": [str(STDLIB / "json" / "*.py")], "weight": 0.75},
            {"name": "english", "type": "jsonl", "paths": [wiki], "weight": 0.25}],
            "stages": [{"start_step": 7, "weights": [0.5, 0.5]}],
            "eval_sets": [{"name": "code", "type": "text", "paths": [str(STDLIB / "email" / "mime" / "*.py")]},
                          {"name": "english", "type": "jsonl", "paths": [wiki], "max_docs": 2}],
            "seed": 3},
        "training": {"steps": STEPS, "batch_size": 4, "seq_len": 64},
        "schedule": {"peak_lr": 3e-3, "warmup": 2, "end_lr": 3e-4},
        "checkpoint": {"every": 6, "keep_last": 2},
        "eval": {"every": 6, "retrieval": {"lengths": [40, 64], "depths": [0, 0.5, 1], "samples": 2}},
        "logging": {"every": 2, "progress": "lines"},
    }
    assert run(config_from_dict(config)).final_step == STEPS
    return root / "run"


def _records(run_dir, kind):
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _table_rows(markdown, first_header):
    """{first cell: [cells]} of the Markdown table whose header starts with `first_header`."""
    block = markdown.split(f"| {first_header} |", 1)[1].split("\n\n", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]
    return {row[0]: row for row in rows}


def _check_before_after(markdown, base, after):
    rows = _table_rows(markdown, "held-out set")
    assert set(rows) == {"code", "english"}
    for name, role in (("code", "domain"), ("english", "general")):
        cells = rows[name]
        b, a = base[name], after[name]
        assert cells[1] == role
        assert cells[2:5] == [f"{b['loss']:.4f}", f"{a['loss']:.4f}", f"{a['loss'] - b['loss']:+.4f}"]
        assert cells[5:7] == [f"{b['bits_per_byte']:.4f}", f"{a['bits_per_byte']:.4f}"]
        amount = b["loss"] - a["loss"] if role == "domain" else a["loss"] - b["loss"]
        assert cells[7 if role == "domain" else 8] == f"{amount:+.4f}"


def _check_mixture(markdown, train, up_to):
    rows = _table_rows(markdown, "source")
    tokens = {name: sum(r["source_tokens"][name] for r in train if r["step"] <= up_to) for name in rows}
    for name, cells in rows.items():
        assert cells[3] == f"{tokens[name]:,.0f}"
        assert cells[2] == f"{tokens[name] / sum(tokens.values()):.1%}"
    assert rows["code"][1] == "75.0% from step 1, 50.0% from step 7"


def _check_long_context(markdown, numbers, evals, probes):
    """Loss by position bucket (default doubling buckets of seq_len 64) and the pass-key probe, as
    the trainer logged them, in the report's text and report.json."""
    labels = ["0-1", "1-2", "2-4", "4-8", "8-16", "16-32", "32-64"]
    for name in ("code", "english"):
        for record in evals:
            summary = record[name]
            assert list(summary["position_loss"]) == labels
            # The buckets partition the set's targets: their token-weighted mean is the set's loss.
            tokens = [summary["position_tokens"][b] for b in labels]
            assert sum(tokens) == summary["tokens"]
            total = sum(summary["position_loss"][b] * t for b, t in zip(labels, tokens) if t)
            assert total / summary["tokens"] == pytest.approx(summary["loss"], rel=1e-5)
        assert numbers["position_loss"][name]["last"] == evals[-1][name]["position_loss"]
    assert "## Long context" in markdown
    rows = _table_rows(markdown.split("Held-out loss of `code` by position", 1)[1], "positions")
    first, last = evals[0]["code"]["position_loss"], evals[-1]["code"]["position_loss"]
    assert rows["32-64"][1:] == [f"{first['32-64']:.4f}", f"{last['32-64']:.4f}",
                                 f"{last['32-64'] - first['32-64']:+.4f}"]
    assert [p["step"] for p in probes] == [0, 6, 12]
    assert [(c["length"], c["depth"]) for c in probes[-1]["cells"]] == [(n, d) for n in (40, 64) for d in (0, 0.5, 1)]
    assert numbers["retrieval"] == [probes[0], probes[-1]]
    for probe in (probes[0], probes[-1]):
        text = markdown.split(f"Pass-key retrieval at step {probe['step']}: {probe['accuracy']:.0%}", 1)[1]
        rows = _table_rows(text, "prompt tokens")
        assert rows["64"][1:] == [f"{c['accuracy']:.0%} ({c['answer_nll']:.2f})" for c in probe["cells"]
                                  if c["length"] == 64]


@pytest.mark.slow
def test_report_numbers_match_the_logs_and_plots_are_images(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    out = run_dir / f"report-step{STEPS}"
    assert f"wrote {out}/report.md" in capsys.readouterr().out
    evals, train = _records(run_dir, "eval"), _records(run_dir, "train")
    assert [e["step"] for e in evals] == [0, 6, 12]
    markdown = (out / "report.md").read_text()
    _check_before_after(markdown, evals[0], evals[-1])
    _check_mixture(markdown, train, STEPS)
    # The learning-rate plot draws the schedule at step - 1 for step N: the trainer's convention.
    schedule = make_schedule(load_config(run_dir / "config.yaml").schedule)
    for record in train:
        assert record["learning_rate"] == pytest.approx(float(schedule(record["step"] - 1)), rel=1e-6)
    numbers = json.loads((out / "report.json").read_text())
    rows = {r["set"]: r for r in numbers["before_after"]["rows"]}
    assert rows["code"]["loss_before"] == evals[0]["code"]["loss"]  # exact: straight from the log
    assert rows["english"]["loss_after"] == evals[-1]["english"]["loss"]
    assert numbers["mixture"]["steps_covered"] == STEPS

    _check_long_context(markdown, numbers, evals, _records(run_dir, "retrieval"))

    images = re.findall(r"!\[\w+\]\((\w+\.png)\)", markdown)
    assert len(images) == 10 and len(set(images)) == 10
    assert {"position_loss.png", "retrieval.png", "goodput.png"} < set(images)
    for name in images:
        pixels = imread(str(out / name))
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600, name
        assert np.std(pixels[..., :3]) > 0.05, f"{name} is blank"
    # An existing report is never replaced.
    assert main(["report", str(run_dir)]) == 2
    assert "folder exists and is not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_a_resumed_run_logs_steps_again_and_the_later_records_count(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report-*", "checkpoints"))
    metrics = copy / "logs" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    redone = [json.loads(line) for line in lines if json.loads(line)["step"] == STEPS]
    for record in redone:  # as a resume from step 10 would log them again, with other numbers
        if record["kind"] == "eval":
            record["code"]["loss"] += 0.5
    metrics.write_text("\n".join(lines + [json.dumps(r) for r in redone]) + '\n{"step": 13, "ki')
    assert main(["report", str(copy), "--out", str(tmp_path / "report")]) == 0
    evals = _records(run_dir, "eval")
    after = json.loads(json.dumps(evals[-1]))
    after["code"]["loss"] += 0.5
    _check_before_after((tmp_path / "report" / "report.md").read_text(), evals[0], after)

    # Without evaluations (eval_sets left out) the report says so, and still draws the rest.
    metrics.write_text("\n".join(line for line in lines if '"kind": "train"' in line) + "\n")
    assert main(["report", str(copy), "--out", str(tmp_path / "no_evals")]) == 0
    assert "No before/after table" in (tmp_path / "no_evals" / "report.md").read_text()


@pytest.mark.slow
def test_the_export_of_a_run_carries_a_model_card(run_dir, tmp_path):
    evals, train = _records(run_dir, "eval"), _records(run_dir, "train")
    for step, after in ((6, evals[1]), (STEPS, evals[2])):
        out = tmp_path / f"export{step}"
        assert main(["convert", "orbax-to-hf", "--ckpt", str(run_dir / "checkpoints"), "--step", str(step),
                     "--out", str(out)]) == 0
        card = (out / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers\n")
        assert f"checkpoint {step} of the run" in card and "warmup_cosine" in card
        assert f"continued from `{run_dir.parent / 'hf'}`" in card
        _check_before_after(card, evals[0], after)
        _check_mixture(card, train, step)


@pytest.mark.slow
def test_cptjax_eval_with_the_run_config_repeats_the_trainers_long_context_numbers(run_dir, tmp_path):
    """`cptjax eval --data-config RUN/config.yaml` takes the run's eval sets, rows, buckets and probe:
    on the last checkpoint it gives the numbers the trainer logged at that step."""
    out = tmp_path / "eval"
    assert main(["eval", "--model", f"{run_dir / 'checkpoints'}@{STEPS}", "--data-config",
                 str(run_dir / "config.yaml"), "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    (results,), (probe,) = report["models"].values(), report["retrieval"].values()
    logged, logged_probe = _records(run_dir, "eval")[-1], _records(run_dir, "retrieval")[-1]
    for name in ("code", "english"):
        assert results[name]["position_tokens"] == logged[name]["position_tokens"]
        for label, loss in logged[name]["position_loss"].items():
            assert results[name]["position_loss"][label] == pytest.approx(loss, rel=1e-5), (name, label)
    assert [c["accuracy"] for c in probe["cells"]] == [c["accuracy"] for c in logged_probe["cells"]]
    for mine, theirs in zip(probe["cells"], logged_probe["cells"]):
        assert mine["answer_nll"] == pytest.approx(theirs["answer_nll"], rel=1e-5)


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no logs/metrics.jsonl; give the run_dir of a cptjax train run" in err[0]
