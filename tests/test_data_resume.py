"""Determinism and exact resume: a saved state continues with exactly the batches that came next."""

import json

import pytest
from data_helpers import STDLIB, assert_batches_equal, collect, corpus_files, tokenizer_dir

from cptjax.core.errors import CptjaxError
from cptjax.data.config import DataConfig, SourceConfig
from cptjax.data.pipeline import build_train_pipeline


def _config(**kwargs) -> DataConfig:
    sources = (SourceConfig(name="code", type="text", paths=(str(STDLIB / "json" / "*.py"),
                                                             str(STDLIB / "email" / "mime" / "*.py")),
                            weight=0.8),
               SourceConfig(name="wiki", type="jsonl", paths=(str(corpus_files()["wiki_jsonl"]),),
                            weight=0.2))
    return DataConfig(sources=sources, **{"seed": 7, **kwargs})


def _pipeline(config, batch_size=8, seq_len=64, process_count=1):
    return build_train_pipeline(config, tokenizer_dir("llama"), seq_len=seq_len,
                                batch_size=batch_size, process_index=0, process_count=process_count)


def _save_and_restore(save_config, restore_config, k=13, n=50):
    reference = _pipeline(save_config)
    collect(reference, k)
    state = json.loads(json.dumps(reference.get_state()))  # what a checkpoint stores
    expected = collect(reference, n)
    reference.close()
    restored = _pipeline(restore_config)
    restored.set_state(state)
    assert_batches_equal(collect(restored, n), expected)
    assert restored.get_state() == reference.get_state()
    restored.close()
    return state


def test_restore_gives_the_next_50_batches():
    state = _save_and_restore(_config(), _config(), k=13)
    assert len(json.dumps(state)) < 2000  # small: two cursors, counts, and checks
    assert state["step"] == 13


def test_same_seed_same_stream_other_seed_other_stream():
    a, b, c = (collect(_pipeline(_config(seed=s)), 5) for s in (7, 7, 8))
    assert_batches_equal(a, b)
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, c))


def test_restore_across_epochs_and_without_prefetch():
    # ~200 batches of 8x64 tokens pass the end of the small code source several times
    state = _save_and_restore(_config(prefetch=0), _config(prefetch=3), k=211)
    assert state["streams"][0]["doc"] > 2 * state["num_docs"][0]  # saved in its third epoch or later


@pytest.mark.slow
def test_restore_with_worker_processes_and_another_worker_count():
    """Grain worker processes tokenize; the state does not depend on how many there are."""
    _save_and_restore(_config(num_workers=2), _config(num_workers=1), k=21)


def test_state_from_another_setup_is_refused():
    pipeline = _pipeline(_config())
    collect(pipeline, 2)
    state = pipeline.get_state()
    pipeline.close()
    with pytest.raises(CptjaxError, match=r"saved with 1 data-loading processes \(hosts\), this run "
                       r"has 2.*Resume on 1 processes, or start a new run"):
        _pipeline(_config(), process_count=2).set_state(state)
    with pytest.raises(CptjaxError, match=r"saved with 1 data-loading processes"):
        _pipeline(_config(), process_count=2).set_state([state])
    expected = r"cannot resume: training.batch_size was 8 when the checkpoint was saved, now 16"
    with pytest.raises(CptjaxError, match=expected):
        _pipeline(_config(), batch_size=16).set_state(state)
    with pytest.raises(CptjaxError, match=r"cannot resume: data.seed was 7 when the checkpoint was saved, now 8"):
        _pipeline(_config(seed=8)).set_state(state)
    renamed = DataConfig(sources=(_config().sources[0],
                                  SourceConfig(name="web", type="jsonl",
                                               paths=(str(corpus_files()["wiki_jsonl"]),))), seed=7)
    with pytest.raises(CptjaxError, match=r"cannot resume: data.sources was \['code', 'wiki'\]"):
        _pipeline(renamed).set_state(state)
