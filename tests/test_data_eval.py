"""Held-out sets: fixed batches, and byte counts that make bits per byte exact."""

import numpy as np
import pytest
from data_helpers import STDLIB, assert_batches_equal, corpus_files, stdlib_files, tokenizer_dir, wiki_articles
from transformers import AutoTokenizer

from cptjax.core.errors import CptjaxError
from cptjax.data.config import DataConfig, EvalSetConfig, SourceConfig
from cptjax.data.eval_sets import build_eval_sets
from cptjax.data.passkey import NEEDLE, QUESTION, RetrievalConfig, make_prompts, probe_batches
from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec


def _config() -> DataConfig:
    wiki = str(corpus_files()["wiki_jsonl"])
    return DataConfig(
        sources=(SourceConfig(name="wiki", type="jsonl", paths=(wiki,)),),
        eval_sets=(EvalSetConfig(name="general", type="jsonl", paths=(wiki,), max_docs=12),
                   EvalSetConfig(name="domain", type="text", paths=(str(STDLIB / "json" / "*.py"),))))


def _sets(style="llama", process_index=0, process_count=1):
    return build_eval_sets(_config(), tokenizer_dir(style), seq_len=128, batch_size=4,
                           process_index=process_index, process_count=process_count)


def test_eval_sets_are_fixed_and_count_every_byte():
    sets = _sets()
    assert list(sets) == ["general", "domain"]
    for name, batches in _sets().items():
        assert_batches_equal(batches, sets[name])
        for batch in batches:
            assert batch["num_bytes"].dtype == np.float32 and batch["num_bytes"].shape == (4,)
            assert batch["inputs"].shape == (4, 128)
    # with BOS (Llama), every byte of every document is in exactly one target token
    general = sum(b["num_bytes"].sum() for b in sets["general"])
    assert general == sum(len(t.encode("utf-8")) for t in wiki_articles()[:12])
    domain = sum(b["num_bytes"].sum() for b in sets["domain"])
    assert domain == sum(len(p.read_bytes()) for p in stdlib_files("json/*.py"))
    # only the last batch is padded
    assert all((b["segment_ids"] > 0).all() for b in sets["domain"][:-1])


def test_eval_bytes_without_bos_leave_out_each_first_token():
    sets = _sets("qwen")
    hf = AutoTokenizer.from_pretrained(tokenizer_dir("qwen"))
    texts = wiki_articles()[:12]
    first = sum(len(hf.decode(hf(t)["input_ids"][:1]).encode("utf-8")) for t in texts)
    total = sum(b["num_bytes"].sum() for b in sets["general"])
    assert total == sum(len(t.encode("utf-8")) for t in texts) - first


def test_processes_split_each_batch():
    whole = _sets()["domain"]
    halves = [_sets(process_index=p, process_count=2)["domain"] for p in (0, 1)]
    for i, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(
                batch[key], np.concatenate([halves[0][i][key], halves[1][i][key]]), err_msg=key)


def test_no_eval_sets_need_no_tokenizer_and_a_missing_one_is_named():
    config = DataConfig(sources=_config().sources)
    assert build_eval_sets(config, None, seq_len=128, batch_size=4, process_index=0,
                           process_count=1) == {}
    with pytest.raises(CptjaxError, match=r"^data.tokenizer: no tokenizer; set data.tokenizer"):
        build_eval_sets(_config(), None, seq_len=128, batch_size=4, process_index=0, process_count=1)
    with pytest.raises(CptjaxError, match=r"^batch_size: 5 rows cannot be split evenly over 2"):
        build_eval_sets(_config(), None, seq_len=128, batch_size=5, process_index=0, process_count=2)


@pytest.mark.parametrize("style", ["llama", "qwen"])  # with and without BOS
def test_passkey_prompts_are_deterministic_and_put_the_needle_where_asked(style):
    tokenizer = DocumentTokenizer(load_tokenizer_spec(tokenizer_dir(style)))
    config = RetrievalConfig(lengths=(40, 100), depths=(0.0, 0.3, 1.0), samples=3, seed=7)
    prompts = make_prompts(config, tokenizer)
    again = make_prompts(config, tokenizer)
    assert [(p.key, p.ids.tolist()) for p in prompts] == [(p.key, p.ids.tolist()) for p in again]
    assert len({p.key for p in prompts}) > len(prompts) // 2  # keys differ from prompt to prompt
    other = make_prompts(RetrievalConfig(lengths=(40,), depths=(0.0,), samples=3, seed=8), tokenizer)
    assert [p.key for p in other] != [p.key for p in prompts[:3]]

    bos = [] if tokenizer.spec.bos_id is None else [tokenizer.spec.bos_id]
    before, after, question = (tokenizer.encode_prompt(t)[len(bos):].tolist() for t in (*NEEDLE, QUESTION))
    for p in prompts:
        ids = p.ids.tolist()
        answer = ids[-p.answer:]
        assert len(ids) == p.length and ids[:len(bos)] == bos
        assert tokenizer.decode(answer) == f" {p.key}"
        needle = before + answer + after  # the key's tokens are the same in the needle and as the answer
        assert ids[p.needle:p.needle + len(needle)] == needle
        assert ids[-p.answer - len(question):-p.answer] == question
        assert f"The pass key is {p.key}. Remember it." in tokenizer.decode(ids)
        # The depth is the share of the filler tokens that come before the needle.
        filler = p.length - len(bos) - len(needle) - len(question) - p.answer
        assert p.needle - len(bos) == round(p.depth * filler), (p.depth, p.needle, filler)

    batches = probe_batches(prompts, seq_len=128, batch_size=2)
    slots = [(b, r, s) for b, batch in enumerate(batches) for r in range(2)
             for s in range(batch["answer_sample"].shape[1]) if batch["answer_sample"][r, s] >= 0]
    assert sorted({batches[b]["answer_sample"][r, s] for b, r, s in slots}) == list(range(len(prompts)))
    targets = {i: [] for i in range(len(prompts))}  # each prompt's answer slots: its answer tokens, in order
    for b, r, s in slots:
        batch, i = batches[b], batches[b]["answer_sample"][r, s]
        index = batch["answer_index"][r, s]
        assert batch["loss_mask"][r, index] == 1
        targets[i].append((int(batch["positions"][r, index]), int(batch["targets"][r, index])))
    for i, p in enumerate(prompts):
        assert targets[i] == list(zip(range(p.length - p.answer - 1, p.length - 1), p.ids[-p.answer:].tolist()))
    assert sum(float(b["loss_mask"].sum()) for b in batches) == sum(p.answer for p in prompts)
    assert max(int(b["segment_ids"].max()) for b in batches) == 3  # three 40-token prompts share a row
    with pytest.raises(CptjaxError, match=r"eval.retrieval.lengths: 20 tokens cannot hold the pass-key needle"):
        make_prompts(RetrievalConfig(lengths=(20,)), tokenizer)
