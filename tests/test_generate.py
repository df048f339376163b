"""`cptjax generate`: greedy decoding with the KV cache against transformers' `generate`."""

import dataclasses
import shutil

import hf_models
import numpy as np
import pytest
import tiny_configs
import torch
from data_helpers import tokenizer_dir
from flax import nnx

from cptjax import load_model
from cptjax.cli import main
from cptjax.io.pretrained import PretrainedModel
from cptjax.measure.generate import Sampling, generate_ids
from cptjax.model.kv_cache import KVCache
from cptjax.model.transformer import model_from_params

PROMPT_LEN = 20  # longer than the sliding window (12): the ring of cache slots wraps while decoding
EOS = tiny_configs.shrunk_config("llama-3.2-1b")["eos_token_id"]


def _prompt(seed=0, rows=1):
    return np.random.default_rng(seed).integers(3, 512, size=(rows, PROMPT_LEN))


def _transformers_greedy(hf_dir, prompt, new_tokens, eos=EOS):
    model = hf_models.load_hf_model(hf_dir)
    with torch.no_grad():
        out = model.generate(torch.as_tensor(prompt), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=eos)
    return [row[prompt.shape[1]:] for row in out.tolist()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mistral-7b-v0.1", "llama-3.2-1b"])
def test_greedy_matches_transformers_for_32_tokens(name, tiny_hf):
    hf_dir = tiny_hf(name)
    model = load_model(hf_dir)
    prompt = _prompt()
    ours = generate_ids(model, prompt, Sampling(max_new_tokens=32), eos=(EOS,))
    assert ours == _transformers_greedy(hf_dir, prompt, 32)
    assert len(ours[0]) == 32  # no early end-of-sequence: all 32 compared

    if model.config.sliding_window is not None:
        # The window changes the answer, so the match above checks the cache's window masking.
        assert KVCache.empty(model.config, 1, PROMPT_LEN + 32, np.float32).keys.shape[2] == 12
        cfg = dataclasses.replace(model.config, sliding_window=None)
        params = nnx.to_pure_dict(nnx.state(model.model, nnx.Param))
        unwindowed = PretrainedModel(cfg, model_from_params(cfg, params))
        assert generate_ids(unwindowed, prompt, Sampling(max_new_tokens=32), eos=(EOS,)) != ours


@pytest.mark.slow
def test_batched_prompts_and_end_of_sequence_match_transformers(tiny_hf):
    hf_dir = tiny_hf("qwen2-sliding")  # GQA, q/k/v biases and a window on every layer
    model = load_model(hf_dir)
    prompt = _prompt(seed=1, rows=2)
    free = generate_ids(model, prompt, Sampling(max_new_tokens=24), eos=())
    stop = free[0][9]  # a token the first row emits: with it as EOS that row must end there
    ours = generate_ids(model, prompt, Sampling(max_new_tokens=24), eos=(stop,))
    assert ours[0] == free[0][:free[0].index(stop) + 1]
    reference = _transformers_greedy(hf_dir, prompt, 24, eos=stop)
    for row, ref in zip(ours, reference):
        ref = ref[:ref.index(stop) + 1] if stop in ref else ref  # transformers pads ended rows
        assert row == ref


def test_sampling_is_reproducible_by_seed_and_top_p_narrows_to_greedy(tiny_hf):
    model = load_model(tiny_hf("llama-3.2-1b"))
    prompt = _prompt()
    hot = lambda seed, **kw: generate_ids(model, prompt, Sampling(16, temperature=1.0, seed=seed, **kw))[0]  # noqa: E731
    assert hot(3) == hot(3)
    assert hot(3) != hot(4)
    greedy = generate_ids(model, prompt, Sampling(16))[0]
    assert hot(3) != greedy
    assert hot(3, top_p=1e-6) == greedy  # only the most likely token is left to draw


@pytest.mark.slow
def test_generate_command_prints_the_continuation(tiny_hf, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_hf("llama-3.2-1b"), folder)
    for f in tokenizer_dir("llama", 512).iterdir():
        shutil.copy(f, folder / f.name)
    args = ["generate", "--model", str(folder), "--prompt", "def decode(self, s):",
            "--max-new-tokens", "12", "--temperature", "0.8", "--top-p", "0.9", "--seed", "7"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    text, summary = first.rstrip("\n").rsplit("\n", 1)
    assert text.startswith("def decode(self, s):") and len(text) > len("def decode(self, s):")
    assert "new tokens, temperature 0.8, top-p 0.9, seed 7" in summary


@pytest.mark.parametrize("flags, expected", [
    (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature -1.0: must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1"),
    (["--max-new-tokens", "1000"], "exceed the model's max_position_embeddings (256)"),
])
def test_bad_generation_settings_get_one_line(flags, expected, tiny_hf, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_hf("llama-3.2-1b"), folder)
    for f in tokenizer_dir("llama", 512).iterdir():
        shutil.copy(f, folder / f.name)
    assert main(["generate", "--model", str(folder), "--prompt", "x = 1", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cptjax: error: ") and expected in err[0], err
