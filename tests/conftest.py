import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite is CPU-only. With libtpu installed (the `tpu` extra, for `cptjax plan`), JAX would
# otherwise probe for a TPU in every process and print libtpu's warnings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit
import shutil
import tempfile

# The tests and the `cptjax` processes they start (dozens of runs of the same tiny model, some killed
# and resumed) share a persistent XLA compilation cache, as a user's runs would with
# JAX_COMPILATION_CACHE_DIR (which a run's compile_cache: true then uses): a later test or process
# loads a program's executable instead of compiling it again (a quarter of the CPU time of the
# in-process trainer tests). The TPU programs of test_plan are compiled, never loaded (its fixture
# turns the cache off). Each pytest-xdist worker makes its own folder (one it inherited from the
# controller is dropped before JAX reads it); entries are renamed into place whole
# (cptjax.train.compile_cache), so a test's SIGKILL never leaves a torn one.
_CACHE_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "CPTJAX_TESTS_XLA_CACHE")
if "CPTJAX_TESTS_XLA_CACHE" in os.environ:
    for _name in _CACHE_ENV:
        os.environ.pop(_name, None)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="cptjax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(dict(zip(_CACHE_ENV, (_cache, "0", "0", "1"), strict=True)))

import jax  # noqa: E402  (this process reads the settings above now)
from etils import epath  # noqa: E402

from cptjax.train.compile_cache import use_whole_writes  # noqa: E402

if jax.config.jax_compilation_cache_dir:
    use_whole_writes(epath.Path(jax.config.jax_compilation_cache_dir))

import hf_models  # noqa: E402
import tiny_configs  # noqa: E402
import yaml  # noqa: E402
from data_helpers import STDLIB, corpus_files, tokenizer_dir  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


@pytest.fixture
def no_compile_cache():
    """This test's programs (test_plan's TPU steps) compiled, never written to or loaded from the
    tests' shared persistent cache; the cache is back afterwards."""
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)
    compilation_cache.reset_cache()
    if jax.config.jax_compilation_cache_dir:
        use_whole_writes(epath.Path(jax.config.jax_compilation_cache_dir))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """name -> folder of a saved tiny random HF checkpoint (built once per session)."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            out = tmp_path_factory.mktemp(name.replace(".", "_"))
            cache[name] = hf_models.save_hf_model(tiny_configs.shrunk_config(name), out / "hf")
        return cache[name]
    return get


@pytest.fixture(scope="session")
def cpt_config(tmp_path_factory):
    """A config for a small CPT run on real text: a tiny Llama, code with English replay."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = tokenizer_dir("llama")
    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    model = hf_models.save_hf_model(dict(tiny_configs.shrunk_config("llama-3.2-1b"), vocab_size=vocab),
                                    root / "hf")
    raw = {
        "run_dir": "unset",
        "model": {"init_from": str(model), "tokenizer": str(tokenizer), "compute_dtype": "float32"},
        "data": {"sources": [
            {"name": "code", "type": "text", "paths": [str(STDLIB / "json" / "*.py")], "weight": 0.9},
            {"name": "english", "type": "jsonl", "paths": [str(corpus_files()["wiki_jsonl"])], "weight": 0.1}],
            "eval_sets": [{"name": "code", "type": "text", "paths": [str(STDLIB / "email" / "mime" / "*.py")]}],
            "seed": 3},
        "training": {"steps": 40, "batch_size": 4, "seq_len": 64},
        "schedule": {"peak_lr": 3e-3, "warmup": 4, "end_lr": 3e-4},
        "checkpoint": {"every": 10, "keep_last": 5},
        "eval": {"every": 20},
        "logging": {"every": 1, "progress": "lines"},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# The files that take longest run first: the README's command spreads whole files over three
# pytest-xdist workers in this order (--no-loadscope-reorder), and a long file started last would leave
# one worker busy alone at the end. Measured with --durations=0 on two Zen 4 cores, both workers busy
# (seconds per file): plan 719, readme 469, crash 447, cpt_findings 237, attention 172, train_step 140,
# multihost_train 110, notebooks 82, parity 77, trainer 72, demo 67, remote_paths 64; the rest < 60.
# test_corruption (about 90 s), test_preemption (about 80 s), test_eval_models and test_length_stages
# (about 100 s each) came later; their places are from runs on a loaded machine, as are those of
# test_train_tasks (about 400 s), test_lm_eval_model (230), test_ema (175), test_wandb (150) and
# test_families (80), measured with other jobs on the cores (load 6-9); test_family_runs (six CPT
# runs, each killed and resumed: 50-140 s each), test_families (five families now, 300 s) and
# test_moe (200 s) likewise.
# Three workers on CI's two cores: a worker is not always computing (it waits on the `cptjax`
# processes it starts, and the TPU compiles of test_plan are mostly single-threaded). Run alone,
# test_plan used 589 s of CPU, test_crash 344 s and test_readme 410 s (user + sys, children included),
# against 719, 447 and 469 s of wall time each took as one of two workers: about 0.8 of a core each.
LONGEST_FIRST = ("test_plan.py", "test_readme.py", "test_crash.py", "test_family_runs.py", "test_train_tasks.py",
                 "test_cpt_findings.py", "test_families.py", "test_moe.py",
                 "test_lm_eval_model.py", "test_attention.py", "test_ema.py", "test_wandb.py", "test_train_step.py",
                 "test_multihost_train.py", "test_eval_models.py", "test_length_stages.py",
                 "test_corruption.py", "test_notebooks.py",
                 "test_preemption.py", "test_parity.py", "test_trainer.py", "test_demo.py", "test_remote_paths.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
