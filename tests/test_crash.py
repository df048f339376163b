"""Crashes as they happen on preemptible machines, through the real CLI and the real pipeline:
SIGTERM at each phase of a run exits 0 with every finished step saved (and an evaluation it cut
short is run when the run starts again); SIGKILL at random moments
(the first start, steps, evaluations, saves and deletions of old steps, the final save) loses at
most the steps since the last checkpoint, and the run ends bit-identical to one never killed."""

import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from data_helpers import STDLIB
from run_helpers import Watcher, cli, records, restore_arrays, start, steps


def _config(cpt_config, tmp_path, **changes) -> str:
    raw = yaml.safe_load(cpt_config.read_text())
    for section, values in changes.items():
        raw[section] = {**raw[section], **values} if isinstance(values, dict) else values
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# The eval phase's held-out set: the first 40 of the standard library's modules, an evaluation of
# seconds (the signal comes within milliseconds of the step line); the other phases keep the
# config's small set, and the final save has no evaluation before it to land in instead.
LARGE_EVAL = {"eval_sets": [{"name": "stdlib", "type": "text", "max_docs": 40, "paths": [str(STDLIB / "*.py")]}]}


@pytest.mark.slow
@pytest.mark.parametrize("phase, wait_for, saved, changes", [
    ("start-up", None, [], {}),                  # before JAX has even been imported
    ("steps", "step 7/40", None, {}),            # mid-run: the step it stops at is saved
    ("eval", "step 40/40", [40], {"data": LARGE_EVAL, "eval": {"at_start": False}}),  # the final eval
    ("final save", "step 40/40", [40], {"eval": {"every": 1000}}),  # the last step's save in flight
])
def test_sigterm_at_each_phase_exits_0_with_its_finished_steps_saved(cpt_config, tmp_path, phase,
                                                                     wait_for, saved, changes):
    run_dir = tmp_path / "run"
    config = _config(cpt_config, tmp_path, run_dir=str(run_dir),
                     checkpoint={"every": 1000, "keep_last": 3},  # only the end and SIGTERM save
                     **changes)
    process = start("train", "--config", config)
    watcher = Watcher(process)
    if wait_for is None:
        time.sleep(1.5)  # importing JAX, reading the config
    else:
        assert watcher.wait_for(wait_for), "".join(watcher.lines)[-3000:]
    process.send_signal(signal.SIGTERM)
    code, out = watcher.finish()
    assert code == 0, out[-3000:]
    found = steps(run_dir / "checkpoints")
    if phase == "start-up":
        assert found == [] and "Traceback" not in out
        return
    if saved is None:  # it stopped at the first step boundary after the signal
        stopped = int(out.split("SIGTERM at step ")[1].split(":")[0])
        saved = [stopped]
        assert 7 <= stopped < 40
    assert found == saved, out[-2000:]
    assert f"step {saved[0]}" in out
    if phase == "eval":  # the signal landed in the evaluation, which stopped without logging
        assert "step 40 eval: interrupted by SIGTERM" in out, out[-2000:]
        assert [r["step"] for r in records(run_dir, "eval")] == [20]
    # and the same command carries on from there to the end (for "eval": the evaluation, first)
    out = cli("train", "--config", config)
    assert "finished at step 40" in out
    if phase == "eval":
        assert "step 40 eval: stdlib loss" in out and [r["step"] for r in records(run_dir, "eval")] == [20, 40]


@pytest.mark.slow
def test_random_sigkills_resume_every_time_and_end_bit_identical(cpt_config, tmp_path):
    changes = dict(checkpoint={"every": 2, "keep_last": 2}, eval={"every": 10})
    cli("train", "--config", _config(cpt_config, tmp_path, run_dir=str(tmp_path / "straight"), **changes))
    killed = _config(cpt_config, tmp_path, run_dir=str(tmp_path / "killed"), **changes)

    # 13 kills (3 in the first start-up, 9 at random steps, the final save); 21 until the suite
    # outgrew its 30 minutes (2026-12-07): the phases are the same, the samples fewer.
    rng = random.Random(20261123)
    kills, start_ups = 13, 3
    where = []
    while len(where) < kills:
        process = start("train", "--config", killed)
        watcher = Watcher(process)
        saved = steps(tmp_path / "killed" / "checkpoints")
        if len(where) < start_ups:  # the first start: imports, tokenizer, hf_assets, compiling
            time.sleep(rng.uniform(0.2, 5.0))
            target = "start-up"
        else:  # a random step ahead of the last checkpoint: steps, evals, saves, deletions
            step = 40 if len(where) == kills - 1 else rng.randint((saved or [0])[-1] + 1, 39)
            target = f"step {step}/40"  # 40: the final save
            assert watcher.wait_for(target), "".join(watcher.lines)[-3000:]
            time.sleep(rng.uniform(0.0, 0.3))
        process.kill()
        code, out = watcher.finish()
        assert code == -signal.SIGKILL, out[-3000:]  # it was still running: every kill counts
        where.append(target)
    out = cli("train", "--config", killed)
    assert "finished at step 40" in out

    straight, split = tmp_path / "straight", tmp_path / "killed"
    key = lambda d, kind: [(r["step"], r.get("loss"), r.get("code")) for r in records(d, kind)]  # noqa: E731
    # every step logged exactly once, as in the run never killed (records a kill made stale are
    # set aside in metrics.discarded.jsonl)
    assert key(split, "train") == key(straight, "train")
    assert [r[0] for r in key(split, "train")] == list(range(1, 41))
    assert key(split, "eval") == key(straight, "eval")
    for item in ("params", "opt_state"):
        a = restore_arrays(straight / "checkpoints" / "40" / item)
        b = restore_arrays(split / "checkpoints" / "40" / item)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    assert steps(split / "checkpoints") == [38, 40]  # keep_last 2, nothing half-deleted left


def test_cptjax_train_catches_sigterm_before_importing_jax():
    # A SIGTERM in the seconds JAX takes to import (longer on a busy machine) must find the handler
    # already there: the start-up case above then exits 0 however slow the machine is.
    probe = (
        "import json, signal, sys\n"
        "import cptjax.cli as cli\n"
        "def parser():\n"
        "    handler = signal.getsignal(signal.SIGTERM)\n"
        "    print(json.dumps({'jax': 'jax' in sys.modules, 'handler': getattr(handler, '__module__', None)}))\n"
        "    raise SystemExit(0)\n"
        "cli._parser = parser\n"
        "cli.main(['train', '--config', 'unused.yaml'])\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"jax": False, "handler": "cptjax.train.preemption"}
