"""Mixtures: realized token shares match the weights, and a stage changes them at its step."""

import numpy as np
from data_helpers import STDLIB, collect, corpus_files, tokenizer_dir

from cptjax.data.config import DataConfig, SourceConfig, StageConfig
from cptjax.data.mixture import PERIOD, StagedSelectionMap
from cptjax.data.pipeline import build_train_pipeline


def _sources(domain_weight: float, replay_weight: float):
    return (SourceConfig(name="code", type="text", paths=(str(STDLIB / "email" / "*.py"),),
                         weight=domain_weight),
            SourceConfig(name="wiki", type="jsonl", paths=(str(corpus_files()["wiki_jsonl"]),),
                         weight=replay_weight))


def _shares(batches) -> np.ndarray:
    """Each source's share of the non-padding input tokens, from the batches' source_ids."""
    ids = np.concatenate([b["source_ids"].reshape(-1) for b in batches])
    counts = np.bincount(ids[ids >= 0], minlength=2)
    return counts / counts.sum()


def test_realized_token_shares_match_weights_over_2000_rows():
    config = DataConfig(sources=_sources(0.9, 0.1), seed=11)
    pipeline = build_train_pipeline(config, tokenizer_dir("llama"), seq_len=128, batch_size=10,
                                    process_index=0, process_count=1)
    batches = collect(pipeline, 200)  # 2,000 packed rows
    shares = _shares(batches)
    assert abs(shares[0] - 0.9) < 0.01 and abs(shares[1] - 0.1) < 0.01, shares
    reported = pipeline.realized_shares()
    np.testing.assert_allclose([reported["code"], reported["wiki"]], shares)
    # the replay rows are spread through the run, not bunched: every batch holds one of them
    assert all(abs(_shares([b])[1] - 0.1) < 1e-9 for b in batches)
    pipeline.close()


def test_stage_changes_weights_at_its_step():
    config = DataConfig(sources=_sources(0.95, 0.05),
                        stages=(StageConfig(start_step=60, weights=(0.8, 0.2)),), seed=5)
    pipeline = build_train_pipeline(config, tokenizer_dir("llama"), seq_len=64, batch_size=20,
                                    process_index=0, process_count=1)
    batches = collect(pipeline, 160)  # batches[k] is the batch of step k + 1
    before, after = _shares(batches[:59]), _shares(batches[59:])
    assert abs(before[1] - 0.05) < 0.01 and abs(after[1] - 0.2) < 0.01, (before, after)
    # the change is at step 60 exactly: step 59 has the old mixture, step 60 the new
    assert _shares([batches[58]])[1] == 0.05 and _shares([batches[59]])[1] == 0.2
    reported = pipeline.realized_shares()  # over the whole run so far
    assert abs(reported["wiki"] - (59 * 0.05 + 101 * 0.2) / 160) < 0.01
    pipeline.close()


def test_selection_map_is_exact_and_random_access():
    selection = StagedSelectionMap([(1, (0.7, 0.2, 0.1)), (4, (0.0, 0.5, 0.5))], rows_per_step=400)
    rows = selection.sources_of(0, 2 * PERIOD)
    first = np.bincount(rows[:1200], minlength=3)
    np.testing.assert_array_equal(first, [840, 240, 120])
    assert (rows[1200:] != 0).all()  # weight 0 means never
    # a pure function of the row: any window (a resumed run's next batch) matches the whole
    for first in (5, 999, 1195, 1201, 1990):
        np.testing.assert_array_equal(selection.sources_of(first, 7), rows[first:first + 7])
    # the new stage's pattern starts at its first row, 0.5/0.5 alternating
    assert sorted(rows[1200:1202].tolist()) == [1, 2]
    np.testing.assert_array_equal(np.bincount(rows[1200:2000], minlength=3), [0, 400, 400])
