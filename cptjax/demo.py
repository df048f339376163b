"""`cptjax demo`: the whole continued-pretraining job on a laptop-sized default, in a few minutes.

1. Trains a byte-level BPE tokenizer on the bundled English corpora and Python's own sources.
2. Pretrains a tiny Llama-style base model from scratch on English (WikiText-2, the Jargon File)
   and exports it as a Hugging Face checkpoint: the "base model from the hub".
3. Continues pretraining that HF checkpoint on a code domain (the Python standard library) with
   10% English replay, re-warming to 10% of the base's peak learning rate, and evaluates held-out
   code (adaptation) and held-out English (forgetting) as it goes.
4. Exports the adapted model back to Hugging Face format (checked with transformers when torch is
   installed; its model card README.md says how it was trained).
5. Writes the run's report (`cptjax report`: the before/after table, curves in PNG) and ends it
   with the same code prompt continued by the base and by the adapted model.

Everything lands in one work folder: each run's config.yaml, logs/metrics.jsonl,
logs/tensorboard/ and checkpoints/, the HF folders base_hf/ and cpt_hf/, and report/.
"""

from __future__ import annotations

import json
import re
import sysconfig
import tempfile
from pathlib import Path

from cptjax.core.errors import CptjaxError
from cptjax.io.run_layout import RunPaths

CORPORA = ("wikitext-2/valid.txt", "jargon/jargon.txt")
# The base model: Llama-3.2's structure (GQA, tied embeddings, explicit head_dim), tiny sizes.
DEMO_MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
    "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
}
CODE_HELDOUT = ("json/*.py",)  # a package; training uses the top-level modules only
BASE_PEAK_LR = 3e-3
CODE_PROMPT = "import os\nimport sys\n\n\ndef main("
# Greedy decoding of a model this small repeats itself; a fixed seed keeps the samples reproducible.
SAMPLING_NOTE = "40 new tokens, temperature 0.7, top-p 0.95, seed 0"


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """The bundled corpora: --data-dir, else the repository's data/ folder, else ./data."""
    candidates = [Path(data_dir)] if data_dir else [Path(__file__).resolve().parents[1] / "data",
                                                    Path.cwd() / "data"]
    for folder in candidates:
        if all((folder / name).is_file() for name in CORPORA):
            return folder
    raise CptjaxError(f"demo corpora not found in {', '.join(map(str, candidates))}; run from a clone "
                      "of the cptjax repository or pass --data-dir to its data/ folder")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def english_documents(data_dir: Path) -> list[str]:
    wiki = (data_dir / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    articles = [a.strip("\n") for a in re.split(r"\n(?= = [^=].* = \n)", wiki) if a.strip()]
    jargon = (data_dir / "jargon" / "jargon.txt").read_text(encoding="utf-8")
    entries = [p for p in jargon.split("\n\n") if len(p) > 200]
    return articles + entries


def write_corpora(workdir: Path, data_dir: Path) -> dict:
    """JSON Lines for English (train / held out, split by document) and globs for the code."""
    english = english_documents(data_dir)
    heldout = english[::10]  # every tenth document, so both sides see both corpora
    train = [d for i, d in enumerate(english) if i % 10]
    paths = {}
    for name, docs in (("english_train", train), ("english_heldout", heldout)):
        path = workdir / "corpora" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        paths[name] = str(path)
    paths["code_train"] = [str(_stdlib() / "*.py")]
    paths["code_heldout"] = [str(_stdlib() / pattern) for pattern in CODE_HELDOUT]
    return paths


def train_tokenizer(out: Path, data_dir: Path, vocab_size: int = 4096) -> Path:
    """Byte-level BPE with Llama 3's conventions (BOS added, EOS ends documents), saved for HF."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    sample = english_documents(data_dir)[:400]
    sample += [p.read_text(encoding="utf-8", errors="replace") for p in sorted(_stdlib().glob("*.py"))[:60]]
    tokenizer.train_from_iterator(sample, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[bos, eos, pad], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tokenizer.token_to_id(bos))])])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos,
                            pad_token=pad).save_pretrained(out)
    return out


def tokenizer_fields(tokenizer: Path) -> dict:
    """The config.json fields a model of `train_tokenizer`'s tokenizer takes from it: vocab_size and
    the bos, eos and pad ids."""
    from tokenizers import Tokenizer

    trained = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    special = (("bos_token_id", "<|begin_of_text|>"), ("eos_token_id", "<|end_of_text|>"), ("pad_token_id", "<|pad|>"))
    return {"vocab_size": trained.get_vocab_size(with_added_tokens=True),
            **{name: trained.token_to_id(token) for name, token in special}}


def _eval_sets(corpora: dict) -> list[dict]:
    return [{"name": "code", "type": "text", "paths": corpora["code_heldout"]},
            {"name": "english", "type": "jsonl", "paths": [corpora["english_heldout"]], "max_docs": 12}]


def base_config(workdir: Path, corpora: dict, tokenizer: Path, steps: int) -> dict:
    return {
        "run_dir": str(workdir / "base_run"),
        "model": {"hf_config": str(workdir / "base_config.json"), "tokenizer": str(tokenizer),
                  "compute_dtype": "float32"},
        "data": {"sources": [{"name": "english", "type": "jsonl", "paths": [corpora["english_train"]]}],
                 "eval_sets": _eval_sets(corpora), "seed": 0},
        "training": {"steps": steps, "batch_size": 8, "seq_len": 128, "seed": 0},
        "schedule": {"kind": "warmup_cosine", "peak_lr": BASE_PEAK_LR, "warmup": 0.05,
                     "end_lr": BASE_PEAK_LR / 10},
        "optimizer": {"weight_decay": 0.1},
        "checkpoint": {"every": steps, "keep_last": 1},
        "eval": {"every": max(steps // 2, 1)},
        "logging": {"every": max(steps // 10, 1)},
    }


def cpt_config(workdir: Path, corpora: dict, base_hf: Path, steps: int, replay: float = 0.1) -> dict:
    """The CPT recipe: re-warm to ~10% of the original peak (2% warmup), cosine re-decay, and
    replay of general text, with both sides evaluated throughout."""
    peak = BASE_PEAK_LR / 10
    return {
        "run_dir": str(workdir / "cpt_run"),
        "model": {"init_from": str(base_hf), "compute_dtype": "float32"},
        "data": {"sources": [
            {"name": "code", "type": "text", "paths": corpora["code_train"], "weight": 1 - replay},
            {"name": "english_replay", "type": "jsonl", "paths": [corpora["english_train"]], "weight": replay}],
            "eval_sets": _eval_sets(corpora), "seed": 1},
        "training": {"steps": steps, "batch_size": 8, "seq_len": 128, "seed": 0},
        "schedule": {"kind": "warmup_cosine", "peak_lr": peak, "warmup": 0.02, "end_lr": peak / 10},
        "checkpoint": {"every": max(steps // 2, 1), "keep_last": 2},
        "eval": {"every": max(steps // 4, 1)},
        "logging": {"every": max(steps // 10, 1)},
    }


def _evals(run_dir: Path) -> list[dict]:
    lines = RunPaths(run_dir).metrics.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "eval"]


def run_demo(workdir: str | Path | None = None, *, data_dir: str | Path | None = None,
             base_steps: int = 200, cpt_steps: int = 100, echo=print) -> dict:
    """Runs the four stages in `workdir` (a new temporary folder by default); returns the results."""
    from cptjax.convert import orbax_to_hf
    from cptjax.hf.verify import torch_available
    from cptjax.train.config import config_from_dict
    from cptjax.train.evaluation import comparison_table
    from cptjax.train.trainer import run

    for flag, steps in (("--base-steps", base_steps), ("--cpt-steps", cpt_steps)):
        if steps < 2:
            raise CptjaxError(f"{flag} {steps}: the demo needs at least 2 steps")
    data_dir = find_data_dir(data_dir)
    if workdir is not None:
        from cptjax.core.atomic_dir import check_output_dir
        check_output_dir(workdir, "--workdir")  # a new or empty folder: nothing there is overwritten
    workdir = Path(workdir).resolve() if workdir else Path(tempfile.mkdtemp(prefix="cptjax-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    corpora = write_corpora(workdir, data_dir)
    tokenizer = train_tokenizer(workdir / "tokenizer", data_dir)
    vocab = tokenizer_fields(tokenizer)
    (workdir / "base_config.json").write_text(json.dumps(dict(DEMO_MODEL, **vocab)))
    vocab = vocab["vocab_size"]
    echo(f"1. tokenizer ({vocab} tokens) trained on the bundled English and Python's sources: {tokenizer}")

    base = run(config_from_dict(base_config(workdir, corpora, tokenizer, base_steps)))
    base_hf = orbax_to_hf(RunPaths(workdir / "base_run").checkpoints, workdir / "base_hf").out
    echo(f"2. pretrained a base model from scratch on English ({base.final_step} steps) and "
         f"exported it to Hugging Face format: {base_hf}")

    cpt = run(config_from_dict(cpt_config(workdir, corpora, base_hf, cpt_steps)))
    cpt_run = RunPaths(workdir / "cpt_run")
    evals = _evals(cpt_run.root)
    before, after = evals[0], evals[-1]
    echo(f"3. continued pretraining on Python code with 10% English replay ({cpt.final_step} steps, "
         f"re-warmed to lr {BASE_PEAK_LR / 10:g}):")
    echo(f"   {'held-out set':<14}{'before':>10}{'after':>10}   (loss in nats/token; bits per byte)")
    for name, role in (("code", "adaptation"), ("english", "forgetting")):
        echo(f"   {name:<14}{before[name]['loss']:>10.3f}{after[name]['loss']:>10.3f}   {role}; "
             f"bpb {before[name]['bits_per_byte']:.3f} -> {after[name]['bits_per_byte']:.3f}")
    export = orbax_to_hf(cpt_run.checkpoints, workdir / "cpt_hf", verify=torch_available())
    check = (f"transformers loads it, logits within {export.max_logit_diff:.1e} of cptjax"
             if export.max_logit_diff is not None else "install torch to check it with transformers")
    echo(f"4. exported the adapted model to Hugging Face format: {export.out} ({check})")
    echo(f"   logs: {cpt_run.logs} ({cpt_run.metrics.name}, {cpt_run.tensorboard.name}/); "
         f"checkpoints: {cpt_run.checkpoints}")
    report, samples = _report(workdir, base_hf, export.out)
    echo(f"5. the run's report: {report.out / 'report.md'}, its curves: {report.out / 'overview.png'}")
    for line in comparison_table(report.numbers["before_after"]["rows"], "before", "after").splitlines():
        echo(f"   {line}")
    echo(f"   the same code prompt continued by each model ({SAMPLING_NOTE}):")
    for label, sample in samples.items():
        echo(f"   {label}: {sample.prompt + sample.text!r}")
    return {"workdir": str(workdir), "before": before, "after": after, "report": str(report.out),
            "samples": {label: s.text for label, s in samples.items()},
            "transformers_logit_diff": export.max_logit_diff, "cpt_steps": cpt.final_step}


def _report(workdir: Path, base_hf, cpt_hf):
    """The CPT run's report, ending with a generation from the same code prompt before and after."""
    from cptjax.measure.generate import Generator, Sampling
    from cptjax.measure.report import write_report

    sampling = Sampling(max_new_tokens=40, temperature=0.7, top_p=0.95, seed=0)
    samples = {label: Generator(path).generate(CODE_PROMPT, sampling)
               for label, path in (("base model", base_hf), ("after CPT", cpt_hf))}
    extra = [f"## Generation before and after\n\nThe prompt continued by each model ({SAMPLING_NOTE}):\n"]
    extra += [f"{label} (`{s.model}`):\n\n```\n{s.prompt + s.text}\n```\n" for label, s in samples.items()]
    return write_report(workdir / "cpt_run", workdir / "report", extra="\n".join(extra)), samples
