"""Two processes with jax.distributed on one machine train, checkpoint and restore (the real CLI,
the real data pipeline: each process reads its own share of a code + English mixture)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import hf_models
import pytest
import tiny_configs
import yaml
from data_helpers import STDLIB, corpus_files, tokenizer_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(err: str) -> str:
    """The lines that say what went wrong (jax's errors embed huge reprs of the jitted function)."""
    keep = [line[:400] for line in err.splitlines()
            if "Error" in line or "error:" in line or line.startswith("cptjax")]
    return "\n".join(keep[-15:]) or err[-3000:]


def _start_both(config_path, steps):
    port = _free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "cptjax.cli", "train", "--config", str(config_path),
         "--set", f"training.steps={steps}", "--set", "distributed.mode=manual",
         "--set", f"distributed.coordinator_address=127.0.0.1:{port}",
         "--set", "distributed.num_processes=2", "--set", f"distributed.process_id={i}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1"))
        for i in range(2)]


def _train_both(config_path, steps):
    processes = _start_both(config_path, steps)
    outputs = [p.communicate(timeout=420) for p in processes]
    for p, (out, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, _summary(err)
    return [out + err for out, err in outputs]


def _config(tmp_path, **changes):
    tokenizer = tokenizer_dir("llama")
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    hf = dict(tiny_configs.shrunk_config("llama-3.2-1b"), vocab_size=vocab)
    model = hf_models.save_hf_model(hf, tmp_path / "hf")
    raw = {
        "run_dir": str(tmp_path / "run"),
        "model": {"init_from": str(model), "tokenizer": str(tokenizer), "compute_dtype": "float32"},
        "data": {"sources": [
            {"name": "code", "type": "text", "paths": [str(STDLIB / "json" / "*.py")], "weight": 0.9},
            {"name": "english", "type": "jsonl", "paths": [str(corpus_files()["wiki_jsonl"])], "weight": 0.1}]},
        "training": {"steps": 4, "batch_size": 4, "seq_len": 32},
        "schedule": {"peak_lr": 1e-3, "warmup": 1},
        "checkpoint": {"every": 2, "keep_last": 5},
        "eval": {"every": 100, "at_start": False},
        "logging": {"every": 1, "progress": "lines"},
    }
    raw.update(changes)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    return config_path


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    config_path = _config(tmp_path, eval={"every": 4, "at_start": False})
    raw = yaml.safe_load(config_path.read_text())
    raw["data"]["eval_sets"] = [{"name": "code", "type": "text", "paths": [str(STDLIB / "email" / "mime" / "*.py")]}]
    config_path.write_text(yaml.safe_dump(raw))
    first = _train_both(config_path, 4)
    # only process 0 logs
    assert "mesh {'data': 2, 'fsdp': 1, 'expert': 1, 'sequence': 1, 'tensor': 1}, 2 devices" in first[0]
    assert all("cptjax train: finished at step 4" in out for out in first)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4]
    meta = json.loads((checkpoints / "4" / "train_meta" / "metadata").read_text())
    assert len(meta["data_state"]) == 2  # each process's own position in the data

    second = _train_both(config_path, 6)
    assert "resumed from step 4" in second[0]
    assert all("cptjax train: finished at step 6" in out for out in second)
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4, 6]
    logged = [(r["kind"], r["step"]) for r in map(json.loads, (tmp_path / "run" / "logs" / "metrics.jsonl")
                                                   .read_text().splitlines())]
    # only process 0 logs, and nothing twice: at the resume, process 0 finds step 4's evaluation
    # in the log and tells process 1 (both would have to run it again together)
    assert [x for x in logged if x[0] != "goodput"] == \
        [("train", s) for s in range(1, 5)] + [("eval", 4)] + [("train", s) for s in (5, 6)]
    # the goodput accounts: at the save of step 2, and as each start ended (steps 4 and 6)
    assert [x for x in logged if x[0] == "goodput"] == [("goodput", 2), ("goodput", 4), ("goodput", 6)]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_with_it_saved(tmp_path):
    """JAX's preemption service: one host preempted, every host saves the same step and exits 0,
    with no per-step collective to agree on it."""
    config_path = _config(tmp_path, checkpoint={"every": 100_000, "keep_last": 2})
    processes = _start_both(config_path, 100_000)
    metrics = tmp_path / "run" / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count('"train"') < 5):
        assert all(p.poll() is None for p in processes), [p.communicate()[1][-2000:] for p in processes]
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (out, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, _summary(err)
    assert all("cptjax train: stopped at step" in out for out, _ in outputs), outputs
    stopped = {int(out.split("stopped at step ")[1].split()[0]) for out, _ in outputs}
    assert len(stopped) == 1, outputs  # both at the same step
    assert "SIGTERM at step" in outputs[0][1]  # process 0, which logs, says why
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == sorted(stopped)
