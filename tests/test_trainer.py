"""The training loop: start order, exact resume, logs and checkpoints, NaN handling."""

import json

import jax
import numpy as np
import pytest
from batches import CountingData, raw_config

from cptjax import load_model
from cptjax.train.config import config_from_dict
from cptjax.train.trainer import run

VOCAB = 512


def _train(raw, until_step=None, data_seed=0):
    config = config_from_dict(raw)
    data = CountingData(VOCAB, config.training.batch_size, config.training.seq_len, data_seed)
    evals = {"domain": [CountingData(VOCAB, 4, 32, seed=99).batch(0)]}
    return run(config, until_step=until_step, data=data, eval_sets=evals)


def _records(run_dir, kind):
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.slow
def test_resume_is_bit_exact(tiny_hf, tmp_path):
    hf = tiny_hf("llama-3.2-1b")
    straight = _train(raw_config(tmp_path / "straight", hf))
    assert straight.final_step == 40 and straight.stopped_early is None

    first = _train(raw_config(tmp_path / "split", hf), until_step=20)
    assert first.final_step == 20 and "weights from" in first.origin
    second = _train(raw_config(tmp_path / "split", hf))
    assert second.origin.startswith("resumed from step 20") and second.final_step == 40

    for a, b in zip(jax.tree.leaves(straight.state["params"]), jax.tree.leaves(second.state["params"]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    losses = lambda d: [(r["step"], r["loss"]) for r in _records(d, "train")]  # noqa: E731
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    assert [s for s, _ in losses(tmp_path / "split")] == list(range(1, 41))


def test_run_layout_logs_and_rewarm(tiny_hf, tmp_path):
    hf = tiny_hf("llama-3.2-1b")
    raw = raw_config(tmp_path / "run", hf, training={"steps": 12}, checkpoint={"every": 5, "keep_last": 2},
                     eval={"every": 6}, schedule={"peak_lr": 1e-3, "warmup": 4, "end_lr": 1e-4})
    result = _train(raw)
    run_dir = tmp_path / "run"
    assert result.final_step == 12
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 12]  # keep_last 2 of 5, 10, 12
    assert (run_dir / "checkpoints" / "hf_assets").is_dir()

    train = _records(run_dir, "train")
    lrs = [r["learning_rate"] for r in train]
    assert lrs[0] == pytest.approx(1e-3 / 4, rel=1e-5)  # re-warm: the first update is not at lr 0
    assert lrs[3] == pytest.approx(1e-3, rel=1e-5) and max(lrs) == lrs[3]
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-4)
    assert all(set(r["source_loss"]) == {"domain", "replay"} for r in train)
    evals = _records(run_dir, "eval")
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[-1]["domain"]["loss"] < evals[0]["domain"]["loss"]
    assert evals[0]["domain"]["bits_per_byte"] > 0

    # The run's checkpoint is a cptjax checkpoint: load_model reads its latest step.
    model = load_model(run_dir / "checkpoints")
    assert model.logits(np.zeros((1, 8), np.int32)).shape == (1, 8, VOCAB)


def test_nan_stops_the_run_and_is_never_checkpointed(tiny_hf, tmp_path):
    hf = tiny_hf("qwen3-0.6b")
    raw = raw_config(tmp_path / "run", hf, training={"steps": 8}, checkpoint={"every": 2},
                     schedule={"peak_lr": 1e30, "warmup": 1, "end_lr": 1e29})
    result = _train(raw)
    assert result.stopped_early and "not finite at step" in result.stopped_early
    bad_step = int(result.stopped_early.split("at step ")[1].split()[0])
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert all(s < bad_step for s in saved)


def test_init_from_a_bf16_checkpoint_then_resume_without_it(tiny_hf, tmp_path):
    import shutil

    import ml_dtypes

    from cptjax.convert import hf_to_orbax, orbax_to_hf
    from cptjax.io.checkpoint import CheckpointReader

    hf_to_orbax(tiny_hf("qwen3-0.6b"), tmp_path / "fp32")
    orbax_to_hf(tmp_path / "fp32", tmp_path / "bf16_hf", dtype="bfloat16")
    source = hf_to_orbax(tmp_path / "bf16_hf", tmp_path / "bf16_ckpt")
    reader = CheckpointReader(source)
    stored = reader.restore()
    reader.close()
    assert stored["norm"].dtype == ml_dtypes.bfloat16

    raw = raw_config(tmp_path / "run", source, training={"steps": 4}, checkpoint={"every": 2},
                     eval={"every": 100, "at_start": False}, schedule={"peak_lr": 1e-30, "warmup": 1, "end_lr": 0.0})
    first = _train(raw, until_step=2)
    assert "weights from" in first.origin
    params = first.state["params"]
    assert params["norm"].dtype == np.float32  # fp32 master weights from a bf16 checkpoint
    # an lr of 1e-30 leaves the weights as loaded: exactly the bf16 values, upcast
    np.testing.assert_array_equal(np.asarray(params["norm"]), stored["norm"].astype(np.float32))

    shutil.rmtree(source)  # the run needs only its own checkpoint from now on
    second = _train(raw)
    assert second.origin.startswith("resumed from step 2") and second.final_step == 4


def test_source_shares_and_packing_cover_the_whole_logging_window(tiny_hf, tmp_path):
    """A record every 4 steps reports the tokens of all 4 steps, not only the logged one."""
    raw = raw_config(tmp_path / "run", tiny_hf("llama-3.2-1b"), training={"steps": 8},
                     logging={"every": 4, "progress": "lines"}, eval={"every": 100, "at_start": False})
    _train(raw)
    train = _records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == [4, 8]
    rows, length = 4, 32
    # CountingData rows: a 'domain' document of 17 tokens (16 targets), a 'replay' one of 16
    # (15 targets), one padding position.
    for record in train:
        assert record["window_steps"] == 4
        assert record["source_tokens"] == {"domain": 4 * rows * 16, "replay": 4 * rows * 15}
        assert record["source_share"]["domain"] == pytest.approx(16 / 31)
        assert record["packing_efficiency"] == pytest.approx((length - 1) / length)
