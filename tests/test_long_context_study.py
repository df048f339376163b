"""scripts/reproduce_long_context.py at --smoke size (one seed, two steps a run): every output it
promises, with finite numbers, the variants' RoPE changes reaching their models, the pass-key
training documents and the record of what ran.

Its cost is compilation (three programs per run): the script runs in a process of its own with XLA's
CPU optimizations off (the programs compile in ~30% less time, run slower, compute the same thing),
and with the base and one variant, YaRN, the one that changes the most keys (the others' keys are
checked by reading `variants`); 33 s of CPU (user time), 1.5 min wall on one core of a shared
2-core machine (2026-12-07, load average 5-10)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from run_helpers import load_script

from cptjax.data.passkey import RetrievalConfig, make_prompts
from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec
from cptjax.io.run_layout import RunPaths
from cptjax.io.weights import open_weights

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "reproduce_long_context.py"


@pytest.mark.slow
def test_the_smoke_study_writes_every_number_per_variant_and_seed(tmp_path):
    script = load_script("reproduce_long_context")
    assert script.variants(script.SMOKE) == {
        "unchanged": {"max_position_embeddings": 256},
        "abf": {"max_position_embeddings": 256, "rope": {"theta": 160000.0}},
        "yarn": {"max_position_embeddings": 256, "rope": {"type": "yarn", "factor": 4,
                                                          "original_max_position_embeddings": 64}}}
    out = tmp_path / "smoke"
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--variants", "yarn", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    short, long = 64, 256  # SMOKE: 64 tokens extended 4x
    buckets, lengths = ["0-64", "64-128", "128-256"], ["64", "128", "256"]
    expected = ["loss", *(f"loss {b}" for b in buckets), *(f"retrieval {n}" for n in lengths)]
    assert list(results["table"]) == ["yarn"]
    for name, row in results["table"].items():
        assert list(row) == expected, name
        for key, entry in row.items():
            assert len(entry["seeds"]) == 1 and math.isfinite(entry["mean"]) and entry["spread"] == 0.0, (name, key)
            assert 0 <= entry["mean"] <= (1 if key.startswith("retrieval") else 20), (name, key)
    # the base at its own context: one bucket, one probe length; every variant also at step 0
    assert list(results["base"]["position_loss"]) == ["0-64"] and list(results["base"]["retrieval"]) == ["64"]
    assert list(results["zero_shot"]) == ["yarn"] and list(results["runs"]) == ["0"]
    cells = results["runs"]["0"]["yarn"]["retrieval_cells"]
    assert sorted({(c["length"], c["depth"]) for c in cells}) == [(n, d) for n in (64, 128, 256) for d in (0.0, 1.0)]
    # YaRN reached the CPT run's model: its checkpoint (and so its HF export) carries it
    weights = open_weights(out / "seed0" / "yarn" / "checkpoints")
    try:
        config = weights.config
    finally:
        weights.close()
    assert (config.max_position_embeddings, config.rope.type, config.rope.factor,
            config.rope.original_max_position_embeddings, config.rope.theta) == (long, "yarn", 4.0, short, 10000.0)
    # the pass-key training documents: the probe's format (another seed, so other keys), each exactly
    # one row of the smallest length, so that packing never parts a needle from its question
    spec = load_tokenizer_spec(out / "tokenizer")
    documents = [json.loads(line)["text"] for line in (out / "corpora" / "passkey_64.jsonl").read_text().splitlines()]
    probe_keys = {p.key for p in make_prompts(RetrievalConfig((short,), (0.0, 1.0), 1, 0), DocumentTokenizer(spec))}
    assert 1 <= len(documents) <= 4
    for text, ids in zip(documents, DocumentTokenizer(spec).encode_batch(documents)):
        keys = re.findall(r"The pass key is (\d+)", text)
        assert len(ids) == short and len(keys) == 2 and keys[0] == keys[1] and text.endswith(keys[1]), text
        assert keys[0] not in probe_keys
    sources = yaml.safe_load(RunPaths(out / "base").config.read_text())["data"]["sources"]
    assert {s["name"]: s["weight"] for s in sources} == pytest.approx({"english": 0.5, "passkey_64": 0.5})
    for name in ("position_loss.png", "retrieval.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG") and (out / name).stat().st_size > 10_000, name
    table = (out / "results.md").read_text()
    assert "| yarn after CPT |" in table and "| yarn, step 0 |" in table and "| base at 64 |" in table
    # what ran, where: the command, the commit and the load are recorded beside the numbers
    record = results["record"]
    assert record["command"].startswith("python scripts/reproduce_long_context.py --smoke")
    assert len(record["git"]["commit"]) == 40 and len(record["load_average"]["after"]) == 3
    assert f"at commit {record['git']['commit']}" in table
