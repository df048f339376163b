"""`cptjax demo` as a user runs it: its wall time, CPU time, the size of its folder, and its before/after losses.

    python scripts/bench_demo.py [--out FILE]

Runs `cptjax demo --workdir DIR` in a fresh process (DIR a new temporary folder, removed after), then reads
the CPT run's held-out evaluations from DIR/cpt_run/logs/metrics.jsonl: code loss (adaptation) and English
loss (forgetting) at the first and the last evaluation, as the demo prints them. The README's demo
numbers come from this record: docs/benchmarks/demo_<date>.json (scripts/bench_record.py: command,
commit, machine, load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_record


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def run_demo(workdir: Path) -> dict:
    command = [sys.executable, "-m", "cptjax.cli", "demo", "--workdir", str(workdir)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    evals = [r for r in map(json.loads, (workdir / "cpt_run" / "logs" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "eval"]
    first, last = evals[0], evals[-1]
    losses = {name: {"before": first[name]["loss"], "after": last[name]["loss"],
                     "bits_per_byte_before": first[name]["bits_per_byte"],
                     "bits_per_byte_after": last[name]["bits_per_byte"]} for name in ("code", "english")}
    return {"demo_command": "cptjax demo --workdir DIR", "wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "folder_bytes": folder_bytes(workdir), "eval_steps": [first["step"], last["step"]],
            "held_out_loss_nats_per_token": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON record (default: a new docs/benchmarks/demo_<date>.json)")
    args = parser.parse_args()
    record = bench_record.begin("demo", ("grain", "tokenizers", "transformers", "torch"))
    parent = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    try:
        results = run_demo(parent / "demo")
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    losses = results["held_out_loss_nats_per_token"]
    print(f"\ncptjax demo: {results['wall_s']:.0f} s wall, {results['cpu_s']:.0f} s CPU on {os.cpu_count()} cores; "
          f"folder {results['folder_bytes'] / 1e6:.0f} MB; code {losses['code']['before']:.2f} -> "
          f"{losses['code']['after']:.2f}, English {losses['english']['before']:.2f} -> "
          f"{losses['english']['after']:.2f} nats/token")
    bench_record.finish(record, results, args.out)


if __name__ == "__main__":
    main()
