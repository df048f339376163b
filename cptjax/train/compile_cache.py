"""The persistent compilation cache: a resumed run loads its compiled programs instead of compiling them.

`compile_cache` in a run's config: true (the default) keeps the cache in the run folder
(`<run_dir>/compile_cache`, local or gs://), so that the run's next start, on this VM or a new one,
finds it, unless JAX's own cache is set for the machine (JAX_COMPILATION_CACHE_DIR): then that one
is used as JAX has it; a folder shares one cache between runs (programs are keyed by what they
compute, so runs of the same model and shapes share entries); false: cptjax sets none.

The cache is JAX's own (`jax.experimental.compilation_cache`): each program is keyed by its HLO,
devices, compile options, the jax and jaxlib versions and XLA's flags, so a changed program,
machine or version is a miss that compiles and writes a new entry. Only process 0 writes (JAX's
rule for shared file systems); every process reads. JAX turns a failed read or write into a
warning and compiles as before. Every program is cached, not only those that took JAX's default
one second to compile, so that the second start of a run compiles nothing.

JAX's file cache writes an entry in place, so a process killed during the write (a preemption
without SIGTERM) would leave a torn entry that every later start fails to read (a warning, and a
compile). On a local disk cptjax writes each entry beside its name and renames it into place,
whole or not at all (JAX's own folder too, while a run uses it); an object store's (gs://) writes
are whole already.

A fresh run's cache folder inside the run folder is only opened once the start's checks have
passed and the run folder is the run's own (nothing is written before then); the compiles before
that (initialisation) are the only ones a first start cannot cache.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid

import jax
from etils import epath
from jax.experimental.compilation_cache import compilation_cache

from cptjax.core.paths import is_remote, user_path
from cptjax.train.config import TrainConfig

# JAX's settings this module sets while a run is open, and their values then (dir set apart).
_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": 0}
_REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"  # a program JAX looked up in the cache
_HITS = "/jax/compilation_cache/cache_hits"  # ... and found there
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"  # a hit: its first compile's time less the load's
_BACKEND = "/jax/core/compile/backend_compile_duration"  # XLA's compile (or the cache's load) of a program

_lock = threading.Lock()
_counts = {_REQUESTS: 0, _HITS: 0}
_seconds = {_SAVED: 0.0, _BACKEND: 0.0}
_listening = False


def _on_event(event: str, **_) -> None:
    if event in _counts:
        with _lock:
            _counts[event] += 1


def _on_duration(event: str, seconds: float, **_) -> None:
    if event in _seconds:
        with _lock:
            _seconds[event] += seconds


def _listen() -> None:
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True
    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)


def compile_counts() -> dict[str, float]:
    """This process's compile counters so far (JAX's monitoring events): programs looked up in the
    cache, found there, the compile seconds those hits saved, and the seconds spent in XLA's compile
    or the cache's load."""
    _listen()
    with _lock:
        return {"requests": _counts[_REQUESTS], "hits": _counts[_HITS], "saved_s": _seconds[_SAVED],
                "compile_s": _seconds[_BACKEND]}


def cache_folder(config: TrainConfig) -> epath.Path | None:
    """Where `config`'s run keeps its compiled programs; None when compile_cache is false."""
    if config.compile_cache is False:
        return None
    if config.compile_cache is True:
        return jax_folder() or config.paths.compile_cache
    return user_path(config.compile_cache, "compile_cache")


def jax_folder() -> epath.Path | None:
    """JAX's own persistent cache folder, when it is set (JAX_COMPILATION_CACHE_DIR, or jax.config)."""
    folder = jax.config.jax_compilation_cache_dir
    return epath.Path(folder) if folder else None


@dataclasses.dataclass
class CompileCache:
    """JAX's persistent cache pointed at a run's folder while the run is open (a context manager);
    JAX's previous settings come back when it closes, so runs in one process (tests, notebooks)
    each use their own."""

    folder: epath.Path | None
    run_root: epath.Path
    _previous: dict | None = None
    _start: dict | None = None

    @classmethod
    def of(cls, config: TrainConfig) -> CompileCache:
        return cls(cache_folder(config), config.paths.root)

    def __enter__(self) -> CompileCache:
        return self

    def open(self, *, run_folder_ready: bool) -> None:
        """Starts caching, unless it is on already or the folder is in a run folder that the start's
        checks have not yet made the run's own (`run_folder_ready`)."""
        if self.folder is None or self._previous is not None or self._start is not None:
            return
        if self.folder == jax_folder():  # JAX's own, set for the machine: used with its settings
            if not is_remote(self.folder):
                compilation_cache.reset_cache()
                use_whole_writes(self.folder)
            self._start = compile_counts()
            return
        inside = str(self.folder).rstrip("/").startswith(str(self.run_root).rstrip("/") + "/")
        if inside and not run_folder_ready:
            return
        self._previous = {name: getattr(jax.config, name) for name in (*_SETTINGS, "jax_compilation_cache_dir")}
        compilation_cache.reset_cache()
        for name, value in _SETTINGS.items():
            jax.config.update(name, value)
        compilation_cache.set_cache_dir(str(self.folder))
        if not is_remote(self.folder):
            use_whole_writes(self.folder)
        self._start = compile_counts()

    def programs(self) -> dict | None:
        """Since the cache opened: {"loaded": programs read from it, "compiled": programs XLA
        compiled, "saved_s": the compile seconds the loads saved}; None when it is not open."""
        if self._start is None:
            return None
        now = compile_counts()
        loaded = now["hits"] - self._start["hits"]
        return {"loaded": loaded, "compiled": now["requests"] - self._start["requests"] - loaded,
                "saved_s": round(now["saved_s"] - self._start["saved_s"], 3)}

    def summary(self) -> str | None:
        """One console line: where the cache is and what this start took from it."""
        programs = self.programs()
        if programs is None:
            return None
        return (f"cptjax train: compile cache {self.folder}: {programs['loaded']} programs loaded "
                f"({programs['saved_s']:.1f} s of compiling saved), {programs['compiled']} compiled")

    def __exit__(self, *exc) -> None:
        if self._previous is None:
            return
        compilation_cache.reset_cache()
        for name, value in self._previous.items():
            jax.config.update(name, value)
        self._previous = None
        if (folder := jax_folder()) is not None and not is_remote(folder):
            use_whole_writes(folder)  # JAX's own cache again, still written whole


def use_whole_writes(folder: epath.Path) -> None:
    """Gives JAX a file cache for `folder` whose entries are renamed into place once written. JAX
    has no public hook for this: its module-level cache is set, and where a JAX release lacks it,
    JAX's own cache (in-place writes) is used as it is."""
    try:
        from jax._src import compilation_cache as internals
        from jax._src.lru_cache import LRUCache
    except ImportError:
        return
    if not hasattr(internals, "_cache"):
        return

    class WholeWrites(LRUCache):
        def put(self, key: str, value: bytes) -> None:
            path = self.path / f"{key}-cache"
            if not key or path.exists():
                return
            partial = self.path / f".{key}.{uuid.uuid4().hex}.partial"
            partial.write_bytes(value)
            partial.replace(path)

    internals._cache = WholeWrites(str(folder), max_size=-1)
