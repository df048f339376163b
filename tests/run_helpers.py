"""Running `cptjax` as users do (a subprocess of the real CLI) and reading what a run wrote."""

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ENV = dict(os.environ, JAX_PLATFORMS="cpu")
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/NAME.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli(*args, cwd=None, check=True, env=None) -> str:
    """Runs `cptjax ARGS`; returns stdout + stderr (asserting exit 0 unless check is False).
    `env`: variables added to the environment (XLA_FLAGS for simulated devices)."""
    result = subprocess.run([sys.executable, "-m", "cptjax.cli", *map(str, args)], capture_output=True,
                            text=True, cwd=cwd, env={**ENV, **(env or {})}, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def start(*args, env=None) -> subprocess.Popen:
    """`cptjax ARGS` in the background, stderr line-buffered for watching."""
    return subprocess.Popen([sys.executable, "-u", "-m", "cptjax.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**ENV, **(env or {})})


class Watcher:
    """Collects a process's output lines as they come, to act when one appears."""

    def __init__(self, process):
        self.process, self.lines = process, []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 300) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in line for line in self.lines):
                return True
            if self.process.poll() is not None:
                return any(text in line for line in self.lines)
            time.sleep(0.01)
        return False

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        code = self.process.wait(timeout=timeout)
        self._thread.join(timeout=10)
        return code, "".join(self.lines)


def records(run_dir, kind: str) -> list[dict]:
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def steps(checkpoints) -> list[int]:
    """The step folders on disk (finished or not: a test asserts which)."""
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []


def restore_arrays(path) -> list[np.ndarray]:
    """Every array of one saved Orbax item, as NumPy, in a fixed order."""
    import warnings

    import jax
    import orbax.checkpoint as ocp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sharding info not provided when restoring")
        with ocp.PyTreeCheckpointer() as checkpointer:
            # As NumPy arrays: a step saved on several (simulated) devices restores in this process too.
            metadata = checkpointer.metadata(path)
            metadata = getattr(metadata, "item_metadata", metadata)
            metadata = getattr(metadata, "tree", metadata)
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
            tree = checkpointer.restore(path, restore_args=as_numpy)
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def flip_largest_file_bytes(folder):
    """Inverts 64 bytes in the middle of the largest file under `folder`, keeping its size (bit rot,
    a bad copy)."""
    largest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    largest.write_bytes(bytes(data))


def truncate_largest_file(folder):
    """Cuts the largest file under `folder` to a third (what a disk fault or a bad copy leaves)."""
    largest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 3])
