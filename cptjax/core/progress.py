"""Progress on long work: a tqdm bar on a terminal; elsewhere (CI logs, SLURM files) a line every
LINE_SECONDS while the work lasts and one when it ends, so quick work (or work that fails at once,
whose error must stay the only line) prints nothing before its result."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator

from tqdm import tqdm

LINE_SECONDS = 10.0


def progress_bar(description: str, stream=None) -> Callable[[Iterable], Iterator]:
    """Wraps an iterable: a tqdm bar if `stream` (stderr) is a terminal, else timed lines."""
    stream = stream or sys.stderr

    def wrap(items: Iterable) -> Iterator:
        items = list(items)
        if stream.isatty():
            yield from tqdm(items, desc=description, file=stream)
            return
        start = last = time.perf_counter()
        for done, item in enumerate(items, start=1):
            yield item
            now = time.perf_counter()
            if now - last >= LINE_SECONDS and done < len(items):
                print(f"{description}: {done}/{len(items)} after {now - start:.0f}s", file=stream, flush=True)
                last = now
        elapsed = time.perf_counter() - start
        if elapsed >= 1.0:
            print(f"{description}: {len(items)} done in {elapsed:.1f}s", file=stream, flush=True)
    return wrap
