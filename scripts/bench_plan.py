"""Per-device memory of the shipped configs' train steps, compiled ahead of time from this CPU host.

    python scripts/bench_plan.py [--only configs|without-knobs|long-context] [--out FILE]

For each config in configs/, `cptjax plan`'s own function (cptjax.train.plan.plan: the trainer's step with its
mesh, shardings, donation, remat, attention kernel and chunked loss) compiled for the config's target:
a TPU slice through libtpu (the `tpu` extra; no TPU needed), a GPU node as the same step on as many TPU
v5p chips (a proxy, as tests/test_plan.py plans it: measured against an H100 80GB as JAX uses it), or
this machine's CPU. Then the flagship (llama-3.1-8b-tpu-wsd.yaml) with its memory knobs turned off:
XLA attention and whole logits, and also no remat; and the flagship's model at 512K tokens a row with
context parallelism (LONG_CONTEXT). The model shapes come from tests/fixtures/hf_configs/
(the configs' init_from folders are not on this machine). docs/performance.md's table comes from this
record: docs/benchmarks/plan_<date>.json (scripts/bench_record.py: command, commit, machine, load).
Its `programs` map each compiled program's key (cptjax.train.plan.program_key: the lowered step,
the devices, jax/jaxlib/libtpu versions, XLA flags) to the compiler's figures; tests/test_plan.py
takes a shipped config's figures from there when its program and compiler are the same, and
compiles it otherwise. Run this again after a change to the model or the step, so the tests need
not compile (each TPU compile is 1-3 minutes of this host's CPU).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import bench_record

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU slices are compile-only; this host computes nothing

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "hf_configs"
RECIPE_MODELS = REPO / "tests" / "fixtures" / "recipe_models"  # published shapes used only by recipes
# An H100 80GB as JAX uses it: 81,559 MiB (nvidia-smi) x XLA_PYTHON_CLIENT_MEM_FRACTION 0.95 (scripts/gpu_env.sh).
H100_BYTES = int(81_559 * 2**20 * 0.95)
CPU_RAM_BYTES = 16 * 10**9  # the RAM qwen2.5-0.5b-cpu.yaml's header names
# config -> (model fixture, topology or None for this host, device count or None for all, what it stands for)
TARGETS = {
    "llama-3.1-8b-8xh100.yaml": ("llama-3.1-8b", "v5p-16", 8, "8 x H100 80GB (proxy: 8 v5p chips)"),
    "llama-3.1-8b-tpu-v6e-64.yaml": ("llama-3.1-8b", "v6e-64", None, "v6e-64"),
    "llama-3.1-8b-tpu-wsd.yaml": ("llama-3.1-8b", "v5p-128", None, "v5p-128"),
    "llama-3.1-8b-128k-v5p.yaml": ("llama-3.1-8b", "v5p-128", None, "v5p-128"),
    "llama-3.2-1b-code.yaml": ("llama-3.2-1b", "v5p-8", 1, "1 x H100 80GB (proxy: 1 v5p chip)"),
    "mistral-7b-tpu-v5p-64.yaml": ("mistral-7b-v0.1", "v5p-64", None, "v5p-64"),
    "gemma-2-9b-tpu-v5p-64.yaml": ("gemma-2-9b", "v5p-64", None, "v5p-64"),
    "mixtral-8x7b-tpu-v5p-256.yaml": ("mixtral-8x7b-v0.1", "v5p-256", None, "v5p-256"),
    "qwen3-30b-a3b-tpu-v5p-128.yaml": ("qwen3-30b-a3b", "v5p-128", None, "v5p-128"),
    "qwen2.5-0.5b-cpu.yaml": ("qwen2.5-0.5b", None, 1, "CPU, 16 GB"),
    "qwen2.5-0.5b-two-stage.yaml": ("qwen2.5-0.5b", "v5e-8", None, "v5e-8"),
}
FLAGSHIP_WITHOUT_KNOBS = {
    "xla attention, whole logits": ["model.attention=xla", "model.loss_chunk=null"],
    "xla attention, whole logits, no remat": ["model.attention=xla", "model.loss_chunk=null", "model.remat=none"],
}


# Long context (docs/scaling.md): the flagship's model at 512K tokens a row, 16 rows, its context
# raised by the run's keys and each row split over 4 chips (context parallelism).
LONG_CONTEXT = {
    "512K rows, mesh.sequence 4": ["training.seq_len=524288", "training.batch_size=16",
                                   "model.max_position_embeddings=524288", "model.rope.theta=1.28e8",
                                   "mesh.data=1", "mesh.fsdp=16", "mesh.sequence=4"],
}


def plan_one(name: str, overrides: list[str], memo: dict[str, dict]) -> dict:
    from cptjax.train.config import load_config
    from cptjax.train.plan import model_config_for, plan

    model, topology, count, target = TARGETS[name]
    config = load_config(str(REPO / "configs" / name), overrides)
    hf_config = next(p for p in (FIXTURES / f"{model}.json", RECIPE_MODELS / f"{model}.json") if p.is_file())
    result = plan(config, model_config_for(config, str(hf_config)), topology, device_count=count, memo=memo)
    if target.startswith(("8 x H100", "1 x H100")):
        memory, against = H100_BYTES, "H100 80GB as JAX uses it (81,559 MiB x 0.95)"
    elif topology is None:
        memory, against = CPU_RAM_BYTES, "16 GB of RAM"
    else:
        memory, against = result.device_memory, f"{result.device_kind} usable HBM"
    return {"config": name, "overrides": overrides, "target": target, "compiled_for": result.target,
            "devices": result.devices, "device_kind": result.device_kind, "mesh": result.mesh,
            "parameters": result.parameters, "attention": result.attention, "needed_bytes": result.needed,
            "device_memory_bytes": memory, "measured_against": against,
            "headroom": None if result.error else 1 - result.needed / memory,
            "fits": result.error is None and result.needed <= memory, "compile_s": round(result.compile_s, 1),
            "compiler_memory": result.memory, "error": result.error, "program_key": result.program_key}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON record (default: a new docs/benchmarks/plan_<date>.json)")
    parser.add_argument("--only", choices=["configs", "without-knobs", "long-context"], action="append",
                        help="plan only these groups (repeatable; default: all three)")
    parser.add_argument("--config", choices=sorted(TARGETS), action="append",
                        help="with --only configs: plan only these configs (repeatable; default: every one)")
    args = parser.parse_args()
    groups = args.only or ["configs", "without-knobs", "long-context"]
    if args.config and groups != ["configs"]:
        parser.error("--config goes with --only configs")
    record = bench_record.begin("plan", ("libtpu",))
    rows, memo = [], {}  # memo: every program compiled (a config with length stages compiles each shape)
    for name in (args.config or TARGETS) if "configs" in groups else ():
        rows.append(plan_one(name, [], memo))
        print_row(rows[-1])
    variants = {**(FLAGSHIP_WITHOUT_KNOBS if "without-knobs" in groups else {}),
                **(LONG_CONTEXT if "long-context" in groups else {})}
    for label, overrides in variants.items():
        rows.append(dict(plan_one("llama-3.1-8b-tpu-wsd.yaml", overrides, memo), variant=label))
        print_row(rows[-1])
    bench_record.finish(record, {"plans": rows, "programs": memo}, args.out)


def print_row(row: dict) -> None:
    gib = 2**30
    verdict = (f"{row['needed_bytes'] / gib:.2f} of {row['device_memory_bytes'] / gib:.2f} GiB, "
               f"headroom {row['headroom']:.0%}" if row["headroom"] is not None else f"does NOT fit: {row['error']}")
    extra = f" [{', '.join(row['overrides'])}]" if row["overrides"] else ""
    print(f"{row['config']}{extra} on {row['target']}: {row['parameters'] / 1e9:.2f}B, mesh {row['mesh']}, "
          f"{row['attention']}: {verdict}; compiled in {row['compile_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
