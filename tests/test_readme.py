"""The README's commands, and the shipped configs' own commands, run as written, from a fresh user
folder with the relative paths they use. The models and corpora they name are stand-ins put at
those paths: a tiny model with Llama 3.2 1B's structure and context length, real text.

Training commands get two changes, both through documented flags: `--until-step` (their configs
describe runs of thousands of steps), and a smaller batch (`--set training.batch_size=8 --set
training.seq_len=512`: the config's 64 x 2560 rows take two minutes a step on two CPU cores)."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import hf_models
import pytest
import tiny_configs
import zstandard
from data_helpers import STDLIB, corpus_files, tokenizer_dir
from doc_commands import commands, documented_commands, documented_tpu_plans
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMALLER = " --set training.batch_size=8 --set training.seq_len=512"
# `cptjax plan --topology` commands must leave this share of each chip free: test_plan holds the
# configs they plan to it and does not compile them again.
HEADROOM = 0.10


def _write_jsonl_zst(path: Path, texts) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(lines))


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    shutil.copytree(ROOT / "configs", folder / "configs")
    tokenizer = tokenizer_dir("llama")
    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    hf = dict(tiny_configs.shrunk_config("llama-3.2-1b"), vocab_size=vocab,
              max_position_embeddings=tiny_configs.full_config("llama-3.2-1b")["max_position_embeddings"])
    for where in ("Llama-3.2-1B", "models/Llama-3.2-1B"):
        hf_models.save_hf_model(hf, folder / where)
        for file in tokenizer.iterdir():
            shutil.copy(file, folder / where / file.name)
    # `cptjax plan --topology` reads only a config.json (the flagship's weights are on gs://)
    for _, model_folder in documented_tpu_plans().values():  # e.g. models/Llama-3.1-8B
        (folder / "models" / model_folder).mkdir(parents=True, exist_ok=True)
        (folder / "models" / model_folder / "config.json").write_text(
            json.dumps(tiny_configs.full_config(model_folder.lower())))
    code = [p.read_text() for p in sorted((STDLIB / "json").glob("*.py"))]
    english = [json.loads(line)["text"] for line in corpus_files()["wiki_jsonl"].read_text().splitlines()]
    _write_jsonl_zst(folder / "corpus" / "code" / "part-0.jsonl.zst", code)
    _write_jsonl_zst(folder / "corpus" / "general" / "part-0.jsonl.zst", english[:40])
    for name, texts in (("code", code[:2]), ("general", english[40:44])):
        (folder / "heldout" / name).mkdir(parents=True)
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
        (folder / "heldout" / name / "part-0.jsonl").write_text(lines)
        (folder / "heldout" / f"{name}.jsonl").write_text(lines)
    return folder


def _run(command: str, cwd: Path) -> str:
    executable = shutil.which("cptjax")
    argv = shlex.split(command)
    argv = [executable, *argv[1:]] if executable else [sys.executable, "-m", "cptjax.cli", *argv[1:]]
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def test_the_readme_shows_the_commands_this_test_runs():
    readme = documented_commands()
    header = commands((ROOT / "configs" / "llama-3.2-1b-code.yaml").read_text(), commented=True)
    assert len(readme) >= 10 and len(header) == 3, (readme, header)
    assert all(c.split()[1] in ("demo", "train", "config", "convert", "eval", "report", "generate", "merge",
                                "plan")
               for c in readme), readme


@pytest.mark.slow
def test_readme_and_config_commands_work_as_written_from_a_fresh_folder(user_folder):
    # the config's own header: convert, prepare the code corpus, train
    header = commands((ROOT / "configs" / "llama-3.2-1b-code.yaml").read_text(), commented=True)
    for command in header:
        out = _run(command + (" --until-step 1" + SMALLER if command.startswith("cptjax train") else ""),
                   user_folder)
    assert "stopped at step 1" in out
    assert (user_folder / "prepared" / "code" / "manifest.json").is_file()
    assert (user_folder / "models" / "llama-3.2-1b-ckpt" / "0").is_dir()
    run = user_folder / "runs" / "llama-3.2-1b-code"
    assert (run / "checkpoints" / "1").is_dir() and (run / "config.yaml").is_file()

    readme = documented_commands()
    for command in readme:
        if command.startswith("cptjax demo"):
            continue  # the demo runs in test_demo.py
        # The examples name the full run's steps; this run stops at step 3.
        if command.startswith("cptjax train") and "--until-step" not in command:
            command += " --until-step 2"  # the same run, one step further (it resumes)
        command = command.replace("--until-step 500", "--until-step 3").replace("@6000", "@3")
        if command.startswith("cptjax train") or (command.startswith("cptjax plan") and "--topology" not in command):
            command += SMALLER  # a plan for this machine's CPU: the batch this test trains with
        out = _run(command, user_folder)
        if command.startswith("cptjax config show"):
            assert f"run_dir: {run}" in out  # relative paths resolved against the user's folder
        if command.startswith("cptjax plan"):
            fits = re.search(r"fits: ([\d.]+) GiB of ([\d.]+) GiB per device", out)
            assert fits, out
            if "--topology" in command:  # test_plan leaves these configs to this command
                assert "; attention splash;" in out, out
                assert 1 - float(fits.group(1)) / float(fits.group(2)) >= HEADROOM, out
        if "--verify" in command:
            assert "verified with transformers: max |logit difference|" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit())[-1] == "3"

    # the README's Python example, on the export it made
    script = ('import cptjax, numpy as np\nmodel = cptjax.load_model("./export", dtype="float32")\n'
              'print(model.logits(np.zeros((1, 4), np.int32)).shape)')
    result = subprocess.run([sys.executable, "-c", script], cwd=user_folder, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith(", 4, " + str(
        json.loads((user_folder / "export" / "config.json").read_text())["vocab_size"]) + ")"), result.stderr
