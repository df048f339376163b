"""Extends a small English model's vocabulary for Python code, four ways, and compares them by CPT.

    python scripts/reproduce_vocab_extension.py --out vocab-study/                      # 3 seeds x 4 variants
    python scripts/reproduce_vocab_extension.py --base-from study-reduced/ --out vocab-study/  # its base
    python scripts/reproduce_vocab_extension.py --smoke --variants none,mean --out vs/   # the test's tiny version

The base is the reduced study's of scripts/reproduce_cpt_findings.py (its `REDUCED` model,
tokenizer, corpora, held-out sets and base schedule; that script's functions train it, or
`--base-from` copies it from a finished study of the same settings): 2 layers, hidden 64, a
1,024-id byte-level BPE, pretrained on English. Its tokenizer is extended by `cptjax vocab extend`
(the library function) with `new_tokens` tokens learnt on the training code (the standard
library's top-level modules; the held-out packages are not read), and the model resized to it by
`cptjax vocab resize` (the library function) with each init. Then every variant continues
pretraining from its model on code with 25% English replay, for the same number of training
tokens (steps x batch x length; the extended tokenizer covers more bytes per token, so its runs
see more bytes, estimated in `bytes_seen`), once per seed (the seed orders the data):
  none:       the base and its tokenizer;
  mean:       the new rows the mean of the old ones (transformers 4's resize; torchtune; Hewitt 2021);
  covariance: a sample of N(mean, 1e-9 x covariance) (transformers 5's mean_resizing), seed 0;
  pieces:     each new row the mean of the rows of the old tokens it is made of.
The resized models are the same for every seed (covariance's sample is drawn once).

Measured: held-out code (`json/`, `email/`, `http/`) and held-out English in bits per byte, the
only unit that compares tokenizers (each model reads the same text through its own tokenizer),
by the trainer's evaluations during each run (step 0 on the first seed: the init before any
training) and `cptjax eval` (the library function) on the base; bytes per token of each tokenizer
on both held-out sets and both training corpora; and, for each init, `cptjax eval` of the resized
model on the held-out sets read with the base's tokenizer (old ids only: what the init costs on
text without new tokens; for `mean` the loss per token is the base's plus between 0 and
ln(1 + k/n), k new and n old ids, Hewitt 2021). Writes into --out: results.json (every number per
seed, and `record`: command, commit, CPU, load before and after as scripts/bench_record.py records
them), results.md (means ± standard deviation over seeds, paired differences against `none`),
curves.png (held-out bits per byte over CPT steps), progress.json (a study stopped and run again
continues: finished runs, the extension, the resized models and the evaluations are kept).

Cost, on the 2-core CPU this was written on (AMD EPYC, family 25 model 17), shared with a test suite
and other studies (load average 8-11), 2026-12-07: the study (3 seeds x 4 variants, `nice -n 5`)
27.1 min wall (docs/studies/vocab_extension: its record, 22:09-22:36 UTC, and progress.json): the
base 1.1 min (300 steps of 8 x 128), each CPT run about 2.1 min (1,000 steps of 8 x 128 in ~40 s,
eleven evaluations of both held-out sets in ~55 s, compilation and start ~25 s), a seed's four
7.7-8.4 min; the pilot (160 steps a run) 0.9 min a run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this clone's cptjax, whichever copy is installed
sys.path.insert(0, str(ROOT / "scripts"))
import bench_record  # noqa: E402  (what ran, on which commit, machine and load)
import reproduce_cpt_findings as findings  # noqa: E402  (the base, corpora, held-out sets, run bookkeeping)

DOMAIN, GENERAL = findings.DOMAIN, findings.GENERAL
VARIANTS = ("none", "mean", "covariance", "pieces")
STUDY = {
    **{key: findings.REDUCED[key] for key in findings.BASE_KEYS},  # the reduced study's base, as it is
    "new_tokens": 512, "pad_to": 128, "replay": 0.25,  # 1,024 + 512 ids
    "cpt": {"steps": 1000, "peak_lr": 2.5e-3, "end_lr": 2.5e-4, "warmup": 0.02, "eval_every": 100},
    "variants": list(VARIANTS), "seeds": [0, 1, 2],
}
# The test's version: every part of the study at shapes that compile and run in seconds.
SMOKE = {
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 16},
    "tokenizer_vocab": 512, "seq_len": 64, "batch_size": 4,
    "base": {"steps": 6, "peak_lr": 5e-3, "warmup": 0.2, "end_lr": 5e-4, "eval_every": 6},
    "heldout": {"english_stride": 8, "code": ["json/*.py"]},
    "code_train": ["c*.py"],  # of the standard library's top-level modules, those that start with c
    "new_tokens": 32, "pad_to": 128, "replay": 0.25,
    "cpt": {"steps": 4, "peak_lr": 2.5e-3, "end_lr": 2.5e-4, "warmup": 0.25, "eval_every": 2},
    "variants": list(VARIANTS), "seeds": [0],
}


def bytes_per_token(tokenizer_dir: Path, patterns: list[str], flag: str) -> dict:
    """UTF-8 bytes and tokens (no special tokens, as `cptjax vocab extend` counts them) of the files."""
    from tokenizers import Tokenizer

    from cptjax.data.vocab_extend import open_corpus

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    num_bytes = num_tokens = 0
    for texts in open_corpus(patterns, flag).chunks(f"bytes per token of {flag}"):
        num_bytes += sum(len(t.encode()) for t in texts)
        num_tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False))
    return {"bytes": num_bytes, "tokens": num_tokens, "bytes_per_token": num_bytes / num_tokens}


def tokenizer_stats(out: Path, corpora: dict) -> dict:
    """{"base" | "extended": {set: bytes_per_token(...)}} on the held-out sets and the training corpora."""
    sets = {f"{DOMAIN}_heldout": corpora["code_heldout"], f"{GENERAL}_heldout": [corpora["english_heldout"]],
            f"{DOMAIN}_train": corpora["code_train"], f"{GENERAL}_train": [corpora["english_train"]]}
    return {name: {key: bytes_per_token(out / folder, paths, key) for key, paths in sets.items()}
            for name, folder in (("base", "tokenizer"), ("extended", "tokenizer_extended"))}


def extend(out: Path, study: dict, corpora: dict) -> dict:
    """The extended tokenizer (made once, kept when the study continues) and its report."""
    from cptjax.data.vocab_extend import REPORT, extend_vocabulary

    folder = out / "tokenizer_extended"
    if not (folder / REPORT).exists():
        extend_vocabulary(out / "tokenizer", corpora["code_train"], study["new_tokens"], folder,
                          general=[corpora["english_heldout"]])
    return json.loads((folder / REPORT).read_text())


def resized(out: Path, study: dict, base: Path, init: str) -> Path:
    """The base resized to the extended tokenizer with `init` (made once): its checkpoint folder."""
    from cptjax.io.resize import resize_vocab

    folder = out / "resized" / init
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        resize_vocab(base, out / "tokenizer_extended", folder, init=init, pad_to=study["pad_to"], seed=0)
    return folder


def cached(out: Path, key: str, compute) -> dict:
    """evaluations.json[key], computed once (an evaluation of a fixed model is the same every time)."""
    file = out / "evaluations.json"
    done = json.loads(file.read_text()) if file.exists() else {}
    if key not in done:
        done[key] = compute()
        file.write_text(json.dumps(done, indent=2) + "\n")
    return done[key]


def evaluate(study: dict, corpora: dict, model: Path, tokenizer: Path | None = None) -> dict:
    """`cptjax eval` (its library function) of one model on both held-out sets: {set: summary}."""
    from cptjax.data.config import EvalSetConfig
    from cptjax.measure.eval_models import evaluate_models

    sets = [EvalSetConfig(name=s["name"], type=s["type"], paths=tuple(s["paths"]))
            for s in findings.eval_sets(corpora)]
    report = evaluate_models([str(model)], sets, domain=[DOMAIN], seq_len=study["seq_len"],
                             batch_size=study["batch_size"], tokenizer=str(tokenizer) if tokenizer else None)
    return {name: {k: v for k, v in summary.items() if k in ("loss", "bits_per_byte", "tokens")}
            for name, summary in next(iter(report.results.values())).items()}


def curve(run_dir: Path) -> list[dict]:
    """The trainer's evaluations: [{"step", set: {"loss", "bits_per_byte"}}]."""
    from cptjax.measure.run_logs import read_run

    return [{"step": r["step"], **{k: {"loss": r[k]["loss"], "bits_per_byte": r[k]["bits_per_byte"]}
                                   for k in (DOMAIN, GENERAL)}} for r in read_run(run_dir).evals]


METRICS = {  # the table's columns: name -> (where in a run's numbers, format)
    f"{DOMAIN} bpb, step 0": ("step0", DOMAIN), f"{DOMAIN} bpb, end": ("final", DOMAIN),
    f"{GENERAL} bpb, step 0": ("step0", GENERAL), f"{GENERAL} bpb, end": ("final", GENERAL),
}


def summarize(study: dict, runs: dict) -> tuple[dict, dict]:
    """({variant: {metric: {mean, spread, seeds}}}, {variant: {metric: paired difference from `none`}})."""
    def stats(values):
        return {"mean": statistics.fmean(values), "spread": statistics.stdev(values) if len(values) > 1 else 0.0,
                "seeds": values}

    table, paired = {}, {}
    for name in study["variants"]:
        table[name] = {metric: stats([runs[s][name][where][key]["bits_per_byte"] for s in study["seeds"]])
                       for metric, (where, key) in METRICS.items()}
        if name != "none" and "none" in study["variants"]:
            paired[name] = {metric: stats([runs[s][name][where][key]["bits_per_byte"]
                                           - runs[s]["none"][where][key]["bits_per_byte"] for s in study["seeds"]])
                            for metric, (where, key) in METRICS.items() if where == "final"}
    return table, paired


def markdown(study: dict, results: dict) -> str:
    table, paired, tokens, record = results["table"], results["paired"], results["tokenizers"], results["record"]

    def cell(entry, sign=""):
        return f"{entry['mean']:{sign}.4f}" + (f" ± {entry['spread']:.4f}" if len(entry["seeds"]) > 1 else "")

    report = results["extension"]
    k, n = report["vocab_size"] - report["first_new_id"], report["first_new_id"]
    lines = [f"# A grown vocabulary at small scale: {n} + {k} ids\n",
             f"Seeds {', '.join(map(str, study['seeds']))}: mean ± standard deviation. Bits per byte on the "
             f"held-out sets, each model reading them with its own tokenizer; {results['tokens_trained']:,} "
             f"training tokens per run ({study['cpt']['steps']} steps x {study['batch_size']} x "
             f"{study['seq_len']}, {study['replay']:.0%} English replay). Step 0 is the init before training "
             "(the same for every seed).\n",
             "| variant | " + " | ".join(METRICS) + f" | {DOMAIN} bytes/token | {GENERAL} bytes/token "
             "| bytes seen (est.) |", "|---" * (len(METRICS) + 4) + "|"]
    for name, row in table.items():
        which = "base" if name == "none" else "extended"
        lines.append(f"| {name} | " + " | ".join(cell(row[m]) for m in METRICS) + " | "
                     f"{tokens[which][f'{DOMAIN}_heldout']['bytes_per_token']:.3f} | "
                     f"{tokens[which][f'{GENERAL}_heldout']['bytes_per_token']:.3f} | "
                     f"{results['bytes_seen'][which] / 1e6:.2f}M |")
    lines.append(f"\nThe base (`cptjax eval`): {DOMAIN} {results['base'][DOMAIN]['bits_per_byte']:.4f}, "
                 f"{GENERAL} {results['base'][GENERAL]['bits_per_byte']:.4f} bits per byte.")
    if paired:
        lines += ["\nPaired differences from `none` at the end (same seed, so the same data order; mean ± sd, "
                  "then each seed), bits per byte:\n", "| variant | " + " | ".join(next(iter(paired.values())))
                  + " |", "|---" * (len(next(iter(paired.values()))) + 1) + "|"]
        for name, row in paired.items():
            lines.append(f"| {name} | " + " | ".join(
                cell(entry, "+") + " (" + ", ".join(f"{v:+.4f}" for v in entry["seeds"]) + ")"
                for entry in row.values()) + " |")
    lines += ["\nEach init read with the base's tokenizer (old ids only; what the new rows cost on text without "
              f"new tokens; `mean`'s loss is the base's plus between 0 and ln(1 + {k}/{n}) = "
              f"{math.log1p(k / n):.4f} nats/token):\n",
              f"| model | {DOMAIN} loss | {DOMAIN} bpb | {GENERAL} loss | {GENERAL} bpb |", "|---|---|---|---|---|"]
    for name, sets in {"base": results["base"], **results["old_tokens"]}.items():
        lines.append(f"| {name} | " + " | ".join(f"{sets[s]['loss']:.4f} | {sets[s]['bits_per_byte']:.4f}"
                                                 for s in (DOMAIN, GENERAL)) + " |")
    lines.append(f"\nCommand `{record['command']}` at commit {record['git']['commit']}"
                 + (f" (dirty: {', '.join(record['git']['dirty_files'])})" if record["git"]["dirty"] else " (clean)")
                 + f"; {bench_record.cpu_description(record['machine']['cpu'])}, {record['load_average']['cores']} "
                 f"usable core(s); load average (1/5/15 min) before {record['load_average']['before']}, after "
                 f"{record['load_average']['after']}.")
    minutes = results["minutes"]
    lines.append(f"\nTimes (training with its evaluations): base {minutes['base']:.1f} min; per seed "
                 + ", ".join(f"{s}: {m:.1f} min" for s, m in minutes["seeds"].items()) + ".")
    return "\n".join(lines) + "\n"


def plot(study: dict, runs: dict, base: dict, out: Path) -> list[str]:
    """curves.png: held-out code and English bits per byte over CPT steps, per variant (seed mean and
    the band of one standard deviation), the base dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for i, name in enumerate(study["variants"]):
        curves = [runs[s][name]["curve"] for s in study["seeds"]]
        steps = [c["step"] for c in curves[0]]
        for ax, key in zip(axes, (DOMAIN, GENERAL)):
            values = [[c[j][key]["bits_per_byte"] for c in curves] for j in range(len(steps))]
            mean = [statistics.fmean(v) for v in values]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            # each line thinner than the one before, so that lines that coincide (covariance's 1e-9
            # spread around the mean) stay visible
            ax.plot(steps, mean, marker=".", color=f"C{i}", lw=3.0 - 2.0 * i / len(study["variants"]), label=name)
            ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=f"C{i}", alpha=0.2)
    for ax, key in zip(axes, (DOMAIN, GENERAL)):
        ax.axhline(base[key]["bits_per_byte"], color="black", ls="--", lw=0.8, label="the base")
        ax.set_title(f"held-out {key}, bits per byte (lower is better)")
        ax.set_xlabel("CPT step (the same tokens in every run)")
        ax.set_ylabel("bits per byte")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Vocabulary +{study['new_tokens']} for code: {len(study['seeds'])} seed(s), mean ± sd")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return ["curves.png"]


def run_study(study: dict, out: Path, data_dir: Path, echo=print) -> dict:
    from cptjax.demo import train_tokenizer

    record = bench_record.begin("reproduce_vocab_extension")  # command, commit (dirty?), CPU, load before
    out.mkdir(parents=True, exist_ok=True)
    corpora = findings.write_corpora(out, data_dir, findings.heldout(study))
    if "code_train" in study:  # fewer top-level modules to learn the tokens from and to train on
        stdlib = Path(corpora["code_train"][0]).parent
        corpora["code_train"] = [str(stdlib / pattern) for pattern in study["code_train"]]
    if not (out / "tokenizer" / "tokenizer.json").exists():  # kept when the study continues, or copied
        train_tokenizer(out / "tokenizer", data_dir, vocab_size=study["tokenizer_vocab"])
    base = findings.pretrain_base(out, study, corpora, out / "tokenizer")
    minutes = {"base": json.loads((out / findings.PROGRESS).read_text())["base"]["minutes"], "seeds": {}}
    echo(f"base: {base} ({minutes['base']:.1f} min)")
    extension = extend(out, study, corpora)
    tokens = cached(out, "tokenizers", lambda: tokenizer_stats(out, corpora))
    echo(f"extended {extension['first_new_id']} -> {extension['vocab_size']} ids; held-out {DOMAIN} bytes/token "
         f"{tokens['base'][f'{DOMAIN}_heldout']['bytes_per_token']:.3f} -> "
         f"{tokens['extended'][f'{DOMAIN}_heldout']['bytes_per_token']:.3f}, {GENERAL} "
         f"{tokens['base'][f'{GENERAL}_heldout']['bytes_per_token']:.3f} -> "
         f"{tokens['extended'][f'{GENERAL}_heldout']['bytes_per_token']:.3f}")
    inits = {name: base if name == "none" else resized(out, study, base, name) for name in study["variants"]}
    base_eval = cached(out, "base", lambda: evaluate(study, corpora, base))
    old_tokens = {name: cached(out, f"{name} with the base's tokenizer",
                               lambda m=model: evaluate(study, corpora, m, out / "tokenizer"))
                  for name, model in inits.items() if name != "none"}

    runs, step0 = {}, {}
    for seed in study["seeds"]:
        runs[seed] = {}
        for name, model in inits.items():
            run_dir = out / f"seed{seed}" / name
            first = seed == study["seeds"][0]  # step 0 is the same for every seed: measured once
            config = findings.variant_config(study, {"name": name, "replay": study["replay"]}, model, corpora,
                                             run_dir, seed)
            config["eval"]["at_start"] = first
            findings._train(config)
            evals = curve(run_dir)
            if first:
                step0[name] = evals[0]
            evals = [step0[name]] + [e for e in evals if e["step"] > 0]
            runs[seed][name] = {"step0": step0[name], "final": evals[-1], "curve": evals}
            echo(f"seed {seed} {name}: {DOMAIN} {evals[-1][DOMAIN]['bits_per_byte']:.4f}, {GENERAL} "
                 f"{evals[-1][GENERAL]['bits_per_byte']:.4f} bits per byte")
        progress = json.loads((out / findings.PROGRESS).read_text())
        minutes["seeds"][seed] = sum(r["minutes"] for k, r in progress.items() if k.startswith(f"seed{seed}/"))
    table, paired = summarize(study, runs)
    tokens_trained = study["cpt"]["steps"] * study["batch_size"] * study["seq_len"]
    bytes_seen = {which: tokens_trained * ((1 - study["replay"]) * t[f"{DOMAIN}_train"]["bytes_per_token"]
                                           + study["replay"] * t[f"{GENERAL}_train"]["bytes_per_token"])
                  for which, t in tokens.items()}
    record = {**record, "load_average": {**record["load_average"], "after": list(os.getloadavg())},
              "finished_utc": bench_record.utc_now()}
    results = {"record": record, "study": study, "extension": {k: v for k, v in extension.items() if k != "new_tokens"},
               "new_tokens_top": sorted(extension["new_tokens"], key=lambda t: -t["count"])[:20],
               "tokenizers": tokens, "tokens_trained": tokens_trained, "bytes_seen": bytes_seen,
               "bytes_seen_note": "tokens x the training corpora's bytes per token, by the replay share",
               "base": base_eval, "base_curve": curve(out / "base"), "old_tokens": old_tokens,
               "runs": {str(s): r for s, r in runs.items()}, "table": table, "paired": paired,
               "minutes": minutes, "figures": plot(study, runs, base_eval, out)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(study, results))
    echo((out / "results.md").read_text())
    return results


def main(argv: list[str] | None = None) -> int:
    from cptjax.demo import find_data_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every part at tiny shapes, a few steps, one seed")
    parser.add_argument("--seeds", help="comma-separated seeds, replacing the study's")
    parser.add_argument("--variants", help="comma-separated, a subset of " + ", ".join(VARIANTS))
    parser.add_argument("--base-from", help="the --out folder of a reproduce_cpt_findings.py --reduced study "
                        "(or of this one): its pretrained base and tokenizer are copied, not trained again")
    parser.add_argument("--data-dir", help="the bundled corpora (default: the clone's data/)")
    parser.add_argument("--out", required=True, help="a new folder, or that of a stopped study to continue it")
    args = parser.parse_args(argv)
    study = json.loads(json.dumps(SMOKE if args.smoke else STUDY))
    if args.seeds:
        study["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.variants:
        study["variants"] = args.variants.split(",")
        unknown = sorted(set(study["variants"]) - set(VARIANTS))
        if unknown:
            print(f"reproduce_vocab_extension: --variants {','.join(unknown)}: not a variant; choose among "
                  + ", ".join(VARIANTS), file=sys.stderr)
            return 2
    out = Path(args.out).absolute()
    refused = findings.open_study("reproduce_vocab_extension", out, study, args.base_from)
    if refused is not None:
        return refused
    return findings.run_to_end("reproduce_vocab_extension", run_study, study, out, find_data_dir(args.data_dir))


if __name__ == "__main__":
    sys.exit(main())
