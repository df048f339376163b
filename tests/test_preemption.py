"""Preemption: SIGTERM saves and exits cleanly; SIGKILL during an async save loses only that save."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hf_models
import tiny_configs
from batches import raw_config

WORKER = Path(__file__).parent / "train_worker.py"


def _start(config_path, vocab):
    return subprocess.Popen([sys.executable, str(WORKER), str(config_path), str(vocab)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _steps(checkpoints: Path):
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def _logged_steps(run_dir):
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"train"' in line]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_hf, tmp_path):
    run_dir = tmp_path / "run"
    raw = raw_config(run_dir, tiny_hf("llama-3.2-1b"), training={"steps": 10_000},
                     checkpoint={"every": 5000}, eval={"every": 5000})
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(raw))
    process = _start(config_path, 512)
    deadline = time.time() + 300
    while time.time() < deadline and len(_logged_steps(run_dir)) < 3:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stopped_early"].startswith("SIGTERM at step")
    assert _steps(run_dir / "checkpoints") == [result["final_step"]]
    assert 3 <= result["final_step"] < 10_000


@pytest.mark.slow
def test_sigkill_during_an_async_save_resumes_from_the_previous_checkpoint(tmp_path):
    # A model big enough (~20M parameters with optimizer state) that a save takes a while.
    hf = dict(tiny_configs.shrunk_config("llama-3.2-1b"), hidden_size=256, intermediate_size=1024,
              num_hidden_layers=4, vocab_size=8192, head_dim=32, num_attention_heads=8)
    source = hf_models.save_hf_model(hf, tmp_path / "hf")
    run_dir = tmp_path / "run"
    raw = raw_config(run_dir, source, training={"steps": 1000, "seq_len": 16, "batch_size": 2},
                     checkpoint={"every": 3, "keep_last": 10}, eval={"every": 1000})
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(raw))
    for attempt in range(5):
        process = _start(config_path, 8192)
        seen_tmp = None
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            checkpoints = run_dir / "checkpoints"
            tmps = [p.name for p in checkpoints.iterdir() if "tmp" in p.name] if checkpoints.exists() else []
            finished = _steps(checkpoints) if checkpoints.exists() else []
            if tmps and finished:  # a save in flight, with a finished one before it
                process.kill()
                seen_tmp = tmps[0]
                break
            time.sleep(0.001)
        process.communicate(timeout=60)
        if seen_tmp is None:
            pytest.fail("never saw a save in flight")
        in_flight = int(seen_tmp.split(".")[0])
        if in_flight not in _steps(run_dir / "checkpoints"):
            break  # the kill landed inside the save, as intended
    else:
        pytest.fail("every kill landed after the save had finished")
    complete = _steps(run_dir / "checkpoints")
    assert in_flight not in complete and complete and max(complete) < in_flight

    raw["training"]["steps"] = max(complete) + 2
    config_path.write_text(json.dumps(raw))
    process = _start(config_path, 8192)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["origin"].startswith(f"resumed from step {max(complete)} ")
    assert result["final_step"] == max(complete) + 2
