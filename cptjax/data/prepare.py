"""`cptjax data prepare`: tokenize a corpus once into ArrayRecord shards of token ids + a manifest
(the format is described in records.py, which reads it; this module only writes it).

Documents keep the source's order (training shuffles them). Training from a prepared folder
(`type: prepared`) refuses a tokenizer whose fingerprint differs, and gives the same batches as
tokenizing the same documents on the fly.
"""

from __future__ import annotations

import contextlib
import json
import tempfile

import grain
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from cptjax.core.atomic_dir import atomic_output_dir
from cptjax.core.errors import CptjaxError
from cptjax.core.paths import is_remote
from cptjax.core.progress import progress_bar
from cptjax.data.config import InputConfig
from cptjax.data.packing import Skipped
from cptjax.data.read import DOCS_PER_READ, open_source, read_documents
from cptjax.data.records import MANIFEST, PREPARED_FORMAT
from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec


def prepare_corpus(source: InputConfig, tokenizer_dir, out, *, num_shards: int = 1,
                   num_workers: int = 0, invalid_utf8: str = "fail") -> dict:
    """Tokenizes every document of `source` into `out` (a new folder); returns the manifest.

    Any error (a bad file, line or document) leaves nothing at `out`: the folder appears only
    when complete.
    """
    source.validate("input")
    if source.type == "prepared":
        raise CptjaxError("input.type: this corpus is prepared already")
    if num_shards < 1 or num_workers < 0:
        raise CptjaxError("--shards must be >= 1 and --workers >= 0")
    if invalid_utf8 not in ("fail", "skip"):
        raise CptjaxError(f"--invalid-utf8: {invalid_utf8!r}; choose 'fail' or 'skip'")
    spec = load_tokenizer_spec(tokenizer_dir, "--tokenizer")
    tokenizer = DocumentTokenizer(spec)
    documents = open_source(source, "input", tokenizer)
    total = len(documents)
    if total == 0:
        raise CptjaxError(f"input: {', '.join(source.paths) or source.dataset} holds no documents")
    num_shards = min(num_shards, total)
    names = [f"tokens-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
    shards = [{"file": name, "num_docs": 0, "num_tokens": 0} for name in names]
    skipped = {"invalid_utf8": 0, "empty": 0}
    dtype = spec.token_dtype.newbyteorder("<")
    with atomic_output_dir(out, "--out") as tmp, _local_staging(tmp) as staging:
        writers = [ArrayRecordWriter(str(staging / name), "group_size:1") for name in names]
        chunks = read_documents(documents, tokenizer, grain.MapDataset.range(total),
                                num_workers=num_workers, invalid_utf8=invalid_utf8)
        try:
            index = 0
            steps = range(len(range(0, total, DOCS_PER_READ)))
            for _, items in zip(progress_bar(f"tokenizing {total} documents")(steps), chunks):
                for item in items:
                    if isinstance(item, Skipped) or len(item) == 0:
                        skipped[item.reason if isinstance(item, Skipped) else "empty"] += 1
                    else:
                        shard = shards[index * num_shards // total]
                        writers[index * num_shards // total].write(item.astype(dtype).tobytes())
                        shard["num_docs"] += 1
                        shard["num_tokens"] += len(item)
                    index += 1
        finally:
            chunks.close()
            for writer in writers:
                writer.close()
        if not sum(s["num_docs"] for s in shards):
            raise CptjaxError(f"input: every document was skipped ({skipped}); nothing to write")
        manifest = {
            "format": PREPARED_FORMAT,
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
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@contextlib.contextmanager
def _local_staging(folder: epath.Path):
    """A local folder to write ArrayRecord shards into (its writer takes local paths only), whose
    files are copied into `folder` at the end when `folder` is remote (gs://)."""
    if not is_remote(folder):
        yield folder
        return
    staging = epath.Path(tempfile.mkdtemp(prefix="cptjax-prepare-"))
    try:
        yield staging
        for file in staging.iterdir():
            file.copy(folder / file.name)
    finally:
        staging.rmtree()
