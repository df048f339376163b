import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite is CPU-only. With libtpu installed (the `tpu` extra, for `cptjax plan`), JAX would
# otherwise probe for a TPU in every process and print libtpu's warnings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hf_models  # noqa: E402
import tiny_configs  # noqa: E402


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
