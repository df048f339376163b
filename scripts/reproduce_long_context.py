"""Extends a small model's context 4x by continued pretraining, three ways, with cptjax itself.

    python scripts/reproduce_long_context.py --out long-context/            # the study: 3 seeds
    python scripts/reproduce_long_context.py --smoke --out lc-smoke/        # the test's tiny version

A base (DEMO_MODEL's sizes but 2 layers: hidden 128, 4 heads, 2 KV heads, head_dim 32) is
pretrained from scratch at 128 tokens (rope_theta 10000, max_position_embeddings 128) on the
bundled English (40%), synthetic pass-key documents (30%: cptjax.data.passkey's format, 40-128
tokens) and a copying drill (30%: a sequence of 4-16 distinct English words repeated to about 60
words, see `copy_documents`), so that it can learn retrieval inside its context. It is then
extended by CPT to 512 tokens (4x), with the same data, tokens and schedule for each variant, once
per seed (the seed orders the data):
  unchanged: only model.max_position_embeddings raised to 512;
  abf:       and the RoPE base raised 16x, 10000 -> 160000 (Xiong et al. 2023's ABF; NTK's
             minimum for 4x at head_dim 32 is 4^(32/30) = 4.4x, Llama-2-Long used 50x for 8x and
             ProLong 16x for 8x: 16x = factor squared sits among them);
  yarn:      and YaRN, factor 4, original_max_position_embeddings 128 (Peng et al. 2023).
The CPT data are the base's: English (documents of at least 512 tokens 4x as frequent) and the
same pass-key and drill documents of at most 128 tokens, so retrieval at 256 and 512 tokens
measures whether the skill carries over to positions the pass-key documents never reach.

The trainer's evaluations measure everything: held-out loss by position bucket (0-128, 128-256,
256-512) on held-out English documents of at least 512 tokens, and the pass-key probe's greedy
exact-match accuracy at 128, 256 and 512 tokens x 5 depths (8 prompts each). The base is measured
at 128 (its own final evaluation); each variant's step-0 evaluation (seed 0 only: the same for
every seed) is the base beyond its context: `unchanged` at step 0 is the base read at 512, `abf`
and `yarn` at step 0 are the two RoPE changes before any training. Writes into --out:
results.json (every number, per seed, and `record`: the command, commit, CPU, load average before
and after, as scripts/bench_record.py records them), results.md (means and standard deviations
over seeds), position_loss.png, retrieval.png, progress.json (a study stopped and run again
continues where it stopped; the record is then the last invocation's).

Cost, on the 2-core CPU this was written on, one core (`taskset -c 1`, XLA_FLAGS=
"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"), shared with other jobs
(load average 4-10 on 2 cores), 2026-12-07:
- `--smoke --variants yarn` with the test's XLA_FLAGS: ~1 min wall (compilation, nearly all of it);
- the study (3 seeds x 3 variants), measured: 23.4 min wall (docs/studies/long_context: its
  record, 12:39-13:02 UTC, and progress.json): the base 11.5 min (1600 steps of 16 x 128 tokens,
  median 0.41 s a step, 4.5-9.8K tokens/s as the load varied), each CPT run 1.0-1.6 min (150 steps
  of 4 x 512 tokens, median 0.34-0.37 s a step, its 2-3 evaluations and its compilation), a seed's
  three 3.8-4.0 min.

Whether the base learns retrieval: NOT SHOWN. At these settings it does not: the base's probe
accuracy at 128 tokens was 0% at every evaluation (steps 400, 800, 1200, 1600), the answer's NLL
2.4-2.9 nats/token (uniform over ten digits: 2.30). Its copying drill's training loss went from
6.26 (step 80) to a plateau of 4.6-4.8 (steps 320-640), then fell to 3.25 at step 1600: copying
began to form in the drill only in the second half, as the LR decayed, and did not reach the
probe's format. Pilots of the base alone, on one shared core, each with its own cosine schedule,
none of which learned the probe (0% at every evaluation, the answer's NLL 2.3-4.2):
- 2 layers at 128 tokens, 600 steps at 3e-3, 50% pass-key documents of 40-128 tokens, no drill;
- the same with 1000 steps and 60% pass-key documents, 8000 of them with keys of 1-8 five-digit
  numbers (the copied digits' NLL stayed ~2.3: no copying); then 400 steps of 90% such documents;
- keys of 3-10 English words instead of numbers (80%, 600 steps at 5e-3);
- the drill above (70% with the pass-key documents, 600 steps at 5e-3): that source's loss fell
  6.5 -> 4.5, still on the plateau.
- this study's base with twice the steps (3200, the same schedule stretched; 13.3 min on one
  core): 0% at every evaluation (every 400 steps), the answer's NLL 2.37-2.64 at the end, the
  drill's loss still falling (3.32 at step 1920, 2.59 at 3200), held-out English 3.85 (its log
  and config: docs/studies/long_context/pilots/).
Earlier, at 256 tokens with 4 layers (600/600/1200 steps, 30-50% pass-key documents): the same.
Induction heads form abruptly after a plateau (Olsson et al. 2022); here copying forms slowly in
the drill and does not reach the probe's format within ~6.5M training tokens. Left to try: more
base steps still, a drill in the probe's own words, or a base pretrained elsewhere.
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
    "model": {"num_hidden_layers": 2},  # else DEMO_MODEL's: hidden 128, 4 heads (2 KV), head_dim 32
    "tokenizer_vocab": 2048, "short": 128, "factor": 4, "theta": 10000.0,
    "base": {"steps": 1600, "batch_size": 16, "peak_lr": 5e-3, "warmup": 0.02, "end_lr": 5e-4, "eval_every": 400},
    "cpt": {"steps": 150, "batch_size": 4, "peak_lr": 1e-3, "warmup": 0.05, "end_lr": 1e-4, "eval_every": 75},
    "passkey": {"weight": 0.3, "lengths": [40, 64, 96, 128], "depths": 11, "samples": 150, "seed": 1000,
                "copy": {"weight": 0.3, "documents": 12000, "words": [4, 16], "length": 60, "vocabulary": 2000,
                         "seed": 7}},
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
    "passkey": {"weight": 0.3, "lengths": [64], "depths": 2, "samples": 2, "seed": 1000,
                "copy": {"weight": 0.3, "documents": 20, "words": [2, 4], "length": 12, "vocabulary": 100, "seed": 7}},
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


def copy_documents(english: list[str], study: dict) -> list[str]:
    """Copying drill: each document a sequence of `words` distinct English words (drawn from the
    `vocabulary` most frequent of the training documents, the 50 most frequent left out) repeated to
    about `length` words. From its second repetition on every token is a copy of the token after
    the same word earlier, the signal from which induction heads form (Olsson et al. 2022), and far
    denser than the probe's documents give: there only the 5-digit answer is a copy, and a key of
    ten possible digit tokens often repeats one, so the token after the last match is often wrong."""
    import collections
    import random
    import re

    drill = study["passkey"]["copy"]
    counts = collections.Counter(w for d in english for w in re.findall(r"\b[a-z]{3,9}\b", d))
    vocabulary = [w for w, _ in counts.most_common(drill["vocabulary"] + 50)][50:]
    rng = random.Random(drill["seed"])
    documents = []
    for _ in range(drill["documents"]):
        words = rng.sample(vocabulary, rng.randint(*drill["words"]))
        documents.append(" " + " ".join(words * max(2, drill["length"] // len(words))))
    return documents


def write_corpora(out: Path, data_dir: Path, study: dict, tokenizer: Path) -> dict:
    """English train (nine documents in ten) and held out (the tenth, only those of at least the
    extended length in tokens, the first `heldout_docs`); pass-key documents as text (the probe's
    prompts, another seed); the copying drill (`copy_documents`)."""
    from tokenizers import Tokenizer

    from cptjax.data.passkey import RetrievalConfig, make_prompts
    from cptjax.data.tokenize import DocumentTokenizer, load_tokenizer_spec

    english = findings.english_documents(data_dir)
    trained = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    long = study["short"] * study["factor"]
    heldout = [d for d in english[::10] if len(trained.encode(d).ids) >= long][:study["heldout_docs"]]
    passkey = study["passkey"]
    depths = [i / max(passkey["depths"] - 1, 1) for i in range(passkey["depths"])]
    prompts = make_prompts(RetrievalConfig(tuple(passkey["lengths"]), tuple(depths), passkey["samples"],
                                           passkey["seed"]), DocumentTokenizer(load_tokenizer_spec(tokenizer)))
    train = [d for i, d in enumerate(english) if i % 10]
    documents = {"english_train": train, "english_heldout_long": heldout,
                 "passkey": [trained.decode(p.ids.tolist(), skip_special_tokens=True) for p in prompts],
                 "copy": copy_documents(train, study)}
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
    english = {"name": "english", "type": "jsonl", "paths": [corpora["english_train"]],
               "weight": 1 - passkey["weight"] - passkey["copy"]["weight"]}
    if seq_len > study["short"]:  # Fu et al. 2024: long documents upsampled, the domain balance kept
        english["long_upsample"] = {"min_tokens": seq_len, "factor": study["long_upsample"]}
    sources = [english,
               {"name": "passkey", "type": "jsonl", "paths": [corpora["passkey"]], "weight": passkey["weight"]},
               {"name": "copy", "type": "jsonl", "paths": [corpora["copy"]], "weight": passkey["copy"]["weight"]}]
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
