"""Every command on gs:// paths, end to end, against an in-process Cloud Storage emulator: the same
clients (gcsfs, google-cloud-storage, tensorstore, ArrayRecord's) that talk to the real service.
A path passed through pathlib anywhere would collapse 'gs://bucket' to 'gs:/bucket' and fail."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import hf_models
import pytest
import tiny_configs
from data_helpers import corpus_files, tokenizer_dir
from etils import epath
from tokenizers import Tokenizer

from cptjax.core.paths import user_path

WORKER = Path(__file__).parent / "remote_worker.py"
EMULATOR = Path(__file__).parent / "gcs_emulator.py"


def test_user_paths_keep_uris_and_make_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(pathlib.Path("gs://bucket/run")) == "gs:/bucket/run"  # what a Path() would do
    assert str(user_path("gs://bucket/run") / "checkpoints") == "gs://bucket/run/checkpoints"
    assert user_path("runs/x") == epath.Path(tmp_path / "runs" / "x")
    assert user_path("~/x") == epath.Path(os.path.expanduser("~/x"))


def test_emulator_sends_object_generations_like_cloud_storage():
    # An OCDBT database (Orbax's arrays) written, opened afresh and written again. Without the
    # x-goog-generation header tensorstore took the manifest's generation as 0 and refused its own
    # next write ("Malformed StorageGeneration"), which failed test_every_command_on_gs_paths in CI
    # whenever Orbax happened to read a manifest back.
    result = subprocess.run([sys.executable, str(EMULATOR)], capture_output=True, text=True, timeout=120)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"keys": ["a", "b"]}, result.stderr[-2000:]
    assert result.returncode == 0


@pytest.mark.slow
def test_every_command_on_gs_paths(tmp_path):
    tokenizer = tokenizer_dir("llama")
    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    model = hf_models.save_hf_model(dict(tiny_configs.shrunk_config("llama-3.2-1b"), vocab_size=vocab),
                                    tmp_path / "hf")
    corpus = shutil.copy(corpus_files()["wiki_jsonl"], tmp_path / "wiki.jsonl")
    result = subprocess.run([sys.executable, str(WORKER), str(model), str(tokenizer), str(corpus), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0 and "error" not in summary, (summary, result.stderr[-4000:])
    assert summary["round_trip_exact"]  # HF -> gs:// checkpoint -> gs:// HF export, bit for bit
    assert summary["export_files"] == ["config.json", "generation_config.json", "model.safetensors"]
    assert summary["prepared_files"] == ["manifest.json", "tokens-00000-of-00001.array_record"]
    # paused at 2, resumed to 4: one record per step, evals at 0, 2, 4
    assert summary["train_steps"] == [1, 2, 3, 4] and summary["eval_steps"] == [0, 2, 4]
    # keep_last 2: steps 1 and 2 were removed (unlisted first), and nothing half-deleted is left
    assert summary["checkpoints"] == ["3", "4", "hf_assets"]
    assert summary["tensorboard"]
    assert summary["assets"] == [".complete", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert summary["logits_shape"] == [1, 4, vocab]
