"""Reproduces the published continued-pretraining findings at small scale, with cptjax itself.

    python scripts/reproduce_cpt_findings.py --config configs/studies/reproduce_cpt_findings.yaml --out study/
    python scripts/reproduce_cpt_findings.py --reduced --out study-reduced/
    python scripts/reproduce_cpt_findings.py --config other.yaml --base-from study/ --out study2/  # same base

One base model is pretrained on English until its held-out English loss has flattened; from it,
each variant of the study's config continues pretraining on Python code with the same tokens,
once per seed (the seed orders the data). Every run is evaluated along the way by the trainer and
at the end by `cptjax eval` (its library function) on held-out English (forgetting) and held-out
code (adaptation). Writes results.json, results.md and PNGs into --out; see the config's header.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this clone's cptjax, whichever copy is installed
DEFAULT_CONFIG = ROOT / "configs" / "studies" / "reproduce_cpt_findings.yaml"
# The CI version: the same study, shrunk until it runs in minutes (the calibration in
# docs/guide.md measured its seed spread).
REDUCED = {"model": {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
           "tokenizer_vocab": 1024, "seq_len": 128, "batch_size": 8,
           "base": {"steps": 300, "peak_lr": 5.0e-3, "warmup": 0.05, "end_lr": 5.0e-4, "eval_every": 100},
           "cpt": {"steps": 80, "peak_lr": 2.5e-3, "end_lr": 2.5e-4, "warmup": 0.02, "eval_every": 20},
           "seeds": [0],
           "variants": [{"name": "rewarm_replay0"}, {"name": "rewarm_replay25", "replay": 0.25},
                        {"name": "constant_min_lr", "schedule": {"kind": "constant", "peak_lr": 2.5e-4}}]}
# What the evaluations read, unless the study's `heldout` says less: every 10th English document
# (training never reads them) and these standard-library packages (training reads the top-level modules).
HELDOUT = {"english_stride": 1, "code": ["json/*.py", "email/*.py", "http/*.py"]}
REDUCED["heldout"] = HELDOUT  # its calibration was measured on the whole held-out sets
PROGRESS = "progress.json"  # "base", "seedN/variant" -> {done, minutes} (summed over continuations)
DOMAIN, GENERAL = "code", "english"
PROG = "reproduce_cpt_findings"  # the messages' prefix


def english_documents(data_dir: Path) -> list[str]:
    """WikiText-2 articles, Jargon File entries and Tiny Shakespeare scenes (all bundled)."""
    from cptjax.demo import english_documents as wiki_and_jargon

    plays = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    scenes, current = [], []
    for paragraph in plays.split("\n\n"):  # speeches, grouped into documents of ~2,000 characters
        current.append(paragraph)
        if sum(map(len, current)) > 2000:
            scenes.append("\n\n".join(current))
            current = []
    return wiki_and_jargon(data_dir) + scenes


def heldout(study: dict) -> dict:
    """The study's held-out sets: HELDOUT, changed as its `heldout` says."""
    return {**HELDOUT, **study.get("heldout", {})}


def write_corpora(out: Path, data_dir: Path, held: dict = HELDOUT) -> dict:
    """English split by document (every tenth held out; the evaluations read every
    `english_stride`-th of those), code split by package (`held["code"]`, globs in the stdlib)."""
    import sysconfig

    english = english_documents(data_dir)
    corpora = {}
    for name, docs in (("english_train", [d for i, d in enumerate(english) if i % 10]),
                       ("english_heldout", english[::10][::held["english_stride"]])):
        path = out / "corpora" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"text": d}) + "\n" for d in docs)
        if not path.exists() or path.read_text(encoding="utf-8") != text:  # a continued study reads it
            path.write_text(text, encoding="utf-8")
        corpora[name] = str(path)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpora["code_train"] = [str(stdlib / "*.py")]
    corpora["code_heldout"] = [str(stdlib / pattern) for pattern in held["code"]]
    return corpora


def eval_sets(corpora: dict) -> list[dict]:
    return [{"name": DOMAIN, "type": "text", "paths": corpora["code_heldout"]},
            {"name": GENERAL, "type": "jsonl", "paths": [corpora["english_heldout"]]}]


def _run_config(run_dir: Path, study: dict, section: dict, model: dict, sources: list[dict], schedule: dict,
                corpora: dict, seed: int, at_start: bool = True) -> dict:
    steps = section["steps"]
    return {
        "run_dir": str(run_dir), "model": {**model, "compute_dtype": "float32"},
        "data": {"sources": sources, "eval_sets": eval_sets(corpora), "seed": seed},
        "training": {"steps": steps, "batch_size": study["batch_size"], "seq_len": study["seq_len"], "seed": 0},
        "schedule": schedule, "optimizer": {"weight_decay": 0.1},
        "checkpoint": {"every": steps, "keep_last": 1}, "eval": {"every": section["eval_every"], "at_start": at_start},
        "logging": {"every": max(steps // 20, 1), "progress": "lines", "tensorboard": False},
    }


def pretrain_base(out: Path, study: dict, corpora: dict, tokenizer: Path) -> Path:
    """The base: pretrained on English from scratch; returns its checkpoint folder."""
    from tokenizers import Tokenizer

    from cptjax.demo import DEMO_MODEL

    trained = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    special = {name: trained.token_to_id(token) for name, token in (
        ("bos_token_id", "<|begin_of_text|>"), ("eos_token_id", "<|end_of_text|>"), ("pad_token_id", "<|pad|>"))}
    hf_config = dict(DEMO_MODEL, **study["model"], vocab_size=trained.get_vocab_size(with_added_tokens=True),
                     max_position_embeddings=max(1024, study["seq_len"]), **special)
    (out / "base_config.json").write_text(json.dumps(hf_config, indent=2))
    base = study["base"]
    config = _run_config(out / "base", study, base, {"hf_config": str(out / "base_config.json"),
                                                      "tokenizer": str(tokenizer)},
                         [{"name": GENERAL, "type": "jsonl", "paths": [corpora["english_train"]]}],
                         {"kind": "warmup_cosine", "peak_lr": base["peak_lr"], "warmup": base["warmup"],
                          "end_lr": base["end_lr"]}, corpora, seed=0)
    _train(config)
    return out / "base" / "checkpoints"


class Stopped(Exception):
    """A run stopped before its last step (SIGTERM: the trainer saved it); the study stops too."""


def _train(config: dict) -> None:
    """Trains one run to its end, or not at all if the study's progress file says it is done (a
    study run again in the same --out continues where it stopped: runs resume from their saves)."""
    from cptjax.train.config import config_from_dict
    from cptjax.train.trainer import run

    run_dir = Path(config["run_dir"])
    study_dir = run_dir.parent if run_dir.name == "base" else run_dir.parents[1]  # out/seedN/variant
    progress_file = study_dir / PROGRESS
    progress = json.loads(progress_file.read_text()) if progress_file.exists() else {}
    key = str(run_dir.relative_to(progress_file.parent))
    if progress.get(key, {}).get("done"):
        return
    start = time.perf_counter()
    result = run(config_from_dict(config))
    minutes = progress.get(key, {}).get("minutes", 0.0) + (time.perf_counter() - start) / 60
    progress[key] = {"done": result.stopped_early is None, "minutes": minutes}
    progress_file.write_text(json.dumps(progress, indent=2) + "\n")
    if result.stopped_early is not None:
        raise Stopped(f"{run_dir}: stopped at step {result.final_step} ({result.stopped_early}); "
                      "run the same command again to continue")


def variant_config(study: dict, variant: dict, base: Path, corpora: dict, run_dir: Path, seed: int) -> dict:
    """A CPT run from the base: re-warm + cosine with 0% replay, changed as `variant` says."""
    cpt = study["cpt"]
    peak = cpt["peak_lr"] * variant.get("peak_lr_scale", 1.0)
    schedule = {"kind": "warmup_cosine", "peak_lr": peak, "warmup": cpt["warmup"], "end_lr": cpt["end_lr"],
                **variant.get("schedule", {})}
    if schedule["kind"] == "constant":  # no re-warm: the LR stays at the given (minimum) value
        schedule = {"kind": "constant", "peak_lr": schedule["peak_lr"]}
    if schedule["kind"] == "wsd":
        schedule["end_lr"] = cpt["end_lr"]
    replay = variant.get("replay", 0.0)
    sources = [{"name": DOMAIN, "type": "text", "paths": corpora["code_train"], "weight": 1 - replay}]
    if replay:
        sources.append({"name": f"{GENERAL}_replay", "type": "jsonl", "paths": [corpora["english_train"]],
                        "weight": replay})
    # no evaluation at step 0: the base is the same in every run, and the seed's final evaluation
    # measures it once (run_study puts that first in every curve)
    return _run_config(run_dir, study, cpt, {"init_from": str(base)}, sources, schedule, corpora, seed,
                       at_start=False)


def heldout_curve(run_dir: Path) -> list[dict]:
    """The trainer's evaluations: [{"step", DOMAIN, GENERAL}] losses."""
    from cptjax.measure.run_logs import read_run

    return [{"step": r["step"], **{k: r[k]["loss"] for k in (DOMAIN, GENERAL)}} for r in read_run(run_dir).evals]


def summarize(study: dict, base_loss: dict, finals: dict, curves: dict) -> dict:
    """Per variant, over seeds: forgetting (general loss rise at the end), adaptation (domain
    loss drop), peak forgetting (the largest rise at any evaluation), and for replay the share of
    forgetting removed and its cost on the domain loss, each against 0% replay of the same seed."""
    names = [v["name"] for v in study["variants"]]
    per_seed: dict[str, list[dict]] = {n: [] for n in names}
    for seed in study["seeds"]:
        reference = finals[seed]["rewarm_replay0"]
        forgetting0 = reference[GENERAL] - base_loss[GENERAL]
        for name in names:
            final = finals[seed][name]
            row = {"forgetting": final[GENERAL] - base_loss[GENERAL],
                   "adaptation": base_loss[DOMAIN] - final[DOMAIN],
                   "peak_forgetting": max(c[GENERAL] for c in curves[seed][name]) - base_loss[GENERAL],
                   "domain_loss": final[DOMAIN], "general_loss": final[GENERAL]}
            if name.startswith("rewarm_replay") and name != "rewarm_replay0":
                row["forgetting_removed"] = 1 - row["forgetting"] / forgetting0 if forgetting0 > 0 else math.nan
                row["domain_cost"] = final[DOMAIN] - reference[DOMAIN]
            per_seed[name].append(row)
    table = {}
    for name, rows in per_seed.items():
        table[name] = {key: {"mean": statistics.fmean(r[key] for r in rows),
                             "spread": (statistics.stdev(r[key] for r in rows) if len(rows) > 1 else 0.0),
                             "seeds": [r[key] for r in rows]}
                       for key in rows[0]}
    return table


# The findings as paired differences (same seed, so the same data order): (what, variant, against it)
COMPARISONS = (("re-warm + cosine against a constant minimum LR", "rewarm_replay0", "constant_min_lr"),
               ("peak LR x1 against x0.5", "rewarm_replay0", "peak_lr_x0.5"),
               ("peak LR x2 against x1", "peak_lr_x2", "rewarm_replay0"),
               ("5% warmup against 1%", "warmup_5pct", "rewarm_replay0"),
               ("WSD (1-sqrt cooldown) against cosine", "wsd_1sqrt", "rewarm_replay0"))


def comparisons(table: dict) -> list[dict]:
    """Each of COMPARISONS whose variants the study ran: adaptation and forgetting differences,
    per seed and their mean."""
    rows = []
    for what, variant, against in COMPARISONS:
        if variant in table and against in table:
            row = {"what": what, "variant": variant, "against": against}
            for key in ("adaptation", "forgetting"):
                seeds = [a - b for a, b in zip(table[variant][key]["seeds"], table[against][key]["seeds"])]
                row[key] = {"mean": statistics.fmean(seeds), "seeds": seeds}
            rows.append(row)
    return rows


def markdown(study: dict, base_loss: dict, table: dict, minutes: dict) -> str:
    def cell(entry, percent=False):
        if entry is None:
            return ""
        scale = 100 if percent else 1
        spread = f" ± {entry['spread'] * scale:.{1 if percent else 3}f}" if len(entry["seeds"]) > 1 else ""
        return f"{entry['mean'] * scale:.{1 if percent else 3}f}{'%' if percent else ''}{spread}"

    lines = ["# Continued pretraining findings at small scale\n",
             (f"Base: held-out {GENERAL} loss {base_loss[GENERAL]:.3f}, {DOMAIN} loss {base_loss[DOMAIN]:.3f} "
              f"nats/token. Seeds {', '.join(map(str, study['seeds']))}: mean ± standard deviation. Losses "
              "in nats/token; forgetting = the English loss rise, adaptation = the code loss drop, both "
              "against the base; replay rows against 0% replay of the same seed.\n"),
             "| variant | forgetting | adaptation | peak forgetting | forgetting removed | code loss cost |",
             "|---|---|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name} | {cell(row['forgetting'])} | {cell(row['adaptation'])} | "
                     f"{cell(row['peak_forgetting'])} | {cell(row.get('forgetting_removed'), True)} | "
                     f"{cell(row.get('domain_cost'))} |")
    paired = comparisons(table)
    if paired:
        seeds = ", ".join(map(str, study["seeds"]))
        lines += [f"\nPaired differences (each seed against itself; mean, then seeds {seeds}):\n",
                  "| comparison | adaptation difference | forgetting difference |", "|---|---|---|"]
        for row in paired:
            lines.append(f"| {row['what']} | " + " | ".join(
                f"{row[k]['mean']:+.3f} (" + ", ".join(f"{v:+.3f}" for v in row[k]["seeds"]) + ")"
                for k in ("adaptation", "forgetting")) + " |")
    lines.append(f"\nTimes: base {minutes['base']:.1f} min; per seed "
                 + ", ".join(f"{s}: {m:.1f} min" for s, m in minutes["seeds"].items()) + ".")
    return "\n".join(lines) + "\n"


def plot(study: dict, base_loss: dict, table: dict, curves: dict, out: Path) -> list[str]:
    """forgetting_vs_adaptation.png (mean and spread per variant) and curves.png (held-out losses
    over CPT steps, seed means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for i, (name, row) in enumerate(table.items()):
        f, a = row["forgetting"], row["adaptation"]
        ax.errorbar(f["mean"], a["mean"], xerr=f["spread"], yerr=a["spread"], fmt="o", color=f"C{i % 10}",
                    capsize=3, label=name)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("forgetting: held-out English loss rise (nats/token); left is better")
    ax.set_ylabel("adaptation: held-out code loss drop (nats/token); up is better")
    ax.set_title("What each CPT variant bought and cost (mean ± sd over seeds)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(out / "forgetting_vs_adaptation.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for i, name in enumerate(table):
        runs = [curves[seed][name] for seed in study["seeds"]]
        steps = [c["step"] for c in runs[0]]
        for ax, key in zip(axes, (GENERAL, DOMAIN)):
            mean = [statistics.fmean(run[j][key] for run in runs) for j in range(len(steps))]
            ax.plot(steps, mean, marker=".", color=f"C{i % 10}", label=name)
    for ax, key, what in zip(axes, (GENERAL, DOMAIN), ("forgetting", "adaptation")):
        ax.axhline(base_loss[key], color="black", ls="--", lw=0.8, label="the base (step 0)")
        ax.set_title(f"held-out {key} loss during CPT ({what})")
        ax.set_xlabel("CPT step")
        ax.set_ylabel("loss (nats/token)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return ["forgetting_vs_adaptation.png", "curves.png"]


def run_study(study: dict, out: Path, data_dir: Path, echo=print) -> dict:
    from cptjax.data.config import EvalSetConfig
    from cptjax.demo import train_tokenizer
    from cptjax.measure.eval_models import evaluate_models
    from cptjax.measure.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    corpora = write_corpora(out, data_dir, heldout(study))
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():  # kept when the study continues
        train_tokenizer(tokenizer, data_dir, vocab_size=study["tokenizer_vocab"])
    base = pretrain_base(out, study, corpora, tokenizer)
    progress = json.loads((out / PROGRESS).read_text())
    minutes = {"base": progress["base"]["minutes"], "seeds": {}}
    if not (out / "base_report").exists():  # reports are never overwritten; kept when continuing
        write_report(out / "base", out / "base_report")
    echo(f"base pretrained in {minutes['base']:.1f} min: {base}")

    sets = [EvalSetConfig(name=s["name"], type=s["type"], paths=tuple(s["paths"])) for s in eval_sets(corpora)]
    finals, curves, base_loss = {}, {}, None
    for seed in study["seeds"]:
        curves[seed] = {}
        for variant in study["variants"]:
            run_dir = out / f"seed{seed}" / variant["name"]
            _train(variant_config(study, variant, base, corpora, run_dir, seed))
            curves[seed][variant["name"]] = heldout_curve(run_dir)
            if seed == study["seeds"][0] and not (out / "reports" / variant["name"]).exists():
                write_report(run_dir, out / "reports" / variant["name"])
            echo(f"seed {seed} {variant['name']}: done")
        # the final numbers: cptjax eval on the base and every run's last checkpoint, together
        start = time.perf_counter()  # the evaluation's time; the runs' training times are in progress.json
        models = [str(base)] + [str(out / f"seed{seed}" / v["name"] / "checkpoints") for v in study["variants"]]
        report = evaluate_models(models, sets, domain=[DOMAIN], seq_len=study["seq_len"],
                                 batch_size=study["batch_size"])
        results = list(report.results.values())
        base_loss = {k: results[0][k]["loss"] for k in (DOMAIN, GENERAL)}
        finals[seed] = {v["name"]: {k: r[k]["loss"] for k in (DOMAIN, GENERAL)}
                        for v, r in zip(study["variants"], results[1:])}
        for name, curve in curves[seed].items():  # step 0: the base, measured by this evaluation
            curves[seed][name] = [{"step": 0, **base_loss}] + [c for c in curve if c["step"] > 0]
        runs = [r for key, r in json.loads((out / PROGRESS).read_text()).items() if key.startswith(f"seed{seed}/")]
        minutes["seeds"][seed] = sum(r["minutes"] for r in runs) + (time.perf_counter() - start) / 60
        echo(f"seed {seed}: {minutes['seeds'][seed]:.1f} min")
    table = summarize(study, base_loss, finals, curves)
    figures = plot(study, base_loss, table, curves, out)
    results = {"study": study, "base_loss": base_loss, "base_curve": heldout_curve(out / "base"),
               "finals": {str(s): f for s, f in finals.items()},
               "curves": {str(s): c for s, c in curves.items()}, "table": table,
               "comparisons": comparisons(table), "minutes": minutes,
               "figures": figures}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(study, base_loss, table, minutes))
    echo((out / "results.md").read_text())
    return results


BASE_KEYS = ("model", "tokenizer_vocab", "seq_len", "batch_size", "base", "heldout")  # the base and its curve


def base_settings(study: dict) -> dict:
    """What a study's base and its curve depend on (a study recorded before `heldout` read HELDOUT)."""
    return {**{key: study.get(key) for key in BASE_KEYS}, "heldout": heldout(study)}


def reuse_base(other: Path, study: dict, out: Path) -> str | None:
    """Copies the tokenizer and the finished base of the study in `other` into `out` (a new study
    whose base settings are the same: only its CPT runs are new); returns why not, or None."""
    import shutil

    recorded = other / "study.json"
    if not recorded.exists():
        return f"--base-from {other}: no study.json there; name the --out folder of an earlier study"
    theirs = json.loads(recorded.read_text())
    theirs, ours = base_settings(theirs), base_settings(study)
    differ = [key for key in BASE_KEYS if theirs[key] != ours[key]]
    if differ:
        return (f"--base-from {other}: its base was made with other {', '.join(differ)}; "
                "reuse only a base made with the same settings")
    progress = json.loads((other / PROGRESS).read_text()) if (other / PROGRESS).exists() else {}
    if not progress.get("base", {}).get("done"):
        return f"--base-from {other}: its base is not finished; finish that study's base first"
    for name in ("tokenizer", "base", "base_report"):
        if (other / name).exists():
            shutil.copytree(other / name, out / name)
    shutil.copy2(other / "base_config.json", out / "base_config.json")
    (out / PROGRESS).write_text(json.dumps({"base": progress["base"]}, indent=2) + "\n")
    return None


def _without_seeds(study: dict) -> dict:
    """What makes two studies the same: everything but the seeds (a study can gain seeds later, and
    a table can be made from the seeds finished so far)."""
    return {key: value for key, value in study.items() if key != "seeds"}


def open_study(prog: str, out: Path, study: dict, base_from: str | None = None) -> int | None:
    """Makes `out` the study's folder: new, or a stopped run of the same study (same settings but
    the seeds), with `base_from`'s base copied into a new one; writes study.json. The studies'
    scripts share it. Returns 2 after printing why when it refuses, else None."""
    recorded = out / "study.json"
    refusal = None
    if out.exists() and any(out.iterdir()):
        if not recorded.exists() or _without_seeds(json.loads(recorded.read_text())) != _without_seeds(study):
            refusal = f"--out {out}: not empty and not a stopped run of this study; choose a new folder"
        elif base_from:
            refusal = f"--base-from: {out} already has its base; leave --base-from out to continue that study"
        else:
            print(f"{prog}: continuing the study in {out}")
    if refusal is None and base_from:
        out.mkdir(parents=True, exist_ok=True)
        refusal = reuse_base(Path(base_from).absolute(), study, out)
        if refusal is None:
            print(f"{prog}: the base of {base_from}, copied")
    if refusal is not None:
        print(f"{prog}: {refusal}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(study, indent=2) + "\n")
    return None


def run_to_end(prog: str, run, *args) -> int:
    """Runs `run(*args)` (a study) and says how long it took: 0, or 3 when a run in it stopped."""
    start = time.perf_counter()
    try:
        run(*args)
    except Stopped as stop:
        print(f"{prog}: {stop}", file=sys.stderr)
        return 3
    print(f"{prog}: {(time.perf_counter() - start) / 60:.1f} min")
    return 0



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the study (default: %(default)s)")
    parser.add_argument("--reduced", action="store_true", help="the CI version: minutes, one seed")
    parser.add_argument("--seeds", help="comma-separated seeds, replacing the config's")
    parser.add_argument("--base-from", help="the --out folder of an earlier study with the same model, "
                        "tokenizer, batch and base settings: its pretrained base is copied, not trained again")
    parser.add_argument("--out", required=True, help="a new folder for everything the study writes, or "
                        "the folder of a stopped study to continue it (with the same or other seeds)")
    args = parser.parse_args(argv)
    study = yaml.safe_load(Path(args.config).read_text())
    if args.reduced:
        study = {**study, **REDUCED}
    if args.seeds:
        study["seeds"] = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out).absolute()
    refused = open_study(PROG, out, study, args.base_from)
    if refused is not None:
        return refused
    return run_to_end(PROG, run_study, study, out, ROOT / "data")


if __name__ == "__main__":
    sys.exit(main())
