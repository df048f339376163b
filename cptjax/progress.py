"""Progress bars on a terminal, plain log lines elsewhere (CI logs, files)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator

from tqdm import tqdm


def progress_bar(description: str, stream=None) -> Callable[[Iterable], Iterator]:
    """Wraps an iterable: a tqdm bar if `stream` (stderr) is a terminal, else start/end lines."""
    stream = stream or sys.stderr

    def wrap(items: Iterable) -> Iterator:
        items = list(items)
        if stream.isatty():
            yield from tqdm(items, desc=description, file=stream)
            return
        start = time.perf_counter()
        print(f"{description}: {len(items)} parts", file=stream, flush=True)
        yield from items
        print(f"{description}: done in {time.perf_counter() - start:.1f}s", file=stream, flush=True)
    return wrap
