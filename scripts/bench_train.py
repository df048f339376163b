"""Training-step throughput on this machine's CPU, beside transformers + PyTorch eager.

    python scripts/bench_train.py --baseline torch [--shapes 7m,32m] [--out FILE]

For each shape, the step `cptjax train` runs (train_step.build_setup: the trainer's own jitted,
donated step; AdamW with global-norm clipping) and, with `--baseline torch`, transformers'
LlamaForCausalLM built from the same config.json with torch.optim.AdamW (same betas, eps, weight
decay, clipping) in eager mode: the same shape, batch and rows of random tokens, float32 on the CPU
for both (cptjax: param and compute dtype float32). Steps are timed in alternating rounds (cptjax,
then PyTorch) after warm-up steps, so a load change on a shared machine hits both; medians are
reported, with their ratio.

MFU = model FLOPs per step / step time / the measured matmul rate, where model FLOPs per token are
PaLM's (cptjax.train.metrics.training_flops_per_token): 6 x matmul parameters (embedding lookup excluded,
output head included) + 12 x layers x heads x head_dim x seq_len (attention). The matmul rate is
measured here: the median of XLA float32 2048 x 2048 x 2048 matmuls (PyTorch's is printed beside
it). Beside PyTorch's step the script prints the largest ratio the machine allows, 1 / PyTorch's
MFU: cptjax's step at the full matmul rate. It depends on the CPU: where XLA's matmul is twice
PyTorch's (AVX-512 at full width, Zen 5) there is room above PyTorch; where both reach the same
rate (Zen 4) PyTorch eager's large matmuls already run near it. `--depth` also compiles the step at
2 and 32 layers of the 32m shape: compile time should not grow with depth (the layers run under scan).
Writes the raw record (scripts/bench_record.py: command, commit, CPU family and model, load average) to
docs/benchmarks/train_cpu_<date>.json, or --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_record
import jax
import jax.numpy as jnp
import numpy as np

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
}
VOCAB = 8192
OPTIMIZER = {"b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "grad_clip_norm": 1.0}
LR = 1e-4


def hf_config(shape: str, layers: int | None = None) -> dict:
    sizes = dict(SHAPES[shape][0])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
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
        hf = {k: v for k, v in hf_config(shape).items() if k not in ("architectures", "model_type")}
        config = transformers.LlamaConfig(**hf, attn_implementation="sdpa")
        self.torch, self.model = torch, transformers.LlamaForCausalLM(config).float().train()
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
    _, rows, length = SHAPES[shape]
    runners = {"cptjax": CptjaxRunner(shape, workdir)}
    if args.baseline == "torch":
        runners["torch"] = TorchRunner(shape)
    for runner in runners.values():
        timed(runner, args.warmup)
    times = {name: [] for name in runners}
    for _ in range(args.rounds):  # alternate, so a change of load on a shared machine hits both
        for name, runner in runners.items():
            times[name] += timed(runner, args.steps)
    cfg = runners["cptjax"].cfg
    flops = training_flops_per_token(cfg, length) * rows * length
    result = {"rows": rows, "length": length, "layers": cfg.num_layers,
              "parameters": _param_count(cfg), "model_flops_per_step": flops,
              "compile_s": runners["cptjax"].compile_s}
    for name, samples in times.items():
        median = statistics.median(samples)
        result[name] = {"step_s_median": median, "step_s_all": samples, "tokens_per_s": rows * length / median,
                        "model_gflops_per_s": flops / median / 1e9,
                        "mfu_vs_xla_matmul": flops / median / 1e9 / matmul["xla_gflops"]}
    if "torch" in result:
        result["speedup_over_torch"] = result["torch"]["step_s_median"] / result["cptjax"]["step_s_median"]
        # The most any step can gain over PyTorch here: model FLOPs at the full measured matmul rate.
        result["speedup_ceiling"] = 1 / result["torch"]["mfu_vs_xla_matmul"]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", choices=["torch", "none"], default="none")
    parser.add_argument("--shapes", default="7m,32m", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per runner after compiling")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per runner per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of timed steps")
    parser.add_argument("--depth", action="store_true", help="also compile at 2 and 32 layers")
    parser.add_argument("--out", help="JSON record (default: a new docs/benchmarks/train_cpu_<date>.json)")
    args = parser.parse_args()
    record = bench_record.begin("train_cpu", ("torch", "transformers"))
    results = {"settings": {"warmup": args.warmup, "steps": args.steps, "rounds": args.rounds},
               "precision": "float32 parameters and compute, both",
               "mfu_formula": "model FLOPs per step / step time / measured XLA float32 matmul rate; model "
                              "FLOPs per token = 6 x matmul params + 12 x layers x heads x head_dim x seq_len"}
    results["matmul"] = matmul_rates()
    with tempfile.TemporaryDirectory() as tmp:
        results["shapes"] = {shape: bench_shape(shape, args, Path(tmp), results["matmul"])
                             for shape in args.shapes.split(",")}
        if args.depth:
            results["depth"] = depth_check(Path(tmp))
    report(results)
    bench_record.finish(record, results, args.out)


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
