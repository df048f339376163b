"""How long a resumed `cptjax train` takes to its first step, with the run's compile cache and without.

    python scripts/bench_resume.py [--repeats 3] [--shapes demo,32m] [--out FILE]

For each model shape (the demo's base model, and scripts/bench_train.py's 32m shape), a run from
scratch on the demo's English corpus (cptjax.demo: its corpora, tokenizer and base config) trains
one step in a first `cptjax train` process, which writes the run's compile cache. Then resumes of
one step each alternate: `--set compile_cache=false` (every program compiled, as before the cache
existed) and the default (programs loaded from the cache), `--repeats` of each. Measured per
process: seconds from launch to the console's line for the first step (imports, start-up checks,
the restore, compilation or loading, and the step itself), the process's wall time, and the
programs the console's compile cache line says were loaded and compiled. The raw record goes to
docs/benchmarks/resume_<date>.json (scripts/bench_record.py: command, commit, machine, load).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_record
import yaml
from bench_train import SHAPES

from cptjax.demo import DEMO_MODEL, base_config, find_data_dir, tokenizer_fields, train_tokenizer, write_corpora

CACHE_LINE = re.compile(r"compile cache .*: (\d+) programs loaded .*, (\d+) compiled")


def model_config(shape: str, vocab: dict) -> dict:
    """The demo's base model (Llama-3.2's structure), at its own sizes or bench_train.py's."""
    sizes = {} if shape == "demo" else dict(SHAPES[shape][0])
    if sizes:
        sizes["head_dim"] = sizes["hidden_size"] // sizes["num_attention_heads"]
    return {**DEMO_MODEL, **sizes, **vocab}


def one_start(config: Path, until: int, cache: bool) -> dict:
    """A `cptjax train` process to step `until`: seconds to its first step's line, and in all."""
    command = [sys.executable, "-m", "cptjax.cli", "train", "--config", str(config), "--until-step", str(until)]
    if not cache:
        command += ["--set", "compile_cache=false"]
    start = time.perf_counter()
    first_step, lines = None, []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            lines.append(line.rstrip())
            if first_step is None and line.startswith("step "):
                first_step = time.perf_counter() - start
    wall = time.perf_counter() - start
    if process.returncode != 0 or first_step is None:
        raise SystemExit(f"bench_resume: {' '.join(command)} failed:\n" + "\n".join(lines[-30:]))
    found = [CACHE_LINE.search(line) for line in lines]
    programs = next(([int(m.group(1)), int(m.group(2))] for m in found if m), None)
    return {"cache": cache, "until_step": until, "first_step_s": round(first_step, 2), "wall_s": round(wall, 2),
            "programs_loaded_compiled": programs}


def bench_shape(shape: str, workdir: Path, corpora: dict, tokenizer: Path, repeats: int) -> dict:
    folder = workdir / shape
    folder.mkdir()
    model = model_config(shape, tokenizer_fields(tokenizer))
    (folder / "model.json").write_text(json.dumps(model))
    raw = base_config(folder, corpora, tokenizer, steps=1000)
    raw["model"]["hf_config"] = str(folder / "model.json")
    if shape in SHAPES:  # bench_train.py's rows and length for the shape (the demo's: 8 x 128)
        raw["training"].update(batch_size=SHAPES[shape][1], seq_len=SHAPES[shape][2])
    raw["checkpoint"] = {"every": 1000, "keep_last": 1}
    raw["eval"] = {"every": 1000}
    raw["logging"] = {"every": 1, "progress": "lines", "tensorboard": False}
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    first = one_start(config, 1, cache=True)
    starts, step = [], 1
    for _ in range(repeats):
        for cache in (False, True):
            step += 1
            starts.append(one_start(config, step, cache))
            last = starts[-1]
            print(f"  {shape}: resume to step {step}, cache {'on ' if cache else 'off'}: first step after "
                  f"{last['first_step_s']:.1f} s, programs loaded/compiled {last['programs_loaded_compiled']}")
    median = {c: statistics.median(s["first_step_s"] for s in starts if s["cache"] == c) for c in (False, True)}
    return {"shape": shape, "model": model, "first_start": first, "resumes": starts,
            "median_first_step_s": {"cache_off": median[False], "cache_on": median[True]},
            "median_saved_s": round(median[False] - median[True], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="demo,32m")
    parser.add_argument("--out", default=None, help="the JSON record (default docs/benchmarks/resume_<date>.json)")
    args = parser.parse_args()
    record = bench_record.begin("resume", packages=("transformers",))
    with tempfile.TemporaryDirectory(prefix="cptjax-bench-resume-") as tmp:
        workdir = Path(tmp)
        data_dir = find_data_dir()
        corpora = write_corpora(workdir, data_dir)
        tokenizer = train_tokenizer(workdir / "tokenizer", data_dir)
        shapes = [bench_shape(s, workdir, corpora, tokenizer, args.repeats) for s in args.shapes.split(",")]
    path = bench_record.finish(record, {"shapes": shapes}, out=args.out)
    for s in shapes:
        m = s["median_first_step_s"]
        print(f"{s['shape']}: resume to first step {m['cache_off']:.1f} s without the compile cache, "
              f"{m['cache_on']:.1f} s with it (medians of {args.repeats}; {s['median_saved_s']:.1f} s saved)")
    print(f"raw: {path}")


if __name__ == "__main__":
    main()
