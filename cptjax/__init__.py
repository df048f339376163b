"""cptjax: continued pretraining of Llama-family models in JAX, with Hugging Face weights in and out.

The names below load on first use, so that processes which only read data (Grain workers) do not
pay for importing JAX and Flax.
"""

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "CptjaxError": "cptjax.core.errors",
    "Llama": "cptjax.model.transformer",
    "ModelConfig": "cptjax.model.config",
    "PretrainedModel": "cptjax.io.pretrained",
    "load_model": "cptjax.io.pretrained",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cptjax' has no attribute {name!r}")
