"""Sources: every format reads the real text, and each bad input gets one clear message."""

import gzip
import json
from collections import Counter

import numpy as np
import pytest
import zstandard
from data_helpers import STDLIB, corpus_files, jargon_paragraphs, tokenizer_dir, wiki_articles, write_jsonl

from cptjax.core.errors import CptjaxError
from cptjax.data.config import DataConfig, InputConfig, SourceConfig
from cptjax.data.pipeline import build_train_pipeline
from cptjax.data.read import open_source


def _read_all(config: InputConfig) -> list[str]:
    source = open_source(config, "data.sources[0]")
    return [source[i] for i in range(len(source))]


def test_jsonl_plain_gzip_zstd_read_the_same_documents(tmp_path):
    texts = list(wiki_articles()[:40])
    plain = write_jsonl(tmp_path / "a.jsonl", texts, field="body")
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        config = InputConfig(name="w", type="jsonl", paths=(str(tmp_path / name),), text_field="body")
        assert _read_all(config) == texts
    glob = InputConfig(name="w", type="jsonl", paths=(str(tmp_path / "*.jsonl*"),), text_field="body")
    assert _read_all(glob) == texts * 3


def test_text_files_parquet_and_arrayrecord(tmp_path):
    files = sorted((STDLIB / "json").glob("*.py"))
    code = InputConfig(name="c", type="text", paths=(str(STDLIB / "json" / "*.py"),))
    assert _read_all(code) == [f.read_text(encoding="utf-8") for f in files]
    jargon = tmp_path / "jargon.txt"
    jargon.write_text("\n\n".join(jargon_paragraphs()[:300]), encoding="utf-8")
    split = InputConfig(name="j", type="text", paths=(str(jargon),), delimiter="\n\n")
    assert _read_all(split) == list(jargon_paragraphs()[:300])
    # compressed: the delimiter's offsets are in the decompressed text
    (tmp_path / "jargon.txt.gz").write_bytes(gzip.compress(jargon.read_bytes()))
    split_gz = InputConfig(name="j", type="text", paths=(str(tmp_path / "jargon.txt.gz"),),
                           delimiter="\n\n")
    assert _read_all(split_gz) == list(jargon_paragraphs()[:300])
    plays = InputConfig(name="p", type="parquet", paths=(str(corpus_files()["shakespeare_parquet"]),))
    assert _read_all(plays)[:3] == ["First Citizen:\nBefore we proceed any further, hear me speak.",
                                    "All:\nSpeak, speak.",
                                    "First Citizen:\nYou are all resolved rather to die than to "
                                    "famish?"]
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(tmp_path / "w.array_record"), "group_size:1")
    for text in wiki_articles()[:10]:
        writer.write(text.encode("utf-8"))
    writer.close()
    records = InputConfig(name="r", type="arrayrecord", paths=(str(tmp_path / "w.array_record"),))
    assert _read_all(records) == list(wiki_articles()[:10])


def test_shuffled_reads_across_many_files(tmp_path, monkeypatch):
    """Training reads in a shuffled order that jumps between files: every read is still right,
    with more plain files than are kept open, and with compressed files kept after their first read."""
    from cptjax.data import sources

    monkeypatch.setattr(sources, "_MAX_OPEN_FILES", 2)
    texts = list(wiki_articles()[:50])
    for i in range(5):
        plain = write_jsonl(tmp_path / f"{i}.jsonl", texts[i * 10:(i + 1) * 10])
        (tmp_path / f"{i}.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    reads = []
    read_bytes = sources._read_bytes
    monkeypatch.setattr(sources, "_read_bytes", lambda path: reads.append(path) or read_bytes(path))
    order = np.random.default_rng(0).permutation(50)
    for pattern in ("*.jsonl", "*.jsonl.gz"):
        source = open_source(InputConfig(name="w", type="jsonl", paths=(str(tmp_path / pattern),)), "k")
        assert [source[int(i)] for i in order] == [texts[i] for i in order]
        if pattern == "*.jsonl":
            assert len(source._open_handles) == 2
    # each .gz file read twice: once to index its lines, once when first read from
    assert sorted(Counter(p for p in reads if p.endswith(".gz")).values()) == [2] * 5


def _build_tfds(data_dir):
    import tensorflow_datasets as tfds

    class JargonEntries(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 200), "test": self._generate_examples(200, 220)}

        def _generate_examples(self, start, stop):
            for i in range(start, stop):
                yield i, {"text": jargon_paragraphs()[i]}

    JargonEntries(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


@pytest.mark.slow
def test_tfds_dataset_by_name_and_data_dir(tmp_path):
    _build_tfds(tmp_path)
    config = InputConfig(name="t", type="tfds", dataset="jargon_entries", split="test",
                         data_dir=str(tmp_path))
    assert sorted(_read_all(config)) == sorted(jargon_paragraphs()[200:220])
    data = DataConfig(sources=(SourceConfig(name="t", type="tfds", dataset="jargon_entries",
                                            data_dir=str(tmp_path)),), prefetch=0)
    pipeline = build_train_pipeline(data, tokenizer_dir("llama"), seq_len=32, batch_size=2,
                                    process_index=0, process_count=1)
    assert next(pipeline)["inputs"].shape == (2, 32)
    missing = InputConfig(name="t", type="tfds", dataset="no_such_dataset", data_dir=str(tmp_path))
    with pytest.raises(CptjaxError, match=r"tfds no_such_dataset .*cannot be opened"):
        _read_all(missing)


def _first_batch(tmp_path, lines: list[bytes], invalid_utf8="fail", text_field="text"):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    config = DataConfig(sources=(SourceConfig(name="bad", type="jsonl", paths=(str(path),),
                                              text_field=text_field),),
                        invalid_utf8=invalid_utf8, prefetch=0)
    pipeline = build_train_pipeline(config, tokenizer_dir("llama"), seq_len=16, batch_size=1,
                                    process_index=0, process_count=1)
    return pipeline, next(pipeline), str(path)


GOOD = json.dumps({"text": "A perfectly good line of text that is long enough."}).encode()


def test_bad_jsonl_lines_are_named_by_file_and_line(tmp_path):
    with pytest.raises(CptjaxError, match=r"bad.jsonl:2: malformed JSON at column 10 "
                       r"\(Unterminated string starting at\); fix the line or remove it"):
        _first_batch(tmp_path, [GOOD, b'{"text": "unterminated', GOOD])
    with pytest.raises(CptjaxError, match=r"bad.jsonl:3: no field 'text' \(fields: body\); set the "
                       r"source's text_field"):
        _first_batch(tmp_path, [GOOD, GOOD, b'{"body": "x"}'])
    with pytest.raises(CptjaxError, match=r"bad.jsonl:1: field 'text' is a int, expected a string"):
        _first_batch(tmp_path, [b'{"text": 3}'])


def test_invalid_utf8_fails_with_file_and_line_or_is_skipped_and_counted(tmp_path):
    lines = [GOOD, b'{"text": "caf\xe9 au lait"}', GOOD]
    with pytest.raises(CptjaxError, match=r"bad.jsonl:2: invalid UTF-8 at byte 13 of the document; "
                       r"fix the file or set data.invalid_utf8: skip"):
        _first_batch(tmp_path, lines)
    pipeline, _, _ = _first_batch(tmp_path, lines * 3, invalid_utf8="skip")
    for _ in range(30):  # a few epochs of the 6 good lines
        assert next(pipeline)["inputs"].shape == (1, 16)
    # every epoch of 9 lines skips its 3 bad ones; the current epoch some of them so far
    passed = pipeline.get_state()["streams"][0]["doc"]
    assert passed >= 18
    skipped = pipeline.skipped_documents()["bad"]
    assert skipped["empty"] == 0
    assert 3 * (passed // 9) <= skipped["invalid_utf8"] <= 3 * (passed // 9) + 3, (passed, skipped)
    pipeline.close()
    with pytest.raises(CptjaxError, match=r"data.sources\[0\] \(bad\): every document is skipped"):
        _first_batch(tmp_path, [lines[1]] * 2, invalid_utf8="skip")


def test_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(CptjaxError, match=r"data.sources\[0\].paths\[0\]: .*nowhere.jsonl: no such "
                       r"file or folder"):
        open_source(InputConfig(name="x", type="jsonl", paths=(str(tmp_path / "nowhere.jsonl"),)),
                    "data.sources[0]")
    with pytest.raises(CptjaxError, match=r"data.sources\[0\].paths\[1\]: the glob '.*/\*.parquet' "
                       r"matches no file"):
        open_source(InputConfig(name="x", type="jsonl", paths=(
            str(corpus_files()["wiki_jsonl"]), str(tmp_path / "*.parquet"))), "data.sources[0]")
    (tmp_path / "t.parquet").write_text("not parquet")
    with pytest.raises(CptjaxError, match=r"t.parquet: not a readable Parquet file"):
        open_source(InputConfig(name="x", type="parquet", paths=(str(tmp_path / "t.parquet"),)), "k")


def _source(**kwargs):
    return {"name": "a", "type": "jsonl", "paths": ["a.jsonl"], **kwargs}


@pytest.mark.parametrize("tree,message", [
    ({"sources": [_source(), _source(name="b", weight=-0.5)]},
     r"^data.sources\[1\].weight: must be >= 0, got -0.5$"),
    ({"sources": [_source(weight=0), _source(name="b", weight=0.0)]},
     r"^data.sources\[\*\].weight: all weights are 0; give at least one source a positive weight$"),
    ({"sources": [_source(type="csv")]},
     r"^data.sources\[0\].type: 'csv' is not allowed; choose one of 'jsonl' \| 'text' \| 'parquet' \| "
     r"'arrayrecord' \| 'tfds' \| 'prepared'$"),
    ({"sources": [_source(), _source()]},
     r"^data.sources\[1\].name: 'a' is used twice"),
    ({"sources": [_source()], "stages": [{"start_step": 10, "weights": [1, 0]}]},
     r"^data.stages\[0\].weights: expected 1 weights, one per source in order \(a\), got 2$"),
    ({"sources": [_source(), _source(name="b")], "stages": [{"start_step": 10, "weights": [0, 0]}]},
     r"^data.stages\[0\].weights: all weights are 0"),
    ({"sources": [_source(paths=[])]},
     r"^data.sources\[0\].paths: a jsonl source needs at least one path or glob$"),
    ({"sources": [_source(paths="a.jsonl")]},
     r"^data.sources\[0\].paths: expected a list, got 'a.jsonl'$"),
    ({"sources": [_source(on_exhaustion="loop")]},
     r"^data.sources\[0\].on_exhaustion: 'loop' is not allowed; choose one of 'repeat' \| 'stop'$"),
    ({"sources": [_source()], "eval_sets": [{"name": "e", "type": "jsonl", "paths": ["x"], "max_docs": 0}]},
     r"^data.eval_sets\[0\].max_docs: must be a positive integer or null, got 0$"),
    ({"sources": [_source()], "seed": 1.5}, r"^data.seed: expected an integer, got 1.5$"),
])
def test_config_errors_name_the_key(tree, message):
    """Read as a config is: config_tree checks the types, DataConfig the values."""
    from cptjax.core.config_tree import from_dict

    with pytest.raises(CptjaxError, match=message):
        from_dict(DataConfig, tree, "data")


def test_config_tree_builds_data_config_from_yaml_mapping():
    """The generic loader (cptjax.core.config_tree) builds and validates this tree."""
    from cptjax.core.config_tree import from_dict

    tree = {"sources": [{"name": "code", "type": "text", "paths": ["x/*.py"], "weight": 0.9},
                        {"name": "wiki", "type": "jsonl", "paths": ["w.jsonl"], "weight": 0.1,
                         "on_exhaustion": "stop"}],
            "stages": [{"start_step": 100, "weights": [0.8, 0.2]}], "num_workers": 2}
    config = from_dict(DataConfig, tree, "data")
    assert config.stage_weights() == [(1, (0.9, 0.1)), (100, (0.8, 0.2))]
    tree["sources"][1]["weight"] = -1
    with pytest.raises(CptjaxError, match=r"^data.sources\[1\].weight: must be >= 0, got -1"):
        from_dict(DataConfig, tree, "data")
    np.testing.assert_equal(len(config.sources), 2)
