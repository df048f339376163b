"""Extends a small model's context 4x by continued pretraining, three ways, with cptjax itself.

    python scripts/reproduce_long_context.py --out long-context/            # the study: 3 seeds
    python scripts/reproduce_long_context.py --smoke --out lc-smoke/        # the test's tiny version

A base (DEMO_MODEL: 4 layers, hidden 128, 4 heads, 2 KV heads, head_dim 32) is pretrained from
scratch at 64 tokens (rope_theta 10000, max_position_embeddings 64) on the bundled English (50%)
and synthetic pass-key documents (50%: cptjax.data.passkey's format with other keys than the
probe's, each exactly one 64-token row, see `passkey_documents`), so that it learns retrieval
inside its context. It is then extended by CPT to 256 tokens (4x), with the same data, tokens and
schedule for each variant, once per seed (the seed orders the data):
  unchanged: only model.max_position_embeddings raised to 256;
  abf:       and the RoPE base raised 16x, 10000 -> 160000 (Xiong et al. 2023's ABF; NTK's
             minimum for 4x at head_dim 32 is 4^(32/30) = 4.4x, Llama-2-Long used 50x for 8x and
             ProLong 16x for 8x: 16x = factor squared sits among them);
  yarn:      and YaRN, factor 4, original_max_position_embeddings 64 (Peng et al. 2023).
The CPT data are the base's: English (documents of at least 256 tokens 4x as frequent) and the
same 64-token pass-key documents, so retrieval at 128 and 256 tokens measures whether the skill
carries over to positions the pass-key documents never reach.

The trainer's evaluations measure everything: held-out loss by position bucket (0-64, 64-128,
128-256) on held-out English documents of at least 256 tokens, and the pass-key probe's greedy
exact-match accuracy at 64, 128 and 256 tokens x 5 depths (8 prompts each). The base is measured
at 64 (its own final evaluation); each variant's step-0 evaluation (seed 0 only: the same for
every seed) is the base beyond its context: `unchanged` at step 0 is the base read at 256, `abf`
and `yarn` at step 0 are the two RoPE changes before any training. Writes into --out:
results.json (every number, per seed, and `record`: the command, commit, CPU, load average before
and after, as scripts/bench_record.py records them), results.md (means and standard deviations
over seeds), position_loss.png, retrieval.png, progress.json (a study stopped and run again
continues where it stopped; the record is then the last invocation's).

Cost, on the 2-core CPU this was written on, one core (`nice -n 10 taskset -c 1`, XLA_FLAGS=
"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"), 2026-12-08, a pilot and then
the test suite on the other core: 27 min wall (docs/studies/long_context: its record, 01:38-02:05
UTC, and progress.json): the base 13.3 min (2,400 steps of 32 x 64 tokens, 0.28-0.40 s a step),
each seed's three CPT runs 4.4-4.7 min (200 steps of 8 x 256 tokens, their evaluations and
compilation). The results are in docs/guide.md ("Context extension at small scale").

What it took for a base to retrieve (pilots of 2026-12-07 and 12-08; the second day's configs,
logs and the scripts that made their data are in docs/studies/long_context/pilots/2026-12-08/,
its README lists each). The study's first version (2 layers at 128 tokens, peak LR 5e-3, 30%
pass-key documents of 40-128 tokens and a 30% copying drill) stayed at 0% at every evaluation,
and so did every variation of it tried on 2026-12-07 (more steps, more pass-key documents, keys of
words; its results: docs/studies/long_context/first_version/). Three things were wrong:
- The learning rate. A drill of 8-24 distinct single-token words repeated (copying from the
  second repetition on, the signal induction heads form from; Olsson et al. 2022) at 100% of the
  data, 2 layers: at peak 1e-2 the loss stayed at the no-copy level (ln 488 words = 6.19) for
  1,100 steps; at 3e-3 it crept down to 4.6-4.7 in 3,000 steps; at 1e-3 it dropped from 5.23 to 2.52
  between steps 400 and 500, the abrupt formation of copying.
- The depth. With 64-token pass-key documents alone (100%, peak 1e-3), 2 layers' loss was 0.46
  at step 600, what a model that copies nothing gets; 4 layers' fell from 0.45 (step 600) to 0.30
  (step 1000), and after 1,200 steps it answered 43 of 48 64-token prompts exactly (3 depths x 16
  keys; `cptjax eval --retrieval`, pilots/2026-12-08/p15_eval.md).
- Split documents. Rows are cut from each source's stream, so a pass-key document of 40-128
  tokens in rows of 128 was usually split, its question in a row without its needle. The
  documents are now exactly one row long.
The same 4-layer model did not retrieve at 128 tokens (0%), a length it never trained on, and one
trained on 64- and 128-token documents (50% each, no English) answered 12.5% of the 128-token
prompts exactly after 2,400 steps (0% at 600, 1,200 and 1,800); hence a base context of 64
tokens, where the skill forms within the study's budget. A word drill trained first (600 steps,
then 30% beside English and pass-key documents) formed copying but did not carry it over to the
keys' digits (0% at steps 800-1600); a drill with 5-digit numbers among the words did not either
(0%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this clone's cptjax, whichever copy is installed
sys.path.insert(0, str(ROOT / "scripts"))
import bench_record  # noqa: E402  (what ran, on which commit, machine and load)
import reproduce_cpt_findings as findings  # noqa: E402  (its English corpus, run bookkeeping)

STUDY = {
    "model": {},  # DEMO_MODEL's: 4 layers, hidden 128, 4 heads (2 KV), head_dim 32
    "tokenizer_vocab": 2048, "short": 64, "factor": 4, "theta": 10000.0,
    "base": {"steps": 2400, "batch_size": 32, "peak_lr": 1e-3, "warmup": 0.02, "end_lr": 1e-4, "eval_every": 600},
    "cpt": {"steps": 200, "batch_size": 8, "peak_lr": 3e-4, "warmup": 0.05, "end_lr": 3e-5, "eval_every": 100},
    "passkey": {"weight": 0.5, "rows": [64], "depths": 11, "samples": 2000, "seed": 1000},
    "heldout_docs": 64, "retrieval": {"depths": [0.0, 0.25, 0.5, 0.75, 1.0], "samples": 8, "seed": 0},
    "abf_theta_scale": 16, "long_upsample": 4, "seeds": [0, 1, 2],
}
# The test's version: every part of the study, at shapes that compile and run in seconds.
SMOKE = {
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 16},
    "tokenizer_vocab": 512, "short": 64, "factor": 4, "theta": 10000.0,
    "base": {"steps": 2, "batch_size": 2, "peak_lr": 3e-3, "warmup": 0.5, "end_lr": 3e-4, "eval_every": 2},
    "cpt": {"steps": 2, "batch_size": 1, "peak_lr": 1e-3, "warmup": 0.5, "end_lr": 1e-4, "eval_every": 2},
    "passkey": {"weight": 0.5, "rows": [64], "depths": 2, "samples": 2, "seed": 1000},
    "heldout_docs": 1, "retrieval": {"depths": [0.0, 1.0], "samples": 1, "seed": 0},
    "abf_theta_scale": 16, "long_upsample": 4, "seeds": [0],
}
EVAL_SET = "english_long"


def lengths(study: dict) -> list[int]:
    """The probe's lengths: the base's context, then doubling up to the extended one."""
    short, out = study["short"], []
    while short <= study["short"] * study["factor"]:
        out.append(short)
        short *= 2
    return out


def variants(study: dict) -> dict[str, dict]:
    """{name: the CPT run's `model` keys}: the three ways to extend the context."""
    long = study["short"] * study["factor"]
    every = {"unchanged": {"max_position_embeddings": long},
            "abf": {"max_position_embeddings": long, "rope": {"theta": study["theta"] * study["abf_theta_scale"]}},
            "yarn": {"max_position_embeddings": long, "rope": {
                "type": "yarn", "factor": study["factor"], "original_max_position_embeddings": study["short"]}}}
    return {name: every[name] for name in study.get("variants", every)}


def passkey_documents(study: dict, tokenizer: Path) -> dict[int, list[str]]:
    """{n: pass-key training documents of exactly n tokens}, for each n of passkey.rows: the probe's
    prompts at n - 1 tokens (another seed, so other keys; `depths` evenly from 0 to 1), as text.
    Rows are cut from each source's own stream (cptjax/data/packing.py), so a source of documents
    of exactly n tokens (BOS and EOS included) never splits one across rows of a multiple of n:
    each needle stays in its question's row. A prompt whose text the tokenizer does not give back
    at n tokens with the same answer (its pieces merge across a seam) is left out."""
    from cptjax.data.passkey import RetrievalConfig, make_prompts
    from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec

    document_tokenizer = DocumentTokenizer(load_tokenizer_spec(tokenizer))
    passkey = study["passkey"]
    depths = tuple(i / max(passkey["depths"] - 1, 1) for i in range(passkey["depths"]))
    documents = {}
    for n in passkey["rows"]:
        prompts = make_prompts(RetrievalConfig((n - 1,), depths, passkey["samples"], passkey["seed"] + n),
                               document_tokenizer)
        texts = [document_tokenizer.decode(p.ids) for p in prompts]
        documents[n] = [text for text, p, ids in zip(texts, prompts, document_tokenizer.encode_batch(texts))
                        if len(ids) == n and (ids[-1 - p.answer:-1] == p.ids[-p.answer:]).all()]
    return documents


def write_corpora(out: Path, data_dir: Path, study: dict, tokenizer: Path) -> dict:
    """English train (nine documents in ten) and held out (the tenth, only those of at least the
    extended length in tokens, the first `heldout_docs`); pass-key documents of each row length
    (`passkey_documents`), one corpus each."""
    from tokenizers import Tokenizer

    english = findings.english_documents(data_dir)
    trained = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    long = study["short"] * study["factor"]
    heldout = [d for d in english[::10] if len(trained.encode(d).ids) >= long][:study["heldout_docs"]]
    documents = {"english_train": [d for i, d in enumerate(english) if i % 10], "english_heldout_long": heldout,
                 **{f"passkey_{n}": docs for n, docs in passkey_documents(study, tokenizer).items()}}
    corpora = {}
    for name, docs in documents.items():
        path = out / "corpora" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        corpora[name] = str(path)
    return corpora


def run_config(run_dir: Path, study: dict, section: dict, model: dict, corpora: dict, seq_len: int,
               seed: int, at_start: bool) -> dict:
    passkey = study["passkey"]
    english = {"name": "english", "type": "jsonl", "paths": [corpora["english_train"]], "weight": 1 - passkey["weight"]}
    if seq_len > study["short"]:  # Fu et al. 2024: long documents upsampled, the domain balance kept
        english["long_upsample"] = {"min_tokens": seq_len, "factor": study["long_upsample"]}
    sources = [english] + [{"name": f"passkey_{n}", "type": "jsonl", "paths": [corpora[f"passkey_{n}"]],
                            "weight": passkey["weight"] / len(passkey["rows"])} for n in passkey["rows"]]
    steps = section["steps"]
    probe = study["retrieval"]
    return {
        "run_dir": str(run_dir), "model": {**model, "compute_dtype": "float32"},
        "data": {"sources": sources, "seed": seed,
                 "eval_sets": [{"name": EVAL_SET, "type": "jsonl", "paths": [corpora["english_heldout_long"]]}]},
        "training": {"steps": steps, "batch_size": section["batch_size"], "seq_len": seq_len, "seed": 0},
        "schedule": {"kind": "warmup_cosine", "peak_lr": section["peak_lr"], "warmup": section["warmup"],
                     "end_lr": section["end_lr"]},
        "optimizer": {"weight_decay": 0.1}, "checkpoint": {"every": steps, "keep_last": 1},
        "eval": {"every": section["eval_every"], "at_start": at_start, "position_buckets": lengths(study)[:-1],
                 "retrieval": {"lengths": [n for n in lengths(study) if n <= seq_len], **probe}},
        "logging": {"every": max(steps // 20, 1), "progress": "lines", "tensorboard": False},
    }


def base_model(out: Path, study: dict, tokenizer: Path) -> dict:
    """The base's `model` keys: a config.json of DEMO_MODEL's structure at the short context."""
    from tokenizers import Tokenizer

    from cptjax.demo import DEMO_MODEL

    trained = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    special = {name: trained.token_to_id(token) for name, token in (
        ("bos_token_id", "<|begin_of_text|>"), ("eos_token_id", "<|end_of_text|>"), ("pad_token_id", "<|pad|>"))}
    hf_config = dict(DEMO_MODEL, **study["model"], vocab_size=trained.get_vocab_size(with_added_tokens=True),
                     max_position_embeddings=study["short"], rope_theta=study["theta"], **special)
    (out / "base_config.json").write_text(json.dumps(hf_config, indent=2))
    return {"hf_config": str(out / "base_config.json"), "tokenizer": str(tokenizer)}


def measured(run_dir: Path, step: int) -> dict:
    """The evaluation at `step`: overall and per-bucket held-out loss, retrieval accuracy per length
    (over depths) and the probe's cells."""
    from cptjax.measure.run_logs import read_run

    log = read_run(run_dir)
    evaluation = next(r for r in log.evals if r["step"] == step)[EVAL_SET]
    probe = next(r for r in log.retrieval if r["step"] == step)
    by_length = {str(n): statistics.fmean(c["accuracy"] for c in probe["cells"] if c["length"] == n)
                 for n in probe["lengths"]}
    return {"loss": evaluation["loss"], "position_loss": evaluation["position_loss"],
            "retrieval": by_length, "retrieval_cells": probe["cells"]}


def metrics(entry: dict) -> dict:
    """One run's numbers, flat: loss, loss by bucket, retrieval accuracy by length."""
    return {"loss": entry["loss"], **{f"loss {b}": v for b, v in entry["position_loss"].items()},
            **{f"retrieval {n}": v for n, v in entry["retrieval"].items()}}


def summarize(runs: dict) -> dict:
    """{variant: {metric: {mean, spread (sd over seeds), seeds}}}."""
    table = {}
    for name in next(iter(runs.values())):
        rows = [metrics(runs[seed][name]) for seed in runs]
        table[name] = {key: {"mean": statistics.fmean(r[key] for r in rows),
                             "spread": statistics.stdev(r[key] for r in rows) if len(rows) > 1 else 0.0,
                             "seeds": [r[key] for r in rows]} for key in rows[0]}
    return table


def markdown(study: dict, base: dict, zero_shot: dict, table: dict, minutes: dict, record: dict) -> str:
    keys = list(next(iter(table.values())))

    def cell(entry):
        return f"{entry['mean']:.3f}" + (f" ± {entry['spread']:.3f}" if len(entry["seeds"]) > 1 else "")

    lines = [f"# Context extension {study['short']} -> {study['short'] * study['factor']} at small scale\n",
             f"Seeds {', '.join(map(str, study['seeds']))}: mean ± standard deviation. Losses in nats/token on "
             f"held-out English documents of at least {study['short'] * study['factor']} tokens, by position in "
             "the document; retrieval: pass-key greedy exact match, averaged over depths.\n",
             "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    base_row = metrics(base)
    lines.append(f"| base at {study['short']} | " + " | ".join(
        f"{base_row[k]:.3f}" if k in base_row else "" for k in keys) + " |")
    for name, entry in zero_shot.items():
        row = metrics(entry)
        lines.append(f"| {name}, step 0 | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    for name, row in table.items():
        lines.append(f"| {name} after CPT | " + " | ".join(cell(row[k]) for k in keys) + " |")
    lines.append(f"\nCommand `{record['command']}` at commit {record['git']['commit']}"
                 + (f" (dirty: {', '.join(record['git']['dirty_files'])})" if record["git"]["dirty"] else " (clean)")
                 + f"; {bench_record.cpu_description(record['machine']['cpu'])}, {record['load_average']['cores']} "
                 f"usable core(s); load average (1/5/15 min) before {record['load_average']['before']}, after "
                 f"{record['load_average']['after']}.")
    lines.append(f"\nTimes: base {minutes['base']:.1f} min; per seed "
                 + ", ".join(f"{s}: {m:.1f} min" for s, m in minutes["seeds"].items()) + ".")
    return "\n".join(lines) + "\n"


def plot(study: dict, base: dict, zero_shot: dict, table: dict, out: Path) -> list[str]:
    """position_loss.png (held-out loss by position bucket) and retrieval.png (accuracy by length),
    per variant after CPT (mean ± sd), at step 0 (dashed) and the base at its own context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    for name, prefix, ylabel in (("position_loss.png", "loss ", "held-out loss (nats/token)"),
                                 ("retrieval.png", "retrieval ", "pass-key accuracy (greedy exact match)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels = [k[len(prefix):] for k in next(iter(table.values())) if k.startswith(prefix)]
        x = range(len(labels))
        for i, (variant, row) in enumerate(table.items()):
            ax.errorbar(x, [row[prefix + b]["mean"] for b in labels], yerr=[row[prefix + b]["spread"] for b in labels],
                        marker="o", capsize=3, color=f"C{i}", label=f"{variant} after CPT")
            ax.plot(x, [metrics(zero_shot[variant])[prefix + b] for b in labels], ls="--", marker=".",
                    color=f"C{i}", alpha=0.6, label=f"{variant} at step 0")
        own = [i for i, b in enumerate(labels) if prefix + b in metrics(base)]
        ax.plot(own, [metrics(base)[prefix + labels[i]] for i in own], "k*", ms=12, label="the base at its context")
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("position in the document (tokens)" if prefix == "loss " else "prompt length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"Context {study['short']} -> {study['short'] * study['factor']}: "
                     f"{len(study['seeds'])} seed(s)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        figures.append(name)
    return figures


def run_study(study: dict, out: Path, data_dir: Path, echo=print) -> dict:
    from cptjax.demo import train_tokenizer

    record = bench_record.begin("reproduce_long_context")  # command, commit (dirty?), CPU, load before

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():  # kept when the study continues
        train_tokenizer(tokenizer, data_dir, vocab_size=study["tokenizer_vocab"])
    corpora = write_corpora(out, data_dir, study, tokenizer)
    long = study["short"] * study["factor"]
    findings._train(run_config(out / "base", study, study["base"], base_model(out, study, tokenizer), corpora,
                               study["short"], seed=0, at_start=False))
    base = measured(out / "base", study["base"]["steps"])
    minutes = {"base": json.loads((out / findings.PROGRESS).read_text())["base"]["minutes"], "seeds": {}}
    accuracy = base["retrieval"][str(study["short"])]
    echo(f"base pretrained in {minutes['base']:.1f} min; pass-key accuracy at {study['short']} tokens {accuracy:.0%}"
         + (" (near 0: the probe will show nothing beyond it, see the docstring)" if accuracy < 0.05 else ""))
    runs, zero_shot = {}, {}
    for seed in study["seeds"]:
        runs[seed] = {}
        for name, model in variants(study).items():
            run_dir = out / f"seed{seed}" / name
            first = seed == study["seeds"][0]  # step 0 is the same for every seed: measured once
            findings._train(run_config(run_dir, study, study["cpt"], {"init_from": str(out / "base" / "checkpoints"),
                                                                      **model}, corpora, long, seed, at_start=first))
            runs[seed][name] = measured(run_dir, study["cpt"]["steps"])
            if first:
                zero_shot[name] = measured(run_dir, 0)
            echo(f"seed {seed} {name}: done")
        progress = json.loads((out / findings.PROGRESS).read_text())
        minutes["seeds"][seed] = sum(r["minutes"] for k, r in progress.items() if k.startswith(f"seed{seed}/"))
    table = summarize(runs)
    record = {**record, "load_average": {**record["load_average"], "after": list(os.getloadavg())},
              "finished_utc": bench_record.utc_now()}
    results = {"record": record, "study": study, "variants": variants(study), "base": base, "zero_shot": zero_shot,
               "runs": {str(s): r for s, r in runs.items()}, "table": table, "minutes": minutes,
               "figures": plot(study, base, zero_shot, table, out)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(study, base, zero_shot, table, minutes, record))
    echo((out / "results.md").read_text())
    return results


def main(argv: list[str] | None = None) -> int:
    from cptjax.demo import find_data_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every part at tiny shapes, a few steps, one seed")
    parser.add_argument("--seeds", help="comma-separated seeds, replacing the study's")
    parser.add_argument("--variants", help="comma-separated, a subset of " + ", ".join(variants(STUDY)))
    parser.add_argument("--data-dir", help="the bundled corpora (default: the clone's data/)")
    parser.add_argument("--out", required=True, help="a new folder, or that of a stopped study to continue it")
    args = parser.parse_args(argv)
    study = dict(SMOKE if args.smoke else STUDY)
    if args.seeds:
        study["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.variants:
        study["variants"] = args.variants.split(",")
        unknown = sorted(set(study["variants"]) - set(variants(STUDY)))
        if unknown:
            print(f"reproduce_long_context: --variants {','.join(unknown)}: not a variant; choose among "
                  + ", ".join(variants(STUDY)), file=sys.stderr)
            return 2
    out = Path(args.out).absolute()
    refused = findings.open_study("reproduce_long_context", out, study)
    if refused is not None:
        return refused
    return findings.run_to_end("reproduce_long_context", run_study, study, out, find_data_dir(args.data_dir))


if __name__ == "__main__":
    sys.exit(main())
