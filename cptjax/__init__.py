"""cptjax: continued pretraining of Llama-family models in JAX, with Hugging Face weights in and out."""

from cptjax.errors import CptjaxError
from cptjax.model import Llama
from cptjax.model_config import ModelConfig
from cptjax.pretrained import PretrainedModel, load_model

__version__ = "0.1.0"
__all__ = ["CptjaxError", "Llama", "ModelConfig", "PretrainedModel", "load_model", "__version__"]
