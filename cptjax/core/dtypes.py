"""The one dtype table: names users write (configs, flags, config.json) <-> NumPy dtypes <->
safetensors codes. JAX takes these NumPy dtypes as they are (`jnp.bfloat16` is `ml_dtypes.bfloat16`).
"""

from __future__ import annotations

import typing
from typing import Literal

import ml_dtypes
import numpy as np

from cptjax.core.errors import CptjaxError

# Floating-point formats a user may choose for parameters, compute, loading and export.
FloatName = Literal["float32", "bfloat16", "float16"]
FLOAT_NAMES: tuple[str, ...] = typing.get_args(FloatName)

# (name, NumPy dtype, safetensors code): every dtype cptjax reads or writes.
_TABLE = (
    ("float64", np.float64, "F64"), ("float32", np.float32, "F32"),
    ("bfloat16", ml_dtypes.bfloat16, "BF16"), ("float16", np.float16, "F16"),
    ("int64", np.int64, "I64"), ("int32", np.int32, "I32"), ("int16", np.int16, "I16"),
    ("int8", np.int8, "I8"), ("uint8", np.uint8, "U8"), ("bool", np.bool_, "BOOL"),
)
DTYPES: dict[str, np.dtype] = {name: np.dtype(t) for name, t, _ in _TABLE}
SAFETENSORS_CODES: dict[str, np.dtype] = {code: np.dtype(t) for _, t, code in _TABLE}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_CODES = {dtype: code for code, dtype in SAFETENSORS_CODES.items()}


def float_dtype(name: str, key: str = "dtype") -> np.dtype:
    """The NumPy dtype of a float name a user gave; `key` names the flag or config key."""
    if name not in FLOAT_NAMES:
        raise CptjaxError(f"{key} {name!r}: choose one of {', '.join(FLOAT_NAMES)}")
    return DTYPES[name]


def dtype_name(dtype) -> str:
    """'float32', 'bfloat16', ...: the name of a NumPy or JAX dtype."""
    return _NAMES[np.dtype(dtype)]


def safetensors_code(dtype) -> str:
    return _CODES[np.dtype(dtype)]
