"""cptjax's commands on gs:// paths, against an in-process Cloud Storage emulator; prints a JSON
summary. gcsfs and google-cloud-storage (epath's and Orbax's metadata), tensorstore (Orbax's
arrays) and google-cloud-cpp (ArrayRecord) are pointed at the emulator by environment variables,
which must be set before any of them starts.

    python tests/remote_worker.py HF_DIR TOKENIZER_DIR CORPUS_JSONL LOCAL_OUT
"""

import json
import os
import sys
import time

import gcs_emulator

server = gcs_emulator.start()  # before any storage client starts: they read its address once
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np
import yaml
from etils import epath

from cptjax import load_model
from cptjax.cli import main as _cli
from cptjax.hf.safetensors import SafetensorsFile


def cli(argv):
    start = time.monotonic()
    code = _cli(argv)
    print(f"timing: {' '.join(argv[:2])} {time.monotonic() - start:.1f}s", file=sys.stderr, flush=True)
    return code


def upload(local: str, remote: str) -> str:
    source = epath.Path(local)
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    for file in files:
        target = epath.Path(remote) if source.is_file() else epath.Path(remote) / file.name
        target.write_bytes(file.read_bytes())
    return remote


def listing(folder: epath.Path) -> list[str]:
    """File names in a gs:// folder, read fresh: gcsfs caches listings, and tensorstore's writes
    do not go through it."""
    import fsspec

    fsspec.filesystem("gcs").invalidate_cache()
    return sorted(p.name for p in folder.iterdir())


def tensors(folder: epath.Path) -> dict:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        local = epath.Path(LOCAL) / f"copy-{path.name}"
        local.write_bytes(path.read_bytes())
        file = SafetensorsFile(local)
        out.update({name: file.read(name) for name in file.tensors})
    return out


def main(hf_dir, tokenizer, corpus):
    summary = {}
    # 1. HF -> cptjax checkpoint -> HF, both ends remote; the round trip is bit-exact
    assert cli(["convert", "hf-to-orbax", "--hf-dir", upload(hf_dir, "gs://bucket/hf"), "--out",
                "gs://bucket/ckpt"]) == 0
    assert cli(["convert", "orbax-to-hf", "--ckpt", "gs://bucket/ckpt", "--out", "gs://bucket/export"]) == 0
    before, after = tensors(epath.Path(hf_dir)), tensors(epath.Path("gs://bucket/export"))
    summary["round_trip_exact"] = before.keys() == after.keys() and all(
        np.array_equal(before[k], after[k]) for k in before)
    summary["export_files"] = listing(epath.Path("gs://bucket/export"))

    # 2. a prepared corpus written to the bucket
    upload(tokenizer, "gs://bucket/tokenizer")
    upload(corpus, "gs://bucket/data/wiki.jsonl")
    assert cli(["data", "prepare", "--type", "jsonl", "--paths", "gs://bucket/data/wiki.jsonl",
                "--tokenizer", "gs://bucket/tokenizer", "--out", "gs://bucket/prepared"]) == 0
    summary["prepared_files"] = listing(epath.Path("gs://bucket/prepared"))

    # 3. train with everything remote: run_dir, init_from, tokenizer, data, eval set; pause, resume
    config = {
        "run_dir": "gs://bucket/run",
        "model": {"init_from": "gs://bucket/ckpt", "tokenizer": "gs://bucket/tokenizer",
                  "compute_dtype": "float32"},
        "data": {"sources": [{"name": "wiki", "type": "jsonl", "paths": ["gs://bucket/data/*.jsonl"],
                              "weight": 0.5},
                             {"name": "prepared", "type": "prepared", "paths": ["gs://bucket/prepared"],
                              "weight": 0.5}],
                 "eval_sets": [{"name": "wiki", "type": "jsonl", "paths": ["gs://bucket/data/wiki.jsonl"],
                                "max_docs": 4}]},
        "training": {"steps": 4, "batch_size": 2, "seq_len": 32},
        "schedule": {"peak_lr": 1e-3, "warmup": 1},
        "checkpoint": {"every": 1, "keep_last": 2},
        "eval": {"every": 2},
        "logging": {"every": 1, "progress": "lines"},
    }
    epath.Path("gs://bucket/config.yaml").write_text(yaml.safe_dump(config))
    assert cli(["train", "--config", "gs://bucket/config.yaml", "--until-step", "2"]) == 0
    assert cli(["train", "--config", "gs://bucket/config.yaml"]) == 0
    run = epath.Path("gs://bucket/run")
    records = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    summary["train_steps"] = [r["step"] for r in records if r["kind"] == "train"]
    summary["eval_steps"] = [r["step"] for r in records if r["kind"] == "eval"]
    summary["checkpoints"] = listing(run / "checkpoints")
    summary["tensorboard"] = bool(listing(run / "logs" / "tensorboard"))
    summary["assets"] = listing(run / "checkpoints" / "hf_assets")
    # 4. the run's checkpoint loads from the bucket
    logits = load_model("gs://bucket/run").logits(np.zeros((1, 4), np.int32))
    summary["logits_shape"] = list(logits.shape)
    return summary


if __name__ == "__main__":
    LOCAL = sys.argv[4]
    try:
        print(json.dumps(main(*sys.argv[1:4])), flush=True)
        code = 0
    except BaseException as err:  # noqa: BLE001 - reported to the test, which shows it
        import traceback
        traceback.print_exc()
        print(json.dumps({"error": f"{type(err).__name__}: {err}"}), flush=True)
        code = 1
    server.stop()
    os._exit(code)  # clients' background threads would otherwise keep the process alive
