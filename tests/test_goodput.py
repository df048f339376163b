"""The goodput account: each start of a run splits its wall time into parts (train/goodput.py);
a restart counts the steps it trains again; the report draws every start."""

import json
import shutil
import statistics
import time

import jax
import jax.numpy as jnp
import pytest
from batches import CountingData, raw_config
from run_helpers import records

from cptjax.measure.report import write_report
from cptjax.train.config import config_from_dict
from cptjax.train.goodput import PARTS, Goodput, process_start_time
from cptjax.train.trainer import run

VOCAB = 512
ROUNDING = 1e-3 * (len(PARTS) + 1)  # each part and the wall time are rounded to the millisecond


def test_nested_timings_count_each_part_once_and_compilation_apart():
    account = Goodput()
    with account.timing("logging"):
        time.sleep(0.05)
        with account.timing("step"):
            time.sleep(0.1)

            @jax.jit
            def fresh(x):  # a new function: XLA compiles it here
                return jnp.sin(x) * 3 + 1
            fresh(jnp.ones(7)).block_until_ready()
    record = account.record()
    assert record["step_s"] >= 0.1 and record["logging_s"] >= 0.05 and record["compile_s"] > 0
    assert record["logging_s"] < 0.05 + 0.1  # the nested step's time is not logging's
    parts = sum(record[f"{p}_s"] for p in PARTS)
    assert abs(parts - record["wall_s"]) <= ROUNDING
    # goodput is step / wall before their rounding to the millisecond
    assert record["goodput"] == pytest.approx(record["step_s"] / record["wall_s"], abs=2e-3 / record["wall_s"])


def test_time_before_the_account_is_startup_and_this_process_start_is_known():
    started = process_start_time()
    assert started is not None and started <= time.time()
    account = Goodput(time.time() - 2.0)
    assert account.record()["startup_s"] >= 2.0 and account.record()["wall_s"] >= 2.0


def test_a_restart_counts_the_steps_trained_again_at_the_median_step_time():
    account = Goodput()
    discarded = [{"step": s, "kind": "train", "step_time_s": t} for s, t in ((9, 0.5), (10, 0.7), (11, 9.0))]
    account.restarted(8, discarded + [{"step": 10, "kind": "eval"}])
    record = account.record()
    assert (record["start_step"], record["recomputed_steps"]) == (8, 3)
    assert record["lost_s"] == pytest.approx(3 * 0.7)


def _train(raw, until_step=None):
    config = config_from_dict(raw)
    data = CountingData(VOCAB, config.training.batch_size, config.training.seq_len)
    evals = {"domain": [CountingData(VOCAB, 4, 32, seed=99).batch(0)]}
    return run(config, until_step=until_step, data=data, eval_sets=evals)


def test_every_start_ends_with_its_account_and_the_report_draws_them(tiny_hf, tmp_path):
    raw = raw_config(tmp_path / "run", tiny_hf("llama-3.2-1b"), training={"steps": 12},
                     checkpoint={"every": 4, "keep_last": 3}, eval={"every": 6}, schedule={"warmup": 1})
    run_dir = tmp_path / "run"
    _train(raw, until_step=8)  # saves at 4 and 8: an account at 4 (the start's so far) and at its end, 8
    accounts = records(run_dir, "goodput")
    assert [(a["step"], a["start_step"]) for a in accounts] == [(4, 0), (8, 0)]
    assert len({a["segment_start"] for a in accounts}) == 1 and accounts[1]["wall_s"] > accounts[0]["wall_s"]
    # A crash after step 8's records, before its checkpoint landed: the next start trains 5-8 again.
    shutil.rmtree(run_dir / "checkpoints" / "8")
    _train(raw)
    last = records(run_dir, "goodput")[-1]
    assert (last["step"], last["start_step"], last["recomputed_steps"]) == (12, 4, 4)
    discarded = [json.loads(line) for line in (run_dir / "logs" / "metrics.discarded.jsonl").read_text().splitlines()]
    # (a step after an evaluation or a save has no step time: the timer restarts there)
    step_times = [r["step_time_s"] for r in discarded if r["kind"] == "train" and r.get("step_time_s")]
    assert last["lost_s"] == pytest.approx(4 * statistics.median(step_times), abs=1e-3)
    for account in records(run_dir, "goodput"):
        assert abs(sum(account[f"{p}_s"] for p in PARTS) - account["wall_s"]) <= ROUNDING
        assert account["step_s"] > 0 and account["eval_s"] > 0 and account["checkpoint_s"] > 0

    report = write_report(run_dir, tmp_path / "report")
    assert "## Where the time went" in report.markdown and report.figures["goodput"] == "goodput.png"
    assert [a["start_step"] for a in report.numbers["goodput"]] == [0, 4]  # one per start, the latest
    assert (report.out / "goodput.png").read_bytes()[:4] == b"\x89PNG"
