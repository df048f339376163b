"""`cptjax vocab extend`: a base HF tokenizer + a domain corpus -> an extended tokenizer folder.

The new tokens come from cptjax.data.vocab (BPE continued on the domain; text without them keeps
its ids). The folder holds tokenizer.json (extended), the base's tokenizer_config.json,
special_tokens_map.json and chat template unchanged (special and added tokens keep their ids), and
vocab_extension.json: the base's size, each new token's id, string, count in the domain corpus and
base ids (`new_token_pieces`), and bytes per token on the domain and general text before and after.
The base's tokenizer.model, vocab.json and merges.txt are left out: they lack the new tokens.

The new ids follow every id of the base (Llama 3's: after its special tokens, from 128256), so a
model trained with the extended tokenizer needs its embedding (and untied output) rows resized to
`vocab_size` in the report; `new_token_pieces` gives, per new id, the base ids its rows can start from.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence

from cptjax.core.atomic_dir import atomic_output_dir, check_output_dir
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import PathLike, local_copy, user_path
from cptjax.core.progress import progress_bar
from cptjax.data.config import InputConfig
from cptjax.data.read import open_source
from cptjax.data.sources import DocumentSource, InvalidUtf8, expand_paths
from cptjax.data.tokenize import TOKENIZER_FILES
from cptjax.data.vocab import BaseTokenizer, WordCounter, continue_bpe, extended_json, new_token_pieces

REPORT = "vocab_extension.json"
STALE_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")  # written anew or left out
DOCS_PER_CHUNK = 256
PROPERTY = ("a text in which no pre-token contains a new token's string encodes to exactly the base's "
            "ids; any other text to the base's tokens with some of them merged")


@dataclasses.dataclass
class Corpus:
    """Documents of files named by paths or globs (JSON Lines, Parquet, else one text per file)."""

    sources: list[DocumentSource]
    flag: str
    skipped: int = 0  # documents that are not UTF-8, counted by the first pass

    def chunks(self, description: str, count_skipped: bool = False) -> Iterator[list[str]]:
        items = [(s, first) for s in self.sources for first in range(0, len(s), DOCS_PER_CHUNK)]
        for source, first in progress_bar(description)(items):
            texts = []
            for i in range(first, min(first + DOCS_PER_CHUNK, len(source))):
                try:
                    text = source[i]
                except InvalidUtf8:
                    self.skipped += count_skipped
                    continue
                if text:
                    texts.append(text)
            yield texts


def open_corpus(patterns: Sequence[str], flag: str, text_field: str = "text") -> Corpus:
    """Each file's type from its name: .jsonl (.gz, .zst) and .parquet hold documents in
    `text_field`; any other file is one document of text."""
    if not patterns:
        raise CptjaxError(f"{flag}: give at least one file or glob")
    files = []
    for pattern in patterns:
        try:
            files += expand_paths([pattern], flag)
        except CptjaxError as err:  # it names "FLAG.paths[0]", the config key's spelling
            raise CptjaxError(str(err).replace(f"{flag}.paths[0]: ", f"{flag}: ")) from None
    groups: dict[str, list[str]] = {}
    for path in files:
        name = path.name.lower()
        kind = ("jsonl" if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")) else
                "parquet" if name.endswith(".parquet") else "text")
        groups.setdefault(kind, []).append(str(path))
    sources = [open_source(InputConfig(name=flag, type=kind, paths=tuple(paths), text_field=text_field), flag)
               for kind, paths in groups.items()]
    return Corpus(sources, flag)


def read_base(tokenizer_dir: PathLike) -> tuple[BaseTokenizer, object]:
    """The base folder's tokenizer.json, checked to be extendable, and the (local) folder."""
    folder = user_path(tokenizer_dir, "--tokenizer")
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise CptjaxError(f"--tokenizer {folder}: no tokenizer.json in this folder; point it at an HF "
                          "tokenizer folder saved by transformers (a fast tokenizer)")
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CptjaxError(f"--tokenizer {file}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise CptjaxError(f"--tokenizer {file}: no 'model' section; not a tokenizers tokenizer.json")
    return BaseTokenizer(data, str(file)), folder


def extend_vocabulary(tokenizer_dir: PathLike, corpus: Sequence[str], new_tokens: int, out: PathLike, *,
                      general: Sequence[str] = (), text_field: str = "text") -> dict:
    """Writes the extended tokenizer folder `out` (whole or not at all) and returns its report."""
    if new_tokens < 1:
        raise CptjaxError(f"--new-tokens {new_tokens}: must be >= 1 (how many tokens to add)")
    out = check_output_dir(out, "--out")
    base, folder = read_base(tokenizer_dir)
    domain = open_corpus(corpus, "--corpus", text_field)
    general_corpus = open_corpus(general, "--general", text_field) if general else None
    base_tokenizer = base.tokenizer()

    counter = WordCounter(base)
    before = [0, 0]  # bytes, tokens
    for texts in domain.chunks("reading --corpus", count_skipped=True):
        encodings = base_tokenizer.encode_batch(texts, add_special_tokens=False)
        counter.add(encodings)
        before[0] += sum(len(t.encode()) for t in texts)
        before[1] += sum(len(e.ids) for e in encodings)
    if not counter.counts:
        raise CptjaxError(f"--corpus {' '.join(corpus)}: no text to learn from (every document is empty"
                          + (f" or, {domain.skipped} of them, not UTF-8" if domain.skipped else "") + ")")
    extension = continue_bpe(counter, new_tokens, progress=sys.stderr.isatty())
    if not extension.tokens:
        raise CptjaxError(f"--corpus {' '.join(corpus)}: no pair of tokens occurs twice; the corpus is too "
                          "small to choose new tokens from")
    from tokenizers import Tokenizer

    extended = Tokenizer.from_str(json.dumps(extended_json(base, extension)))
    moved = {t: i for t, i in [*base.added.items(), *((t, i) for i, t in extension.tokens.items())]
             if extended.token_to_id(t) != i}
    if moved:  # tokenizers renumbers what it cannot place; a model would read the wrong rows
        raise CptjaxError(f"--tokenizer {folder}: the extended tokenizer would move the ids of {sorted(moved)[:5]}; "
                          "this tokenizer.json cannot be extended by cptjax")
    after = _measure(extended, domain, "measuring --corpus")
    pieces = new_token_pieces(base_tokenizer, extended)
    report = {
        "base_tokenizer": str(folder), "kind": base.kind, "base_vocab_size": base.size,
        "vocab_size": base.next_id + len(extension.tokens), "first_new_id": base.next_id,
        "new_tokens_asked": new_tokens, "property": PROPERTY,
        "new_tokens": [{"id": i, "token": token, "text": base.text(token), "count": after["ids"][i],
                        "base_ids": pieces[i]} for i, token in extension.tokens.items()],
        "bytes_per_token": {"domain": {"before": _ratio(before), "after": after["bytes_per_token"]}},
        "domain_documents_not_utf8": domain.skipped,
    }
    if general_corpus is not None:
        general_before = _measure(base_tokenizer, general_corpus, "measuring --general (base)")
        general_after = _measure(extended, general_corpus, "measuring --general (extended)")
        unchanged = sum(a == b for a, b in zip(general_before["docs"], general_after["docs"]))
        report["bytes_per_token"]["general"] = {"before": general_before["bytes_per_token"],
                                                "after": general_after["bytes_per_token"]}
        report["general_documents_unchanged"] = [unchanged, len(general_before["docs"])]
    with atomic_output_dir(out, "--out") as tmp:
        extended.save(str(tmp / "tokenizer.json"))
        source = local_copy(folder, TOKENIZER_FILES)
        for name in TOKENIZER_FILES:
            if name not in STALE_FILES and (source / name).is_file():
                (source / name).copy(tmp / name)
        (tmp / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _measure(tokenizer, corpus: Corpus, description: str) -> dict:
    """Bytes per token of a corpus (encoded without special tokens), each document's ids (hashed),
    and the count of each id."""
    num_bytes = num_tokens = 0
    ids: collections.Counter[int] = collections.Counter()
    docs = []
    for texts in corpus.chunks(description):
        for text, encoding in zip(texts, tokenizer.encode_batch_fast(texts, add_special_tokens=False)):
            num_bytes += len(text.encode())
            num_tokens += len(encoding.ids)
            ids.update(encoding.ids)
            docs.append(hash(tuple(encoding.ids)))
    return {"bytes_per_token": _ratio((num_bytes, num_tokens)), "ids": ids, "docs": docs}


def _ratio(counts) -> float | None:
    return counts[0] / counts[1] if counts[1] else None


def summary(report: dict, out: str) -> str:
    """What `cptjax vocab extend` prints: the sizes, bytes per token before and after, the top tokens."""
    lines = [f"wrote {out}: {len(report['new_tokens'])} new tokens, ids {report['first_new_id']}-"
             f"{report['vocab_size'] - 1}, after the {report['base_vocab_size']} of {report['base_tokenizer']} "
             f"({report['kind']}); resize the model's embeddings to {report['vocab_size']} rows",
             f"{'bytes per token':<18}{'before':>9}{'after':>9}{'change':>9}"]
    for name, row in report["bytes_per_token"].items():
        change = f"{row['after'] / row['before'] - 1:+.1%}" if row["before"] and row["after"] else "n/a"
        lines.append(f"{name:<18}{row['before'] or 0:>9.3f}{row['after'] or 0:>9.3f}{change:>9}")
    if "general_documents_unchanged" in report:
        same, total = report["general_documents_unchanged"]
        lines.append(f"general documents encoded to the same ids: {same} of {total}")
    if len(report["new_tokens"]) < report["new_tokens_asked"]:
        lines.append(f"only {len(report['new_tokens'])} of {report['new_tokens_asked']} tokens: no other pair "
                     "occurs twice in the corpus")
    top = sorted(report["new_tokens"], key=lambda t: -t["count"])[:10]
    lines.append("most used: " + ", ".join(f"{t['text']!r} ({t['count']})" for t in top))
    return "\n".join(lines)
