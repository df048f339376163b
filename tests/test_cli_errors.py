"""Bad input: one line naming the file or key, a non-zero exit, and nothing written to --out."""

import json
import shutil
import subprocess
import sys

import pytest

from cptjax.cli import main
from cptjax.hf.safetensors import SafetensorsFile, write_safetensors


def _copy(tiny_hf, tmp_path, name="llama-3.2-1b"):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf(name), folder)
    return folder


def _rewrite_weights(folder, edit):
    """Rewrites model.safetensors through `edit(dict name -> array) -> dict`."""
    path = folder / "model.safetensors"
    st = SafetensorsFile(path)
    tensors = edit({name: st.read(name) for name in st.tensors})
    write_safetensors(path, tensors.items(), [(k, v.dtype, v.shape) for k, v in tensors.items()])


def _missing_dir(tiny_hf, tmp_path):
    return tmp_path / "nowhere", "--hf-dir"


def _missing_config(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)
    (folder / "config.json").unlink()
    return folder, "config.json: missing"


def _malformed_config(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)
    (folder / "config.json").write_text('{"model_type": "llama", ')
    return folder, "config.json: not valid JSON"


def _config_missing_key(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder, "missing key 'hidden_size'"


def _missing_tensor(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)
    _rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    return folder, "'model.layers.1.mlp.up_proj.weight' is missing"


def _extra_tensor(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)
    _rewrite_weights(folder, lambda t: {**t, "model.layers.9.mlp.up_proj.weight": t["model.norm.weight"]})
    return folder, "'model.layers.9.mlp.up_proj.weight' in model.safetensors has no place"


def _wrong_shape(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)
    _rewrite_weights(folder, lambda t: {**t, "model.layers.0.self_attn.k_proj.weight":
                                        t["model.layers.0.self_attn.q_proj.weight"]})
    return folder, "'model.layers.0.self_attn.k_proj.weight' in model.safetensors has shape [96, 64]"


def _pickled_only(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"a pickle that must never be opened")
    return folder, "only pickled weights (pytorch_model.bin)"


def _unsupported_architecture(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder, "unsupported architecture: model_type 'gpt2'. cptjax supports: llama (LlamaForCausalLM)"


def _refused_rope(tiny_hf, tmp_path):
    folder = _copy(tiny_hf, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "longrope", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, "unsupported rope type 'longrope': cptjax implements default, linear, llama3, yarn"


BAD_HF_DIRS = [_missing_dir, _missing_config, _malformed_config, _config_missing_key, _missing_tensor,
               _extra_tensor, _wrong_shape, _pickled_only, _unsupported_architecture, _refused_rope]


def _assert_one_line_error(capsys, expected):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cptjax: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("make", BAD_HF_DIRS, ids=lambda f: f.__name__.strip("_"))
def test_bad_hf_input(make, tiny_hf, tmp_path, capsys):
    folder, expected = make(tiny_hf, tmp_path)
    capsys.readouterr()  # only what the conversion prints counts
    out = tmp_path / "out"
    assert main(["convert", "hf-to-orbax", "--hf-dir", str(folder), "--out", str(out)]) == 2
    _assert_one_line_error(capsys, expected)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no partial leftovers


def _non_empty(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    return out


def test_existing_non_empty_out_is_refused_and_kept(tiny_hf, tmp_path, capsys):
    out = _non_empty(tmp_path)
    tiny_hf("llama-3.2-1b")
    capsys.readouterr()
    assert main(["convert", "hf-to-orbax", "--hf-dir", str(tiny_hf("llama-3.2-1b")), "--out", str(out)]) == 2
    _assert_one_line_error(capsys, "folder exists and is not empty")
    assert main(["convert", "hf-to-orbax", "--hf-dir", str(tiny_hf("llama-3.2-1b")),
                 "--out", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    assert main(["convert", "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(out)]) == 2
    _assert_one_line_error(capsys, "folder exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_an_empty_out_folder_is_used(tiny_hf, tmp_path):
    (tmp_path / "out").mkdir()
    assert main(["convert", "hf-to-orbax", "--hf-dir", str(tiny_hf("llama-3.2-1b")),
                 "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "0").is_dir()


@pytest.mark.parametrize("args, expected", [
    (["--ckpt", "{tmp}/none"], "no such folder"),
    (["--ckpt", "{tmp}"], "no finished checkpoint step"),
    (["--ckpt", "{ckpt}", "--max-shard-size", "huge"], "--max-shard-size 'huge'"),
])
def test_bad_export_input(args, expected, tiny_hf, tmp_path, capsys):
    source = tiny_hf("qwen3-0.6b")
    assert main(["convert", "hf-to-orbax", "--hf-dir", str(source), "--out", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    args = [a.format(tmp=tmp_path / "empty", ckpt=tmp_path / "ckpt") for a in args]
    (tmp_path / "empty").mkdir()
    assert main(["convert", "orbax-to-hf", *args, "--out", str(tmp_path / "out")]) == 2
    _assert_one_line_error(capsys, expected)
    assert not (tmp_path / "out").exists()


def test_console_script_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cptjax.cli", "convert", "hf-to-orbax", "--hf-dir",
                             str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("cptjax: error: ")
    assert "Traceback" not in result.stderr
