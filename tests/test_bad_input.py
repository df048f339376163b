"""The bad-input catalogue: every command, every kind of mistake a user makes, run as users run them
(relative paths, from their own folder). Each must exit non-zero with one line that names the
offending flag, key, file or line, print no traceback, and create or change no file anywhere in
the user's folder (a refused resume must leave the run exactly as it was)."""

import hashlib
import json
import shutil

import hf_models
import numpy as np
import pytest
import tiny_configs
import yaml
from data_helpers import corpus_files, tokenizer_dir
from run_helpers import flip_largest_file_bytes, truncate_largest_file

from cptjax.cli import main
from cptjax.hf.safetensors import SafetensorsFile, write_safetensors

GOOD_LINE = json.dumps({"text": "A perfectly good line of text, long enough to be a document."})


def _rewrite(folder, edit):
    """Rewrites model.safetensors through `edit(dict name -> array) -> dict`."""
    path = folder / "model.safetensors"
    file = SafetensorsFile(path)
    tensors = edit({name: file.read(name) for name in file.tensors})
    write_safetensors(path, tensors.items(), [(k, v.dtype, v.shape) for k, v in tensors.items()])


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def _hf_variant(root, name, make):
    folder = root / name
    shutil.copytree(root / "hf", folder)
    make(folder)








@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A user's folder: models, a tokenizer, good and bad corpora, checkpoints and runs."""
    root = tmp_path_factory.mktemp("user")
    tokenizer = tokenizer_dir("llama")
    shutil.copytree(tokenizer, root / "tok")
    vocab = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"]) + 3
    hf_models.save_hf_model(dict(tiny_configs.shrunk_config("llama-3.2-1b"), vocab_size=vocab), root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, root / "hf" / name)
    hf_models.save_hf_model(tiny_configs.shrunk_config("llama-3.2-1b"), root / "small_vocab_hf")

    _hf_variant(root, "no_config", lambda f: (f / "config.json").unlink())
    _hf_variant(root, "bad_json_config", lambda f: (f / "config.json").write_text('{"model_type": '))
    _hf_variant(root, "no_hidden_size", lambda f: _edit_config(f, hidden_size=None))
    _hf_variant(root, "gemma", lambda f: _edit_config(f, model_type="gemma", architectures=None))
    dynamic = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 500000.0}
    _hf_variant(root, "dynamic_rope", lambda f: _edit_config(f, rope_scaling=None, rope_parameters=dynamic))
    _hf_variant(root, "rope_conflict", lambda f: _edit_config(f, rope_scaling=dynamic))
    _hf_variant(root, "missing_tensor", lambda f: _rewrite(
        f, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}))
    _hf_variant(root, "extra_tensor", lambda f: _rewrite(
        f, lambda t: {**t, "model.layers.9.mlp.up_proj.weight": t["model.norm.weight"]}))
    _hf_variant(root, "wrong_shape", lambda f: _rewrite(
        f, lambda t: {**t, "model.norm.weight": np.zeros(7, np.float32)}))
    _hf_variant(root, "int_weights", lambda f: _rewrite(
        f, lambda t: {**t, "model.norm.weight": t["model.norm.weight"].astype(np.int32)}))
    _hf_variant(root, "truncated", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:-1000]))
    _hf_variant(root, "bad_header", lambda f: (f / "model.safetensors").write_bytes(
        b"\x20\x00\x00\x00\x00\x00\x00\x00{not json at all, nope, nope}!!"))
    _hf_variant(root, "pickled", lambda f: ((f / "model.safetensors").rename(f / "pytorch_model.bin")))
    _hf_variant(root, "missing_shard", lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})))
    _hf_variant(root, "untied_head", lambda f: (_edit_config(f, tie_word_embeddings=True), _rewrite(
        f, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1})))

    corpus = root / "corpus"
    corpus.mkdir()
    shutil.copy(corpus_files()["wiki_jsonl"], corpus / "good.jsonl")
    (corpus / "bad_json.jsonl").write_text(f'{GOOD_LINE}\n{{"text": "unterminated\n{GOOD_LINE}\n')
    (corpus / "no_field.jsonl").write_text(f'{GOOD_LINE}\n{{"body": "x"}}\n')
    (corpus / "utf8.jsonl").write_bytes(GOOD_LINE.encode() + b'\n{"text": "caf\xe9"}\n')
    (corpus / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (corpus / "empty_docs.jsonl").write_text('{"text": ""}\n' * 5)
    (corpus / "empty.jsonl").write_text("")
    (corpus / "notes.txt").write_text("plain text\n")

    assert main(["convert", "hf-to-orbax", "--hf-dir", str(root / "hf"), "--out", str(root / "ckpt")]) == 0
    shutil.copytree(root / "ckpt", root / "broken_ckpt")
    truncate_largest_file(root / "broken_ckpt" / "0" / "params")

    config = {
        "run_dir": "runs/new",
        "model": {"init_from": "hf", "compute_dtype": "float32"},
        "data": {"sources": [{"name": "wiki", "type": "jsonl", "paths": ["corpus/good.jsonl"]}],
                 "eval_sets": [{"name": "wiki", "type": "jsonl", "paths": ["corpus/good.jsonl"], "max_docs": 2}]},
        "training": {"steps": 4, "batch_size": 2, "seq_len": 32},
        "schedule": {"peak_lr": 1e-3, "warmup": 1},
        "checkpoint": {"every": 1, "keep_last": 3},
        "eval": {"every": 2},
        "logging": {"every": 1, "progress": "lines"},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "run.yaml").write_text(yaml.safe_dump({**config, "run_dir": "runs/done"}))
    (root / "broken_run.yaml").write_text(yaml.safe_dump({**config, "run_dir": "runs/broken"}))
    (root / "tampered_run.yaml").write_text(yaml.safe_dump({**config, "run_dir": "runs/tampered"}))
    (root / "not_yaml.yaml").write_text("training: [1, 2\n  steps: : :\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    other = root / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    import os
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", "--config", "run.yaml", "--until-step", "2"]) == 0
        assert main(["train", "--config", "broken_run.yaml", "--until-step", "2"]) == 0
        assert main(["train", "--config", "tampered_run.yaml", "--until-step", "2"]) == 0
    finally:
        os.chdir(cwd)
    truncate_largest_file(root / "runs" / "broken" / "checkpoints" / "2" / "params")
    flip_largest_file_bytes(root / "runs" / "tampered" / "checkpoints" / "2" / "params")
    return root


def _set(*pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


TRAIN = ["train", "--config", "config.yaml"]
SHOW = ["config", "show", "--config", "config.yaml"]
TO_ORBAX = ["convert", "hf-to-orbax", "--out", "out"]
TO_HF = ["convert", "orbax-to-hf", "--out", "out"]
PREPARE = ["data", "prepare", "--type", "jsonl", "--tokenizer", "tok", "--out", "out"]
VOCAB = ["vocab", "extend", "--corpus", "corpus/good.jsonl", "--new-tokens", "10", "--out", "out"]

CASES = [
    # --- convert hf-to-orbax: every way an HF folder is wrong --------------------------------------
    ("hf missing", [*TO_ORBAX, "--hf-dir", "nowhere"], "--hf-dir"),
    ("hf is a file", [*TO_ORBAX, "--hf-dir", "corpus/notes.txt"], "is a file"),
    ("hf no config.json", [*TO_ORBAX, "--hf-dir", "no_config"], "config.json: missing"),
    ("hf config not JSON", [*TO_ORBAX, "--hf-dir", "bad_json_config"], "config.json: not valid JSON"),
    ("hf config key missing", [*TO_ORBAX, "--hf-dir", "no_hidden_size"], "missing key 'hidden_size'"),
    ("hf architecture", [*TO_ORBAX, "--hf-dir", "gemma"], "unsupported architecture: model_type 'gemma'"),
    ("hf rope type", [*TO_ORBAX, "--hf-dir", "dynamic_rope"], "rope type 'dynamic' (dynamic NTK scaling) is refused"),
    ("hf rope keys disagree", [*TO_ORBAX, "--hf-dir", "rope_conflict"], "rope_scaling and rope_parameters"),
    ("hf missing tensor", [*TO_ORBAX, "--hf-dir", "missing_tensor"], "'model.layers.1.mlp.up_proj.weight' is missing"),
    ("hf extra tensor", [*TO_ORBAX, "--hf-dir", "extra_tensor"], "'model.layers.9.mlp.up_proj.weight'"),
    ("hf wrong shape", [*TO_ORBAX, "--hf-dir", "wrong_shape"],
     "'model.norm.weight' in model.safetensors has shape [7]"),
    ("hf integer weights", [*TO_ORBAX, "--hf-dir", "int_weights"], "weights must be floating point"),
    ("hf truncated file", [*TO_ORBAX, "--hf-dir", "truncated"], "truncated or corrupt"),
    ("hf corrupt header", [*TO_ORBAX, "--hf-dir", "bad_header"],
     "bad_header/model.safetensors: not a safetensors file"),
    ("hf pickled only", [*TO_ORBAX, "--hf-dir", "pickled"], "pytorch_model.bin"),
    ("hf index lists a missing shard", [*TO_ORBAX, "--hf-dir", "missing_shard"],
     "lists model-00002-of-00002.safetensors"),
    ("hf tied head differs", [*TO_ORBAX, "--hf-dir", "untied_head"], "tie_word_embeddings"),
    ("hf is a checkpoint", [*TO_ORBAX, "--hf-dir", "ckpt"], "is a cptjax checkpoint, not an HF model folder"),
    ("hf out not empty", ["convert", "hf-to-orbax", "--hf-dir", "hf", "--out", "other"], "--out"),
    ("hf out is a file", ["convert", "hf-to-orbax", "--hf-dir", "hf", "--out", "corpus/notes.txt"], "is not a folder"),
    ("hf flag missing", ["convert", "hf-to-orbax", "--out", "out"], "--hf-dir"),
    # --- convert orbax-to-hf -------------------------------------------------------------------------
    ("ckpt missing", [*TO_HF, "--ckpt", "nowhere"], "--ckpt"),
    ("ckpt is an HF folder", [*TO_HF, "--ckpt", "hf"], "is an HF model folder, not a cptjax checkpoint"),
    ("ckpt without steps", [*TO_HF, "--ckpt", "corpus"], "no finished checkpoint step"),
    ("ckpt step absent", [*TO_HF, "--ckpt", "ckpt", "--step", "7"], "--step 7"),
    ("ckpt dtype", [*TO_HF, "--ckpt", "ckpt", "--dtype", "fp8"], "--dtype"),
    ("ckpt shard size", [*TO_HF, "--ckpt", "ckpt", "--max-shard-size", "huge"], "--max-shard-size 'huge'"),
    ("ckpt out not empty", ["convert", "orbax-to-hf", "--ckpt", "ckpt", "--out", "other"], "--out"),
    ("ckpt corrupted", [*TO_HF, "--ckpt", "broken_ckpt"], "step 0 cannot be read"),
    ("ckpt step not a number", [*TO_HF, "--ckpt", "ckpt", "--step", "last"], "--step"),
    # --- the config file and --set ------------------------------------------------------------------
    ("config missing", ["config", "show", "--config", "nowhere.yaml"], "--config"),
    ("config not YAML", ["config", "show", "--config", "not_yaml.yaml"], "not_yaml.yaml: not valid YAML"),
    ("config a list", ["config", "show", "--config", "list.yaml"], "expected a mapping"),
    ("config unknown key", [*SHOW, *_set("training.stpes=3")], "training.stpes: unknown key; did you mean 'steps'?"),
    ("config wrong type", [*SHOW, *_set("training.steps=many")], "training.steps: expected an integer"),
    ("config bad choice", [*SHOW, *_set("model.remat=some")], "model.remat: 'some' is not allowed"),
    ("config required missing", [*SHOW, *_set("training={steps: 3, batch_size: 2}")], "training.seq_len: required key"),
    ("config --set YAML", [*SHOW, "--set", "training.steps=[1,"],
     "--set 'training.steps=[1,': value is not valid YAML"),
    ("config --set form", [*SHOW, "--set", "training.steps"], "--set 'training.steps': expected dotted.key=value"),
    ("config --set into a value", [*SHOW, *_set("run_dir.x=1")], "--set run_dir.x: 'run_dir' is not a section"),
    ("config two model sources", [*SHOW, *_set("model.hf_config=x.json")], "model: set exactly one of init_from"),
    ("config schedule lr", [*SHOW, *_set("schedule.peak_lr=-1")], "schedule.peak_lr: must be a positive number"),
    ("config schedule warmup", [*SHOW, *_set("schedule.warmup=10")], "schedule.warmup"),
    ("config schedule kind", [*SHOW, *_set("schedule.kind=cosine")], "schedule.kind: 'cosine' is not allowed"),
    ("config mesh rules", [*SHOW, *_set("mesh.rules=[[vocab, nowhere]]")], "mesh.rules"),
    ("config keep_every", [*SHOW, *_set("checkpoint={every: 2, keep_every: 3}")], "checkpoint.keep_every"),
    ("config stage weights", [*SHOW, *_set("data.stages=[{start_step: 3, weights: [1, 2]}]")],
     "data.stages[0].weights: expected 1 weights"),
    ("config stage at step 1", [*SHOW, *_set("data.stages=[{start_step: 1, weights: [1]}]")],
     "data.stages[0].start_step: must be > 1"),
    ("config negative weight", [*SHOW, *_set("data.sources=[{name: a, type: jsonl, paths: [x], weight: -1}]")],
     "data.sources[0].weight: must be >= 0"),
    ("config source type", [*SHOW, *_set("data.sources=[{name: a, type: csv, paths: [x]}]")],
     "data.sources[0].type: 'csv' is not allowed"),
    ("config cycles boundaries", [*SHOW, *_set("training.steps=12", "data.stages=[{start_step: 5, weights: [1]}]",
                                              "schedule={kind: cycles, peak_lr: 0.001, stage_boundaries: [7]}")],
     "schedule.stage_boundaries [7] differ from the start steps of data.stages [5]"),
    ("config accumulation", [*SHOW, *_set("optimizer.grad_accum_steps=3")],
     "training.batch_size 2 is not divisible by optimizer.grad_accum_steps 3"),
    # --- train: checks that need files and devices, all before anything is written --------------
    ("train init_from missing", [*TRAIN, *_set("model.init_from=nowhere")], "model.init_from"),
    ("train init_from a file", [*TRAIN, *_set("model.init_from=corpus/notes.txt")], "model.init_from"),
    ("train init_step absent", [*TRAIN, *_set("model.init_from=ckpt", "model.init_step=77")], "model.init_step 77"),
    ("train hf_config missing", [*TRAIN, *_set("model={hf_config: nowhere.json, tokenizer: tok}")], "model.hf_config"),
    ("train tokenizer too big", [*TRAIN, *_set("model.init_from=small_vocab_hf", "model.tokenizer=tok")],
     "more than the model's vocab_size 512"),
    ("train tokenizer folder", [*TRAIN, *_set("model.tokenizer=corpus")], "model.tokenizer"),
    ("train truncated weights", [*TRAIN, *_set("model.init_from=truncated")], "truncated or corrupt"),
    ("train seq_len too long", [*TRAIN, *_set("training.seq_len=4096")], "training.seq_len 4096 exceeds"),
    ("train mesh", [*TRAIN, *_set("mesh={data: 3}")], "mesh:"),
    ("train run_dir taken", [*TRAIN, *_set("run_dir=other")], "run_dir"),
    ("train until-step", [*TRAIN, "--until-step", "0"], "--until-step 0"),
    ("train JSONL not JSON", [*TRAIN, *_set("data.sources=[{name: a, type: jsonl, paths: [corpus/bad_json.jsonl]}]")],
     "bad_json.jsonl:2: malformed JSON"),
    ("train text field", [*TRAIN, *_set("data.sources=[{name: a, type: jsonl, paths: [corpus/no_field.jsonl]}]")],
     "no_field.jsonl:2: no field 'text'"),
    ("train invalid UTF-8", [*TRAIN, *_set("data.sources=[{name: a, type: jsonl, paths: [corpus/utf8.jsonl]}]")],
     "utf8.jsonl:2: invalid UTF-8"),
    ("train binary file", [*TRAIN, *_set("data.sources=[{name: a, type: text, paths: [corpus/binary.txt]}]")],
     "binary.txt: invalid UTF-8"),
    ("train all documents empty",
     [*TRAIN, *_set("data.sources=[{name: a, type: jsonl, paths: [corpus/empty_docs.jsonl]}]")],
     "data.sources[0] (a): every document is skipped"),
    ("train empty file", [*TRAIN, *_set("data.sources=[{name: a, type: jsonl, paths: [corpus/empty.jsonl]}]")],
     "data.sources[0] (a): no documents"),
    ("train glob matches nothing",
     [*TRAIN, *_set("data.sources=[{name: a, type: jsonl, paths: ['corpus/*.parquet']}]")],
     "data.sources[0].paths[0]: the glob"),
    ("train eval set prepared", [*TRAIN, *_set("data.eval_sets=[{name: e, type: prepared, paths: [corpus]}]")],
     "data.eval_sets[0].type"),
    ("train eval set empty",
     [*TRAIN, *_set("data.eval_sets=[{name: e, type: jsonl, paths: [corpus/empty_docs.jsonl]}]")],
     "data.eval_sets[0]: no documents with text"),
    ("train resume changed seq_len", ["train", "--config", "run.yaml", *_set("training.seq_len=16")],
     "cannot resume: training.seq_len was 32"),
    ("train resume changed sources", ["train", "--config", "run.yaml",
                                      *_set("data.sources=[{name: b, type: jsonl, paths: [corpus/good.jsonl]}]")],
     "cannot resume: data.sources"),
    ("train resume corrupted", ["train", "--config", "broken_run.yaml"],
     "step 2 cannot be read (/"),  # ...the file; the earlier step and how to fall back to it:
    ("train resume corrupted advice", ["train", "--config", "broken_run.yaml"], "to resume from step 1, move"),
    ("train resume tampered", ["train", "--config", "tampered_run.yaml"], "step 2 cannot be read"),
    # --- data prepare ----------------------------------------------------------------------------
    ("prepare missing path", [*PREPARE, "--paths", "nowhere.jsonl"], "input.paths[0]"),
    ("prepare tokenizer", ["data", "prepare", "--type", "jsonl", "--paths", "corpus/good.jsonl", "--tokenizer",
                           "corpus", "--out", "out"], "--tokenizer"),
    ("prepare out not empty", ["data", "prepare", "--type", "jsonl", "--paths", "corpus/good.jsonl", "--tokenizer",
                               "tok", "--out", "other"], "--out"),
    ("prepare shards", [*PREPARE, "--paths", "corpus/good.jsonl", "--shards", "0"], "--shards"),
    ("prepare bad line", [*PREPARE, "--paths", "corpus/bad_json.jsonl"], "bad_json.jsonl:2: malformed JSON"),
    ("prepare type", [*PREPARE, "--paths", "x", "--type", "prepared"], "--type"),
    ("prepare empty", [*PREPARE, "--paths", "corpus/empty.jsonl"], "holds no documents"),
    # --- vocab extend ----------------------------------------------------------------------------
    ("vocab no tokenizer.json", [*VOCAB, "--tokenizer", "corpus"], "no tokenizer.json"),
    ("vocab new tokens", [*VOCAB, "--tokenizer", "tok", "--new-tokens", "0"], "--new-tokens 0"),
    ("vocab missing corpus", ["vocab", "extend", "--tokenizer", "tok", "--corpus", "nowhere.txt", "--new-tokens",
                              "10", "--out", "out"], "--corpus"),
    ("vocab empty corpus", ["vocab", "extend", "--tokenizer", "tok", "--corpus", "corpus/empty.jsonl",
                            "--new-tokens", "10", "--out", "out"], "no text to learn from"),
    ("vocab out not empty", ["vocab", "extend", "--tokenizer", "tok", "--corpus", "corpus/good.jsonl",
                             "--new-tokens", "10", "--out", "other"], "--out"),
    # --- eval, report, generate, merge --------------------------------------------------------------
    ("eval not a model", ["eval", "--model", "corpus", "--data", "w=jsonl:corpus/good.jsonl"], "--model"),
    ("eval no such step", ["eval", "--model", "runs/done@9", "--data", "w=jsonl:corpus/good.jsonl"], "9"),
    ("eval empty set", ["eval", "--model", "hf", "--data", "e=jsonl:corpus/empty_docs.jsonl"], "e"),
    ("eval missing set", ["eval", "--model", "hf", "--data", "w=jsonl:corpus/none.jsonl"], "none.jsonl"),
    ("eval spec form", ["eval", "--model", "hf", "--data", "w"], "--data"),
    ("eval vocabularies", ["eval", "--model", "hf", "--model", "small_vocab_hf", "--data",
                           "w=jsonl:corpus/good.jsonl"], "vocab"),
    ("eval out not empty", ["eval", "--model", "hf", "--data", "w=jsonl:corpus/good.jsonl", "--out", "other"], "--out"),
    ("report not a run", ["report", "corpus"], "corpus"),
    ("report out not empty", ["report", "runs/done", "--out", "other"], "--out"),
    ("generate not a model", ["generate", "--model", "corpus", "--prompt", "x"], "--model"),
    ("generate top-p", ["generate", "--model", "hf", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    ("generate no tokenizer", ["generate", "--model", "small_vocab_hf", "--prompt", "x"], "tokenizer"),
    ("merge alpha", ["merge", "--base", "hf", "--tuned", "ckpt", "--alpha", "1.5", "--out", "m"], "--alpha"),
    ("merge shapes", ["merge", "--base", "hf", "--tuned", "small_vocab_hf", "--alpha", "0.5", "--out", "m"], "vocab"),
    ("merge not a model", ["merge", "--base", "corpus", "--tuned", "hf", "--alpha", "0.5", "--out", "m"], "--base"),
    ("merge out not empty", ["merge", "--base", "hf", "--tuned", "ckpt", "--alpha", "0.5", "--out", "other"], "--out"),
    ("merge sweep empty set", ["merge", "--base", "hf", "--tuned", "ckpt", "--alpha", "0,1", "--eval",
                               "e=jsonl:corpus/empty_docs.jsonl", "--out", "m"], "e"),
    # --- demo ------------------------------------------------------------------------------------
    ("demo no steps", ["demo", "--base-steps", "0", "--workdir", "demo"], "--base-steps 0"),
    ("demo data dir", ["demo", "--data-dir", "corpus", "--workdir", "demo"], "demo corpora not found"),
    ("demo workdir taken", ["demo", "--workdir", "other"], "--workdir"),
    # --- the command line itself -----------------------------------------------------------------
    ("no command", [], "command"),
    ("unknown command", ["fly"], "invalid choice: 'fly'"),
]


def _snapshot(root) -> dict:
    """Every file below `root`: its size and content hash."""
    return {str(p.relative_to(root)): (p.stat().st_size, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_catalogue_is_large_and_covers_every_command():
    assert len(CASES) >= 60
    assert len({name for name, _, _ in CASES}) == len(CASES)
    commands = {tuple(argv[:2]) if argv[:1] in (["convert"], ["data"], ["config"], ["vocab"]) else tuple(argv[:1])
                for _, argv, _ in CASES}
    assert {("convert", "hf-to-orbax"), ("convert", "orbax-to-hf"), ("train",), ("config", "show"),
            ("data", "prepare"), ("vocab", "extend"), ("demo",), ("eval",), ("report",), ("generate",),
            ("merge",)} <= commands


@pytest.mark.slow
@pytest.mark.parametrize("name, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(workspace, monkeypatch, capsys, name, argv, expected):
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own exits
        code = exit_.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith("cptjax: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err
    assert _snapshot(workspace) == before, f"{name} changed the user's folder"
