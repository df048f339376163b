"""Benchmarks `cptjax convert` on a random Llama-3.2-1B-shaped bf16 checkpoint: time and peak memory.

    python scripts/bench_convert.py --workdir /tmp/bench-convert --keep
    python scripts/bench_convert.py --workdir /tmp/bench-convert --keep --sharded-load 8

Runs, each in a fresh process: (a) `cptjax convert hf-to-orbax`, (b) `cptjax convert orbax-to-hf`
(bf16, 5GB shards), and a baseline that reads every tensor with the `safetensors` package and writes
the same bytes back out. Targets: peak RSS of (a) and (b) at most 1.3x the checkpoint size, and each
conversion at most 3x the baseline's time. Prints a table and writes the raw record (scripts/bench_record.py:
command, commit, machine, load average) to docs/benchmarks/convert_<date>.json, or --out. The source
checkpoint is ~2.5 GB and the run writes three more of that size; expect a few minutes on a small machine.

`--sharded-load N` measures multi-host loading instead: N processes (jax.distributed on this CPU, one
device each) load the source onto one fsdp mesh as `cptjax train` loads model.init_from, and each
reports the checkpoint bytes it read; together they should read the checkpoint about once
(docs/benchmarks/convert_sharded_load_<date>.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_record
import ml_dtypes
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "tests/fixtures/hf_configs/llama-3.2-1b.json"
TARGET_RSS_RATIO = 1.3  # peak RSS / checkpoint bytes
TARGET_TIME_RATIO = 3.0  # conversion time / baseline time
SOURCE_MARKER = "bench_source.json"  # written last: a source folder without it is incomplete
_CHUNK = 1 << 24  # values generated per draw; bounds the float32 scratch at 64 MiB


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- the random source checkpoint ------------------------------------------------------------------

def random_param(shape: tuple[int, ...], seed: int, index: int) -> np.ndarray:
    """A bf16 array of N(0, 0.02) values, drawn in float32 chunks so no full-size float32 copy exists.

    Normal draws, not random bits: real weights' bytes compress only a little, and so do these,
    which matters if Orbax compresses what it writes.
    """
    rng = np.random.default_rng([seed, index])
    out = np.empty(shape, ml_dtypes.bfloat16)
    flat = out.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        draw = rng.standard_normal(min(_CHUNK, flat.size - start), dtype=np.float32)
        draw *= 0.02
        flat[start:start + draw.size] = draw  # the assignment rounds float32 to bf16
    return out


def make_source(hf_dir: Path, config_path: Path, shard_size: str, seed: int) -> None:
    """Writes a random bf16 HF folder through `write_hf_dir`, generating one stacked parameter at a time."""
    from cptjax.core.dtypes import DTYPES
    from cptjax.hf.keymap import key_map
    from cptjax.hf.write import write_hf_dir
    from cptjax.model.config import ModelConfig

    hf_config = json.loads(config_path.read_text())
    cfg = ModelConfig.from_hf_config(hf_config, str(config_path))
    mappings: dict[tuple[str, ...], list] = {}
    for m in key_map(cfg):
        mappings.setdefault(m.path, []).append(m)
    stacked = {path: ((len(group),) if group[0].layer is not None else ()) + group[0].shape
               for path, group in mappings.items()}
    order = list(stacked)

    def get_param(path: tuple[str, ...]) -> np.ndarray:
        return random_param(stacked[path], seed, order.index(path))

    partial = hf_dir.with_name(hf_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    start = time.perf_counter()
    files = write_hf_dir(partial, cfg, get_param, dtype=DTYPES["bfloat16"], max_shard_size=shard_size,
                         progress=_log_each("generating"))
    (partial / SOURCE_MARKER).write_text(json.dumps(_source_key(config_path, shard_size, seed), indent=2))
    partial.rename(hf_dir)
    log(f"generated {len(files)} files in {time.perf_counter() - start:.1f}s")


def _source_key(config_path: Path, shard_size: str, seed: int) -> dict:
    return {"config": json.loads(config_path.read_text()), "max_shard_size": shard_size, "seed": seed}


def _log_each(description: str):
    def wrap(items):
        items = list(items)
        for i, item in enumerate(items):
            log(f"{description}: file {i + 1}/{len(items)}")
            yield item
    return wrap


def estimated_bytes(config_path: Path) -> int:
    from cptjax.hf.keymap import key_map
    from cptjax.model.config import ModelConfig

    cfg = ModelConfig.from_hf_config(json.loads(config_path.read_text()), str(config_path))
    return sum(math.prod(m.shape) * 2 for m in key_map(cfg))


# --- the baseline: the safetensors package reading and writing the same bytes -------------------------

def plain_copy(src: Path, dst: Path) -> None:
    """Reads each .safetensors file of `src` with safetensors.numpy and writes it to `dst`.

    Recent safetensors releases (0.8.0 checked) read and write bf16 as ml_dtypes.bfloat16 NumPy
    arrays, so this is the package's plain NumPy path with no framework conversion in between:
    load_file (every tensor of one file into NumPy) then save_file, one file at a time.
    """
    from safetensors.numpy import load_file, save_file

    dst.mkdir(parents=True)
    for path in sorted(src.glob("*.safetensors")):
        save_file(load_file(path), dst / path.name, metadata={"format": "pt"})
    for path in src.glob("*.json"):
        shutil.copy2(path, dst / path.name)


# --- measuring one step in its own process ---------------------------------------------------------

def drop_page_cache() -> bool:
    """Flushes dirty pages and drops the page cache; False where the kernel does not let us."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_through(folder: Path) -> None:
    """Reads every file once, so a step starts with its input in the page cache (when dropping fails)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


# Runs argv[2:] as a child of this small process and writes its wall time, peak RSS and exit code to
# argv[1]. See `measure` for why a child's ru_maxrss needs this middleman.
_LAUNCHER = """\
import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    f.write(f"{wall} {usage.ru_maxrss} {usage.ru_utime} {usage.ru_stime} {os.waitstatus_to_exitcode(status)}")
"""


def measure(name: str, cmd: list[str], input_dir: Path, output_dir: Path | None, cold: bool) -> dict:
    """Runs `cmd` in a fresh process and returns its wall time, the sync after it, and its peak RSS.

    Peak RSS is the kernel's high-water mark of that one process (ru_maxrss from os.wait4, KiB on
    Linux): exact, where polling with psutil could miss a short spike. But Linux carries the old
    address space's high-water mark across exec, and Popen's vfork/fork child starts as this process,
    so a direct child would report at least this process's own peak (this process generates the
    source). Hence the launcher: `python -S` forks from a ~5 MB image and waits on the real command,
    whose ru_maxrss is then its own plus at most those few MB (checked: /usr/bin/true reads 5 MB).
    RUSAGE_CHILDREN would have the same problem and also keeps the largest child seen so far.
    """
    if cold:
        drop_page_cache()
    else:
        read_through(input_dir)
    log(f"{name}: {shlex.join(cmd)}")
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as report:
        code = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, report.name, *cmd]).returncode
        fields = report.read().split()
    if code != 0 or len(fields) != 5 or fields[4] != "0":
        raise SystemExit(f"bench_convert: {name} failed (exit code {fields[4] if fields else code}): "
                         f"{shlex.join(cmd)}")
    wall, maxrss_kib, user, system = float(fields[0]), int(fields[1]), float(fields[2]), float(fields[3])
    start = time.perf_counter()
    os.sync()  # the step's writes reach the disk; some writers fsync themselves, some do not
    sync = time.perf_counter() - start
    result = {"command": shlex.join(cmd), "wall_s": wall, "sync_s": sync, "total_s": wall + sync,
              "peak_rss_bytes": maxrss_kib * 1024, "user_s": user, "sys_s": system,
              "output_bytes": dir_bytes(output_dir) if output_dir else 0}
    log(f"{name}: {wall:.1f}s (+{sync:.1f}s sync), peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB")
    return result


def dir_bytes(folder: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in folder.rglob(f"*{suffix}") if p.is_file())


def check_same_tensors(source: Path, export: Path) -> None:
    """The export must hold every source tensor with identical bytes (bf16 in, bf16 out)."""
    from cptjax.hf.read import find_weight_files

    theirs = {name: f for f in find_weight_files(export).values() for name in f.tensors}
    for file in find_weight_files(source).values():
        for name in file.tensors:
            if name not in theirs:
                raise SystemExit(f"bench_convert: {name} is missing from the export {export}")
            a, b = file.read(name), theirs[name].read(name)
            if a.shape != b.shape or not np.array_equal(a.view(np.uint16), b.view(np.uint16)):
                raise SystemExit(f"bench_convert: {name} differs between {source} and {export}")


# --- sharded load: several processes load one HF folder onto one mesh, as a multi-host run does ----

def load_worker(hf_dir: str, process_id: int, processes: int, port: int, out: str) -> None:
    """One process of `--sharded-load`: joins the others (jax.distributed on this CPU, one device
    each), loads the HF folder onto an fsdp mesh over every process's devices the way `cptjax train`
    does for model.init_from (Weights.read_onto), and writes what it read and how long it took."""
    import jax
    import jax.numpy as jnp

    jax.distributed.initialize(f"127.0.0.1:{port}", processes, process_id)
    from flax import nnx

    from cptjax.hf import safetensors
    from cptjax.io.weights import open_weights
    from cptjax.model.sharding import DEFAULT_RULES, MeshConfig, make_mesh, param_shardings
    from cptjax.model.transformer import abstract_model

    with open_weights(Path(hf_dir)) as weights:
        mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
        abstract = abstract_model(weights.config, param_dtype=jnp.float32)
        abstract_params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                       nnx.to_pure_dict(nnx.state(abstract, nnx.Param)),
                                       param_shardings(abstract, mesh, DEFAULT_RULES))
        counted = getattr(safetensors, "bytes_read", None)  # cptjax's own count of checkpoint bytes
        counted_before = counted() if counted else None
        io_before = psutil.Process().io_counters()
        start = time.perf_counter()
        params = weights.read_onto(abstract_params)
        jax.block_until_ready(params)
        seconds = time.perf_counter() - start
        io_after = psutil.Process().io_counters()
    Path(out).write_text(json.dumps({
        "process": process_id, "seconds": seconds,
        "checkpoint_bytes_read": None if counted is None else counted() - counted_before,
        "read_chars": io_after.read_chars - io_before.read_chars,  # every read syscall, sockets included
        "disk_read_bytes": io_after.read_bytes - io_before.read_bytes,
        "rss_at_end_bytes": psutil.Process().memory_info().rss}))


def sharded_load(args) -> dict:
    """`--sharded-load N`: N processes load the same random source onto one mesh; bytes per process."""
    config_path = Path(args.config).resolve()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-")).resolve()
    hf_dir = workdir / "hf-random"
    if not ((hf_dir / SOURCE_MARKER).is_file() and json.loads((hf_dir / SOURCE_MARKER).read_text())
            == _source_key(config_path, args.max_shard_size, args.seed)):
        shutil.rmtree(hf_dir, ignore_errors=True)
        make_source(hf_dir, config_path, args.max_shard_size, args.seed)
    ckpt_bytes = dir_bytes(hf_dir, ".safetensors")
    cold = drop_page_cache()
    if not cold:
        read_through(hf_dir)
    processes = args.sharded_load
    port = _free_port()
    with tempfile.TemporaryDirectory() as reports:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
        start = time.perf_counter()
        # Each worker runs under the small launcher `measure` uses, for its own peak RSS (see `measure`).
        workers = [subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, f"{reports}/{i}.usage", sys.executable,
                                     str(Path(__file__).resolve()), "--load-worker", str(hf_dir), str(i),
                                     str(processes), str(port), f"{reports}/{i}.json"], env=env)
                   for i in range(processes)]
        codes = [w.wait() for w in workers]
        wall = time.perf_counter() - start
        if any(codes):
            raise SystemExit(f"bench_convert: a load worker's launcher failed (exit codes {codes})")
        usage = [Path(f"{reports}/{i}.usage").read_text().split() for i in range(processes)]
        if any(u[4] != "0" for u in usage):
            raise SystemExit(f"bench_convert: a load worker failed (exit codes {[u[4] for u in usage]})")
        per_process = [dict(json.loads(Path(f"{reports}/{i}.json").read_text()), peak_rss_bytes=int(u[1]) * 1024)
                       for i, u in enumerate(usage)]
    counted = [p["checkpoint_bytes_read"] for p in per_process]
    return {
        "mode": f"sharded load: {processes} processes (jax.distributed on this CPU, one device each), "
                "mesh fsdp over all of them, Weights.read_onto as `cptjax train` loads model.init_from",
        "page_cache": "dropped before the run" if cold else "warm: the source read once before the run",
        "checkpoint_bytes": ckpt_bytes, "wall_s_all_processes": wall, "processes": per_process,
        "checkpoint_bytes_read_total": None if None in counted else sum(counted),
        "reads_of_the_checkpoint": None if None in counted else sum(counted) / ckpt_bytes,
        "read_chars_total_over_checkpoint": sum(p["read_chars"] for p in per_process) / ckpt_bytes,
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the run ---------------------------------------------------------------------------------------

def run(args) -> dict:
    config_path = Path(args.config).resolve()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-")).resolve()
    created_workdir = args.workdir is None or not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    hf_dir, ckpt, export, plain = (workdir / n for n in ("hf-random", "orbax", "hf-export", "plain-copy"))

    if (hf_dir / SOURCE_MARKER).is_file():
        if json.loads((hf_dir / SOURCE_MARKER).read_text()) != _source_key(config_path, args.max_shard_size,
                                                                           args.seed):
            raise SystemExit(f"bench_convert: {hf_dir} holds a source made with another config, shard size "
                             "or seed; remove it or choose another --workdir")
        reuse = True
    else:
        reuse = False
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
    for stale in (ckpt, export, plain):
        if stale.exists():
            shutil.rmtree(stale)

    expected = estimated_bytes(config_path)
    needed = expected * (3 if reuse else 4) * 1.1  # orbax, export and baseline copies (+ the source)
    free = shutil.disk_usage(workdir).free
    log(f"workdir {workdir}: {free / 1e9:.1f} GB free, this run needs about {needed / 1e9:.1f} GB")
    if free < needed:
        raise SystemExit(f"bench_convert: {workdir} has {free / 1e9:.1f} GB free; this run needs about "
                         f"{needed / 1e9:.1f} GB. Pass --workdir on a larger disk")

    try:
        if reuse:
            log(f"reusing the source checkpoint in {hf_dir}")
        else:
            log(f"generating a random bf16 checkpoint of {expected / 1e9:.2f} GB in {hf_dir}")
            make_source(hf_dir, config_path, args.max_shard_size, args.seed)
        ckpt_bytes = dir_bytes(hf_dir, ".safetensors")

        cold = drop_page_cache()
        log("page cache: " + ("dropped before each step (cold reads)" if cold else "cannot be dropped "
                              "here; each step's input is read once before it (warm reads)"))
        python = sys.executable
        steps = {
            "import_only": measure("import only", [python, "-c", "import cptjax.convert"], hf_dir, None,
                                   cold),
            "baseline_plain_safetensors": measure(
                "baseline", [python, str(Path(__file__).resolve()), "--plain-copy", str(hf_dir), str(plain)],
                hf_dir, plain, cold),
            "hf_to_orbax": measure(
                "hf-to-orbax", [python, "-m", "cptjax.cli", "convert", "hf-to-orbax", "--hf-dir", str(hf_dir),
                                "--out", str(ckpt)], hf_dir, ckpt, cold),
            "orbax_to_hf": measure(
                "orbax-to-hf", [python, "-m", "cptjax.cli", "convert", "orbax-to-hf", "--ckpt", str(ckpt),
                                "--out", str(export)], ckpt, export, cold),
        }
        log("checking that the export holds the source's bytes")
        check_same_tensors(hf_dir, export)
        check_same_tensors(hf_dir, plain)
    finally:
        if not args.keep:
            for folder in (hf_dir, hf_dir.with_name(hf_dir.name + ".partial"), ckpt, export, plain):
                shutil.rmtree(folder, ignore_errors=True)
            if created_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            log("removed the benchmark's files (pass --keep to keep them)")

    baseline = steps["baseline_plain_safetensors"]
    for name, step in steps.items():
        if name != "import_only":  # it moves no bytes; it is the fixed cost of starting Python and JAX
            step["throughput_bytes_per_s"] = ckpt_bytes / step["total_s"]
    targets = {}
    for name in ("hf_to_orbax", "orbax_to_hf"):
        step = steps[name]
        step["rss_over_checkpoint"] = step["peak_rss_bytes"] / ckpt_bytes
        step["time_over_baseline"] = step["total_s"] / baseline["total_s"]
        targets[name] = {"rss_met": step["rss_over_checkpoint"] <= TARGET_RSS_RATIO,
                         "time_met": step["time_over_baseline"] <= TARGET_TIME_RATIO}
    return {
        "page_cache": "dropped before each step" if cold else "warm: each step's input read once before it",
        "timing": "total_s = the step's wall time + os.sync() after it (its writes on disk)",
        "peak_rss": "ru_maxrss from os.wait4 on the step's process, forked from a ~5 MB launcher",
        "baseline": "safetensors.numpy load_file + save_file per file (bf16 as ml_dtypes arrays)",
        "source": {"config": str(config_path), "max_shard_size": args.max_shard_size, "seed": args.seed,
                   "checkpoint_bytes": ckpt_bytes, "reused": reuse, "workdir": str(workdir),
                   "kept": args.keep},
        "targets": {"rss_over_checkpoint_max": TARGET_RSS_RATIO, "time_over_baseline_max": TARGET_TIME_RATIO,
                    **targets},
        "steps": steps,
    }


def print_table(results: dict) -> None:
    size = results["source"]["checkpoint_bytes"]
    print(f"\ncheckpoint: {size:,} bytes ({size / 2**30:.2f} GiB) of .safetensors; page cache: "
          f"{results['page_cache']}")
    print(f"{'step':<28}{'wall s':>8}{'sync s':>8}{'total s':>9}{'MB/s':>8}{'peak RSS GiB':>14}"
          f"{'RSS/ckpt':>10}{'time/base':>11}{'output GB':>11}")
    for name, step in results["steps"].items():
        print(f"{name:<28}{_cell(step, 'wall_s', digits=1):>8}{_cell(step, 'sync_s', digits=1):>8}"
              f"{_cell(step, 'total_s', digits=1):>9}{_cell(step, 'throughput_bytes_per_s', 1e6, 0):>8}"
              f"{_cell(step, 'peak_rss_bytes', 2**30):>14}{_cell(step, 'rss_over_checkpoint'):>10}"
              f"{_cell(step, 'time_over_baseline'):>11}{_cell(step, 'output_bytes', 1e9):>11}")
    for name in ("hf_to_orbax", "orbax_to_hf"):
        met = results["targets"][name]
        print(f"{name}: RSS <= {TARGET_RSS_RATIO}x checkpoint {'met' if met['rss_met'] else 'NOT met'}, "
              f"time <= {TARGET_TIME_RATIO}x baseline {'met' if met['time_met'] else 'NOT met'}")


def print_sharded(results: dict) -> None:
    size = results["checkpoint_bytes"]
    print(f"\ncheckpoint: {size:,} bytes; {results['mode']}; page cache: {results['page_cache']}")
    print(f"{'process':>8}{'checkpoint bytes read':>24}{'share':>8}{'read_chars':>16}{'load s':>8}")
    for p in results["processes"]:
        counted = p["checkpoint_bytes_read"]
        print(f"{p['process']:>8}{'n/a' if counted is None else f'{counted:,}':>24}"
              f"{'' if counted is None else f'{counted / size:.3f}':>8}{p['read_chars']:>16,}{p['seconds']:>8.1f}")
    if results["reads_of_the_checkpoint"] is not None:
        print(f"all processes together read the checkpoint {results['reads_of_the_checkpoint']:.3f} times")
    print(f"read syscalls (sockets included) over the checkpoint: {results['read_chars_total_over_checkpoint']:.3f}; "
          f"wall time of the whole load: {results['wall_s_all_processes']:.1f} s")


def _cell(step: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
    return f"{step[key] / scale:.{digits}f}" if key in step else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="folder for the checkpoints (default: a new temp folder); a "
                        "source generated there with --keep is reused")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="HF config.json of the model shape")
    parser.add_argument("--max-shard-size", default="1GB", help="shard size of the generated source")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON record (default: a new docs/benchmarks/convert_<date>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    parser.add_argument("--sharded-load", type=int, metavar="N", help="instead: N processes load the "
                        "source onto one fsdp mesh; reports the bytes each reads (default --out "
                        "docs/benchmarks/convert_sharded_load_<date>.json)")
    parser.add_argument("--plain-copy", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    parser.add_argument("--load-worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_copy:
        plain_copy(Path(args.plain_copy[0]), Path(args.plain_copy[1]))
        return
    if args.load_worker:
        hf_dir, process_id, processes, port, out = args.load_worker
        load_worker(hf_dir, int(process_id), int(processes), int(port), out)
        return
    packages = ("orbax-checkpoint", "tensorstore", "safetensors", "ml_dtypes")
    if args.sharded_load:
        record = bench_record.begin("convert_sharded_load", packages)
        results = sharded_load(args)
        print_sharded(results)
    else:
        record = bench_record.begin("convert", packages)
        results = run(args)
        print_table(results)
    bench_record.finish(record, results, args.out)


if __name__ == "__main__":
    main()
