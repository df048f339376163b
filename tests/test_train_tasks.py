"""lm-evaluation-harness tasks during training (eval.tasks), through the real `cptjax train`.

One process and two (jax.distributed on localhost): task scores at step 0 and every N steps;
SIGTERM while the step-2 evaluation runs, then a resume that runs what that step still owes (and
nothing twice); the report's task section and plot; and the scores of the last step equal
`cptjax eval --tasks` on the saved step, which scores without the trainer and without Lockstep.
"""

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
from lm_eval_tasks import write_tasks
from run_helpers import cli
from transformers import AutoTokenizer

TASKS = ("tiny_mc", "tiny_rolling", "tiny_gen")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1")


def _config(tmp_path, run_name="run"):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("llama")))
    hf = dict(tiny_configs.shrunk_config("llama-3.2-1b"), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
              eos_token_id=tok.eos_token_id)
    model = hf_models.save_hf_model(hf, tmp_path / "hf")
    tok.save_pretrained(model)
    tasks = write_tasks(tmp_path / "tasks", mc_docs=24, gen_docs=8)
    raw = {
        "run_dir": str(tmp_path / run_name),
        "model": {"init_from": str(model), "compute_dtype": "float32"},
        "data": {"sources": [
            {"name": "code", "type": "text", "paths": [str(STDLIB / "json" / "*.py")], "weight": 0.9},
            {"name": "english", "type": "jsonl", "paths": [str(corpus_files()["wiki_jsonl"])], "weight": 0.1}],
            "eval_sets": [{"name": "code", "type": "text", "paths": [str(STDLIB / "email" / "mime" / "*.py")]}]},
        "training": {"steps": 4, "batch_size": 4, "seq_len": 32},
        "schedule": {"peak_lr": 3e-3, "warmup": 1},
        "checkpoint": {"every": 2, "keep_last": 5},
        "eval": {"every": 2, "tasks": {"names": [str(tasks / f"{t}.yaml") for t in TASKS], "every": 2,
                                       "limit": 24}},
        "logging": {"every": 1, "progress": "lines"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, tmp_path / run_name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(config, processes: int):
    if processes == 1:
        commands = [[sys.executable, "-m", "cptjax.cli", "train", "--config", str(config)]]
    else:
        port = _free_port()
        commands = [[sys.executable, "-m", "cptjax.cli", "train", "--config", str(config),
                     "--set", "distributed.mode=manual", "--set", f"distributed.coordinator_address=127.0.0.1:{port}",
                     "--set", f"distributed.num_processes={processes}", "--set", f"distributed.process_id={i}"]
                    for i in range(processes)]
    return [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=1")) for c in commands]


def _records(run):
    path = run / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(procs):
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out + err for out, err in outputs]


def _sigterm_during_step_2_tasks(config, run, processes: int) -> list[str]:
    """Starts the run, and signals every process as soon as step 2's held-out record is written:
    the task evaluation of step 2 comes right after it."""
    procs = _start(config, processes)
    deadline = time.time() + 600
    while not any(r["kind"] == "eval" and r["step"] == 2 for r in _records(run)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[1][-3000:] for p in procs]
        time.sleep(0.02)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    return _wait(procs)


def _check_records(run):
    kinds = [(r["kind"], r["step"]) for r in _records(run) if r["kind"] in ("eval", "tasks")]
    # step 0 and every 2 steps, each once: the resume ran only what step 2 still owed
    assert sorted(kinds) == [(k, s) for k in ("eval", "tasks") for s in (0, 2, 4)], kinds
    tasks = {r["step"]: r for r in _records(run) if r["kind"] == "tasks"}
    for record in tasks.values():
        assert set(record) == {"step", "kind", *TASKS}
        assert 0.0 <= record["tiny_mc"]["acc"] <= 1.0 and 0.0 <= record["tiny_gen"]["exact_match"] <= 1.0
    rolling = [tasks[s]["tiny_rolling"]["bits_per_byte"] for s in (0, 2, 4)]
    assert len(set(rolling)) == 3  # the model as it trains at each step, not one model
    return tasks


def _check_scores_equal_eval_alone(run, tmp_path, tasks):
    """The last step scored outside training: no trainer, no Lockstep, one process (relative 1e-5:
    the sums run over another mesh)."""
    names = ",".join(str(tmp_path / "tasks" / f"{t}.yaml") for t in TASKS)
    cli("eval", "--model", f"{run}@4", "--tasks", names, "--limit", 24, "--out", tmp_path / "eval4")
    alone = json.loads((tmp_path / "eval4" / "eval.json").read_text())["tasks"][f"{run}@4"]
    for task in TASKS:
        assert alone[task].keys() == tasks[4][task].keys()
        for metric, value in alone[task].items():
            assert abs(value - tasks[4][task][metric]) <= 1e-5 * abs(value), (task, metric, value)


def _check_report(run, tmp_path, tasks):
    cli("report", run, "--out", tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Downstream tasks" in markdown and "![tasks](tasks.png)" in markdown
    mc = tasks[4]["tiny_mc"]["acc_norm"] - tasks[0]["tiny_mc"]["acc_norm"]
    assert f"| tiny_mc | acc_norm | {tasks[0]['tiny_mc']['acc_norm']:.4f} (step 0) |" in markdown
    assert f"{mc:+.4f} |" in markdown
    assert (tmp_path / "report" / "tasks.png").stat().st_size > 10_000
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["tasks"]["tiny_gen"] == {"metric": "exact_match", "first_step": 0, "last_step": 4,
                                           "first": tasks[0]["tiny_gen"]["exact_match"],
                                           "last": tasks[4]["tiny_gen"]["exact_match"]}


@pytest.mark.slow
def test_tasks_during_training_stop_on_sigterm_and_resume(tmp_path):
    config, run = _config(tmp_path)
    first = _sigterm_during_step_2_tasks(config, run, 1)[0]
    assert "step 2 tasks: interrupted by SIGTERM, not logged" in first
    assert "SIGTERM at step 2: checkpoint saved, exiting" in first
    assert [(r["kind"], r["step"]) for r in _records(run) if r["kind"] == "tasks"] == [("tasks", 0)]
    second = _wait(_start(config, 1))[0]
    assert "resumed from step 2" in second and "step 2 tasks: tiny_mc acc_norm" in second
    assert "step 2 eval" not in second  # the held-out sets of step 2 were logged before the signal
    _check_report(run, tmp_path, _check_records(run))


@pytest.mark.slow
def test_two_processes_one_drives_the_harness_both_compute(tmp_path):
    config, run = _config(tmp_path)
    first = _sigterm_during_step_2_tasks(config, run, 2)
    assert all("cptjax train: stopped at step" in out for out in first), first
    stopped = {int(out.split("stopped at step ")[1].split()[0]) for out in first}
    assert len(stopped) == 1, first  # both at the same step, saved
    second = _wait(_start(config, 2))
    assert all("cptjax train: finished at step 4" in out for out in second)
    assert "step 4 tasks: tiny_mc acc_norm" in second[0] and "tasks:" not in second[1]  # process 0 logs
    _check_scores_equal_eval_alone(run, tmp_path, _check_records(run))
