"""The backend switch every fastdiff op reads, and the argument checks the ops share.

Backend choice, read at every call, first match wins: the op's own ``backend=`` argument, the
innermost :func:`backend` context manager, the ``FASTDIFF_BACKEND`` environment variable, ``"auto"``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = ["BACKENDS", "ACTIVATIONS", "backend", "current_backend", "use_triton"]

BACKENDS = ("auto", "triton", "reference")
ACTIVATIONS = (None, "silu")

_local = threading.local()


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _check_backend(name, allowed=BACKENDS, arg="backend"):
    if name not in allowed:
        raise ValueError(f"{arg} must be one of {allowed}, got {name!r}")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Route every fastdiff op inside the block: ``"auto" | "triton" | "reference"``."""
    _check_backend(name)
    _stack().append(name)
    try:
        yield
    finally:
        _stack().pop()


def current_backend(override: Optional[str] = None) -> str:
    """The backend word in force: ``override``, else the innermost context, else the environment."""
    if override is not None:
        return override
    stack = _stack()
    if stack:
        return stack[-1]
    env = os.environ.get("FASTDIFF_BACKEND", "auto") or "auto"
    _check_backend(env, arg="FASTDIFF_BACKEND")
    return env


def use_triton(x: Tensor, override: Optional[str] = None) -> bool:
    """Whether an op on ``x`` runs its Triton kernel (see the module docstring for the rule)."""
    word = current_backend(override)
    if word == "reference":
        return False
    if word == "auto":
        return x.is_cuda
    if word != "triton":
        raise ValueError(f"backend must be one of {BACKENDS} here, got {word!r}")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend 'triton' on a {x.device.type} tensor needs TRITON_INTERPRET=1 in the environment "
            "before triton is imported (the Triton interpreter runs the kernels on the CPU)"
        )
    return True


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_float(t: Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_vector(t: Optional[Tensor], name: str, x: Tensor, shape: tuple, same_dtype: bool) -> None:
    """Validate an optional parameter tensor against x: shape, device and dtype."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must be on one device")
    _check_float(t, name)
    if same_dtype and t.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    if not same_dtype and t.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"{name} has dtype {t.dtype}; it must be x's dtype ({x.dtype}) or float32")


def _silu_grad(z: Tensor) -> Tensor:
    sig = torch.sigmoid(z)
    return sig * (1 + z * (1 - sig))


# ---------------------------------------------------------------------------------------------
# group_norm_modulate: act((GN(x) * weight[c] + bias[c]) * (1 + scale[n, c]) + shift[n, c])
# ---------------------------------------------------------------------------------------------
