"""`cptjax data prepare`: ArrayRecord token shards + manifest, same batches as on the fly."""

import argparse
import json

import pytest
from data_helpers import STDLIB, assert_batches_equal, collect, corpus_files, tokenizer_dir, wiki_articles

from cptjax.core.errors import CptjaxError
from cptjax.data.cli import add_data_commands, run_data_command
from cptjax.data.config import DataConfig, InputConfig, SourceConfig
from cptjax.data.pipeline import build_train_pipeline
from cptjax.data.prepare import prepare_corpus


def _cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="cptjax")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    run_data_command(parser.parse_args(argv))


def test_prepared_corpus_gives_the_same_batches_as_on_the_fly(tmp_path, capsys):
    wiki = str(corpus_files()["wiki_jsonl"])
    _cli(["data", "prepare", "--type", "jsonl", "--paths", wiki, "--tokenizer",
          str(tokenizer_dir("llama")), "--out", str(tmp_path / "wiki"), "--shards", "3"])
    assert "documents" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "wiki" / "manifest.json").read_text())
    assert manifest["num_docs"] == len(wiki_articles())
    assert [s["file"] for s in manifest["shards"]] == [
        f"tokens-0000{i}-of-00003.array_record" for i in range(3)]
    assert manifest["dtype"] == "uint16"  # vocab 2,048 fits
    code = SourceConfig(name="code", type="text", paths=(str(STDLIB / "json" / "*.py"),), weight=0.7)

    def batches(wiki_source):
        config = DataConfig(sources=(code, wiki_source), seed=4)
        pipeline = build_train_pipeline(config, tokenizer_dir("llama"), seq_len=128, batch_size=4,
                                        process_index=0, process_count=1)
        return collect(pipeline, 60)

    on_the_fly = batches(SourceConfig(name="wiki", type="jsonl", paths=(wiki,), weight=0.3))
    prepared = batches(SourceConfig(name="wiki", type="prepared", paths=(str(tmp_path / "wiki"),),
                                    weight=0.3))
    assert_batches_equal(prepared, on_the_fly)
    assert manifest["num_tokens"] > 100_000


def test_prepared_corpus_refuses_another_tokenizer(tmp_path):
    prepare_corpus(InputConfig(name="i", type="text", paths=(str(STDLIB / "json" / "*.py"),)),
                   tokenizer_dir("qwen"), tmp_path / "code")
    config = DataConfig(sources=(SourceConfig(name="code", type="prepared",
                                              paths=(str(tmp_path / "code"),)),))
    with pytest.raises(CptjaxError, match=r"data.sources\[0\]: .*code was prepared with another "
                       r"tokenizer \(.*tokenizer-qwen-2048, fingerprint \w+\) than this run's "
                       r"\(.*tokenizer-llama-2048, \w+\); .*Run cptjax data prepare again"):
        build_train_pipeline(config, tokenizer_dir("llama"), seq_len=16, batch_size=1,
                             process_index=0, process_count=1)


@pytest.mark.parametrize("lines,message", [
    ([b'{"text": "fine"}', b'{"text": "fine"', b'{"text": "fine"}'], r"bad.jsonl:2: malformed JSON"),
    ([b'{"text": "fine"}'] * 40 + [b'{"body": "x"}'], r"bad.jsonl:41: no field 'text'"),
    ([b'{"text": "fine"}', b'{"text": "\xff"}'], r"bad.jsonl:2: invalid UTF-8"),
])
def test_bad_input_leaves_no_partial_output(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    with pytest.raises(CptjaxError, match=message):
        _cli(["data", "prepare", "--type", "jsonl", "--paths", str(path), "--tokenizer",
              str(tokenizer_dir("llama")), "--out", str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no out, no .partial


def test_prepare_skips_and_counts_invalid_utf8_and_refuses_missing_input(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n{"text": ""}\n{"text": "also fine"}\n')
    manifest = prepare_corpus(InputConfig(name="i", type="jsonl", paths=(str(path),)),
                              tokenizer_dir("llama"), tmp_path / "out", invalid_utf8="skip")
    assert manifest["num_docs"] == 2 and manifest["skipped"] == {"invalid_utf8": 1, "empty": 1}
    with pytest.raises(CptjaxError, match=r"input.paths\[0\]: .*missing/\*.jsonl' matches no file"):
        prepare_corpus(InputConfig(name="i", type="jsonl", paths=(str(tmp_path / "missing/*.jsonl"),)),
                       tokenizer_dir("llama"), tmp_path / "out2")
    with pytest.raises(CptjaxError, match=r"--out .*out: folder exists and is not empty"):
        prepare_corpus(InputConfig(name="i", type="jsonl", paths=(str(path),)),
                       tokenizer_dir("llama"), tmp_path / "out")
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_prepare_with_worker_processes_matches_in_process(tmp_path):
    source = InputConfig(name="i", type="jsonl", paths=(str(corpus_files()["wiki_jsonl"]),))
    a = prepare_corpus(source, tokenizer_dir("qwen"), tmp_path / "a", num_shards=2)
    b = prepare_corpus(source, tokenizer_dir("qwen"), tmp_path / "b", num_shards=2, num_workers=2)
    assert a == b
    for shard in a["shards"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == \
            (tmp_path / "b" / shard["file"]).read_bytes()
