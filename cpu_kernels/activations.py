"""Gate activations of gated expert FFNs (transformers' `hidden_act` names) as numba scalars."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

SILU, GELU, GELU_TANH = 0, 1, 2
# transformers `hidden_act` name -> activation code passed to the kernels.
ACTIVATIONS = {
    "silu": SILU,
    "swish": SILU,
    "gelu": GELU,
    "gelu_pytorch_tanh": GELU_TANH,
}
_SQRT_HALF = np.float32(0.7071067811865476)
_SQRT_2_OVER_PI = np.float32(0.7978845608028654)
_TANH_COEF = np.float32(0.044715)


def activation_code(name: str) -> int:
    """transformers `hidden_act` name -> kernel activation code; ValueError if unsupported."""
    code = ACTIVATIONS.get(str(name))
    if code is None:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return code


@njit(nogil=True, cache=True)
def activate(value, code):
    """act(value) in float32: silu, exact (erf) gelu, or tanh-approximated gelu."""
    v = np.float32(value)
    one = np.float32(1.0)
    half = np.float32(0.5)
    if code == SILU:
        return v / (one + math.exp(-v))
    if code == GELU:
        return half * v * (one + math.erf(v * _SQRT_HALF))
    inner = _SQRT_2_OVER_PI * (v + _TANH_COEF * v * v * v)
    return half * v * (one + math.tanh(inner))
