"""`cptjax data prepare`: tokenize a corpus once into ArrayRecord shards of token ids + a manifest.

A prepared folder:

    manifest.json                       format, tokenizer (fingerprint, BOS/EOS ids, vocab size),
                                        token dtype, the source it was made from, document and
                                        token counts, skipped documents, and the shards
    tokens-00000-of-00004.array_record  one record per document: its ids (BOS? text EOS) as
                                        little-endian uint16 (vocab <= 65,536) or uint32

Documents keep the source's order (training shuffles them). Training from a prepared folder
(`type: prepared`) refuses a tokenizer whose fingerprint differs, and gives the same batches as
tokenizing the same documents on the fly.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import numpy as np
from etils import epath

from cptjax.atomic_dir import atomic_output_dir
from cptjax.data.config import InputConfig
from cptjax.data.packing import Failed, Skipped
from cptjax.data.sources import DocumentSource, open_source
from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec
from cptjax.errors import CptjaxError
from cptjax.progress import progress_bar

FORMAT = "cptjax-prepared-tokens-v1"
MANIFEST = "manifest.json"


class PreparedSource(DocumentSource):
    """The documents of one or more prepared folders, as int32 token ids."""

    def __init__(self, folders: list[epath.Path], tokenizer: DocumentTokenizer | None, key: str):
        shards, self._dtype, self._folders = [], None, [str(f) for f in folders]
        for folder in folders:
            manifest = read_manifest(folder)
            if tokenizer is not None and manifest["tokenizer"]["fingerprint"] != tokenizer.spec.fingerprint:
                made = manifest["tokenizer"]
                raise CptjaxError(
                    f"{key}: {folder} was prepared with another tokenizer ({made['path']}, "
                    f"fingerprint {made['fingerprint']}) than this run's ({tokenizer.spec.path}, "
                    f"{tokenizer.spec.fingerprint}); its token ids would be wrong. Run cptjax data "
                    "prepare again with this tokenizer, or train with the one it was made with")
            dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
            if self._dtype is not None and dtype != self._dtype:
                raise CptjaxError(f"{key}: {folder} stores {dtype} ids, the other folders "
                                  f"{self._dtype}; prepare them alike")
            self._dtype = dtype
            shards += [str(folder / shard["file"]) for shard in manifest["shards"]]
        self._shards = shards
        self._open()

    def _open(self):
        self._open_source = grain.sources.ArrayRecordDataSource(self._shards)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_open_source"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._open_source)

    def where(self, index: int) -> str:
        return f"{', '.join(self._folders)}: document {index}"

    def __getitem__(self, index: int) -> np.ndarray:
        return np.frombuffer(self._open_source[index], dtype=self._dtype).astype(np.int32)

    def read_batch(self, indices: list[int]) -> list[np.ndarray]:
        return [np.frombuffer(r, dtype=self._dtype).astype(np.int32)
                for r in self._open_source.__getitems__(indices)]


def read_manifest(folder) -> dict:
    path = epath.Path(folder) / MANIFEST
    if not path.exists():
        raise CptjaxError(f"{folder}: not a prepared corpus (no {MANIFEST}); make one with "
                          "cptjax data prepare")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CptjaxError(f"{path}: unreadable ({err}); prepare the corpus again") from None
    if manifest.get("format") != FORMAT:
        raise CptjaxError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; "
                          "prepare the corpus again with this version of cptjax")
    return manifest


def prepare_corpus(source: InputConfig, tokenizer_dir, out, *, num_shards: int = 1,
                   num_workers: int = 0, invalid_utf8: str = "fail") -> dict:
    """Tokenizes every document of `source` into `out` (a new folder); returns the manifest.

    Any error (a bad file, line or document) leaves nothing at `out`: the folder appears only
    when complete.
    """
    from cptjax.data.pipeline import DOCS_PER_READ, ReadDocuments, with_workers

    source.validate("input")
    if source.type == "prepared":
        raise CptjaxError("input.type: this corpus is prepared already")
    if num_shards < 1 or num_workers < 0:
        raise CptjaxError("--shards must be >= 1 and --workers >= 0")
    if invalid_utf8 not in ("fail", "skip"):
        raise CptjaxError(f"--invalid-utf8: {invalid_utf8!r}; choose 'fail' or 'skip'")
    spec = load_tokenizer_spec(tokenizer_dir)
    tokenizer = DocumentTokenizer(spec)
    documents = open_source(source, "input", tokenizer)
    total = len(documents)
    if total == 0:
        raise CptjaxError(f"input: {', '.join(source.paths) or source.dataset} holds no documents")
    num_shards = min(num_shards, total)
    dataset = (grain.MapDataset.range(total).batch(DOCS_PER_READ)
               .map(ReadDocuments(documents, tokenizer, invalid_utf8))
               .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)))
    if num_workers:
        dataset = with_workers(dataset, num_workers)
    from array_record.python.array_record_module import ArrayRecordWriter

    names = [f"tokens-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
    shards = [{"file": name, "num_docs": 0, "num_tokens": 0} for name in names]
    skipped = {"invalid_utf8": 0, "empty": 0}
    dtype = spec.token_dtype.newbyteorder("<")
    with atomic_output_dir(out) as tmp:
        writers = [ArrayRecordWriter(str(Path(tmp) / name), "group_size:1") for name in names]
        iterator = iter(dataset)
        try:
            index = 0
            steps = range(len(range(0, total, DOCS_PER_READ)))
            for _, items in zip(progress_bar(f"tokenizing {total} documents")(steps), iterator):
                for item in items:
                    if isinstance(item, Failed):
                        raise CptjaxError(item.message)
                    if isinstance(item, Skipped) or len(item) == 0:
                        skipped[item.reason if isinstance(item, Skipped) else "empty"] += 1
                    else:
                        shard = shards[index * num_shards // total]
                        writers[index * num_shards // total].write(item.astype(dtype).tobytes())
                        shard["num_docs"] += 1
                        shard["num_tokens"] += len(item)
                    index += 1
        finally:
            getattr(iterator, "close", lambda: None)()
            for writer in writers:
                writer.close()
        if not sum(s["num_docs"] for s in shards):
            raise CptjaxError(f"input: every document was skipped ({skipped}); nothing to write")
        manifest = {
            "format": FORMAT,
            "tokenizer": {"fingerprint": spec.fingerprint, "path": spec.path, "bos_id": spec.bos_id,
                          "eos_id": spec.eos_id, "vocab_size": spec.vocab_size},
            "dtype": dtype.name,
            "source": {"type": source.type, "paths": list(source.paths),
                       "text_field": source.text_field, "delimiter": source.delimiter,
                       "dataset": source.dataset, "split": source.split},
            "num_docs": sum(s["num_docs"] for s in shards),
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "skipped": skipped,
            "shards": shards,
        }
        (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
