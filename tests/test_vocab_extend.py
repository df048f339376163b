"""`cptjax vocab extend`: tiny base tokenizers in Llama 3's structure (byte-level BPE, a split regex,
ignore_merges, special tokens after the BPE ids) and Llama 2's (SentencePiece-style BPE with byte
fallback, no pre-tokenizer), trained here on English, extended on Python's own sources through the
CLI, then checked on held-out English and code: the ids of text without new tokens, fewer tokens for
code, the folder through transformers, the report, and the messages for bad input."""

import contextlib
import io
import json

import pytest
from data_helpers import jargon_paragraphs, shakespeare_speeches, stdlib_files, wiki_articles
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from cptjax.cli import main
from cptjax.data.tokenize import load_tokenizer_spec
from cptjax.data.vocab import new_token_pieces

NEW_TOKENS = 200
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _english() -> list[str]:
    return list(wiki_articles()[:60]) + list(jargon_paragraphs()[:1500])


def _llama3_style(out):
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_english(), trainers.BpeTrainer(vocab_size=1024, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok.add_special_tokens([bos, eos, "<|reserved_special_token_0|>"])  # ids 1024-1026, as Llama 3's 128000+
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos).save_pretrained(out)


def _llama2_style(out):
    """As transformers converts Llama 2's: byte tokens <0x00>... in the vocabulary, "▁" for spaces by the
    normalizer, no pre-tokenizer. Rare characters ('_' among them) are left to byte fallback."""
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")  # words for training only
    tok.train_from_iterator(_english(), trainers.BpeTrainer(vocab_size=1024, show_progress=False, limit_alphabet=70,
                                                            special_tokens=["<unk>", "<s>", "</s>", *byte_tokens]))
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in byte_tokens]
    data["pre_tokenizer"] = None
    tok = Tokenizer.from_str(json.dumps(data))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", params=["llama3", "llama2"])
def extended(request, tmp_path_factory):
    """(base folder, extended folder, report, what the CLI printed), made through `cptjax vocab extend`."""
    folder = tmp_path_factory.mktemp(request.param)
    base = folder / "base"
    (_llama3_style if request.param == "llama3" else _llama2_style)(base)
    general = folder / "general.jsonl"
    general.write_text("".join(json.dumps({"text": t}) + "\n" for t in shakespeare_speeches()[:300]))
    code, printed, err = _cli(["vocab", "extend", "--tokenizer", str(base), "--corpus", *map(str, _domain()),
                               "--new-tokens", str(NEW_TOKENS), "--out", str(folder / "extended"),
                               "--general", str(general)])
    assert code == 0, err
    return base, folder / "extended", json.loads((folder / "extended" / "vocab_extension.json").read_text()), printed


def _domain():
    return stdlib_files("json/*.py") + stdlib_files("email/*.py")


def _held_out_code() -> list[str]:
    return [p.read_text() for p in stdlib_files("collections/*.py") + stdlib_files("logging/*.py")]


def _held_out_english() -> list[str]:
    """Lines: short documents, many of which hold no new token's string."""
    lines = [line for speech in shakespeare_speeches()[300:700] for line in speech.splitlines()]
    return lines + list(jargon_paragraphs()[1500:1700])


def _tokenizers(extended):
    base, out, _, _ = extended
    return Tokenizer.from_file(str(base / "tokenizer.json")), Tokenizer.from_file(str(out / "tokenizer.json"))


def _pre_tokens(tokenizer: Tokenizer, text: str) -> list[str]:
    """The base's pre-tokens of `text` in its vocabulary's alphabet; the whole normalized text where
    it has no pre-tokenizer (Llama 2)."""
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    if tokenizer.pre_tokenizer is None:
        return [text]
    return [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def test_text_in_which_no_pre_token_holds_a_new_token_encodes_to_the_same_ids(extended):
    base, ext = _tokenizers(extended)
    new = [t["token"] for t in extended[2]["new_tokens"]]
    texts = _held_out_english()
    same = changed = 0
    for text, before, after in zip(texts, base.encode_batch(texts, add_special_tokens=False),
                                   ext.encode_batch(texts, add_special_tokens=False)):
        if not any(token in piece for piece in _pre_tokens(base, text) for token in new):
            assert after.ids == before.ids, text
            same += 1
        else:  # the base's tokens, some of them merged: never more, the same text
            assert len(after.ids) <= len(before.ids) and ext.decode(after.ids) == base.decode(before.ids), text
            changed += after.ids != before.ids
    assert same >= len(texts) // 4 and changed > 0, (same, changed, len(texts))


def test_domain_text_encodes_to_fewer_tokens(extended):
    base, ext = _tokenizers(extended)
    code = _held_out_code()
    before = sum(len(e.ids) for e in base.encode_batch(code, add_special_tokens=False))
    after = sum(len(e.ids) for e in ext.encode_batch(code, add_special_tokens=False))
    assert after < 0.9 * before, (before, after)
    domain = extended[2]["bytes_per_token"]["domain"]
    assert domain["after"] > 1.1 * domain["before"], domain


def test_transformers_loads_the_folder_with_the_same_ids_and_special_tokens(extended):
    from transformers import AutoTokenizer

    base_dir, out, report, _ = extended
    base, ext = AutoTokenizer.from_pretrained(base_dir), AutoTokenizer.from_pretrained(out)
    _, raw = _tokenizers(extended)
    texts = _held_out_code()[:3] + _held_out_english()[:50]
    for text in texts:
        assert ext(text)["input_ids"] == [base.bos_token_id] + raw.encode(text, add_special_tokens=False).ids
    assert (ext.bos_token_id, ext.eos_token_id, ext.all_special_ids) == (base.bos_token_id, base.eos_token_id,
                                                                           base.all_special_ids)
    assert len(ext) == report["vocab_size"] == len(base) + NEW_TOKENS
    spec = load_tokenizer_spec(out)  # as training reads it
    assert spec.vocab_size == report["vocab_size"] and spec.eos_id == base.eos_token_id
    assert not (out / "tokenizer.model").exists()


def test_the_report_names_each_new_token_and_its_base_pieces(extended):
    base_dir, out, report, printed = extended
    base, ext = _tokenizers(extended)
    ids = [t["id"] for t in report["new_tokens"]]
    assert ids == list(range(report["first_new_id"], report["vocab_size"])) and len(ids) == NEW_TOKENS
    assert report["first_new_id"] == report["base_vocab_size"]  # after every base id, special ones included
    pieces = new_token_pieces(base_dir, out)
    assert pieces == {t["id"]: t["base_ids"] for t in report["new_tokens"]}
    for token in report["new_tokens"]:
        assert ext.id_to_token(token["id"]) == token["token"] and base.token_to_id(token["token"]) is None
        assert max(token["base_ids"]) < report["first_new_id"] and len(token["base_ids"]) >= 1
        assert base.decode(token["base_ids"]) == ext.decode([token["id"]])
    assert sum(t["count"] for t in report["new_tokens"]) > 0
    for token in base.get_added_tokens_decoder().values():  # special tokens keep their ids (Llama 3's follow the BPE's)
        assert ext.token_to_id(token.content) == base.token_to_id(token.content)
    assert set(report["bytes_per_token"]) == {"domain", "general"}
    assert "bytes per token" in printed and "resize the model's embeddings to" in printed
    assert str(report["vocab_size"]) in printed


def _unigram(folder):
    folder.mkdir()
    tok = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0, False))
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("case, expected", [
    ("no_tokenizer_json", "no tokenizer.json in this folder"),
    ("unigram", "model.type is 'Unigram'; vocabulary extension supports BPE"),
    ("zero_tokens", "--new-tokens 0: must be >= 1"),
    ("empty_corpus", "no text to learn from"),
    ("missing_corpus", "no such file or folder"),
    ("out_not_empty", "folder exists and is not empty"),
])
def test_bad_input_is_one_line_naming_the_flag(case, expected, tmp_path, extended):
    base_dir = extended[0]
    corpus, out = str(_domain()[0]), tmp_path / "out"
    args = {"--tokenizer": str(base_dir), "--corpus": corpus, "--new-tokens": "10", "--out": str(out)}
    if case == "no_tokenizer_json":
        (tmp_path / "empty").mkdir()
        args["--tokenizer"] = str(tmp_path / "empty")
    elif case == "unigram":
        args["--tokenizer"] = str(_unigram(tmp_path / "unigram"))
    elif case == "zero_tokens":
        args["--new-tokens"] = "0"
    elif case == "empty_corpus":
        (tmp_path / "empty.txt").write_text("")
        args["--corpus"] = str(tmp_path / "empty.txt")
    elif case == "missing_corpus":
        args["--corpus"] = str(tmp_path / "nowhere.txt")
    elif case == "out_not_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    code, printed, err = _cli(["vocab", "extend", *[x for kv in args.items() for x in kv]])
    assert code == 2 and not printed and expected in err, err
    assert err.startswith("cptjax: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert case == "out_not_empty" or not out.exists()
