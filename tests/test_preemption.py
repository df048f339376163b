"""Preemption: SIGTERM saves and exits cleanly, in start-up as soon as the phase it lands in ends
(between the tensors of a weight load), and an evaluation it cuts short is run again first; SIGKILL
during an async save loses only that save."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hf_models
import pytest
import tiny_configs
import yaml
from batches import CountingData, raw_config
from run_helpers import ENV, records, steps

from cptjax.train.config import config_from_dict
from cptjax.train.trainer import run

WORKER = Path(__file__).parent / "train_worker.py"
STARTUP_WORKER = Path(__file__).parent / "startup_worker.py"


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


class _SigtermDuring(list):
    """An eval set's batches that send this process SIGTERM in the middle of the passes numbered in
    `passes` (1: the run's first evaluation), as a preemption landing in an evaluation would."""

    def __init__(self, batches, passes=()):
        super().__init__(batches)
        self.passes, self.count = set(passes), 0

    def __iter__(self):
        self.count += 1
        for i, batch in enumerate(super().__iter__()):
            if i == 1 and self.count in self.passes:
                # only while the trainer's handler turns the signal into a request (else it would end pytest)
                assert getattr(signal.getsignal(signal.SIGTERM), "__module__", None) == "cptjax.train.preemption"
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


@pytest.mark.slow
def test_an_evaluation_cut_short_by_sigterm_is_run_first_on_resume_and_none_is_lost(tiny_hf, tmp_path):
    hf = tiny_hf("llama-3.2-1b")
    eval_batches = [CountingData(512, 4, 32, seed=99).batch(k) for k in range(2)]

    def train(run_dir, passes=()):
        raw = raw_config(run_dir, hf, training={"steps": 12}, checkpoint={"every": 4, "keep_last": 5},
                         eval={"every": 6})  # evaluations at steps 0 (the base model), 6 and 12
        config = config_from_dict(raw)
        data = CountingData(512, config.training.batch_size, config.training.seq_len)
        return run(config, data=data, eval_sets={"domain": _SigtermDuring(eval_batches, passes)})

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(straight).stopped_early is None
    for passes, final, why, saved in [
        ({1}, 0, "SIGTERM during step 0's evaluation", []),  # the base model's: nothing is saved
        ({2}, 6, "SIGTERM at step 6", [4, 6]),  # a middle one: its step is saved, and the run stops
        ({1}, 6, "SIGTERM during step 6's evaluation", [4, 6]),  # the same, run again first on resume
        ({2}, 12, "SIGTERM at step 12", [4, 6, 8, 12]),  # the final one, after step 6's re-run
    ]:
        result = train(split, passes)
        assert (result.final_step, result.stopped_early.split(":")[0]) == (final, why)
        assert steps(split / "checkpoints") == saved
    finished = train(split)  # the run had reached its last step: it still owes step 12's evaluation
    assert (finished.final_step, finished.stopped_early) == (12, None)
    assert finished.origin.startswith("resumed from step 12")

    # every scheduled evaluation, once each, equal to the run never preempted (same program, same
    # machine: bit for bit)
    assert [r["step"] for r in records(split, "eval")] == [0, 6, 12]
    assert records(split, "eval") == records(straight, "eval")
    losses = lambda d: [(r["step"], r["loss"]) for r in records(d, "train")]  # noqa: E731
    assert losses(split) == losses(straight) and [s for s, _ in losses(split)] == list(range(1, 13))


@pytest.mark.slow
def test_sigterm_during_start_up_stops_at_the_next_phase_with_nothing_written(cpt_config, tmp_path):
    """The phases of `cptjax train`'s start: the signal after the config checks, in the middle of a
    slow weight load (each tensor 0.5 s), or once the state is loaded stops the process before the
    next phase, with exit 0 and the run folder never created."""
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(cpt_config.read_text()), "run_dir": str(run_dir)}))

    def start(phase):
        return subprocess.Popen([sys.executable, "-u", str(STARTUP_WORKER), phase, str(config)], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(process, phase):
        out, _ = process.communicate(timeout=300)
        assert process.returncode == 0, out[-3000:]
        assert f"cptjax train: SIGTERM during start-up ({phase}): nothing written, exiting" in out, out[-3000:]
        assert "cptjax train: stopped at step 0" in out and "Traceback" not in out
        assert not run_dir.exists()
        return json.loads(out.strip().splitlines()[-1])

    assert finish(start("config"), "after the config checks") == {"reads": 0, "steps": 0}
    loaded = finish(start("compile"), "before the first compile")
    assert loaded["reads"] > 6 and loaded["steps"] == 0  # every tensor read, the train step never run

    process = start("load")
    for line in process.stdout:
        if line.strip() == "read 3":
            break
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    interrupted = finish(process, "loading the weights")
    # it stops at the end of the tensor it is reading (a layer-stacked one: up to 3 reads) and exits
    # (3 s measured on a busy machine), where the rest of the load alone would take 26 x 0.5 s
    assert 3 <= interrupted["reads"] <= 6 and interrupted["steps"] == 0
    assert time.monotonic() - signalled < 8.0
