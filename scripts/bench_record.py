"""The one record format of the benchmark scripts: what ran, on which code, on which machine, under what load.

A benchmark's number is worth what is known about how it was made. Each `scripts/bench_*.py` calls
`begin(name)` before it measures and `finish(record, results)` after: the JSON it writes into
docs/benchmarks/<name>_<UTC date>.json (never over an existing file: `_2`, `_3`, ... are added) holds

  command        the command line, with the script's path relative to the repository
  git            the commit, and whether tracked files differed from it (`dirty`, with the files)
  machine        the CPU (vendor, family, model and name from /proc/cpuinfo; implementer and part on
                 ARM), its vector width, the cores this process may use, the memory
  software       Python's and the packages' versions
  load_average   os.getloadavg() before and after the measurement (1, 5 and 15 minutes), with the
                 core count. The load before is what else ran; the load after also counts the
                 benchmark's own threads, so only a load after well above the cores says more
  started_utc, finished_utc
  results        what the script measured

The docs cite these files; a number in README.md or docs/ that no file here holds is not written.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "docs" / "benchmarks"
PACKAGES = ("jax", "jaxlib", "flax", "orbax-checkpoint", "optax", "numpy")
IDLE_LOAD_PER_CORE = 0.25  # 1-minute load per core before the run under which the machine counts as idle


def begin(name: str, packages: tuple[str, ...] = ()) -> dict:
    """The record's context, taken before measuring: command, commit, machine, software, load before."""
    return {"benchmark": name, "command": command_line(), "git": git_state(), "machine": machine(),
            "software": software(PACKAGES + packages),
            "load_average": {"cores": usable_cores(), "before": list(os.getloadavg())},
            "started_utc": utc_now()}


def finish(record: dict, results: dict, out: str | Path | None = None) -> Path:
    """Adds the load after and `results` to `record`, writes it (default: a new file in docs/benchmarks/),
    prints the context's summary and returns the path written."""
    record = {**record, "load_average": {**record["load_average"], "after": list(os.getloadavg())},
              "finished_utc": utc_now(), "results": results}
    path = Path(out) if out else new_path(BENCH_DIR, record["benchmark"], record["started_utc"][:10])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x" if out is None else "w") as f:  # "x": a cited raw file is never overwritten
        f.write(json.dumps(record, indent=2) + "\n")
    print(summary(record))
    print(f"wrote {path}")
    return path


def new_path(folder: Path, name: str, date: str) -> Path:
    """folder/<name>_<date>.json, or the first of _2, _3, ... that does not exist yet."""
    path, n = folder / f"{name}_{date}.json", 2
    while path.exists():
        path, n = folder / f"{name}_{date}_{n}.json", n + 1
    return path


def summary(record: dict) -> str:
    """A small table of where and how the numbers were made, with a line on the load."""
    git, cpu, load = record["git"], record["machine"]["cpu"], record["load_average"]
    rows = [("command", record["command"]),
            ("commit", f"{git['commit']}" + (f" (dirty: {', '.join(git['dirty_files'])})" if git["dirty"] else
                                             " (clean)")),
            ("cpu", cpu_description(cpu)),
            ("cores, memory", f"{load['cores']}, {record['machine']['memory_bytes'] / 2**30:.1f} GiB"),
            ("load average", f"before {_loads(load['before'])}; after {_loads(load.get('after'))}"),
            ("started", record["started_utc"])]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines + [load_note(load)])


def load_note(load: dict) -> str:
    """Whether the machine was idle when the benchmark started, by the 1-minute load before it (the load
    after counts the benchmark's own threads too, so it cannot say)."""
    before, cores = load["before"][0], load["cores"]
    if before <= IDLE_LOAD_PER_CORE * cores:
        return f"the machine was idle when it started (1-minute load {before:.2f} on {cores} cores)"
    return (f"the machine was shared: 1-minute load {before:.2f} on {cores} cores before it started; other "
            "processes ran beside the benchmark, so its times are not an idle machine's")


def _loads(values: list[float] | None) -> str:
    return "n/a" if values is None else " / ".join(f"{v:.2f}" for v in values)


# --- the context ---------------------------------------------------------------------------------------

def command_line() -> str:
    """`python scripts/bench_x.py ARGS`, the script's path relative to the repository when it is inside."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_name = str(script.relative_to(REPO))
    except ValueError:
        script_name = sys.argv[0]
    return shlex.join(["python", script_name, *sys.argv[1:]])


def git_state() -> dict:
    """The commit checked out and the tracked files that differ from it (untracked files do not count:
    the benchmark's own output is one)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=True).stdout
    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "dirty_files": []}
    return {"commit": commit, "dirty": bool(changed), "dirty_files": changed}


def machine() -> dict:
    return {"cpu": cpu_info(), "cores_usable": usable_cores(), "cpu_count": os.cpu_count(),
            "memory_bytes": memory_bytes(), "platform": platform.platform()}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cpu_info(text: str | None = None) -> dict:
    """The first processor's identity from /proc/cpuinfo (or `text`): vendor, family, model and name on
    x86 ("AMD EPYC" alone names Zen 3, Zen 4 and Zen 5, whose matmul rates differ), implementer
    and part on ARM, and the widest vector extension. Without /proc/cpuinfo: what `platform` knows."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {"model_name": platform.processor() or platform.machine(), "architecture": platform.machine()}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    keys = {"vendor": "vendor_id", "family": "cpu family", "model": "model", "stepping": "stepping",
            "model_name": "model name", "implementer": "CPU implementer", "part": "CPU part",
            "variant": "CPU variant", "revision": "CPU revision"}
    info = {name: fields[key] for name, key in keys.items() if key in fields}
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    info["vector"] = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SVE" if "sve" in flags
                      else "NEON" if "asimd" in flags else "other")
    info["architecture"] = platform.machine()
    return info


def cpu_description(cpu: dict) -> str:
    """One line: the name, then family/model (x86) or implementer/part (ARM), then the vector width."""
    name = cpu.get("model_name") or cpu.get("vendor") or cpu.get("architecture", "unknown CPU")
    details = []
    if "family" in cpu:
        details.append(f"{cpu.get('vendor', '')} family {cpu['family']} model {cpu.get('model', '?')}".strip())
    if "implementer" in cpu:
        details.append(f"implementer {cpu['implementer']} part {cpu.get('part', '?')}")
    if cpu.get("vector") not in (None, "other"):
        details.append(cpu["vector"])
    return f"{name} ({', '.join(details)})" if details else name


def software(packages: tuple[str, ...]) -> dict:
    versions = {"python": platform.python_version()}
    for package in dict.fromkeys(packages):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
