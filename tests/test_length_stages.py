"""Length stages and length-aware mixing: seq_len and rows per step change at a data stage's start
step, exactly resumable on either side of it (the data alone, and a whole training run), and the
per-source length options (min_tokens, long_upsample) leave out exactly what they say."""

import json
import shutil

import jax
import numpy as np
import pytest
import tiny_configs
import yaml
from data_helpers import (
    STDLIB,
    assert_batches_equal,
    collect,
    jargon_paragraphs,
    reassemble,
    tokenizer_dir,
    wiki_articles,
    workdir,
    write_jsonl,
)
from run_helpers import records

from cptjax.core.config_tree import to_dict
from cptjax.core.errors import CptjaxError
from cptjax.data.config import DataConfig, LongUpsample, SourceConfig, StageConfig, StageShape, shape_at
from cptjax.data.pipeline import LengthFilter, build_train_pipeline
from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec
from cptjax.measure.eval_models import eval_sets_from_file
from cptjax.measure.run_logs import RunLog, run_summary
from cptjax.model.config import ModelConfig
from cptjax.train.config import config_from_dict
from cptjax.train.step import check_layout
from cptjax.train.trainer import run

CODE = SourceConfig(name="code", type="text", paths=(str(STDLIB / "json" / "*.py"),))


def _pipeline(config: DataConfig, seq_len: int, batch_size: int):
    return build_train_pipeline(config, tokenizer_dir("llama"), seq_len=seq_len, batch_size=batch_size,
                                process_index=0, process_count=1)


def test_length_stage_config_inherits_and_refuses_with_the_key(tmp_path):
    two = (CODE, SourceConfig(name="b", type="text", paths=("x",), weight=0.5))
    config = DataConfig(sources=two, stages=(StageConfig(start_step=5, weights=(1, 3)),
                                             StageConfig(start_step=9, seq_len=256, batch_size=2),
                                             StageConfig(start_step=20, batch_size=8)))
    assert config.stage_shapes(64, 4) == [StageShape(1, 64, 4), StageShape(5, 64, 4), StageShape(9, 256, 2),
                                          StageShape(20, 256, 8)]
    assert config.stage_weights()[2:] == [(9, (0.25, 0.75)), (20, (0.25, 0.75))]  # weights kept from step 5
    shapes = config.stage_shapes(64, 4)
    assert [shape_at(shapes, s).seq_len for s in (0, 1, 8, 9, 19, 20, 1000)] == [64, 64, 64, 256, 256, 256, 256]
    for stage, message in [
            ({"start_step": 3}, r"data.stages\[0\]: changes nothing; give weights, seq_len or batch_size"),
            ({"start_step": 3, "seq_len": 0}, r"data.stages\[0\].seq_len: must be >= 1 or null, got 0"),
            ({"start_step": 3, "batch_size": -2}, r"data.stages\[0\].batch_size: must be >= 1")]:
        with pytest.raises(CptjaxError, match=message):
            DataConfig(sources=(CODE,), stages=(StageConfig(**stage),))
    for options, message in [
            ({"min_tokens": 0}, r"data.sources\[0\].min_tokens: must be a positive integer"),
            ({"long_upsample": LongUpsample(min_tokens=100, factor=0.5)},
             r"data.sources\[0\].long_upsample.factor: must be a finite number >= 1"),
            ({"min_tokens": 200, "long_upsample": LongUpsample(min_tokens=100, factor=2)},
             r"long_upsample.min_tokens \(100\): min_tokens \(200\) already drops every shorter document")]:
        with pytest.raises(CptjaxError, match=message):
            DataConfig(sources=(SourceConfig(name="a", type="text", paths=("x",), **options),))

    raw = {"run_dir": "unused", "model": {"hf_config": "unused.json"},
           "data": {"sources": [{"name": "a", "type": "text", "paths": ["x"]}],
                    "stages": [{"start_step": 4, "seq_len": 128, "batch_size": 3}, {"start_step": 99, "seq_len": 999}]},
           "training": {"steps": 10, "batch_size": 8, "seq_len": 64}, "schedule": {"peak_lr": 1e-4},
           "optimizer": {"grad_accum_steps": 2}}
    with pytest.raises(CptjaxError, match=r"data.stages\[0\].batch_size \(step 4 on\) 3 is not divisible by "
                       r"optimizer.grad_accum_steps 2"):
        config_from_dict(raw)
    raw["data"]["stages"][0]["batch_size"] = 4
    config = config_from_dict(raw)
    # the stage at step 99 is past training.steps: never reached, so neither checked nor planned
    assert config.stage_shapes == [StageShape(1, 64, 8), StageShape(4, 128, 4)]
    assert config.eval_shape == StageShape(4, 128, 4)  # evaluations: the longest rows, all run
    assert config_from_dict(to_dict(config)) == config  # what `cptjax config show` and checkpoints keep
    model = ModelConfig.from_hf_config(dict(tiny_configs.shrunk_config("llama-3.2-1b"), max_position_embeddings=100))
    with pytest.raises(CptjaxError, match=r"data.stages\[0\].seq_len \(step 4 on\) 128 exceeds the model's "
                       r"max_position_embeddings \(100\)"):
        check_layout(config, model, jax.devices()[:1])

    # `cptjax eval --data-config RUN/config.yaml` scores in the shape the run's own evaluations used
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "eval_sets": [
        {"name": "e", "type": "text", "paths": [str(STDLIB / "json" / "*.py")]}]}}))
    assert eval_sets_from_file(str(path))[1] == {"seq_len": 128, "batch_size": 4}
    # and `cptjax report` counts each stage's positions: 3 x 8 x 64 + 3 x 4 x 128
    assert "(3,072 positions in all)" in run_summary(RunLog(tmp_path, config, [], []), 6)[1]


def test_pipeline_changes_shape_at_the_boundary_and_resumes_on_either_side():
    config = DataConfig(sources=(CODE,), stages=(StageConfig(start_step=4, seq_len=96, batch_size=2),), seed=3)
    straight = _pipeline(config, 48, 4)
    batches, states = [], []
    for _ in range(8):
        batches.append(next(straight))
        states.append(json.loads(json.dumps(straight.get_state())))  # what step k's checkpoint holds
    straight.close()
    assert [b["inputs"].shape for b in batches] == [(4, 48)] * 3 + [(2, 96)] * 5
    assert states[2]["seq_len"] == 48 and states[3]["seq_len"] == 96
    # one source: its rows are one stream, each row starting at the previous row's last token, across
    # the boundary too (nothing lost, nothing repeated)
    rows = [(b["inputs"][r], b["targets"][r]) for b in batches for r in range(len(b["inputs"]))]
    for (_, targets), (inputs, _) in zip(rows, rows[1:]):
        assert targets[-1] == inputs[0]
    for saved in (3, 5):  # the last step before the boundary (batches of the next already built), one after
        resumed = _pipeline(config, 48, 4)
        resumed.set_state(states[saved - 1])
        assert_batches_equal(collect(resumed, 8 - saved), batches[saved:])
        resumed.close()
    other = DataConfig(sources=(CODE,), stages=(StageConfig(start_step=4, seq_len=64, batch_size=2),), seed=3)
    with pytest.raises(CptjaxError, match=r"cannot resume: training.seq_len \(or the seq_len and batch_size of "
                       r"the data.stages entry of step 4\) was 96 when the checkpoint was saved, now 64"):
        _pipeline(other, 48, 4).set_state(states[4])


def test_long_upsample_draw_is_a_fixed_1_in_factor_per_place():
    source = SourceConfig(name="a", type="text", paths=("x",), min_tokens=10,
                          long_upsample=LongUpsample(min_tokens=100, factor=4))
    lengths = LengthFilter(source, seed=123)
    assert lengths.reason(9, 0) == "short" and lengths.reason(100, 0) is None
    draws = [lengths.reason(50, place) for place in range(20_000)]
    assert draws == [LengthFilter(source, seed=123).reason(50, place) for place in range(20_000)]
    # 1 - 1/4 left out; 3 standard deviations of a binomial share over 20,000 draws: 0.0092
    assert abs(draws.count("downsampled") / len(draws) - 0.75) < 0.0092
    assert draws != [LengthFilter(source, seed=124).reason(50, place) for place in range(20_000)]


def test_min_tokens_and_long_upsample_in_the_stream():
    """Short documents (Jargon File paragraphs) with 4 long ones (WikiText articles): min_tokens keeps
    only the long ones; long_upsample 4 keeps every long one and about a quarter of the short ones."""
    tokenizer = DocumentTokenizer(load_tokenizer_spec(tokenizer_dir("llama")))
    short = [t for t in jargon_paragraphs()[:500] if len(tokenizer.encode_batch([t])[0]) < 200][:300]
    texts = short + list(wiki_articles()[:4])
    ids = {tuple(x[1:]): len(x) for x in tokenizer.encode_batch(texts)}  # what reassemble rebuilds
    path = write_jsonl(workdir() / "lengths" / "mixed.jsonl", texts)

    def run(**options):
        source = SourceConfig(name="mixed", type="jsonl", paths=(str(path),), **options)
        pipeline = _pipeline(DataConfig(sources=(source,), seed=1), 128, 4)
        batches = collect(pipeline, 120)  # 61,440 positions: over 2 epochs with upsampling
        counts = pipeline.document_counts().get("mixed")
        state = pipeline.get_state()
        pipeline.close()
        docs = reassemble(batches)[1:-1]  # whole documents only (the first may continue, the last goes on)
        assert all(d in ids for d in docs)
        long_share = sum(len(d) for d in docs if ids[d] >= 200) / sum(len(d) for d in docs)
        return docs, long_share, counts, state

    docs, share, counts, state = run(min_tokens=200)
    assert docs and all(ids[d] >= 200 for d in docs) and share == 1.0
    assert counts["downsampled"] == 0 and counts["kept"] + counts["short"] == counts["passed"]
    epochs = state["streams"][0]["doc"] // len(texts)
    assert epochs >= 3 and 300 * epochs <= counts["short"] <= 300 * (epochs + 1)

    _, base_share, base_counts, _ = run()
    assert base_counts is None  # no length options: nothing to report
    docs, share, counts, state = run(long_upsample=LongUpsample(min_tokens=200, factor=4))
    assert counts["short"] == 0 and counts["kept"] + counts["downsampled"] == counts["passed"]
    long_tokens = sum(n for n in ids.values() if n >= 200)
    short_tokens = sum(n for n in ids.values() if n < 200)
    expected = long_tokens / (long_tokens + short_tokens / 4)
    assert base_share < 0.45 and share > 0.6, (base_share, share, expected)
    # every long document of each epoch is there, short ones at 1 in 4 (binomial: 300 draws an epoch)
    long_seen = sum(1 for d in docs if ids[d] >= 200)
    passes = state["streams"][0]["doc"] / len(texts)
    assert abs(long_seen - 4 * passes) <= 4
    assert abs(counts["downsampled"] / (counts["passed"] * 300 / 304) - 0.75) < 0.05
    # measured 0.39 -> 0.76 (0.74 expected over whole epochs): the 120 batches end mid-epoch, and
    # one long article is about 7% of their tokens
    assert abs(share - expected) < 0.1, (share, expected)


@pytest.mark.slow
def test_run_resumes_bit_identically_on_either_side_of_a_length_boundary(cpt_config, tmp_path):
    """5 steps: 4 rows of 64 tokens, then from step 3 on 2 rows of 128 (the same tokens per step).
    Killed with its last checkpoint at step 2 (the last short step; the pipeline had built long
    batches ahead) or at step 4 (on the long side), the run resumed from there ends exactly as the
    one never stopped."""
    raw = yaml.safe_load(cpt_config.read_text())
    raw["data"]["stages"] = [{"start_step": 3, "seq_len": 128, "batch_size": 2}]
    raw["data"]["sources"][1]["min_tokens"] = 3000  # the longer English articles only
    raw["data"]["eval_sets"] = []  # the train step's compiles are this test's cost; evaluations add theirs
    raw.update(training={**raw["training"], "steps": 5}, checkpoint={"every": 2, "keep_last": 5})

    def train(name):
        return run(config_from_dict({**raw, "run_dir": str(tmp_path / name)}))

    straight = train("straight")
    assert straight.final_step == 5
    key = lambda d: [(r["step"], r["loss"], r.get("documents")) for r in records(tmp_path / d, "train")]  # noqa: E731
    assert [r[0] for r in key("straight")] == [1, 2, 3, 4, 5]
    for last in (2, 4):  # what a kill leaves: the checkpoints up to `last`, the logs of later steps
        shutil.copytree(tmp_path / "straight", tmp_path / f"killed-{last}")
        for step in {4, 5} - {last}:
            shutil.rmtree(tmp_path / f"killed-{last}" / "checkpoints" / str(step))
        resumed = train(f"killed-{last}")
        assert resumed.origin.startswith(f"resumed from step {last}") and resumed.final_step == 5
        for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert key(f"killed-{last}") == key("straight")
    documents = [r["documents"] for r in records(tmp_path / "straight", "train")]
    assert all(set(d) == {"english"} for d in documents)  # the one source with a length option
    assert all(d["english"]["kept"] + d["english"]["short"] == d["english"]["passed"] for d in documents)

