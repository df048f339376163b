"""The goodput account of a training run at the study's CPU shape: how much of the step time goes to
waiting for data, saving checkpoints and logging.

    python scripts/bench_goodput.py [--steps 120] [--every 20] [--repeats 2] [--out FILE]

The model and batch of configs/studies/reproduce_cpt_findings.yaml (Llama-shaped, 4 layers of 256,
16 rows of 256 tokens, float32), trained from scratch on the demo's English corpus through the real
Grain pipeline with its default prefetch (cptjax.demo: corpora and tokenizer), `--steps` steps in
one `cptjax train` process, an asynchronous checkpoint every `--every` steps, a train record
every step (logging's worst case), TensorBoard on, the held-out sets at the start and the end.
From the run's last goodput record (cptjax/train/goodput.py) it reports, per run:
  data       seconds waiting for batches / seconds of train steps        (bound: 2%)
  checkpoint blocking seconds per save / seconds of the steps between two saves (bound: 5%)
  logging    seconds building and writing records / seconds of train steps (bound: 1%)
The raw record goes to docs/benchmarks/goodput_<date>.json (scripts/bench_record.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_record
import yaml

from cptjax.demo import DEMO_MODEL, base_config, find_data_dir, tokenizer_fields, train_tokenizer, write_corpora

STUDY = Path(__file__).resolve().parents[1] / "configs" / "studies" / "reproduce_cpt_findings.yaml"
BOUNDS = {"data": 0.02, "checkpoint": 0.05, "logging": 0.01}


def study_shape() -> dict:
    study = yaml.safe_load(STUDY.read_text())
    return {"model": study["model"], "batch_size": study["batch_size"], "seq_len": study["seq_len"],
            "tokenizer_vocab": study["tokenizer_vocab"]}


def one_run(folder: Path, corpora: dict, tokenizer: Path, model: dict, shape: dict, steps: int, every: int) -> dict:
    (folder / "model.json").write_text(json.dumps(model))
    raw = base_config(folder, corpora, tokenizer, steps=steps)
    raw["model"]["hf_config"] = str(folder / "model.json")
    raw["training"].update(batch_size=shape["batch_size"], seq_len=shape["seq_len"])
    raw["checkpoint"] = {"every": every, "keep_last": 2, "async_save": True}
    raw["eval"] = {"every": steps}
    raw["logging"] = {"every": 1, "progress": "lines", "tensorboard": True}
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "cptjax.cli", "train", "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench_goodput: {' '.join(command)} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (folder / "base_run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    account = [r for r in records if r["kind"] == "goodput"][-1]
    median = statistics.median(r["step_time_s"] for r in records if r["kind"] == "train" and r.get("step_time_s"))
    saves = steps // every
    shares = {"data": account["data_s"] / account["step_s"],
              "checkpoint": account["checkpoint_s"] / saves / (every * median),
              "logging": account["logging_s"] / account["step_s"]}
    return {"goodput": account, "saves": saves, "median_step_time_s": median,
            "shares": {k: round(v, 5) for k, v in shares.items()},
            "within_bounds": {k: shares[k] < BOUNDS[k] for k in BOUNDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="the JSON record (default docs/benchmarks/goodput_<date>.json)")
    args = parser.parse_args()
    record = bench_record.begin("goodput")
    shape = study_shape()
    runs = []
    with tempfile.TemporaryDirectory(prefix="cptjax-bench-goodput-") as tmp:
        workdir = Path(tmp)
        data_dir = find_data_dir()
        corpora = write_corpora(workdir, data_dir)
        tokenizer = train_tokenizer(workdir / "tokenizer", data_dir, vocab_size=shape["tokenizer_vocab"])
        model = {**DEMO_MODEL, **shape["model"], **tokenizer_fields(tokenizer)}
        for i in range(args.repeats):
            folder = workdir / f"run{i}"
            folder.mkdir()
            runs.append(one_run(folder, corpora, tokenizer, model, shape, args.steps, args.every))
            shares = ", ".join(f"{k} {v:.2%}" for k, v in runs[-1]["shares"].items())
            print(f"  run {i + 1}: goodput {runs[-1]['goodput']['goodput']:.1%}; {shares}")
    path = bench_record.finish(record, {"shape": shape, "model": model, "steps": args.steps,
                                        "checkpoint_every": args.every, "bounds": BOUNDS, "runs": runs}, out=args.out)
    for name, bound in BOUNDS.items():
        values = [r["shares"][name] for r in runs]
        print(f"{name}: {min(values):.2%}-{max(values):.2%} (bound {bound:.0%})")
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
