"""The weight EMA (training.ema): the recurrence, exact resume, the fingerprint, eval and export."""

import json
import shutil

import hf_models
import jax
import numpy as np
import pytest
from batches import CountingData, raw_config
from data_helpers import STDLIB, tokenizer_dir
from run_helpers import flip_largest_file_bytes

from cptjax import load_model
from cptjax.cli import main
from cptjax.core.errors import CptjaxError
from cptjax.train.config import config_from_dict
from cptjax.train.trainer import run

VOCAB = 512
EMA = {"decay": 0.9, "start_step": 2}  # a short span, so a few steps move it well away from the weights


def _config(tmp_path, hf, name="run", **sections):
    sections.setdefault("training", {"steps": 8, "ema": EMA})
    return config_from_dict(raw_config(tmp_path / name, hf, **sections))


def _train(config, until_step=None):
    data = CountingData(VOCAB, config.training.batch_size, config.training.seq_len)
    evals = {"domain": [CountingData(VOCAB, 4, 32, seed=99).batch(0)]}
    return run(config, until_step=until_step, data=data, eval_sets=evals)


def _records(run_dir, kind):
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(x).copy(), tree)


def test_the_ema_is_the_bias_corrected_recurrence_and_skips_non_finite_steps(tiny_hf, tmp_path):
    """The trainer's own jitted step, 6 steps, step 4 non-finite: the EMA equals a float64 NumPy
    recomputation of ema_n = (1 - w_n) ema + w_n params_n, w_n = (1 - d) / (1 - d^n), n counted from
    start_step (the weights themselves before it), and optax.ema(debias=True) over the same weights."""
    import optax

    from cptjax.train.preemption import Preemption
    from cptjax.train.start import choose_start, initial_state
    from cptjax.train.step import build_setup

    config = _config(tmp_path, tiny_hf("qwen3-0.6b"), model={"param_dtype": "float32"})
    start = choose_start(config)
    data = CountingData(VOCAB, 4, 32)
    setup = build_setup(config, start.model_config, num_sources=2)
    state = initial_state(start, config, setup, data, Preemption())
    start.close()
    assert jax.tree.map(lambda e: e.sharding, state["ema"]) == jax.tree.map(lambda p: p.sharding, state["params"])
    assert all(e.dtype == np.float32 for e in jax.tree.leaves(state["ema"]))

    params, emas, skipped = [], [], []
    for step in range(1, 7):
        batch = next(data)
        if step == 4:
            batch = dict(batch, loss_mask=batch["loss_mask"] * np.nan)
        state, metrics = setup.step_fn(state, setup.to_global(batch))
        params.append(_host(state["params"]))
        emas.append(_host(state["ema"]))
        skipped.append(bool(metrics["skipped"]))
    assert skipped == [False, False, False, True, False, False]

    decay, first = EMA["decay"], EMA["start_step"]
    expected = jax.tree.map(lambda p: p.astype(np.float64), params[0])
    for step in range(1, 7):
        p = params[step - 1]
        if step < first:  # before start_step: exactly the weights
            assert all(np.array_equal(e, q) for e, q in zip(jax.tree.leaves(emas[step - 1]), jax.tree.leaves(p)))
            expected = jax.tree.map(lambda q: q.astype(np.float64), p)
            continue
        if not skipped[step - 1]:
            n = step - first + 1
            w = (1 - decay) / (1 - decay ** n)
            expected = jax.tree.map(lambda e, q: (1 - w) * e + w * q.astype(np.float64), expected, p)
        else:  # left as it was, to the bit
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(emas[step - 1]),
                                                            jax.tree.leaves(emas[step - 2])))
        for got, want in zip(jax.tree.leaves(emas[step - 1]), jax.tree.leaves(expected), strict=True):
            # float32 arithmetic against float64: a few ulps of the weights' scale per step
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-7)
    # The EMA has moved away from the weights (decay 0.9 over 4 updates).
    assert max(float(np.abs(e - p).max()) for e, p in
               zip(jax.tree.leaves(emas[-1]), jax.tree.leaves(params[-1]))) > 1e-5

    # optax's debiased EMA over steps 2 and 3 (before the skipped step) is the same average.
    ema = optax.ema(decay, debias=True)
    optax_state = ema.init(params[first - 1])
    for p in params[first - 1:3]:
        averaged, optax_state = ema.update(p, optax_state)
    for got, want in zip(jax.tree.leaves(emas[2]), jax.tree.leaves(averaged), strict=True):
        np.testing.assert_allclose(got, np.asarray(want), rtol=2e-6, atol=2e-7)


@pytest.mark.slow
def test_resume_restores_the_ema_bit_for_bit_and_eval_and_export_use_it(tiny_hf, tmp_path):
    hf = tiny_hf("llama-3.2-1b")
    sections = dict(training={"steps": 8, "ema": EMA}, checkpoint={"every": 4}, eval={"every": 4, "ema": True})
    straight = _train(_config(tmp_path, hf, "straight", **sections))
    assert straight.final_step == 8
    first = _train(_config(tmp_path, hf, "split", **sections), until_step=4)
    assert first.final_step == 4
    second = _train(_config(tmp_path, hf, "split", **sections))
    assert second.origin.startswith("resumed from step 4") and second.final_step == 8
    for a, b in zip(jax.tree.leaves(straight.state["ema"]), jax.tree.leaves(second.state["ema"]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))

    # Held-out evaluations on the EMA: eval_ema records from start_step on, beside the weights' own.
    run_dir = tmp_path / "split"
    assert [r["step"] for r in _records(run_dir, "eval")] == [0, 4, 8]
    ema_evals = _records(run_dir, "eval_ema")
    assert [r["step"] for r in ema_evals] == [4, 8]
    assert ema_evals == _records(tmp_path / "straight", "eval_ema")
    assert ema_evals[-1]["domain"]["loss"] != _records(run_dir, "eval")[-1]["domain"]["loss"]

    # The step's fingerprint covers the EMA: a changed EMA file is refused on resume, by name.
    checkpoints = run_dir / "checkpoints"
    meta = json.loads((checkpoints / "8" / "train_meta" / "metadata").read_text())
    assert any(name.startswith("ema/") for name in meta["fingerprint"]["arrays"])
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    flip_largest_file_bytes(damaged / "checkpoints" / "8" / "ema")
    with pytest.raises(CptjaxError, match=r"step 8 cannot be read.*ema/.*differ from the fingerprint"):
        _train(_config(tmp_path, hf, "damaged", **dict(sections, training={"steps": 9, "ema": EMA})))

    # The export of the EMA loads in transformers and gives cptjax's logits on the EMA.
    out = tmp_path / "ema_hf"
    assert main(["convert", "orbax-to-hf", "--ckpt", str(checkpoints), "--out", str(out), "--ema"]) == 0
    ours = load_model(run_dir, ema=True)
    for a, b in zip(jax.tree.leaves(ours.model), jax.tree.leaves(second.state["ema"])):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # the loaded EMA is the trained one
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 16))
    theirs = hf_models.hf_logits(hf_models.load_hf_model(out), tokens)
    np.testing.assert_allclose(theirs, np.asarray(ours.logits(tokens)), atol=1e-4, rtol=0)
    raw = hf_models.hf_logits(hf_models.load_hf_model(hf), tokens)
    assert np.abs(theirs - raw).max() > 1e-3  # not the base model's
    card = (out / "README.md").read_text()
    assert "(step 8, EMA)" in card and "exponential moving average" in card

    # `cptjax eval` of RUN@8:ema is the EMA: the same numbers as its float32 export, not the weights'.
    tokenizer = tokenizer_dir("llama", VOCAB)
    report = tmp_path / "eval"
    models = [f"{run_dir}@8", f"{run_dir}@8:ema", str(out)]
    code = f"code=text:{STDLIB / 'json' / '*.py'}"
    assert main(["eval", *(f for m in models for f in ("--model", m)), "--data", code, "--tokenizer", str(tokenizer),
                 "--seq-len", "32", "--out", str(report)]) == 0
    losses = [json.loads((report / "eval.json").read_text())["models"][m]["code"]["loss"] for m in models]
    assert losses[1] == pytest.approx(losses[2], rel=1e-6) and abs(losses[1] - losses[0]) > 1e-4, losses

    # The eval_ema record is the EMA's loss: the held-out batch through the EMA model loaded above
    # (whose logits transformers just confirmed), documents kept apart as in the packed rows.
    batch = CountingData(VOCAB, 4, 32, seed=99).batch(0)
    logits = np.asarray(ours.logits(batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
    loss = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    assert ema_evals[-1]["domain"]["loss"] == pytest.approx(loss, rel=1e-5)


def test_a_run_without_an_ema_says_so_in_one_line(tiny_hf, tmp_path, capsys):
    hf = tiny_hf("llama-3.2-1b")
    short = dict(checkpoint={"every": 2}, eval={"every": 100, "at_start": False}, schedule={"warmup": 1})
    plain = _config(tmp_path, hf, training={"steps": 2}, **short)
    assert _train(plain).final_step == 2
    checkpoints = tmp_path / "run" / "checkpoints"
    capsys.readouterr()

    out = tmp_path / "export"
    assert main(["convert", "orbax-to-hf", "--ckpt", str(checkpoints), "--out", str(out), "--ema"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--ckpt {checkpoints}: step 2 holds no EMA" in err and "training.ema" in err
    assert not out.exists()
    data = tmp_path / "heldout.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    assert main(["eval", "--model", f"{tmp_path / 'run'}@2:ema", "--data", f"d=jsonl:{data}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "step 2 holds no EMA" in err
    with pytest.raises(CptjaxError, match="is an HF folder, which holds no EMA"):
        load_model(hf, ema=True)

    # Adding training.ema to this run: its step 2 has no average to continue, unless the EMA starts later.
    with pytest.raises(CptjaxError, match=r"training.ema: step 2 of .* saved without an EMA.*start_step to 3"):
        _train(_config(tmp_path, hf, training={"steps": 3, "ema": {"decay": 0.9}}, **short))
    resumed = _train(_config(tmp_path, hf, training={"steps": 3, "ema": {"decay": 0.9, "start_step": 3}}, **short))
    assert resumed.final_step == 3 and "ema" in resumed.state


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("training.ema.decay", "1.0", "training.ema.decay: must be in (0, 1)"),
    ("training.ema.start_step", "0", "training.ema.start_step: must be >= 1"),
    ("eval.ema", "true", "eval.ema: there is no EMA to evaluate; set training.ema"),
])
def test_bad_ema_keys_get_one_line(key, value, expected, tiny_hf, tmp_path, capsys):
    import yaml

    raw = raw_config(tmp_path / "run", tiny_hf("llama-3.2-1b"))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["config", "show", "--config", str(path), "--set", f"{key}={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected in err


@pytest.mark.usefixtures("no_compile_cache")  # memory figures of programs compiled here, not loaded
def test_plan_counts_the_ema(tmp_path):
    """Enabling training.ema raises the planned per-device memory by the parameters' float32 size."""
    import tiny_configs

    from cptjax.model.config import read_hf_config_file
    from cptjax.train.plan import format_plan, plan

    hf = tmp_path / "config.json"
    hf.write_text(json.dumps(tiny_configs.shrunk_config("qwen2.5-0.5b")))
    raw = raw_config(tmp_path / "run", hf, training={"steps": 10, "batch_size": 4, "seq_len": 64})
    raw["model"] = {"hf_config": str(hf), "compute_dtype": "float32", "param_dtype": "bfloat16"}
    without = config_from_dict(raw)
    with_ema = config_from_dict(dict(raw, training={**raw["training"], "ema": {}}))
    model_config = read_hf_config_file(hf)
    a, b = plan(without, model_config), plan(with_ema, model_config)
    assert a.ema_bytes == 0 and b.ema_bytes == 2 * a.params_bytes  # float32 beside bfloat16 weights
    # The compiled state (arguments + outputs - donated) grows by the EMA, to within the 8-byte
    # step counter and alignment; the compiler's temporaries move by up to ~2% of this tiny model's
    # (its scheduling differs), so `needed` is held to the EMA's size only within 25%.
    state = lambda p: p.memory["argument"] + p.memory["output"] - p.memory["alias"]  # noqa: E731
    assert abs(state(b) - state(a) - b.ema_bytes) <= 0.01 * b.ema_bytes, (a.memory, b.memory, b.ema_bytes)
    assert abs((b.needed - a.needed) - b.ema_bytes) <= 0.25 * b.ema_bytes, (a.needed, b.needed, b.ema_bytes)
    assert "weight EMA" in format_plan(b, "c.yaml", model_config, with_ema)
    assert "weight EMA" not in format_plan(a, "c.yaml", model_config, without)
