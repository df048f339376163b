"""How a step worker times its steps and reports them: one home for the protocol of both workers of
`scripts/bench_train.py --baseline easydel` (its own `--worker` and scripts/easydel_step.py, which runs in
EasyDeL's environment and so imports nothing of cptjax; this module imports nothing but the standard library)."""

from __future__ import annotations

import json
import resource
import time

RESULT_PREFIX = "bench_train steps: "  # the worker's one line of JSON on stdout, among its libraries' prints


def timed_with_usage(step, steps: int) -> tuple[list[float], dict]:
    """Each of `steps` calls' wall time, and what the process used over all of them (getrusage): CPU
    seconds in user and kernel mode, page faults, and context switches, involuntary ones being the
    scheduler handing a core to another process; and its peak RSS. Both workers time their steps with it."""
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    usage = {name: getattr(after, field) - getattr(before, field) for name, field in (
        ("user_s", "ru_utime"), ("system_s", "ru_stime"), ("minor_faults", "ru_minflt"),
        ("voluntary_switches", "ru_nvcsw"), ("involuntary_switches", "ru_nivcsw"))}
    usage["peak_rss_mib"] = after.ru_maxrss / 1024  # Linux: KiB; the process's high-water mark so far
    return times, usage


def worker_result(step_s: list[float], usage: dict, compile_s: float, loss: float) -> str:
    """The line a step worker prints (both workers print it the same way)."""
    return RESULT_PREFIX + json.dumps({"step_s": step_s, "usage": usage, "compile_s": compile_s, "last_loss": loss})
