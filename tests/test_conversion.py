"""HF -> cptjax checkpoint -> HF, checked with the safetensors package and transformers."""

import json

import data_helpers
import hf_models
import numpy as np
import pytest
import tiny_configs
import torch
from safetensors import safe_open

from cptjax import load_model
from cptjax.cli import main
from cptjax.hf.safetensors import SafetensorsFile, write_safetensors

ALL = tiny_configs.NAMES + sorted(tiny_configs.BUILT) + sorted(tiny_configs.VARIANTS)


def _tensors(folder):
    """Every tensor of an HF folder, read by the safetensors package itself (not cptjax)."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_round_trip_is_bit_exact_and_loads_in_transformers(name, tiny_hf, tmp_path):
    """With default flags: the export keeps the precision the source's config.json recorded."""
    source = tiny_hf(name)
    assert json.loads((source / "config.json").read_text())["dtype"] == "float32"
    assert main(["convert", "hf-to-orbax", "--hf-dir", str(source), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out",
                 str(tmp_path / "export")]) == 0
    before, after = _tensors(source), _tensors(tmp_path / "export")
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype == torch.float32
        assert torch.equal(before[key], after[key]), key

    exported = hf_models.load_hf_model(tmp_path / "export")
    assert type(exported).__name__ == tiny_configs.shrunk_config(name)["architectures"][0]
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, tiny_configs.SEQ_LEN))
    np.testing.assert_array_equal(hf_models.hf_logits(exported, tokens),
                                  hf_models.hf_logits(hf_models.load_hf_model(source), tokens))
    # The checkpoint itself loads too, with the same logits as the HF folder.
    np.testing.assert_array_equal(np.asarray(load_model(tmp_path / "ckpt").logits(tokens)),
                                  np.asarray(load_model(source).logits(tokens)))


@pytest.mark.slow
def test_bf16_export_is_sharded_with_tokenizer_and_verify(tiny_hf, tmp_path, capsys):
    import transformers

    source = tmp_path / "source"
    hf_models.save_hf_model(tiny_configs.shrunk_config("llama-3.1-8b"), source, max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").is_file()  # sharded input is read too
    wiki = (tiny_configs.FIXTURES.parent / "hf_configs" / "llama-3.1-8b.json").read_text()
    data_helpers.save_tokenizer(source, [wiki] * 20)

    assert main(["convert", "hf-to-orbax", "--hf-dir", str(source), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["convert", "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out",
                 str(tmp_path / "export"), "--dtype", "bfloat16", "--max-shard-size", "200KB", "--verify"]) == 0
    printed = capsys.readouterr().out
    diff = float(printed.split("max |logit difference| = ")[1].split()[0])
    assert diff < 1e-4

    export = tmp_path / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((export / s).stat().st_size <= 200_000 + 10_000 for s in shards)
    before, after = _tensors(source), _tensors(export)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in after.values())
    for key in before:
        assert after[key].dtype == torch.bfloat16
        assert torch.equal(after[key], before[key].to(torch.bfloat16)), key
    config = json.loads((export / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["rope_scaling"]["rope_type"] == "llama3"

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (export / name).is_file(), name
    text = "def hello(): return 'world'"
    assert (transformers.AutoTokenizer.from_pretrained(str(export))(text)["input_ids"]
            == transformers.AutoTokenizer.from_pretrained(str(source))(text)["input_ids"])
    generation = transformers.GenerationConfig.from_pretrained(str(export))
    assert generation.eos_token_id == 2


def test_export_of_a_chosen_step(tiny_hf, tmp_path, capsys):
    from cptjax.convert import hf_to_orbax, orbax_to_hf

    hf_to_orbax(tiny_hf("qwen3-0.6b"), tmp_path / "ckpt")
    result = orbax_to_hf(tmp_path / "ckpt", tmp_path / "export", step=0)
    assert result.step == 0 and result.files == ["model.safetensors"]
    assert main(["convert", "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out",
                 str(tmp_path / "other"), "--step", "7"]) == 2
    assert "finished steps are 0" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_safetensors_writer_and_reader_agree_with_the_package(tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float16),
              "c": rng.normal(size=(2, 2, 2)).astype(ml_dtypes.bfloat16)}
    specs = [(k, v.dtype, v.shape) for k, v in arrays.items()]
    write_safetensors(tmp_path / "ours.safetensors", arrays.items(), specs)
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        for key, value in arrays.items():
            np.testing.assert_array_equal(f.get_tensor(key).float().numpy(), value.astype(np.float32))
    save_file({k: v for k, v in arrays.items() if k != "c"}, str(tmp_path / "theirs.safetensors"))
    ours = SafetensorsFile(tmp_path / "theirs.safetensors")
    for key, value in load_file(str(tmp_path / "theirs.safetensors")).items():
        np.testing.assert_array_equal(ours.read(key), value)
