"""A grown vocabulary (`cptjax vocab resize`, optimizer.vocab): the old logits kept, each init's
rows, padding never predicted, original rows bit-identical after training, the HF round trip."""

import dataclasses
import json
import shutil
import types

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_configs
import transformers
from batches import CountingData, raw_config
from data_helpers import tokenizer_dir
from tokenizers import Tokenizer

from cptjax import load_model
from cptjax.cli import main
from cptjax.convert import orbax_to_hf
from cptjax.core.errors import CptjaxError
from cptjax.io.pretrained import PretrainedModel
from cptjax.io.weights import open_weights
from cptjax.measure.generate import Generator, generate_ids
from cptjax.model.decode import Sampling
from cptjax.model.transformer import model_from_params
from cptjax.model.vocab import COVARIANCE_SCALE, new_rows
from cptjax.train.config import config_from_dict
from cptjax.train.optimizer import VocabRowsConfig, trained_rows
from cptjax.train.trainer import run

# Added as the extended tokenizer's new ids, after every old one: a word, a code fragment, a phrase
# with its leading space, and one the old tokenizer splits into many byte pieces.
NEW_TOKENS = ["xyzzy", "def parse_config", " hello world", "naïveté", "<<<>>>"]
MODELS = {"tied": "llama-3.2-1b", "untied": "llama-2-7b"}


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """Tiny random HF models (tied and untied head) with a trained BPE tokenizer of their
    vocabulary's size, and that tokenizer extended by NEW_TOKENS."""
    root = tmp_path_factory.mktemp("vocab")
    base_tok = tokenizer_dir("llama")
    old = Tokenizer.from_file(str(base_tok / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    models = {}
    for kind, name in MODELS.items():
        folder = hf_models.save_hf_model(dict(tiny_configs.shrunk_config(name), vocab_size=old), root / kind)
        for f in base_tok.iterdir():
            shutil.copy(f, folder / f.name)
        models[kind] = folder
    extended = transformers.AutoTokenizer.from_pretrained(str(base_tok))
    extended.add_tokens(NEW_TOKENS)
    extended.save_pretrained(root / "extended")
    return types.SimpleNamespace(root=root, models=models, base_tok=base_tok, extended=root / "extended",
                                 old=old, new=old + len(NEW_TOKENS))


def _resized(grown, kind, init, fmt="orbax"):
    """The model resized by the command users run (once per module)."""
    out = grown.root / f"{kind}-{init}-{fmt}"
    if not out.exists():
        assert main(["vocab", "resize", "--model", str(grown.models[kind]), "--tokenizer", str(grown.extended),
                     "--init", init, "--format", fmt, "--out", str(out)]) == 0
    return out


def _params(path):
    with open_weights(path) as weights:
        return weights.config, weights.read()


@pytest.mark.parametrize("kind", list(MODELS))
def test_mean_init_keeps_the_old_logits_and_bounds_the_new_mass(grown, kind):
    """On old ids, the resized model's logits over the old ids equal the original's (the old rows
    are copied and the new rows only add columns); each new logit is the mean of the old ones, so
    the new ids take at most k/(n + k) of the probability and the distribution over the old ids,
    renormalised, is the original's. The padding columns are -inf."""
    n, k = grown.old, len(NEW_TOKENS)
    original = load_model(grown.models[kind])
    resized = load_model(_resized(grown, kind, "mean"))
    assert resized.config.vocab_size == 2176 and resized.config.real_vocab_size == n + k  # 2053 -> 17 x 128
    tokens = np.random.default_rng(0).integers(0, n, (2, 24))
    before, after = np.asarray(original.logits(tokens)), np.asarray(resized.logits(tokens))
    # Equal up to float32 summation order: XLA may tile the head's matmul differently for more rows.
    np.testing.assert_allclose(after[..., :n], before, rtol=0, atol=1e-5)
    np.testing.assert_allclose(after[..., n:n + k], np.repeat(before.mean(-1, keepdims=True), k, -1), atol=1e-5)
    assert np.all(after[..., n + k:] == -np.inf)
    log_p = jax.nn.log_softmax(after, axis=-1)
    new_mass = np.exp(jax.nn.logsumexp(log_p[..., n:], axis=-1))
    assert np.all(new_mass <= k / (n + k) + 1e-6)
    np.testing.assert_allclose(jax.nn.log_softmax(after[..., :n], axis=-1), jax.nn.log_softmax(before, axis=-1),
                               atol=1e-5)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("init", ["mean", "pieces", "covariance"])
def test_each_init_gives_its_rows(grown, kind, init):
    """Old rows copied bit for bit, padding rows zero, new rows by the init's formula, for the
    embedding and (untied) the head from its own rows."""
    n, k = grown.old, len(NEW_TOKENS)
    _, base = _params(grown.models[kind])
    _, params = _params(_resized(grown, kind, init))
    tables = ["embed_tokens"] + (["lm_head"] if kind == "untied" else [])
    assert ("lm_head" in params) == (kind == "untied")
    splitter = Tokenizer.from_file(str(grown.base_tok / "tokenizer.json"))
    for name in tables:
        old, grown_table = base[name], params[name]
        np.testing.assert_array_equal(grown_table[:n], old)
        assert not grown_table[n + k:].any()
        mean = old.astype(np.float64).mean(0)
        added = grown_table[n:n + k]
        if init == "mean":
            np.testing.assert_array_equal(added, np.broadcast_to(mean.astype(old.dtype), added.shape))
        elif init == "pieces":
            for row, text in zip(added, NEW_TOKENS, strict=True):
                ids = splitter.encode(text, add_special_tokens=False).ids
                assert len(ids) >= 1
                np.testing.assert_allclose(row, old[ids].astype(np.float64).mean(0), rtol=0, atol=1e-7)
        else:  # a sample of N(mean, 1e-9 cov): within a few standard deviations of the mean, never at it
            spread = np.sqrt(COVARIANCE_SCALE * old.astype(np.float64).var(0))
            assert np.all(np.abs(added - mean) < 6 * spread + 1e-7)
            assert len({row.tobytes() for row in added}) == k


def test_covariance_samples_have_the_old_rows_mean_and_scaled_covariance():
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(6, 6))
    table = (rng.normal(size=(3000, 6)) @ mixing + 2.0).astype(np.float32)
    rows, note = new_rows(table, 3000, 3000 + 20000, "covariance", rng=np.random.default_rng(2))
    assert note is None and rows.shape == (20000, 6)
    mean, cov = table.astype(np.float64).mean(0), np.cov(table.astype(np.float64), rowvar=False, bias=True)
    np.testing.assert_allclose(rows.astype(np.float64).mean(0), mean, atol=1e-5)
    sample = (rows.astype(np.float64) - mean) / np.sqrt(COVARIANCE_SCALE)
    np.testing.assert_allclose(np.cov(sample, rowvar=False), cov, atol=0.1 * np.abs(cov).max())
    flat = np.ones((10, 6), np.float32)  # a covariance of zero: the mean, as transformers falls back
    rows, note = new_rows(flat, 10, 12, "covariance")
    assert np.array_equal(rows, np.ones((2, 6), np.float32)) and "not positive definite" in note


def test_padding_is_never_predicted_or_generated(grown):
    """Padding rows made to win every logit by far still lose: their logits are -inf in the model,
    and generation (sampled; greedy takes the argmax checked here) never emits them."""
    n, k = grown.old, len(NEW_TOKENS)
    cfg, params = _params(_resized(grown, "untied", "mean"))
    model = PretrainedModel(cfg, model_from_params(cfg, params))
    tokens = np.random.default_rng(0).integers(0, n, (2, 8))
    best = np.asarray(model.logits(tokens))[0, -1].argmax()
    params["lm_head"][n + k:] = 1e3 * params["lm_head"][best]
    no_mask = dataclasses.replace(cfg, real_vocab_size=None)
    unmasked = PretrainedModel(no_mask, model_from_params(no_mask, params))
    assert np.asarray(unmasked.logits(tokens))[0, -1].argmax() >= n + k  # the rows would win unmasked
    model = PretrainedModel(cfg, model_from_params(cfg, params))
    logits = np.asarray(model.logits(tokens))
    assert np.all(logits[..., n + k:] == -np.inf) and logits.argmax(-1).max() < n + k
    out = generate_ids(model, tokens, Sampling(max_new_tokens=6, temperature=1.5, seed=3))
    assert all(0 <= t < n + k for row in out for t in row), out


def _train(raw, vocab, until_step=None):
    config = config_from_dict(raw)
    data = CountingData(vocab, config.training.batch_size, config.training.seq_len)
    return run(config, until_step=until_step, data=data, eval_sets={})


def assert_bits_equal(a, b):
    """Bit for bit (assert_array_equal counts -0.0 equal to 0.0)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


def test_an_untrained_value_keeps_its_bits_where_adding_a_zero_update_would_not():
    rows = trained_rows(VocabRowsConfig(original_rows=2, freeze_original=True), 1, 4)
    old = {"embed_tokens": np.array([[-0.0, 1.5], [2.0, -0.0], [-0.0, 3.0], [4.0, 5.0]], np.float32),
           "norm": np.array([-0.0, 1.0], np.float32)}
    added = jax.tree.map(lambda x: x + np.float32(0.0), old)  # what a zero update gives: -0.0 -> +0.0
    assert (np.asarray(added["embed_tokens"]).view(np.uint32) != old["embed_tokens"].view(np.uint32)).any()
    moved = jax.tree.map(lambda x: x + np.float32(1.0), old)
    kept = rows.where_trained(moved, old, jnp.asarray(1))
    assert_bits_equal(kept["embed_tokens"][:2], old["embed_tokens"][:2])  # original rows: the old bits
    assert_bits_equal(kept["embed_tokens"][2:], moved["embed_tokens"][2:])  # new rows train
    assert_bits_equal(kept["norm"], moved["norm"])  # the rest trains (no first stage)
    zeroed = rows.where_trained(moved, None, jnp.asarray(1))
    assert not np.asarray(zeroed["embed_tokens"][:2]).any() and np.array_equal(zeroed["norm"], moved["norm"])


def test_original_rows_stay_bit_identical_and_the_first_stage_trains_only_new_rows(grown, tmp_path):
    """optimizer.vocab with freeze_original and a first stage of new rows and norms, through the
    trainer's own step: after step 2 (the first stage) only the new rows and the norms moved;
    after step 4 the layers moved too, and the original rows are still bit for bit the loaded ones.
    The padding rows never move: the loss gives them no gradient (their logits are -inf)."""
    n, k = grown.old, len(NEW_TOKENS)
    resized = _resized(grown, "tied", "mean")
    _, start = _params(resized)
    raw = raw_config(tmp_path / "run", resized, training={"steps": 4, "batch_size": 4, "seq_len": 32},
                     schedule={"peak_lr": 1e-2, "warmup": 1, "end_lr": 1e-3},
                     optimizer={"vocab": {"original_rows": n, "freeze_original": True,
                                          "first_stage": "new_rows_and_norms"}},
                     checkpoint={"every": 2, "keep_last": 2}, eval={"every": 100, "at_start": False})
    raw["data"]["stages"] = [{"start_step": 3, "weights": [0.5, 0.5]}]
    first = _train(raw, n + k, until_step=2)
    params = jax.tree.map(np.asarray, first.state["params"])
    embed = params["embed_tokens"]
    assert_bits_equal(embed[:n], start["embed_tokens"][:n])
    assert all(not np.array_equal(embed[i], start["embed_tokens"][i]) for i in range(n, n + k))
    assert_bits_equal(embed[n + k:], start["embed_tokens"][n + k:])
    assert_bits_equal(params["layers"]["q_proj"], start["layers"]["q_proj"])
    assert not np.array_equal(params["layers"]["input_layernorm"], start["layers"]["input_layernorm"])
    assert not np.array_equal(params["norm"], start["norm"])

    second = _train(raw, n + k)
    assert second.final_step == 4
    params = jax.tree.map(np.asarray, second.state["params"])
    assert_bits_equal(params["embed_tokens"][:n], start["embed_tokens"][:n])
    assert_bits_equal(params["embed_tokens"][n + k:], start["embed_tokens"][n + k:])
    assert not np.array_equal(params["layers"]["q_proj"], start["layers"]["q_proj"])


def test_the_export_round_trips_through_transformers(grown):
    """The padded checkpoint exported to HF drops its padding rows; transformers loads it with the
    extended tokenizer, which gives the new ids, and its float32 logits match cptjax's within 1e-4.
    `--format hf` writes the same model directly."""
    n, k = grown.old, len(NEW_TOKENS)
    resized = _resized(grown, "untied", "pieces")
    export = grown.root / "export"
    orbax_to_hf(resized, export)
    hf_config = json.loads((export / "config.json").read_text())
    assert hf_config["vocab_size"] == n + k and "real_vocab_size" not in hf_config
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(export))
    ids = tokenizer("xyzzy and def parse_config hello world")["input_ids"]
    assert {n, n + 1} <= set(ids) and max(ids) < n + k
    tokens = np.asarray([ids])
    theirs = hf_models.hf_logits(hf_models.load_hf_model(export), tokens)
    ours = np.asarray(load_model(resized).logits(tokens))
    assert theirs.shape[-1] == n + k
    np.testing.assert_allclose(theirs, ours[..., :n + k], rtol=0, atol=1e-4)

    direct = _resized(grown, "untied", "pieces", fmt="hf")
    assert json.loads((direct / "config.json").read_text())["vocab_size"] == n + k
    np.testing.assert_allclose(np.asarray(load_model(direct).logits(tokens)), ours[..., :n + k], rtol=0, atol=1e-5)


def test_generate_and_lm_eval_use_the_extended_tokenizer(grown):
    from cptjax.train.lm_eval_model import CptjaxLM

    resized = _resized(grown, "tied", "mean")
    generator = Generator(resized)
    assert grown.old in generator.tokenizer.encode_prompt("xyzzy").tolist()
    assert generator.generate("xyzzy", Sampling(max_new_tokens=4)).new_tokens >= 1
    lm = CptjaxLM(path=str(resized), max_length=64, batch_size=2)
    assert grown.old in lm.tok_encode("xyzzy") and len(lm.tokenizer) == grown.new


def _cli(*args):
    return main(["vocab", "resize", *map(str, args)])


def test_bad_input_is_one_clear_line_and_overwrites_nothing(grown, tmp_path, capsys):
    model = grown.models["tied"]
    cases = [
        (["--tokenizer", tmp_path], "--tokenizer", "no tokenizer.json"),
        (["--tokenizer", grown.base_tok], "--tokenizer", "no more than the model's tokenizer's"),
        (["--tokenizer", grown.extended, "--pad-to", "0"], "--pad-to", "must be >= 1"),
    ]
    reordered = tmp_path / "reordered"
    shutil.copytree(grown.extended, reordered)
    spec = json.loads((reordered / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (reordered / "tokenizer.json").write_text(json.dumps(spec))
    cases.append((["--tokenizer", reordered], "--tokenizer", "an extended tokenizer keeps every old id"))
    bare = tmp_path / "bare"
    shutil.copytree(model, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    cases.append((["--model", bare, "--tokenizer", grown.extended], "--model", "has no tokenizer.json"))
    for i, (args, flag, message) in enumerate(cases):
        args = args if "--model" in args else ["--model", model, *args]
        assert _cli(*args, "--out", tmp_path / f"out{i}") == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and flag in err and message in err, err
        assert not (tmp_path / f"out{i}").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert _cli("--model", model, "--tokenizer", grown.extended, "--out", taken) == 2
    assert "--out" in capsys.readouterr().err and [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_the_config_refuses_a_first_stage_without_data_stages_and_a_model_without_new_rows(tmp_path, grown):
    raw = raw_config(tmp_path / "run", grown.models["tied"],
                     optimizer={"vocab": {"original_rows": grown.old, "first_stage": "new_rows"}})
    with pytest.raises(CptjaxError, match="optimizer.vocab.first_stage 'new_rows'.*data.stages"):
        config_from_dict(raw)
    vocab = VocabRowsConfig(original_rows=grown.old)
    with pytest.raises(CptjaxError, match=f"optimizer.vocab.original_rows {grown.old}: the model has {grown.old} "):
        trained_rows(vocab, 1, num_tokens=grown.old)  # build_setup's check, before the run folder is touched
    assert trained_rows(vocab, 1, num_tokens=grown.new).original_rows == grown.old
