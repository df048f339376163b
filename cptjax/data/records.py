"""Record-based sources: ArrayRecord files of UTF-8 documents, TFDS datasets read by name, and
corpora prepared by `cptjax data prepare` (ArrayRecord shards of token ids plus a manifest).

A prepared folder:

    manifest.json                       format, tokenizer (fingerprint, BOS/EOS ids, vocab size),
                                        token dtype, the source it was made from, document and
                                        token counts, skipped documents, and the shards
    tokens-00000-of-00004.array_record  one record per document: its ids (BOS? text EOS) as
                                        little-endian uint16 (vocab <= 65,536) or uint32

This module reads that format; prepare.py writes it. Training from a prepared folder refuses a
tokenizer whose fingerprint differs from the one it was made with.
"""

from __future__ import annotations

import json

import grain
import numpy as np
from etils import epath

from cptjax.core.errors import CptjaxError
from cptjax.data.sources import DocumentSource, decode_utf8
from cptjax.data.tokenize import DocumentTokenizer

PREPARED_FORMAT = "cptjax-prepared-tokens-v1"
MANIFEST = "manifest.json"


def _array_record_source(files: list[epath.Path]):
    for path in files:
        if not path.is_file():
            raise CptjaxError(f"{path}: expected an ArrayRecord file, found a folder")
    try:
        return grain.sources.ArrayRecordDataSource([str(f) for f in files])
    except Exception as err:  # noqa: BLE001 - array_record raises bare RuntimeErrors
        raise CptjaxError(f"{', '.join(map(str, files[:3]))}: not readable as ArrayRecord "
                          f"({err})") from None


class ArrayRecordTextSource(DocumentSource):
    """ArrayRecord files whose records are UTF-8 documents."""

    def __init__(self, files: list[epath.Path]):
        self._files = [str(f) for f in files]
        self._source = _array_record_source(files)

    def __len__(self) -> int:
        return len(self._source)

    def where(self, index: int) -> str:
        return f"{self._files[0] if len(self._files) == 1 else 'ArrayRecord files'}: record {index}"

    def __getitem__(self, index: int) -> str:
        return decode_utf8(self._source[index], self.where(index))


class TfdsSource(DocumentSource):
    """A TFDS dataset read with `tfds.data_source` (ArrayRecord, random access, no TensorFlow)."""

    def __init__(self, dataset: str, split: str, data_dir: str | None, text_field: str):
        self._args = (dataset, split, data_dir)
        self._text_field = text_field
        self._open()
        self._length = len(self._open_source)

    def _open(self):
        import tensorflow_datasets as tfds

        dataset, split, data_dir = self._args
        try:
            self._open_source = tfds.data_source(dataset, split=split, data_dir=data_dir,
                                                 download=False)
        except Exception as err:  # noqa: BLE001 - tfds raises many types for a missing or unprepared dataset
            raise CptjaxError(f"tfds {dataset} (split {split!r}, data_dir {data_dir}): cannot be "
                              f"opened ({str(err).splitlines()[0]}); prepare it with TFDS first "
                              "(downloads are off here) and check data_dir") from None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_open_source"}

    def __len__(self) -> int:
        return self._length

    def where(self, index: int) -> str:
        dataset, split, _ = self._args
        return f"tfds {dataset}[{split}]: example {index}"

    def __getitem__(self, index: int) -> str:
        if "_open_source" not in self.__dict__:
            self._open()
        record = self._open_source[index]
        if self._text_field not in record:
            raise CptjaxError(f"{self.where(index)}: no feature {self._text_field!r} (features: "
                              f"{', '.join(record)}); set the source's text_field")
        value = record[self._text_field]
        if isinstance(value, np.ndarray):
            value = value.item()
        return decode_utf8(value, self.where(index)) if isinstance(value, bytes) else str(value)


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
    if manifest.get("format") != PREPARED_FORMAT:
        raise CptjaxError(f"{path}: format {manifest.get('format')!r}, expected {PREPARED_FORMAT!r}; "
                          "prepare the corpus again with this version of cptjax")
    return manifest
