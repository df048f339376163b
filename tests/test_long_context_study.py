"""scripts/reproduce_long_context.py at --smoke size (one seed, two steps a run): every output it
promises, with finite numbers, and the variants' RoPE changes reaching their models.

Its cost is compilation (four runs of three programs each): the script runs in a process of its own
with XLA's CPU optimizations off (the programs compile in ~40% less time, run slower, compute the
same thing), and with two of the three variants (`abf` differs from `unchanged` only by the
theta the unit check below reads). About 27 s of CPU on a shared 2-core machine."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduce_long_context.py"


def _script():
    spec = importlib.util.spec_from_file_location("reproduce_long_context", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_smoke_study_writes_every_number_per_variant_and_seed(tmp_path):
    script = _script()
    assert script.variants(script.SMOKE)["abf"] == {"max_position_embeddings": 256, "rope": {"theta": 160000.0}}
    out = tmp_path / "smoke"
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--variants", "unchanged,yarn", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    short, long = 64, 256  # SMOKE: 64 tokens extended 4x
    buckets, lengths = ["0-64", "64-128", "128-256"], ["64", "128", "256"]
    expected = ["loss", *(f"loss {b}" for b in buckets), *(f"retrieval {n}" for n in lengths)]
    assert list(results["table"]) == ["unchanged", "yarn"]
    for name, row in results["table"].items():
        assert list(row) == expected, name
        for key, entry in row.items():
            assert len(entry["seeds"]) == 1 and math.isfinite(entry["mean"]) and entry["spread"] == 0.0, (name, key)
            assert 0 <= entry["mean"] <= (1 if key.startswith("retrieval") else 20), (name, key)
    # the base at its own context: one bucket, one probe length; every variant also at step 0
    assert list(results["base"]["position_loss"]) == ["0-64"] and list(results["base"]["retrieval"]) == ["64"]
    assert list(results["zero_shot"]) == ["unchanged", "yarn"] and list(results["runs"]) == ["0"]
    cells = results["runs"]["0"]["yarn"]["retrieval_cells"]
    assert sorted({(c["length"], c["depth"]) for c in cells}) == [(n, d) for n in (64, 128, 256) for d in (0.0, 1.0)]
    # the same base read two ways: YaRN reached the model (unapplied, it would compile the same
    # program as `unchanged` and give its loss bit for bit)
    step0 = {name: entry["loss"] for name, entry in results["zero_shot"].items()}
    assert step0["unchanged"] != step0["yarn"], step0
    models = {name: yaml.safe_load((out / "seed0" / name / "config.yaml").read_text())["model"]
              for name in ("unchanged", "yarn")}
    assert [m["max_position_embeddings"] for m in models.values()] == [long] * 2
    assert models["unchanged"]["rope"]["theta"] is None and models["unchanged"]["rope"]["type"] is None
    assert (models["yarn"]["rope"]["type"], models["yarn"]["rope"]["factor"],
            models["yarn"]["rope"]["original_max_position_embeddings"]) == ("yarn", 4.0, short)
    # the pass-key training documents are the probe's prompts: the run's tokenizer gives back
    # their token ids exactly (a seed of their own, so other keys than the probe's)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    documents = [json.loads(line)["text"] for line in (out / "corpora" / "passkey.jsonl").read_text().splitlines()]
    assert len(documents) == 4 and all(" What is the pass key? The pass key is " in d for d in documents)
    assert all(len(tokenizer.encode(d).ids) == short for d in documents)  # BOS included, as the probe's
    for name in ("position_loss.png", "retrieval.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG") and (out / name).stat().st_size > 10_000, name
    table = (out / "results.md").read_text()
    assert all(f"| {name} after CPT |" in table for name in ("unchanged", "yarn"))
