"""Packing: the batch contract, and no token of any document lost or duplicated in an epoch."""

from collections import Counter

import numpy as np
import pytest
from data_helpers import (
    STDLIB,
    collect,
    corpus_files,
    reassemble,
    shakespeare_speeches,
    stdlib_files,
    tokenizer_dir,
    wiki_articles,
    workdir,
)
from transformers import AutoTokenizer

from cptjax.core.errors import CptjaxError
from cptjax.data.config import DataConfig, SourceConfig
from cptjax.data.packing import BATCH_KEYS
from cptjax.data.pipeline import build_train_pipeline


def _epoch(source: SourceConfig, style: str, seq_len: int, batch_size: int) -> list[dict]:
    """Every batch of one epoch of a single "stop" source."""
    config = DataConfig(sources=(source,), seed=3)
    pipeline = build_train_pipeline(config, tokenizer_dir(style), seq_len=seq_len,
                                    batch_size=batch_size, process_index=0, process_count=1)
    batches = []
    with pytest.raises(CptjaxError, match=r"data.sources\[0\] \(.*\): all of this source's "
                       r"documents have been used \(on_exhaustion: stop\)"):
        while True:
            batches.append(next(pipeline))
    pipeline.close()
    return batches


def _expected(texts, style: str) -> Counter:
    """Ground truth from transformers: each document's ids (with the tokenizer's own BOS) + EOS,
    without the first token, which is never a target."""
    hf = AutoTokenizer.from_pretrained(tokenizer_dir(style))
    docs = [hf(t, add_special_tokens=True)["input_ids"] + [hf.eos_token_id] for t in texts if t]
    return Counter(tuple(d[1:]) for d in docs)


def _plays_parquet() -> str:
    """The first 1,500 speeches as Parquet: a smaller slice keeps the test quick."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = workdir() / "plays-1500.parquet"
    pq.write_table(pa.table({"text": list(shakespeare_speeches()[:1500])}), path)
    return str(path)


CASES = {
    "code-text-llama": (lambda: SourceConfig(name="code", type="text", on_exhaustion="stop",
                                             paths=(str(STDLIB / "json" / "*.py"),)),
                        lambda: [p.read_text(encoding="utf-8") for p in stdlib_files("json/*.py")],
                        "llama", 64, 4),
    "wiki-jsonl-qwen": (lambda: SourceConfig(name="wiki", type="jsonl", on_exhaustion="stop",
                                             paths=(str(corpus_files()["wiki_jsonl"]),)),
                        lambda: list(wiki_articles()), "qwen", 256, 6),
    "plays-parquet-llama": (lambda: SourceConfig(name="plays", type="parquet", on_exhaustion="stop",
                                                 paths=(_plays_parquet(),)),
                            lambda: list(shakespeare_speeches()[:1500]), "llama", 100, 8),
}


@pytest.mark.parametrize("case", CASES)
def test_every_token_is_a_target_exactly_once_per_epoch(case):
    make_source, texts, style, seq_len, batch_size = CASES[case]
    batches = _epoch(make_source(), style, seq_len, batch_size)
    got = Counter(reassemble(batches))
    expected = _expected(texts(), style)
    assert sum(got.values()) == sum(expected.values())
    assert got == expected
    hf = AutoTokenizer.from_pretrained(tokenizer_dir(style))
    inputs = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
    if style == "llama":  # Llama convention: one BOS per document, at its start
        assert (inputs == hf.bos_token_id).sum() == sum(expected.values())
    else:  # Qwen convention: no BOS at all, <|endoftext|> ends each document
        assert hf.bos_token_id is None
        assert hf.convert_ids_to_tokens(hf.eos_token_id) == "<|endoftext|>"
    assert all(doc[-1] == hf.eos_token_id for doc in got)
    # Padding only in the last rows of the stream: every earlier row is full.
    pad_rows = [i for i, b in enumerate(batches) for r in range(b["inputs"].shape[0])
                if (b["segment_ids"][r] == 0).any()]
    assert all(i == len(batches) - 1 for i in pad_rows)


def test_batch_contract():
    config = DataConfig(sources=(
        SourceConfig(name="code", type="text", paths=(str(STDLIB / "json" / "*.py"),), weight=0.5),
        SourceConfig(name="wiki", type="jsonl", paths=(str(corpus_files()["wiki_jsonl"]),),
                     weight=0.5)), prefetch=0)
    pipeline = build_train_pipeline(config, tokenizer_dir("llama"), seq_len=96, batch_size=8,
                                    process_index=0, process_count=1)
    assert pipeline.source_names == ("code", "wiki")
    for batch in collect(pipeline, 20):
        assert tuple(batch) == BATCH_KEYS
        for key, dtype in zip(BATCH_KEYS, ("int32", "int32", "float32", "int32", "int32", "int32"), strict=True):
            assert batch[key].dtype == dtype and batch[key].shape == (8, 96), key
        seg = batch["segment_ids"]
        # targets are the next inputs within a row
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        # a target counts exactly when it continues its input's document; the last target's
        # segment lies past the row, so there it can only be checked to follow a real input
        real = seg > 0
        np.testing.assert_array_equal(batch["loss_mask"][:, :-1] == 1,
                                      (seg[:, 1:] == seg[:, :-1]) & real[:, :-1])
        assert ((batch["loss_mask"][:, -1] == 1) <= real[:, -1]).all()
        # positions restart at 0 at each segment and count up inside it
        starts = np.concatenate([np.ones((8, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        assert (batch["positions"][starts] == 0).all()
        np.testing.assert_array_equal(batch["positions"][:, 1:][~starts[:, 1:]],
                                      batch["positions"][:, :-1][~starts[:, 1:]] + 1)
        # segment ids count documents from 1 in each row; one source per row
        assert (seg[:, 0] == 1).all() and (np.diff(seg, axis=1) >= 0).all()
        for r in range(8):
            assert len(set(batch["source_ids"][r].tolist())) == 1
        # nothing is padding while every source repeats: each input position holds a document token
        assert (seg > 0).all()
