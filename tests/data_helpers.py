"""Real text and locally trained tokenizers for the data tests, built once per test process.

Corpora: data/ (WikiText-2 validation, Tiny Shakespeare, the Jargon File; see data/README.md) as
the general-text replay side, and the Python standard library's own sources as the code domain.
Tokenizers: byte-level BPE trained here with `tokenizers`, saved as HF tokenizer folders, in the two
conventions of the Llama family: "llama" (adds <|begin_of_text|>, ends with <|end_of_text|>) and
"qwen" (no BOS, ends with <|endoftext|>).
"""

from __future__ import annotations

import atexit
import functools
import json
import re
import shutil
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="cptjax-data-tests-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def stdlib_files(pattern: str = "json/*.py") -> list[Path]:
    """Standard-library sources matching `pattern`, without test/, idlelib/, site-packages/."""
    excluded = ("test", "idlelib", "site-packages")
    return sorted(p for p in STDLIB.glob(pattern)
                  if not any(part in excluded for part in p.relative_to(STDLIB).parts))


@functools.cache
def wiki_articles() -> tuple[str, ...]:
    """WikiText-2 validation, one document per article (split at its ' = Title = ' lines)."""
    text = (DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    parts = re.split(r"\n(?= = [^=].* = \n)", text)
    return tuple(p.strip("\n") for p in parts if p.strip())


@functools.cache
def shakespeare_speeches() -> tuple[str, ...]:
    text = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    return tuple(p for p in text.split("\n\n") if p.strip())


@functools.cache
def jargon_paragraphs() -> tuple[str, ...]:
    text = (DATA / "jargon" / "jargon.txt").read_text(encoding="utf-8")
    return tuple(p for p in text.split("\n\n") if p.strip())


def write_jsonl(path: Path, texts, field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, field: text}) + "\n")
    return path


@functools.cache
def corpus_files() -> dict[str, Path]:
    """The corpora in the formats the sources read, written once."""
    root = workdir() / "corpora"
    files = {"wiki_jsonl": write_jsonl(root / "wiki.jsonl", wiki_articles())}
    import pyarrow as pa
    import pyarrow.parquet as pq

    files["shakespeare_parquet"] = root / "shakespeare.parquet"
    pq.write_table(pa.table({"text": list(shakespeare_speeches())}), files["shakespeare_parquet"])
    return files


@functools.cache
def tokenizer_dir(style: str = "llama", vocab_size: int = 2048) -> Path:
    """An HF tokenizer folder trained on the test corpora (byte-level BPE, a few seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = {"llama": ("<|begin_of_text|>", "<|end_of_text|>"),
                "qwen": (None, "<|endoftext|>")}[style]
    specials = [t for t in (bos, eos, "<|pad|>") if t]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    sample = list(wiki_articles()[:60]) + list(jargon_paragraphs()[:2000])
    sample += [p.read_text(encoding="utf-8") for p in stdlib_files("json/*.py")]
    if style == "qwen":  # a different training sample: a genuinely different tokenizer
        sample += list(shakespeare_speeches()[:2000])
    tokenizer.train_from_iterator(sample, trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos:
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokenizer.token_to_id(bos))])
        tokenizer.post_processor = processors.Sequence([byte_level, template])
    else:
        tokenizer.post_processor = byte_level
    out = workdir() / f"tokenizer-{style}-{vocab_size}"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos,
                            pad_token="<|pad|>").save_pretrained(out)
    return out


def collect(pipeline, steps: int) -> list[dict]:
    return [next(pipeline) for _ in range(steps)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"batch {i}, {key}")


def reassemble(batches: list[dict], source_id: int = 0) -> list[tuple[int, ...]]:
    """Documents rebuilt from one source's packed rows, each without its first token.

    In row order, each segment's loss-masked targets belong to one document. A row's first segment
    continues the previous row's last document exactly when that row's last target counted
    (loss_mask 1): the rows overlap by one token. Compare with the tokenizer's ids[1:] per document.
    """
    docs: list[list[int]] = []
    continues = False
    for batch in batches:
        for r in range(batch["inputs"].shape[0]):
            seg, mask = batch["segment_ids"][r], batch["loss_mask"][r]
            real = seg > 0
            if not real.any() or batch["source_ids"][r][real][0] != source_id:
                continue
            for k in range(1, int(seg.max()) + 1):
                targets = [int(t) for t in batch["targets"][r][(seg == k) & (mask == 1)]]
                if k == 1 and continues:
                    docs[-1].extend(targets)
                else:
                    docs.append(targets)
            continues = bool(mask[-1] == 1)
    return [tuple(d) for d in docs]
def save_tokenizer(out: Path, texts: list[str]) -> None:
    """A small byte-level BPE tokenizer trained here, saved as HF tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(out)
