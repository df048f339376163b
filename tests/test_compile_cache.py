"""compile_cache: where a run keeps its compiled programs, and JAX's settings around it. The resume
that compiles nothing, through the CLI in separate processes, is in test_train_cli.py."""

import jax
import pytest
from batches import CountingData, raw_config

from cptjax.core.errors import CptjaxError
from cptjax.train.config import config_from_dict
from cptjax.train.trainer import run

VOCAB = 512


def _train(raw, until_step=None):
    config = config_from_dict(raw)
    data = CountingData(VOCAB, config.training.batch_size, config.training.seq_len)
    evals = {"domain": [CountingData(VOCAB, 4, 32, seed=99).batch(0)]}
    return run(config, until_step=until_step, data=data, eval_sets=evals)


def _short(tmp_path, name, hf, **top):
    return {**raw_config(tmp_path / name, hf, training={"steps": 4}, checkpoint={"every": 2}, eval={"every": 2},
                         schedule={"warmup": 1}), **top}


def test_a_shared_folder_serves_a_second_run_and_jax_settings_come_back(tiny_hf, tmp_path):
    hf = tiny_hf("llama-3.2-1b")
    before = {name: getattr(jax.config, name) for name in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
    shared = tmp_path / "shared-cache"
    first = _train(_short(tmp_path, "a", hf, compile_cache=str(shared)))
    assert first.programs["compiled"] > 0 and any(shared.iterdir())
    assert not (tmp_path / "a" / "compile_cache").exists()  # the folder named, not the run's
    # Another run of the same model and shapes: its train and eval steps come from the first's entries.
    second = _train(_short(tmp_path, "b", hf, compile_cache=str(shared)))
    assert second.programs["loaded"] >= 2 and second.programs["compiled"] == 0
    assert {name: getattr(jax.config, name) for name in before} == before  # as they were before the runs
    # Off: nothing cached, nothing written.
    off = _train(_short(tmp_path, "c", hf, compile_cache=False))
    assert off.programs is None and not (tmp_path / "c" / "compile_cache").exists()


def test_a_start_refused_by_its_checks_leaves_no_cache_folder(tiny_hf, tmp_path):
    raw = _short(tmp_path, "run", tiny_hf("llama-3.2-1b"))
    raw["model"] = {**raw["model"], "attention": "splash"}  # a TPU kernel: refused on this CPU, in run()
    with pytest.raises(CptjaxError, match="splash"):
        _train(raw)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [3, ["a"]])
def test_a_bad_value_names_the_key(tmp_path, value):
    with pytest.raises(CptjaxError, match=r"^compile_cache: "):
        config_from_dict({**raw_config(tmp_path / "run", tmp_path / "hf"), "compile_cache": value})
