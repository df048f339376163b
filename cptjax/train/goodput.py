"""Where a run's wall time goes: its goodput account, per run segment (one start of `cptjax train`).

A segment's wall time, from its process's start (or from `run()` when called in a process that
was already running), is split into:

  startup     imports, config checks, the data pipeline's first reads, the weights or checkpoint
              read, until the first step (compilation excepted)
  compile     JAX's tracing, lowering and XLA compilation (or the compile cache's load), wherever
              it happens: the first step, the first evaluation, a new stage's shape
  step        the train steps: dispatching each and waiting for its results
  data        waiting for the next batch
  eval        held-out evaluations, the retrieval probe and lm-eval tasks between steps
  checkpoint  the blocking part of saves (the async writes are not counted), and the final wait
  logging     building and writing the records (metrics.jsonl, TensorBoard, W&B, console)
  other       the rest of the wall time

`goodput` is step / wall. A segment that restarts from a checkpoint recomputes the steps the
previous one had trained past it: `recomputed_steps` and `lost_s` (those steps at the previous
segment's logged step time) are time the restart cost, on top of this segment's wall time.

Compile seconds come from JAX's monitoring events (compile_cache.compile_counts), which fire in
the thread that compiles; timings nest (a step's wait inside the logging of its record is step
time), and each part excludes what nested parts and compilation took.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

from cptjax.train.compile_cache import compile_counts

PARTS = ("startup", "compile", "step", "data", "eval", "checkpoint", "logging", "other")


def process_start_time() -> float | None:
    """When this process started (Unix time), from /proc; None where there is no /proc."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class Goodput:
    """One segment's account. `started`: the segment's start (Unix time); time before this object
    was made counts as startup."""

    def __init__(self, started: float | None = None):
        now = time.time()
        self.started = min(started, now) if started is not None else now
        self._origin = time.perf_counter() - (now - self.started)  # perf_counter's reading at `started`
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.seconds["startup"] = now - self.started
        self._compile = self._compile_s()
        self._stack: list[list[float]] = []  # per open timing: [nested s, nested compile s, compile s at its start]
        self._timed_compile = 0.0  # compile seconds inside the closed outermost timings
        self.start_step = 0  # the step this segment started from
        self.recomputed_steps = 0
        self.lost_s = 0.0

    @staticmethod
    def _compile_s() -> float:
        return compile_counts()["compile_s"]

    @contextlib.contextmanager
    def timing(self, part: str):
        """Counts the block's wall time to `part`, less what nested timings and compilation took."""
        start, compile_start = time.perf_counter(), self._compile_s()
        self._stack.append([0.0, 0.0, compile_start])
        try:
            yield
        finally:
            nested, nested_compile, _ = self._stack.pop()
            elapsed, compiled = time.perf_counter() - start, self._compile_s() - compile_start
            own_compile = compiled - nested_compile
            self.seconds[part] += elapsed - nested - own_compile
            self.seconds["compile"] += own_compile
            if self._stack:
                self._stack[-1][0] += elapsed
                self._stack[-1][1] += compiled
            else:
                self._timed_compile += compiled

    def loop_started(self) -> None:
        """The first step is next: the time so far that no timing counted is start-up (or compile)."""
        elapsed = time.perf_counter() - self._origin
        compiled = self._compile_s() - self._compile
        self.seconds["compile"] += compiled - self._timed_compile  # compiles outside any timing
        self._timed_compile = compiled
        self.seconds["startup"] = elapsed - sum(v for k, v in self.seconds.items() if k not in ("startup", "other"))

    def restarted(self, start_step: int, discarded: list[dict]) -> None:
        """The segment starts at `start_step`; `discarded`: the records this start set aside, of the steps
        a previous segment trained past it, which this one trains again."""
        self.start_step = start_step
        train = [r for r in discarded if r.get("kind") == "train" and r["step"] > start_step]
        if not train:
            return
        self.recomputed_steps = max(r["step"] for r in train) - start_step
        times = [r["step_time_s"] for r in train if r.get("step_time_s")]
        self.lost_s = self.recomputed_steps * statistics.median(times) if times else 0.0

    def record(self) -> dict:
        """The account so far, as a metrics record's fields (seconds rounded to milliseconds)."""
        wall = time.perf_counter() - self._origin
        now = self._compile_s()
        open_compile = now - self._stack[0][2] if self._stack else 0.0
        untimed = now - self._compile - self._timed_compile - open_compile  # compiles outside any timing
        parts = dict(self.seconds, compile=self.seconds["compile"] + max(untimed, 0.0))
        measured = sum(v for k, v in parts.items() if k != "other")
        parts["other"] = max(wall - measured, 0.0)
        return {"segment_start": round(self.started, 3), "start_step": self.start_step, "wall_s": round(wall, 3),
                **{f"{k}_s": round(v, 3) for k, v in parts.items()},
                "goodput": round(parts["step"] / wall, 4) if wall > 0 else None,
                "recomputed_steps": self.recomputed_steps, "lost_s": round(self.lost_s, 3)}

    def summary(self) -> str:
        """One console line."""
        r = self.record()
        parts = ", ".join(f"{k} {r[f'{k}_s']:.1f} s" for k in PARTS if k != "step" and r[f"{k}_s"] >= 0.05)
        lost = f"; {r['recomputed_steps']} steps recomputed after the restart ({r['lost_s']:.1f} s)" \
            if r["recomputed_steps"] else ""
        return (f"cptjax train: goodput {r['goodput']:.0%} of {r['wall_s']:.1f} s: steps {r['step_s']:.1f} s, "
                f"{parts}{lost}")
