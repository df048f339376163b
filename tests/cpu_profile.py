"""An opt-in pytest plugin: each test's CPU seconds, for finding what makes the suite long.

    CPTJAX_CPU_PROFILE=cpu.jsonl PYTHONPATH=tests python -m pytest -p cpu_profile -n 3 --dist loadfile ...

One JSON line per test (setup, call and teardown together): its node id, the CPU seconds of the
process that ran it ("self") and of the processes it started and waited for ("children"), and its
wall seconds. CI is CPU-bound (two cores, three workers), so the CPU seconds, not the wall times
that --durations prints, say what a test costs the suite.
"""

import json
import os
import resource
import time

import pytest


def _cpu() -> tuple[float, float]:
    own, waited = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, waited.ru_utime + waited.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    (own, waited), start = _cpu(), time.time()
    yield
    (own_after, waited_after), end = _cpu(), time.time()
    with open(os.environ.get("CPTJAX_CPU_PROFILE", "cpu_profile.jsonl"), "a") as f:
        f.write(json.dumps({"id": item.nodeid, "self": own_after - own, "children": waited_after - waited,
                            "wall": end - start}) + "\n")
