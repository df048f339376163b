"""Training-step throughput on this machine's CPU, beside transformers + PyTorch eager or EasyDeL.

    python scripts/bench_train.py --baseline torch [--shapes 7m,32m] [--out FILE]
    python scripts/bench_train.py --baseline easydel [--shapes 7m,32m,32m-swa] [--pairs 5] [--steps 25] [--venv DIR]
    python scripts/bench_train.py --cptjax-env 'NAME=VALUE ...' [--shapes 7m] [--pairs 5]

For each shape, the step `cptjax train` runs (train_step.build_setup: the trainer's own jitted,
donated step; AdamW with global-norm clipping) and, with `--baseline torch`, transformers'
LlamaForCausalLM (MistralForCausalLM for 32m-swa) built from the same config.json with
torch.optim.AdamW (same betas, eps, weight decay, clipping) in eager mode: the same shape, batch and
rows of random tokens, float32 on the CPU for both (cptjax: param and compute dtype float32). Steps
are timed in alternating rounds (cptjax, then PyTorch) after warm-up steps, so a load change on a
shared machine hits both; medians are reported, with their ratio.

MFU = model FLOPs per step / step time / the measured matmul rate, where model FLOPs per token are
PaLM's (cptjax.train.metrics.training_flops_per_token): 6 x matmul parameters (embedding lookup excluded,
output head included) + 12 x layers x heads x head_dim x seq_len (attention). The matmul rate is
measured here: the median of XLA float32 2048 x 2048 x 2048 matmuls (PyTorch's is printed beside
it). Beside PyTorch's step the script prints the largest ratio the machine allows, 1 / PyTorch's
MFU: cptjax's step at the full matmul rate. It depends on the CPU: where XLA's matmul is twice
PyTorch's (AVX-512 at full width, Zen 5) there is room above PyTorch; where both reach the same
rate (Zen 4) PyTorch eager's large matmuls already run near it. `--depth` also compiles the step at
2 and 32 layers of the 32m shape: compile time should not grow with depth (the layers run under scan).

`--baseline easydel` times EasyDeL's own Trainer step (scripts/easydel_step.py) in EasyDeL's own virtual
environment (--venv, created with its pinned versions when missing) in separate processes, alternating
with processes timing cptjax's step (`--worker`): `--pairs` pairs per shape, each process `--warmup`
untimed and `--steps` timed steps. Per runner it reports the median of the processes' medians, their
spread (slowest / fastest - 1), and each process's CPU seconds per step, cores kept busy and
involuntary context switches (scripts/step_timing.py), which tell a slower program from a process that
lost its cores to other work. `--cptjax-env` pairs cptjax's processes the same way with processes run
under extra environment variables (an allocator, a thread setting).

Writes the raw record (scripts/bench_record.py: command, commit, CPU family and model, load average) to
docs/benchmarks/train_cpu_<date>.json (train_easydel_<date>.json, train_processes_<date>.json), or --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_record
import jax
import jax.numpy as jnp
import numpy as np
from step_timing import RESULT_PREFIX, timed_with_usage, worker_result

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cptjax.data.packing import BATCH_KEYS  # noqa: E402
from cptjax.model.config import ModelConfig  # noqa: E402
from cptjax.train.metrics import training_flops_per_token  # noqa: E402

# Llama-shaped models (GQA, SwiGLU, untied head, 8k vocabulary) and their batches (rows x length).
SHAPES = {
    "7m": ({"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2}, 16, 256),
    "32m": ({"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
             "num_key_value_heads": 4}, 8, 512),
    # Mistral-style: the 32m sizes with GQA 8:1 and a 128-token sliding window at length 512.
    "32m-swa": ({"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8,
                 "num_key_value_heads": 1, "sliding_window": 128}, 8, 512),
}
VOCAB = 8192
OPTIMIZER = {"b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "grad_clip_norm": 1.0}
LR = 1e-4


def hf_config(shape: str, layers: int | None = None) -> dict:
    sizes = dict(SHAPES[shape][0])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    family = ("MistralForCausalLM", "mistral") if sizes.get("sliding_window") else ("LlamaForCausalLM", "llama")
    return {"architectures": [family[0]], "model_type": family[1], "vocab_size": VOCAB,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, **sizes}


def tokens(rows: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (rows, length + 1))


# --- cptjax: the trainer's own step ------------------------------------------------------------------

def cptjax_setup(shape: str, workdir: Path, layers: int | None = None, **model):
    """(setup, state, global batch) for `shape`, built as `cptjax train` builds them."""
    from flax import nnx

    from cptjax.model.transformer import Llama
    from cptjax.train.config import config_from_dict
    from cptjax.train.step import build_setup

    hf = hf_config(shape, layers)
    path = workdir / f"{shape}-{layers}.json"
    path.write_text(json.dumps(hf))
    _, rows, length = SHAPES[shape]
    config = config_from_dict({
        "run_dir": str(workdir / "run"),
        "model": {"hf_config": str(path), "param_dtype": "float32", "compute_dtype": "float32", **model},
        "data": {"sources": [{"name": "bench", "type": "jsonl", "paths": ["unused.jsonl"]}]},
        "training": {"steps": 1000, "batch_size": rows, "seq_len": length},
        "schedule": {"kind": "constant", "peak_lr": LR},
        "optimizer": OPTIMIZER,
        "mesh": {"data": 1}})
    cfg = ModelConfig.from_hf_config(hf)
    setup = build_setup(config, cfg, num_sources=1, devices=jax.devices()[:1])
    params = nnx.to_pure_dict(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    state = {"step": jnp.int32(0), "params": params, "opt_state": setup.optimizer.init(params)}
    state = jax.device_put(state, setup.state_shardings)
    ids = tokens(rows, length)
    batch = {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((rows, length), np.float32),
             "positions": np.broadcast_to(np.arange(length), (rows, length)),
             "segment_ids": np.ones((rows, length), np.int32), "source_ids": np.zeros((rows, length), np.int32)}
    batch = setup.to_global({k: np.asarray(v, np.float32 if k == "loss_mask" else np.int32)
                             for k, v in batch.items() if k in BATCH_KEYS})
    return setup, state, batch, cfg


class CptjaxRunner:
    def __init__(self, shape: str, workdir: Path):
        self.setup, self.state, self.batch, self.cfg = cptjax_setup(shape, workdir)
        start = time.perf_counter()
        self.step_fn = self.setup.step_fn.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start

    def step(self) -> float:
        self.state, metrics = self.step_fn(self.state, self.batch)
        return float(metrics["loss"])  # waits for the step, as the trainer's logging would


# --- transformers + PyTorch eager -----------------------------------------------------------------------

class TorchRunner:
    def __init__(self, shape: str):
        import torch
        import transformers

        torch.manual_seed(0)
        torch.set_num_threads(os.cpu_count())
        hf = {k: v for k, v in hf_config(shape).items() if k != "architectures"}
        config = transformers.AutoConfig.for_model(**hf, attn_implementation="sdpa")
        self.torch, self.model = torch, transformers.AutoModelForCausalLM.from_config(config).float().train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(OPTIMIZER["b1"], OPTIMIZER["b2"]),
                                           eps=OPTIMIZER["eps"], weight_decay=OPTIMIZER["weight_decay"])
        _, rows, length = SHAPES[shape]
        ids = torch.as_tensor(tokens(rows, length), dtype=torch.long)
        self.inputs, self.targets = ids[:, :-1], ids[:, 1:]

    def step(self) -> float:
        torch = self.torch
        logits = self.model(input_ids=self.inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIMIZER["grad_clip_norm"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()


# --- measuring ---------------------------------------------------------------------------------------

def matmul_rates(n: int = 2048, repeats: int = 10) -> dict:
    """Median GFLOP/s of float32 n x n x n matmuls: XLA (jit) and PyTorch."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    xla = []
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, a).block_until_ready()
        xla.append(time.perf_counter() - start)
    result = {"xla_gflops": 2 * n**3 / statistics.median(xla) / 1e9}
    try:
        import torch
        t = torch.randn(n, n)
        torch.mm(t, t)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(t, t)
            times.append(time.perf_counter() - start)
        result["torch_gflops"] = 2 * n**3 / statistics.median(times) / 1e9
    except ImportError:
        pass
    return result


def timed(runner, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = runner.step()
        out.append(time.perf_counter() - start)
        if not np.isfinite(loss):
            raise SystemExit(f"bench_train: loss {loss} is not finite")
    return out


def bench_shape(shape: str, args, workdir: Path, matmul: dict) -> dict:
    """`--baseline torch` or none: the runners in this process, in alternating rounds of timed steps."""
    runners = {"cptjax": CptjaxRunner(shape, workdir)}
    if args.baseline == "torch":
        runners["torch"] = TorchRunner(shape)
    for runner in runners.values():
        timed(runner, args.warmup)
    times = {name: [] for name in runners}
    for _ in range(args.rounds):  # alternate, so a change of load on a shared machine hits both
        for name, runner in runners.items():
            times[name] += timed(runner, args.steps)
    result = {**shape_facts(shape), "compile_s": runners["cptjax"].compile_s}
    for name, samples in times.items():
        result[name] = step_rates(statistics.median(samples), result, matmul) | {"step_s_all": samples}
    if "torch" in result:
        result["speedup_over_torch"] = result["torch"]["step_s_median"] / result["cptjax"]["step_s_median"]
        # The most any step can gain over PyTorch here: model FLOPs at the full measured matmul rate.
        result["speedup_ceiling"] = 1 / result["torch"]["mfu_vs_xla_matmul"]
    return result


def shape_facts(shape: str) -> dict:
    _, rows, length = SHAPES[shape]
    cfg = ModelConfig.from_hf_config(hf_config(shape))
    return {"rows": rows, "length": length, "layers": cfg.num_layers, "parameters": _param_count(cfg),
            "model_flops_per_step": training_flops_per_token(cfg, length) * rows * length}


def step_rates(step_s: float, facts: dict, matmul: dict) -> dict:
    """A step time with its tokens/s, model GFLOP/s and MFU against the measured XLA matmul rate."""
    tokens_per_step, flops = facts["rows"] * facts["length"], facts["model_flops_per_step"]
    gflops = flops / step_s / 1e9
    return {"step_s_median": step_s, "tokens_per_s": tokens_per_step / step_s, "model_gflops_per_s": gflops,
            "mfu_vs_xla_matmul": gflops / matmul["xla_gflops"]}


# --- a peer in its own process and environment: EasyDeL ---------------------------------------------------
#
# EasyDeL pins its own jax (0.9 through ejkernel), flax and transformers, so it runs in a virtual
# environment of its own, which `easydel_python` creates; scripts/easydel_step.py builds and times its
# trainer's step there. Each process builds, compiles, warms up and times one step function and prints
# its times; the processes alternate (cptjax, EasyDeL, cptjax, ...), so a change of load on a shared
# machine hits both, and the spread between processes of the same program is measured, not assumed.

# EasyDeL 0.3.0 and the versions its pins resolved to when this was written (ejkernel 0.0.78 pins jax ~= 0.9.0).
# Importing its Llama imports PIL and, through transformers' GLM-4V-MoE classes, torch: a CPU build, installed
# first (the CPU wheel of the version the test extra installs), so that pip takes no CUDA build.
EASYDEL_TORCH = ("torch==2.13.0",)
EASYDEL_REQUIREMENTS = ("easydel==0.3.0", "jax==0.9.2", "jaxlib==0.9.2", "flax==0.12.3", "transformers==5.5.4",
                        "pillow==13.0.0")
EASYDEL_WORKER = REPO / "scripts" / "easydel_step.py"


def easydel_python(venv: Path) -> Path:
    """The python of a virtual environment at `venv` holding EASYDEL_REQUIREMENTS: created with `python -m
    venv` and installed with pip when missing (a marker file names what was installed)."""
    python, marker = venv / "bin" / "python", venv / "cptjax-bench-requirements.txt"
    wanted = "\n".join(EASYDEL_TORCH + EASYDEL_REQUIREMENTS) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"bench_train: installing {' '.join(EASYDEL_REQUIREMENTS)} into {venv} (minutes, once)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for requirements in (EASYDEL_TORCH, EASYDEL_REQUIREMENTS):  # torch first, so pip takes no CUDA build
        subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
    marker.write_text(wanted)
    return python


def worker_spec(shape: str, warmup: int, steps: int) -> dict:
    """All a step worker in another process needs: the HF config.json, the batch's tokens [B, L + 1], the
    optimizer and learning rate, and how many steps to warm up and to time."""
    _, rows, length = SHAPES[shape]
    return {"shape": shape, "hf_config": hf_config(shape), "rows": rows, "length": length,
            "tokens": tokens(rows, length).tolist(), "learning_rate": LR, "optimizer": OPTIMIZER,
            "warmup": warmup, "steps": steps}


def run_worker(command: list[str], spec: dict, env: dict | None = None) -> dict:
    """Runs a step worker with `spec` on its stdin; its result line, with the process's wall time."""
    load_before, start = os.getloadavg()[0], time.perf_counter()
    done = subprocess.run(command, input=json.dumps(spec), capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode or not lines:
        raise SystemExit(f"bench_train: {' '.join(command)} failed (exit {done.returncode}):\n"
                         f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {**json.loads(lines[-1][len(RESULT_PREFIX):]), "process_wall_s": wall,
            "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0]}


def cptjax_worker() -> None:
    """`--worker`: times the cptjax step of the spec on stdin in this process and prints its line."""
    spec = json.loads(sys.stdin.read())
    assert spec["hf_config"] == hf_config(spec["shape"]), "the spec's config is this script's own"
    with tempfile.TemporaryDirectory() as tmp:
        runner = CptjaxRunner(spec["shape"], Path(tmp))
        timed(runner, spec["warmup"])
        samples, usage = timed_with_usage(runner.step, spec["steps"])
        print(worker_result(samples, usage, runner.compile_s, runner.step()), flush=True)


def bench_shape_processes(shape: str, args, matmul: dict) -> dict:
    """`--baseline easydel` or `--cptjax-env`: `args.pairs` pairs of processes, cptjax then the other
    runner (EasyDeL, or cptjax with the variables), each timing `args.steps` steps after `args.warmup`;
    each process's median, and their medians and spreads."""
    spec = worker_spec(shape, args.warmup, args.steps)
    cptjax = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    commands = {"cptjax": (cptjax, None)}
    if args.baseline == "easydel":
        peer_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of cptjax's environment
        commands["easydel"] = ([str(easydel_python(Path(args.venv))), str(EASYDEL_WORKER)], peer_env)
    else:
        commands["cptjax_env"] = (cptjax, {**os.environ, **parse_env(args.cptjax_env)})
    processes = {name: [] for name in commands}
    for pair in range(args.pairs):
        for name, (command, env) in commands.items():
            processes[name].append(run_worker(command, spec, env))
            p = processes[name][-1]
            print(f"{shape} pair {pair + 1}/{args.pairs} {name}: median {statistics.median(p['step_s']) * 1e3:.0f} ms "
                  f"(compile {p['compile_s']:.1f} s, process {p['process_wall_s']:.0f} s)", flush=True)
    return {**shape_facts(shape), **summarize_processes(processes, shape_facts(shape), matmul)}


def parse_env(text: str) -> dict[str, str]:
    """`--cptjax-env "K=V K2=V2"` -> {"K": "V", "K2": "V2"}."""
    pairs = [item.partition("=") for item in text.split()]
    if any(not key or not sep for key, sep, _ in pairs):
        raise SystemExit(f"bench_train: --cptjax-env {text!r}: give space-separated NAME=VALUE pairs")
    return {key: value for key, _, value in pairs}


def summarize_processes(processes: dict[str, list[dict]], facts: dict, matmul: dict) -> dict:
    """Per runner: each process's median step, the median of those, and their spread (slowest / fastest
    - 1), with each process's CPU seconds per step (user + kernel), the cores it kept busy while timed
    (CPU seconds / wall seconds) and its involuntary context switches per step (a core taken by another
    process); for the second runner, the ratio of the runners' medians and each pair's ratio (its step /
    cptjax's: above 1, cptjax's step is faster)."""
    result = {}
    for name, runs in processes.items():
        medians = [statistics.median(run["step_s"]) for run in runs]
        cpu = [run["usage"]["user_s"] + run["usage"]["system_s"] for run in runs]
        result[name] = step_rates(statistics.median(medians), facts, matmul) | {
            "process_medians_s": medians, "process_spread": max(medians) / min(medians) - 1,
            "process_cpu_s_per_step": [c / len(run["step_s"]) for c, run in zip(cpu, runs)],
            "process_cores_busy": [c / sum(run["step_s"]) for c, run in zip(cpu, runs)],
            "process_involuntary_switches_per_step": [run["usage"]["involuntary_switches"] / len(run["step_s"])
                                                      for run in runs],
            "processes": runs}
    first, other = list(processes)[:2]
    result[f"speedup_over_{other}"] = result[other]["step_s_median"] / result[first]["step_s_median"]
    result["pair_ratios"] = [o / f for f, o in zip(result[first]["process_medians_s"],
                                                   result[other]["process_medians_s"])]
    return result


def _param_count(cfg: ModelConfig) -> int:
    from cptjax.model.transformer import abstract_model, param_count
    return param_count(abstract_model(cfg))


def depth_check(workdir: Path) -> dict:
    """Compile time of the 32m shape's step at 2 and at 32 layers."""
    out = {}
    for layers in (2, 32):
        setup, state, batch, _ = cptjax_setup("32m", workdir, layers)
        start = time.perf_counter()
        setup.step_fn.lower(state, batch).compile()
        out[f"compile_s_{layers}_layers"] = time.perf_counter() - start
    out["ratio_32_over_2"] = out["compile_s_32_layers"] / out["compile_s_2_layers"]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", choices=["torch", "easydel", "none"], default="none")
    parser.add_argument("--shapes", default="7m,32m", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per runner after compiling")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per runner per round (per process with "
                                                             "--baseline easydel)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of timed steps")
    parser.add_argument("--pairs", type=int, default=5, help="--baseline easydel: pairs of processes per shape")
    parser.add_argument("--venv", default=str(Path(tempfile.gettempdir()) / "cptjax-easydel-venv"),
                        help="--baseline easydel: EasyDeL's virtual environment (created if missing)")
    parser.add_argument("--cptjax-env", default="", metavar="'NAME=VALUE ...'",
                        help="time cptjax's step in processes with these environment variables, paired with plain "
                             "ones (an allocator: 'LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2')")
    parser.add_argument("--depth", action="store_true", help="also compile at 2 and 32 layers")
    parser.add_argument("--out", help="JSON record (default: a new docs/benchmarks/train_<kind>_<date>.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one process of --baseline easydel
    args = parser.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: {', '.join(unknown)} unknown; choose among {', '.join(SHAPES)}")
    if args.baseline == "easydel" and args.depth:
        parser.error("--depth compiles in this process; run it without --baseline easydel")
    if args.cptjax_env and (args.baseline != "none" or args.depth):
        parser.error("--cptjax-env pairs cptjax's processes with and without the variables: give it without "
                     "--baseline and --depth")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        return cptjax_worker()
    easydel, processes = args.baseline == "easydel", args.baseline == "easydel" or bool(args.cptjax_env)
    record = bench_record.begin("train_easydel" if easydel else "train_processes" if processes else "train_cpu",
                                () if processes else ("torch", "transformers"))
    results = {"settings": {"warmup": args.warmup, "steps": args.steps,
                            **({"pairs": args.pairs, "cptjax_env": parse_env(args.cptjax_env)} if processes
                               else {"rounds": args.rounds})},
               "precision": "float32 parameters and compute, both",
               "mfu_formula": "model FLOPs per step / step time / measured XLA float32 matmul rate; model "
                              "FLOPs per token = 6 x matmul params + 12 x layers x heads x head_dim x seq_len"}
    results["matmul"] = matmul_rates()
    if processes:
        if easydel:
            results["easydel_software"] = peer_versions(easydel_python(Path(args.venv)))
        results["shapes"] = {shape: bench_shape_processes(shape, args, results["matmul"])
                             for shape in args.shapes.split(",")}
        report_processes(results)
        bench_record.finish(record, results, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results["shapes"] = {shape: bench_shape(shape, args, Path(tmp), results["matmul"])
                             for shape in args.shapes.split(",")}
        if args.depth:
            results["depth"] = depth_check(Path(tmp))
    report(results)
    bench_record.finish(record, results, args.out)


def peer_versions(python: Path) -> dict:
    """The versions of the packages that make EasyDeL's step, in its environment."""
    code = ("import importlib.metadata as m, json, platform; print(json.dumps({'python': platform.python_version(), "
            "**{p: m.version(p) for p in ('easydel', 'eformer', 'ejkernel', 'jax', 'jaxlib', 'flax', 'optax', "
            "'transformers', 'numpy')}}))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


def report_processes(results: dict) -> None:
    mm = results["matmul"]
    print(f"measured float32 matmul (2048^3, cptjax's jax): XLA {mm['xla_gflops']:.0f} GFLOP/s")
    print(f"{'shape':<8}{'batch':>10}{'runner':>11}{'step ms':>9}{'MFU':>6}{'spread':>8}{'CPU s':>7}{'cores':>6}"
          f"{'ratio':>7}  pairs")
    for shape, r in results["shapes"].items():
        names = [name for name in ("cptjax", "easydel", "cptjax_env") if name in r]
        for name in names:
            s = r[name]
            ratio, pairs = "", ""
            if name != "cptjax":
                ratio = f"{r[f'speedup_over_{name}']:.2f}x"
                pairs = f"{min(r['pair_ratios']):.2f}-{max(r['pair_ratios']):.2f}x"
            print(f"{shape:<8}{r['rows']:>5} x{r['length']:>4}{name:>11}{s['step_s_median'] * 1e3:>9.0f}"
                  f"{s['mfu_vs_xla_matmul']:>6.0%}{s['process_spread']:>8.0%}"
                  f"{statistics.median(s['process_cpu_s_per_step']):>7.2f}"
                  f"{statistics.median(s['process_cores_busy']):>6.2f}{ratio:>7}  {pairs}")
    print("step: the median of the processes' median steps; spread: slowest process's median / fastest's - 1; "
          "CPU s: CPU seconds per step (user + kernel), cores: CPU seconds / wall seconds while timed (medians over "
          "processes); ratio: the other runner's step / cptjax's, and the range of each pair's")


def report(results: dict) -> None:
    mm = results["matmul"]
    print(f"measured float32 matmul (2048^3): XLA {mm['xla_gflops']:.0f} GFLOP/s"
          + (f", PyTorch {mm['torch_gflops']:.0f} GFLOP/s" if "torch_gflops" in mm else ""))
    print(f"{'shape':<6}{'params':>8}{'batch':>10}{'runner':>8}{'step ms':>9}{'tokens/s':>10}{'GFLOP/s':>9}"
          f"{'MFU':>6}{'vs torch':>9}")
    for shape, r in results["shapes"].items():
        for name in ("cptjax", "torch"):
            if name not in r:
                continue
            s = r[name]
            ratio = f"{r['speedup_over_torch']:.2f}x" if name == "cptjax" and "speedup_over_torch" in r else ""
            if name == "torch" and "speedup_ceiling" in r:
                ratio = f"<={r['speedup_ceiling']:.2f}x"
            print(f"{shape:<6}{r['parameters'] / 1e6:>7.1f}M{r['rows']:>5} x{r['length']:>4}{name:>8}"
                  f"{s['step_s_median'] * 1e3:>9.1f}{s['tokens_per_s']:>10,.0f}{s['model_gflops_per_s']:>9.1f}"
                  f"{s['mfu_vs_xla_matmul']:>6.0%}{ratio:>9}")
    if "depth" in results:
        d = results["depth"]
        print(f"compile time, 32m shape: {d['compile_s_2_layers']:.1f} s at 2 layers, {d['compile_s_32_layers']:.1f} s "
              f"at 32 layers ({d['ratio_32_over_2']:.2f}x)")
    print(f"MFU = {results['mfu_formula']}")
    if any("speedup_ceiling" in r for r in results["shapes"].values()):
        print("<=: the largest ratio over PyTorch this machine allows (1 / PyTorch's MFU: model FLOPs at "
              "the full measured matmul rate)")


if __name__ == "__main__":
    main()
