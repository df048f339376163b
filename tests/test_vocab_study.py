"""scripts/reproduce_vocab_extension.py at --smoke size (one seed, `none` and `mean`, four CPT steps):
every number it promises per variant and seed, and two that theory fixes.

- `none` at step 0 is the base: the same model on the same text, measured once by the trainer's
  evaluation at the start of the CPT run and once by `cptjax eval`'s library function, so its bits
  per byte are equal (up to float32 summation order).
- `mean` gives each new id the mean of the old rows, so a new logit is the mean of the old logits:
  on text read with the base's tokenizer (old ids only) each new id takes at most 1/(n + k) of the
  probability and the old ids keep the base's distribution, renormalised (Hewitt 2021). The loss
  per token is the base's plus ln(1 + sum over new ids of e^mean / sum over old of e^logit), between
  0 and ln(1 + k/n); on the same tokens and bytes, the code bits per byte at step 0 are the base's
  plus between 0 and log2(1 + k/n) x tokens / bytes. Read with the extended tokenizer, theory gives
  no sign: a new token costs at least log2(n + k) bits, against the base's cost of its pieces, so
  `mean` is below `none` on a base that predicts the pieces badly (as the smoke's nearly untrained
  one does) and above it on one that predicts them well; the study measures which.

Its cost is compilation (three trainer runs and two evaluations): the script runs in a process of
its own with XLA's CPU optimizations off, and learns its 32 tokens from a tenth of the training code
(`SMOKE["code_train"]`). 46 s of CPU (user time) for the whole test (both runs); 53 s wall on a
2-core machine at load average 8, 4.7 min at nice 10 beside two studies and a test suite (load
average 10-13), 2026-12-07."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduce_vocab_extension.py"


def _study(out: Path) -> subprocess.CompletedProcess:
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--variants", "none,mean", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, check=False)


@pytest.mark.slow
def test_the_smoke_study_writes_every_number_and_mean_init_keeps_the_base(tmp_path):
    out = tmp_path / "smoke"
    done = _study(out)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    variants, sets = ["none", "mean"], ("code", "english")
    # every number, per variant and seed
    assert list(results["runs"]) == ["0"] and list(results["runs"]["0"]) == variants
    for name in variants:
        run = results["runs"]["0"][name]
        assert [c["step"] for c in run["curve"]] == [0, 2, 4], name
        assert run["step0"] == run["curve"][0] and run["final"] == run["curve"][-1], name
        for point in run["curve"]:
            for key in sets:
                assert math.isfinite(point[key]["bits_per_byte"]) and 0 < point[key]["bits_per_byte"] < 10, name
        row = results["table"][name]
        assert list(row) == ["code bpb, step 0", "code bpb, end", "english bpb, step 0", "english bpb, end"]
        assert all(len(entry["seeds"]) == 1 and entry["spread"] == 0.0 for entry in row.values()), name
    assert list(results["paired"]) == ["mean"]
    tokens = results["tokenizers"]
    for which in ("base", "extended"):
        assert list(tokens[which]) == ["code_heldout", "english_heldout", "code_train", "english_train"]
    # the extension saves tokens on the code it learnt from, and never adds any (docs/data.md)
    for key in ("code_train", "code_heldout", "english_heldout"):
        assert tokens["extended"][key]["bytes"] == tokens["base"][key]["bytes"], key
        assert tokens["extended"][key]["tokens"] <= tokens["base"][key]["tokens"], key
    assert tokens["extended"]["code_train"]["tokens"] < tokens["base"]["code_train"]["tokens"]
    assert results["bytes_seen"]["extended"] > results["bytes_seen"]["base"]
    assert results["tokens_trained"] == 4 * 4 * 64  # the same for every variant: steps x batch x length

    # `none` at step 0 is the base: the trainer's evaluation and `cptjax eval` agree
    base, none0 = results["base"], results["runs"]["0"]["none"]["step0"]
    for key in sets:
        assert none0[key]["bits_per_byte"] == pytest.approx(base[key]["bits_per_byte"], rel=1e-5), key
    # `mean` on the base's tokens: the base's loss plus between 0 and ln(1 + k/n) per token
    extension = results["extension"]
    n, k = extension["first_new_id"], extension["vocab_size"] - extension["first_new_id"]
    assert (n, k) == (512, 32)
    mean = results["old_tokens"]["mean"]
    for key in sets:
        assert mean[key]["tokens"] == base[key]["tokens"], key
        rise = mean[key]["loss"] - base[key]["loss"]
        assert -1e-6 < rise <= math.log1p(k / n) + 1e-6, (key, rise)
        bytes_read = base[key]["loss"] * base[key]["tokens"] / math.log(2) / base[key]["bits_per_byte"]
        bpb_rise = mean[key]["bits_per_byte"] - base[key]["bits_per_byte"]
        assert bpb_rise == pytest.approx(rise * base[key]["tokens"] / math.log(2) / bytes_read, rel=1e-4), key

    # the outputs a reader looks at, with the record of what ran
    table = (out / "results.md").read_text()
    assert "| none |" in table and "| mean |" in table and "Paired differences" in table
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")
    record = results["record"]
    assert record["command"].startswith("python scripts/reproduce_vocab_extension.py --smoke")
    assert len(record["git"]["commit"]) == 40 and len(record["load_average"]["after"]) == 3

    # run again into the same folder: nothing is trained or evaluated again
    progress = (out / "progress.json").read_text()
    evaluations = (out / "evaluations.json").read_text()
    again = _study(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the study in" in again.stdout
    assert (out / "progress.json").read_text() == progress
    assert (out / "evaluations.json").read_text() == evaluations
    assert json.loads((out / "results.json").read_text())["table"] == results["table"]


def test_a_folder_of_another_study_is_refused(tmp_path, capsys):
    (tmp_path / "study.json").write_text(json.dumps({"model": {}, "seeds": [0]}))
    assert load_script("reproduce_vocab_extension").main(["--smoke", "--out", str(tmp_path)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "not a stopped run of this study; choose a new folder" in message
