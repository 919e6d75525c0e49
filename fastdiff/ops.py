"""fastdiff's public ops, each declared once with ``torch.library.custom_op``.

The op contract (../shared/DESIGN.md):

- the default implementation is the reference: plain PyTorch, float32 statistics, any device;
- CUDA tensors go to the Triton launcher in ``fastdiff.kernels`` (``register_kernel("cuda", ...)``);
- ``register_fake`` gives shapes for torch.compile and export;
- ``register_autograd`` wires the backward, itself an op with a reference and a Triton kernel.

Backend choice, read at every call, first match wins: the op's own ``backend=`` argument, the
innermost :func:`backend` context manager, the ``FASTDIFF_BACKEND`` environment variable, ``"auto"``.
``"auto"`` is Triton for CUDA tensors and PyTorch's native norm kernels plus one in-place multiply-add
elsewhere (the fast CPU path); ``"reference"`` is the plain-PyTorch reference with shifted-data float32
statistics; ``"triton"`` forces the kernels on any device, which on CPU tensors needs
``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = [
    "BACKENDS",
    "backend",
    "current_backend",
    "group_norm_modulate",
    "layer_norm_modulate",
    "attention",
    "sampler_step",
]

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


def _gn_normalize(x: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """GroupNorm without affine: (xhat as (N, C, S), rstd as (N, G, 1)) in the compute dtype.

    The group's first element is subtracted before the moments ("shifted data"), so an input with
    a large common offset (mean 1e4, std 1) keeps its precision: ``x - pivot`` is exact when the
    two are close, and the mean that is then removed is of the order of the spread.
    """
    n, c = x.shape[:2]
    xg = x.to(_compute_dtype(x.dtype)).reshape(n, num_groups, -1)
    d = xg - xg[:, :, :1]
    d = d - d.mean(-1, keepdim=True)
    rstd = torch.rsqrt(d.square().mean(-1, keepdim=True) + eps)
    return (d * rstd).reshape(n, c, -1), rstd


def _gn_affine_modulate(xhat, weight, bias, scale, shift):
    """(N, C, S) normalised -> (y, z): y after the affine, z after the modulation."""
    cd = xhat.dtype
    y = xhat
    if weight is not None:
        y = y * weight.to(cd)[:, None]
    if bias is not None:
        y = y + bias.to(cd)[:, None]
    z = y
    if scale is not None:
        z = z * (1 + scale.to(cd)[:, :, None])
    if shift is not None:
        z = z + shift.to(cd)[:, :, None]
    return y, z


def group_norm_modulate_reference(x, num_groups, weight=None, bias=None, scale=None, shift=None,
                                  eps=1e-5, activation=None):
    """Plain-PyTorch group_norm_modulate; statistics in float32 (float64 for float64 input).

    The per-channel factors fold into one (N, C) pair, ``z = (x - pivot) * a + b`` (as in the kernel),
    so the CPU path makes few passes over x: the shift, the moments, one multiply-add, the activation.
    """
    n, c = x.shape[:2]
    cd = _compute_dtype(x.dtype)
    d = x.to(cd).reshape(n, num_groups, -1)
    d = d - d[:, :, :1]  # shifted data (see _gn_normalize); d is kept, the pivot is not
    var, mean = torch.var_mean(d, dim=-1, unbiased=False)  # (N, G)
    rstd = torch.rsqrt(var + eps).repeat_interleave(c // num_groups, dim=1)  # (N, C)
    mean = mean.repeat_interleave(c // num_groups, dim=1)
    alpha = rstd if weight is None else rstd * weight.to(cd)
    beta = torch.zeros_like(alpha) if bias is None else bias.to(cd).expand(n, c)
    if scale is not None:
        alpha = alpha * (1 + scale.to(cd))
        beta = beta * (1 + scale.to(cd))
    if shift is not None:
        beta = beta + shift.to(cd)
    beta = beta - mean * alpha
    z = torch.addcmul(beta[:, :, None], d.reshape(n, c, -1), alpha[:, :, None])
    if activation == "silu":
        z = torch.nn.functional.silu(z, inplace=True)
    out = torch.empty_like(x)
    out.copy_(z.reshape(x.shape))
    return out


def _modulate_inplace(y: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], activation=None) -> Tensor:
    """``act(y * (1 + scale) + shift)`` written into y; scale/shift already shaped to broadcast over y."""
    if scale is not None and shift is not None:
        torch.addcmul(shift, y, 1 + scale, out=y)
    elif scale is not None:
        y.mul_(1 + scale)
    elif shift is not None:
        y.add_(shift)
    if activation == "silu":
        torch.nn.functional.silu(y, inplace=True)
    return y


# ATen accumulates a float32 input's moments in float32, so its output error grows with the offset of a
# group, about 5e-8 * |mean| / std: where that ratio passes this limit (error 1e-6), the native paths
# recompute on pivot-shifted data (see _gn_normalize). Measured: 9e-7 at 16, 5e-4 at 1e4.
_NATIVE_OFFSET_LIMIT = 16.0


def _dense(x: Tensor) -> Tensor:
    """x itself when it is contiguous as NCHW or channels_last (what ATen's GroupNorm reads), else a copy.

    A channels_last tensor must also have the canonical strides: with N = 1 a slice can pass
    ``is_contiguous(memory_format=...)`` while ATen's stride-based format guess calls it neither format.
    """
    if x.is_contiguous():
        return x
    if x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        if x.is_contiguous(memory_format=fmt):
            c, spatial = x.shape[1], x.shape[2:]
            inner = [c * math.prod(spatial[i + 1:]) for i in range(len(spatial))]  # NHWC: W*C, C
            canonical = (c * math.prod(spatial), 1, *inner)
            return x if x.stride() == canonical else x.clone(memory_format=fmt)
    return x.contiguous()


def _offset_too_large(x: Tensor, mean: Tensor, rstd: Tensor) -> bool:
    return x.dtype == torch.float32 and bool((mean.abs() * rstd).amax() > _NATIVE_OFFSET_LIMIT)


def group_norm_modulate_native(x, num_groups, weight=None, bias=None, scale=None, shift=None, eps=1e-5,
                               activation=None):
    """The ``auto`` path off CUDA: ATen's GroupNorm (Welford moments, float32 for half types, NCHW or
    channels_last), then the modulation and activation in place on its output.

    Two passes over x instead of the reference's six; the modulation runs in x's dtype, as in ADM's
    own ``out_norm(h) * (1 + scale) + shift``. A float32 group whose mean is far from zero relative to
    its spread is recomputed on shifted data (``_NATIVE_OFFSET_LIMIT``).
    """
    n, c = x.shape[:2]
    bcast = (slice(None), slice(None)) + (None,) * (x.dim() - 2)
    x = _dense(x)
    y, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, x.numel() // (n * c), num_groups,
                                                     eps)
    if _offset_too_large(x, mean, rstd):
        pivot = x[(slice(None), slice(None, None, c // num_groups)) + (0,) * (x.dim() - 2)]  # (N, G)
        y = torch.nn.functional.group_norm(x - pivot.repeat_interleave(c // num_groups, dim=1)[bcast],
                                           num_groups, weight, bias, eps)
    return _modulate_inplace(y, None if scale is None else scale[bcast], None if shift is None else shift[bcast],
                             activation)


def group_norm_modulate_backward_reference(grad, x, num_groups, weight, bias, scale, shift, eps,
                                           activation):
    """Closed-form gradients of group_norm_modulate: (dx, dweight, dbias, dscale, dshift).

    All five are always returned (weight/bias as (C,), scale/shift as (N, C)); the autograd
    wrapper drops those of absent inputs.
    """
    n, c = x.shape[:2]
    cd = _compute_dtype(x.dtype)
    xhat, rstd = _gn_normalize(x, num_groups, eps)  # (N, C, S), (N, G, 1)
    y, z = _gn_affine_modulate(xhat, weight, bias, scale, shift)
    dz = grad.to(cd).reshape(n, c, -1)
    if activation == "silu":
        dz = dz * _silu_grad(z)
    dshift = dz.sum(-1)
    dscale = (dz * y).sum(-1)
    dy = dz if scale is None else dz * (1 + scale.to(cd)[:, :, None])
    dbias = dy.sum((0, 2))
    dweight = (dy * xhat).sum((0, 2))
    dxhat = dy if weight is None else dy * weight.to(cd)[:, None]
    # d/dx of (x - mean) * rstd over each group: rstd * (g - mean(g) - xhat * mean(g * xhat))
    xh = xhat.reshape(n, num_groups, -1)
    g = dxhat.reshape(n, num_groups, -1)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xh * (g * xh).mean(-1, keepdim=True))
    out_dx = torch.empty_like(x)
    out_dx.copy_(dx.reshape(x.shape))
    pdt = lambda t, like: t.to(like.dtype if like is not None else x.dtype)
    return (out_dx, pdt(dweight, weight), pdt(dbias, bias), pdt(dscale, scale), pdt(dshift, shift))


@torch.library.custom_op("fastdiff::group_norm_modulate", mutates_args=())
def _group_norm_modulate_op(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                            scale: Optional[Tensor], shift: Optional[Tensor], eps: float,
                            activation: Optional[str], backend: Optional[str]) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    if use_triton(x, backend):
        from fastdiff.kernels.modulated_norm import group_norm_modulate_forward
        return group_norm_modulate_forward(x, num_groups, weight, bias, scale, shift, eps, activation)
    if current_backend(backend) == "auto":
        return group_norm_modulate_native(x, num_groups, weight, bias, scale, shift, eps, activation)
    return group_norm_modulate_reference(x, num_groups, weight, bias, scale, shift, eps, activation)


@_group_norm_modulate_op.register_fake
def _(x, num_groups, weight, bias, scale, shift, eps, activation, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastdiff::group_norm_modulate_backward", mutates_args=())
def _group_norm_modulate_backward_op(
        grad: Tensor, x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
        scale: Optional[Tensor], shift: Optional[Tensor], eps: float, activation: Optional[str],
        backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if use_triton(x, backend) and x.numel() > 0:
        from fastdiff.kernels.modulated_norm import group_norm_modulate_backward
        return group_norm_modulate_backward(grad, x, num_groups, weight, bias, scale, shift, eps, activation)
    return group_norm_modulate_backward_reference(grad, x, num_groups, weight, bias, scale, shift, eps,
                                                  activation)


@_group_norm_modulate_backward_op.register_fake
def _(grad, x, num_groups, weight, bias, scale, shift, eps, activation, backend):
    n, c = x.shape[:2]
    pick = lambda t, shape: x.new_empty(shape, dtype=t.dtype if t is not None else x.dtype)
    return (torch.empty_like(x), pick(weight, (c,)), pick(bias, (c,)), pick(scale, (n, c)),
            pick(shift, (n, c)))


def _gnm_setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, scale, shift, eps, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift)
    ctx.args = (num_groups, eps, activation, backend)


def _gnm_backward(ctx, grad):
    x, weight, bias, scale, shift = ctx.saved_tensors
    num_groups, eps, activation, backend = ctx.args
    dx, dw, db, ds, dt = torch.ops.fastdiff.group_norm_modulate_backward(
        grad, x, num_groups, weight, bias, scale, shift, eps, activation, backend)
    keep = lambda g, t: g if t is not None and t.requires_grad else None
    return (dx, None, keep(dw, weight), keep(db, bias), keep(ds, scale), keep(dt, shift), None, None, None)


_group_norm_modulate_op.register_autograd(_gnm_backward, setup_context=_gnm_setup_context)


def group_norm_modulate(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                        shift: Optional[Tensor] = None, eps: float = 1e-5,
                        activation: Optional[str] = None, backend: Optional[str] = None) -> Tensor:
    """``act((GN(x) * weight[c] + bias[c]) * (1 + scale[n, c]) + shift[n, c])``.

    The order of ADM's ``use_scale_shift_norm`` ResBlock (norm, then ``* (1 + scale) + shift``, then
    SiLU); with scale and shift absent it is GroupNorm (+ SiLU).

    Args:
        x: (N, C, *spatial), spatial rank 1, 2 or 3; float16, bfloat16, float32 (or float64 on the
            reference path); NCHW or channels_last; the output keeps x's dtype and memory format.
        num_groups: divides C.
        weight, bias: (C,) GroupNorm affine, x's dtype or float32, or None.
        scale, shift: (N, C) per-sample modulation in x's dtype, or None.
        eps: added to the variance.
        activation: None or "silu".
        backend: None (follow the switch), "auto", "triton" or "reference".
    Statistics are float32 (float64 for float64 input); NaN in one sample stays in that sample.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"x must have shape (N, C, *spatial) with 1 to 3 spatial dims, got {tuple(x.shape)}")
    _check_float(x, "x")
    n, c = x.shape[:2]
    if not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if c % num_groups != 0:
        raise ValueError(f"num_groups={num_groups} must divide the channels C={c} of x")
    _check_vector(weight, "weight", x, (c,), same_dtype=False)
    _check_vector(bias, "bias", x, (c,), same_dtype=False)
    _check_vector(scale, "scale", x, (n, c), same_dtype=True)
    _check_vector(shift, "shift", x, (n, c), same_dtype=True)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if backend is not None:
        _check_backend(backend)
    return _group_norm_modulate_op(x, num_groups, weight, bias, scale, shift, float(eps), activation, backend)


# ---------------------------------------------------------------------------------------------
# layer_norm_modulate: (LN(x) * weight[d] + bias[d]) * (1 + scale[n, d]) + shift[n, d]
# ---------------------------------------------------------------------------------------------


def _ln_normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """LayerNorm without affine over the last dim: (xhat, rstd) in the compute dtype."""
    xf = x.to(_compute_dtype(x.dtype))
    d = xf - xf[..., :1]  # shifted data, as in _gn_normalize
    d = d - d.mean(-1, keepdim=True)
    rstd = torch.rsqrt(d.square().mean(-1, keepdim=True) + eps)
    return d * rstd, rstd


def _ln_affine_modulate(xhat, weight, bias, scale, shift):
    cd = xhat.dtype
    y = xhat
    if weight is not None:
        y = y * weight.to(cd)
    if bias is not None:
        y = y + bias.to(cd)
    z = y
    if scale is not None:
        z = z * (1 + scale.to(cd)[:, None, :])
    if shift is not None:
        z = z + shift.to(cd)[:, None, :]
    return y, z


def layer_norm_modulate_reference(x, scale=None, shift=None, weight=None, bias=None, eps=1e-6):
    """Plain-PyTorch layer_norm_modulate; statistics in float32 (float64 for float64 input)."""
    _, z = _ln_affine_modulate(_ln_normalize(x, eps)[0], weight, bias, scale, shift)
    out = torch.empty_like(x)
    out.copy_(z)
    return out


def layer_norm_modulate_native(x, scale=None, shift=None, weight=None, bias=None, eps=1e-6):
    """The ``auto`` path off CUDA: ATen's LayerNorm and the modulation in place on its output (a float32
    row far from zero mean is recomputed shifted by its first feature, as in group_norm_modulate_native)."""
    y, mean, rstd = torch.ops.aten.native_layer_norm(x, x.shape[-1:], weight, bias, eps)
    if _offset_too_large(x, mean, rstd):
        y = torch.nn.functional.layer_norm(x - x[..., :1], x.shape[-1:], weight, bias, eps)
    return _modulate_inplace(y, None if scale is None else scale[:, None, :],
                             None if shift is None else shift[:, None, :])


def layer_norm_modulate_backward_reference(grad, x, scale, shift, weight, bias, eps):
    """Closed-form gradients: (dx, dscale, dshift, dweight, dbias), all always returned."""
    cd = _compute_dtype(x.dtype)
    xhat, rstd = _ln_normalize(x, eps)
    y, _ = _ln_affine_modulate(xhat, weight, bias, scale, shift)
    dz = grad.to(cd)
    dshift = dz.sum(1)
    dscale = (dz * y).sum(1)
    dy = dz if scale is None else dz * (1 + scale.to(cd)[:, None, :])
    dbias = dy.sum((0, 1))
    dweight = (dy * xhat).sum((0, 1))
    g = dy if weight is None else dy * weight.to(cd)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    out_dx = torch.empty_like(x)
    out_dx.copy_(dx)
    pdt = lambda t, like: t.to(like.dtype if like is not None else x.dtype)
    return (out_dx, pdt(dscale, scale), pdt(dshift, shift), pdt(dweight, weight), pdt(dbias, bias))


@torch.library.custom_op("fastdiff::layer_norm_modulate", mutates_args=())
def _layer_norm_modulate_op(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                            weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                            backend: Optional[str]) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    if use_triton(x, backend):
        from fastdiff.kernels.modulated_norm import layer_norm_modulate_forward
        return layer_norm_modulate_forward(x, scale, shift, weight, bias, eps)
    if current_backend(backend) == "auto":
        return layer_norm_modulate_native(x, scale, shift, weight, bias, eps)
    return layer_norm_modulate_reference(x, scale, shift, weight, bias, eps)


@_layer_norm_modulate_op.register_fake
def _(x, scale, shift, weight, bias, eps, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastdiff::layer_norm_modulate_backward", mutates_args=())
def _layer_norm_modulate_backward_op(
        grad: Tensor, x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Optional[Tensor],
        bias: Optional[Tensor], eps: float, backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if use_triton(x, backend) and x.numel() > 0:
        from fastdiff.kernels.modulated_norm import layer_norm_modulate_backward
        return layer_norm_modulate_backward(grad, x, scale, shift, weight, bias, eps)
    return layer_norm_modulate_backward_reference(grad, x, scale, shift, weight, bias, eps)


@_layer_norm_modulate_backward_op.register_fake
def _(grad, x, scale, shift, weight, bias, eps, backend):
    n, _, d = x.shape
    pick = lambda t, shape: x.new_empty(shape, dtype=t.dtype if t is not None else x.dtype)
    return (torch.empty_like(x), pick(scale, (n, d)), pick(shift, (n, d)), pick(weight, (d,)), pick(bias, (d,)))


def _lnm_setup_context(ctx, inputs, output):
    x, scale, shift, weight, bias, eps, backend = inputs
    ctx.save_for_backward(x, scale, shift, weight, bias)
    ctx.args = (eps, backend)


def _lnm_backward(ctx, grad):
    x, scale, shift, weight, bias = ctx.saved_tensors
    eps, backend = ctx.args
    dx, ds, dt, dw, db = torch.ops.fastdiff.layer_norm_modulate_backward(
        grad, x, scale, shift, weight, bias, eps, backend)
    keep = lambda g, t: g if t is not None and t.requires_grad else None
    return (dx, keep(ds, scale), keep(dt, shift), keep(dw, weight), keep(db, bias), None, None)


_layer_norm_modulate_op.register_autograd(_lnm_backward, setup_context=_lnm_setup_context)


def layer_norm_modulate(x: Tensor, *, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                        weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-6,
                        backend: Optional[str] = None) -> Tensor:
    """DiT's ``modulate(norm(x), shift, scale)``: ``(LN(x) * weight + bias) * (1 + scale[n]) + shift[n]``.

    Keyword-only because DiT's own ``modulate`` takes shift before scale.

    Args:
        x: (N, L, D) tokens; float16, bfloat16, float32 (float64 on the reference path).
        scale, shift: (N, D) in x's dtype, or None (None for both is a plain LayerNorm).
        weight, bias: (D,) LayerNorm affine (DiT uses none), x's dtype or float32, or None.
        eps: added to the variance (DiT: 1e-6).
        backend: None (follow the switch), "auto", "triton" or "reference".
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (N, L, D), got {tuple(x.shape)}")
    _check_float(x, "x")
    n, _, d = x.shape
    _check_vector(scale, "scale", x, (n, d), same_dtype=True)
    _check_vector(shift, "shift", x, (n, d), same_dtype=True)
    _check_vector(weight, "weight", x, (d,), same_dtype=False)
    _check_vector(bias, "bias", x, (d,), same_dtype=False)
    if backend is not None:
        _check_backend(backend)
    return _layer_norm_modulate_op(x, scale, shift, weight, bias, float(eps), backend)


# ---------------------------------------------------------------------------------------------
# attention: softmax(q k^T * scale) v over (B, H, S, D)
# ---------------------------------------------------------------------------------------------

ATTENTION_BACKENDS = ("auto", "triton", "sdpa", "xformers", "reference")
_TRITON_ATTENTION_MAX_D = 128
_xformers_usable_cache: dict = {}


def _attention_probs(q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor]) -> Tensor:
    """softmax(q k^T * scale + bias) in the compute dtype; a row whose keys are all -inf is 0."""
    cd = _compute_dtype(q.dtype)
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(cd)
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    return p / torch.where(den == 0, torch.ones_like(den), den)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None,
                        bias: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch attention, softmax in float32 (float64 for float64 input); materialises the
    (B, H, Sq, Skv) scores. ``bias`` is additive and broadcasts; fully masked rows give zeros."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    if k.shape[-2] == 0:
        return out.zero_()
    out.copy_(torch.matmul(_attention_probs(q, k, scale, bias), v.to(_compute_dtype(q.dtype))))
    return out


def attention_backward_reference(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float,
                                 bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed-form gradients (dq, dk, dv, dscores): with ``p = softmax(s)``, ``dv = p^T g``,
    ``ds = p * (g v^T - rowsum(p * g v^T))``, ``dq = ds k * scale``, ``dk = ds^T q * scale``.
    ``dscores`` (B, H, Sq, Skv) is the bias gradient before summing over its broadcast dims."""
    cd = _compute_dtype(q.dtype)
    p = _attention_probs(q, k, scale, bias)
    g = grad.to(cd)
    dv = torch.matmul(p.transpose(-1, -2), g)
    dp = torch.matmul(g, v.to(cd).transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.to(cd)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(cd)) * scale
    as_input = lambda t, like: t.to(like.dtype).contiguous()
    return as_input(dq, q), as_input(dk, k), as_input(dv, v), ds


def _sdpa_mask(bias: Optional[Tensor], dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(attn_mask for SDPA, fully-masked-row indicator or None). SDPA makes NaN of a row whose keys
    are all -inf; such rows get a zero bias here (finite softmax, finite gradients) and a zero
    output afterwards."""
    if bias is None:
        return None, None
    mask = bias.to(dtype)
    dead = (mask == float("-inf")).all(-1, keepdim=True)
    return mask.masked_fill(dead, 0.0), dead


def _attention_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: Optional[Tensor]) -> Tensor:
    mask, dead = _sdpa_mask(bias, q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if dead is not None:
        out = out.masked_fill(dead, 0.0)
    return out


def _attention_xformers(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    import xformers.ops as xops  # (B, S, H, D) layout there

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return xops.memory_efficient_attention(q, k, v, scale=scale).transpose(1, 2)


def xformers_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether xformers imports and runs its attention on this device and dtype (a tiny probe, cached).
    The PyPI wheel has no CPU kernel and is built against one torch version."""
    key = (torch.device(device).type, dtype)
    if key not in _xformers_usable_cache:
        try:
            t = torch.zeros(1, 2, 1, 16, device=device, dtype=dtype)
            ok = bool(torch.isfinite(_attention_xformers(t, t, t, 0.25)).all())
        except Exception:  # not installed, no kernel for the device, or built for another torch
            ok = False
        _xformers_usable_cache[key] = ok
    return _xformers_usable_cache[key]


@torch.compiler.assume_constant_result
def _cuda_major(index: Optional[int]) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _auto_attention_backend(q: Tensor, bias: Optional[Tensor]) -> str:
    """``auto``: SDPA on the CPU; on CUDA a small table.

    Written from reasoning, TO BE RE-MEASURED on a GPU with benchmarks/bench_attention.py: SDPA's
    flash and cuDNN kernels are tuned for power-of-two head dims, and FlashAttention rounds other
    head dims up (40 -> 64, 72 and 80 -> 96), where the Triton kernel's split tiles (32+16, 64+16)
    do less matrix work; SDPA's flash kernel also takes no bias (it then falls to the slower
    memory-efficient kernel). float32, D > 128 and pre-Ampere GPUs stay on SDPA.
    """
    if not q.is_cuda:
        return "sdpa"
    d = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16) or d > _TRITON_ATTENTION_MAX_D or d < 16:
        return "sdpa"
    if _cuda_major(q.device.index) < 8:
        return "sdpa"
    if d & (d - 1) != 0 or bias is not None:
        return "triton"
    return "sdpa"


@torch.library.custom_op("fastdiff::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str,
                  bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    # backend: the resolved word (triton | sdpa | xformers | reference). Returns (out, lse): lse is
    # the Triton kernel's row log-sum-exp (B, H, Sq) for its backward, an empty tensor otherwise.
    lse = q.new_empty((0,), dtype=torch.float32)
    if q.numel() == 0 or k.shape[2] == 0:
        out = q.new_zeros(q.shape)
        return (out, q.new_zeros(q.shape[:3], dtype=torch.float32)) if backend == "triton" else (out, lse)
    if backend == "triton":
        from fastdiff.kernels.attention import attention_forward
        return attention_forward(q, k, v, scale, _expand_bias(bias, q, k))
    if backend == "reference":
        return attention_reference(q, k, v, scale, bias), lse
    if backend == "xformers":
        return _attention_xformers(q, k, v, scale).contiguous(), lse
    return _attention_sdpa(q, k, v, scale, bias).contiguous(), lse


@_attention_op.register_fake
def _(q, k, v, scale, backend, bias=None):
    lse_shape = q.shape[:3] if backend == "triton" else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def _expand_bias(bias: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    """The 4-D bias as a stride-0 view of shape (B, H, Sq, Skv) (no copy), as the kernel reads it."""
    return None if bias is None else bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


@torch.library.custom_op("fastdiff::attention_backward", mutates_args=())
def _attention_backward_op(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           scale: float, backend: str, bias: Optional[Tensor],
                           need_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # (dq, dk, dv, dscores): dscores is (B, H, Sq, Skv) when need_dbias, else empty. The Triton
    # backward gives no bias gradient, so need_dbias takes the reference path.
    empty = q.new_empty((0,))
    if q.numel() == 0 or k.numel() == 0:
        dbias = q.new_zeros(q.shape[:3] + k.shape[2:3]) if need_dbias else empty
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    if backend == "triton" and not need_dbias:
        from fastdiff.kernels.attention import attention_backward
        dq, dk, dv = attention_backward(grad, q, k, v, out, lse, scale, _expand_bias(bias, q, k))
        return dq, dk, dv, empty
    dq, dk, dv, ds = attention_backward_reference(grad, q, k, v, scale, bias)
    return dq, dk, dv, (ds.to(q.dtype).contiguous() if need_dbias else empty)


@_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse, scale, backend, bias, need_dbias):
    dbias = q.new_empty(q.shape[:3] + k.shape[2:3]) if need_dbias else q.new_empty((0,))
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dbias)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale, backend, bias = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad, _grad_lse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[5]
    if ctx.backend in ("sdpa", "xformers") and q.numel() > 0 and k.shape[2] > 0:
        # Recompute through the same backend under autograd: its own backward kernels do the work.
        with torch.enable_grad():
            q_, k_, v_ = (t.detach().requires_grad_(True) for t in (q, k, v))
            b_ = bias.detach().requires_grad_(need_dbias) if bias is not None else None
            if ctx.backend == "xformers":
                o = _attention_xformers(q_, k_, v_, ctx.scale)
            else:
                o = _attention_sdpa(q_, k_, v_, ctx.scale, b_)
            wrt = (q_, k_, v_, b_) if need_dbias else (q_, k_, v_)
            grads = torch.autograd.grad(o, wrt, grad)
        dbias = grads[3] if need_dbias else None
        return grads[0], grads[1], grads[2], None, None, dbias
    dq, dk, dv, ds = torch.ops.fastdiff.attention_backward(grad, q, k, v, out, lse, ctx.scale, ctx.backend,
                                                           bias, need_dbias)
    dbias = ds.sum_to_size(bias.shape) if need_dbias else None
    return dq, dk, dv, None, None, dbias


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def _check_attention_bias(bias, q: Tensor, k: Tensor) -> Optional[Tensor]:
    """Validate ``bias`` and return it as a 4-D view (a bool mask becomes 0 / -inf in q's dtype)."""
    if bias is None:
        return None
    if not isinstance(bias, Tensor):
        raise ValueError(f"bias must be a tensor or None, got {type(bias).__name__}")
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if bias.dim() > 4 or any(s not in (1, f) for s, f in zip(bias.shape[::-1], full[4 - bias.dim():][::-1],
                                                              strict=True)):
        raise ValueError(f"bias must broadcast to (B, H, Sq, Skv) = {full}, got {tuple(bias.shape)}")
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}; they must be on one device")
    if bias.dtype == torch.bool:  # SDPA's convention: True = attend
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
    elif not bias.is_floating_point():
        raise ValueError(f"bias must be a float (additive) or bool (True = attend) tensor, got {bias.dtype}")
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def resolve_attention_backend(q: Tensor, bias: Optional[Tensor] = None, backend: Optional[str] = None) -> str:
    """The backend :func:`attention` runs for these inputs: the argument, else the switch
    (:func:`backend` / FASTDIFF_BACKEND), with ``auto`` resolved by :func:`_auto_attention_backend`.
    Raises ValueError where the chosen backend cannot run these inputs."""
    if backend is not None and backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    word = current_backend(backend)
    if word == "auto":
        return _auto_attention_backend(q, bias)
    if word == "triton":
        use_triton(q, "triton")  # raises on a CPU tensor without TRITON_INTERPRET=1
        d = q.shape[-1]
        if d > _TRITON_ATTENTION_MAX_D:
            raise ValueError(f"backend 'triton' takes head dims up to {_TRITON_ATTENTION_MAX_D}; q has D={d}")
        if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"backend 'triton' on a GPU takes float16 or bfloat16; q has {q.dtype} "
                             "(use backend='sdpa' for it)")
        if not q.is_cuda and q.dtype not in (torch.float32, torch.float16):
            raise ValueError(f"backend 'triton' on the CPU runs the Triton interpreter, which takes float32 "
                             f"or float16 (it does not run bfloat16 faithfully); q has {q.dtype}")
    elif word == "xformers":
        if bias is not None:
            raise ValueError("backend 'xformers' takes no bias here; use 'triton' or 'sdpa'")
        if not xformers_usable(q.device, q.dtype):
            raise ValueError(f"backend 'xformers' is not usable for {q.dtype} on {q.device.type} (not "
                             "installed, no kernel for the device, or built for another torch)")
    return word


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None, backend: Optional[str] = None,
              *, bias: Optional[Tensor] = None) -> Tensor:
    """Non-causal attention ``softmax(q k^T * scale + bias) v``.

    Args:
        q: (B, H, Sq, D); k, v: (B, H, Skv, D), one dtype and device; any strides (e.g. views of a
            fused qkv projection). Sq and Skv independent (cross-attention).
        scale: softmax scale, default ``D ** -0.5``.
        backend: None (follow :func:`backend` / FASTDIFF_BACKEND: auto | triton | reference) or one of
            ``auto | triton | sdpa | xformers | reference``; the argument wins over the switch.
            ``triton``: fastdiff.kernels.attention (D <= 128; fp16/bf16 on CUDA, fp32/fp16 under
            TRITON_INTERPRET=1 on the CPU); ``sdpa``: torch's scaled_dot_product_attention;
            ``xformers``: memory_efficient_attention where it imports and runs on the device;
            ``reference``: plain PyTorch, float32 softmax. ``auto``: see :func:`_auto_attention_backend`.
        bias: optional additive float tensor broadcastable to (B, H, Sq, Skv), or a bool mask (True =
            attend), e.g. a key-padding mask of shape (B, 1, 1, Skv). Rows with every key masked give
            zeros (not NaN). Its gradient is computed when it requires one (reference backward).
    Returns (B, H, Sq, D) in q's dtype, contiguous. Differentiable in q, k, v (and bias): the Triton
    backend has a Triton backward, sdpa/xformers recompute through themselves under autograd. An
    empty batch (or Skv = 0) gives an empty (zero) result.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, S, D), got {tuple(t.shape)}")
        _check_float(t, name)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k, v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must be on one device")
    b, h, sq, d = q.shape
    if k.shape[0] != b or k.shape[1] != h:
        raise ValueError(f"k must have q's batch and heads (B, H) = {(b, h)}, got {tuple(k.shape[:2])}")
    if k.shape[3] != d:
        raise ValueError(f"k has head dim D={k.shape[3]} but q has D={d}; they must match")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape (B, H, Skv, D) = {tuple(k.shape)}, got {tuple(v.shape)}")
    if scale is None:
        scale = d ** -0.5
    elif not isinstance(scale, (int, float)) or not float("-inf") < float(scale) < float("inf"):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    bias = _check_attention_bias(bias, q, k)
    word = resolve_attention_backend(q, bias, backend)
    return _attention_op(q, k, v, float(scale), word, bias)[0]


# ---------------------------------------------------------------------------------------------
# sampler_step: one row of a sampler table (fastdiff.samplers), fused
# ---------------------------------------------------------------------------------------------

_SAMPLER_STEP_FIXED_COLUMNS = 11  # fastdiff.samplers.COL_SLOTS: p q e f a g b0 c lv_lo lv_hi write


def sampler_step_reference(x: Tensor, model_out: Tensor, history: Tensor, table: Tensor, rows: Tensor,
                           uncond: Optional[Tensor] = None, guidance_scale: float = 1.0,
                           variance: Optional[Tensor] = None, noise: Optional[Tensor] = None,
                           clip: Optional[Tensor] = None) -> Tensor:
    """Plain-PyTorch sampler_step (float32 math, float64 for float64 x); writes ``history`` in place.

    Per sample n with row ``r = rows[n]`` (clamped to the table) and its coefficients:
    ``m = u + w (c - u)``, ``x0 = clip(p x + q m)``, ``h = e x + f x0``,
    ``x_next = a x + g m + b0 h + sum_s b_s history[s] + c' noise`` with ``c' = c`` or, given the
    learned-range ``variance`` v, ``c exp((lv_lo + (v + 1)/2 (lv_hi - lv_lo)) / 2)``; then
    ``history[write] = h`` where ``write >= 0``.
    """
    cd = _compute_dtype(x.dtype)
    n = x.shape[0]
    num_slots = history.shape[0]
    view = (n,) + (1,) * (x.dim() - 1)
    idx = rows.long().clamp(0, table.shape[0] - 1)
    coef = table.to(cd)[idx]
    col = lambda k: coef[:, k].reshape(view)
    m = model_out.to(cd)
    if uncond is not None:
        u = uncond.to(cd)
        m = u + guidance_scale * (m - u)
    xf = x.to(cd)
    x0 = col(0) * xf + col(1) * m
    if clip is not None:
        bound = clip[:, 0].to(cd).reshape(view)
        x0 = torch.minimum(torch.maximum(x0, -bound), bound) * clip[:, 1].to(cd).reshape(view)
    h = col(2) * xf + col(3) * x0
    out = col(4) * xf + col(5) * m + col(6) * h
    for s in range(num_slots):
        out = out + col(11 + s) * history[s].to(cd)
    if noise is not None:
        c = col(7)
        if variance is not None:
            frac = (variance.to(cd) + 1) * 0.5
            c = c * torch.exp(0.5 * (col(8) + frac * (col(9) - col(8))))
        out = out + c * noise.to(cd)
    write = coef[:, 10].round().long()
    for s in range(num_slots):
        keep = (write != s).reshape(view)
        history[s].copy_(torch.where(keep, history[s], h.to(history.dtype)))
    return out.to(x.dtype)


@torch.library.custom_op("fastdiff::sampler_step", mutates_args=("history",))
def _sampler_step_op(x: Tensor, model_out: Tensor, history: Tensor, table: Tensor, rows: Tensor,
                     uncond: Optional[Tensor], guidance_scale: float, variance: Optional[Tensor],
                     noise: Optional[Tensor], clip: Optional[Tensor], backend: Optional[str]) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    if x.dtype != torch.float64 and use_triton(x, backend):
        from fastdiff.kernels.sampler_step import sampler_step_forward
        return sampler_step_forward(x, model_out, history, table, rows, uncond, guidance_scale, variance,
                                    noise, clip)
    return sampler_step_reference(x, model_out, history, table, rows, uncond, guidance_scale, variance, noise,
                                  clip)


@_sampler_step_op.register_fake
def _(x, model_out, history, table, rows, uncond, guidance_scale, variance, noise, clip, backend):
    return torch.empty_like(x)


def _check_like_x(t: Optional[Tensor], name: str, x: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must be on one device")
    _check_float(t, name)


def sampler_step(x: Tensor, model_out: Tensor, history: Tensor, table: Tensor, rows: Tensor, *,
                 uncond: Optional[Tensor] = None, guidance_scale: float = 1.0,
                 variance: Optional[Tensor] = None, noise: Optional[Tensor] = None,
                 clip: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """One fused sampler update (a row of a table from ``fastdiff.samplers``); returns x_next, writes history.

    Args:
        x: (N, ...) state; float16, bfloat16, float32 (float64 always takes the reference path).
        model_out: (N, ...) model output (the cond half under guidance); any float dtype; may be a view
            with a batch stride (e.g. the first half of a learned-sigma output).
        history: (S, N, ...) ring of earlier history entries (x0 or d), float; updated in place.
        table: (R, 11 + S) packed coefficients (``fastdiff.samplers.pack_table``), float64 or float32.
        rows: (N,) integer row of each sample (``expand`` of one index is fine; out-of-range rows clamp).
        uncond: (N, ...) unconditional output for classifier-free guidance, or None.
        guidance_scale: w in ``u + w (c - u)`` (ignored without ``uncond``).
        variance: (N, ...) learned-range variance output v in [-1, 1] (DDPM), or None.
        noise: (N, ...) standard normal noise for this row, or None (the noise term is then dropped).
        clip: (N, 2) per-sample ``(bound, scale)``: ``x0 = clamp(x0, -bound, bound) * scale``, or None.
        backend: None (follow the switch), "auto", "triton" or "reference".
    The math is in :func:`sampler_step_reference`. Elementwise per sample: NaN in one sample stays there.
    """
    if not isinstance(x, Tensor) or x.dim() < 1:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor (N, ...), got {got}")
    _check_float(x, "x")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not isinstance(model_out, Tensor):
        raise ValueError(f"model_out must be a tensor, got {type(model_out).__name__}")
    _check_like_x(model_out, "model_out", x)
    for name, t in (("uncond", uncond), ("variance", variance), ("noise", noise)):
        _check_like_x(t, name, x)
    if not isinstance(table, Tensor) or table.dim() != 2 or table.shape[1] < _SAMPLER_STEP_FIXED_COLUMNS + 1:
        raise ValueError(f"table must be a 2-D tensor (R, 11 + S) with S >= 1, got "
                         f"{tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__}")
    if table.shape[0] == 0:
        raise ValueError("table must have at least one row")
    if table.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"table must be float32 or float64, got {table.dtype}")
    if table.device != x.device:
        raise ValueError(f"table is on {table.device} but x is on {x.device}; they must be on one device")
    num_slots = table.shape[1] - _SAMPLER_STEP_FIXED_COLUMNS
    if not isinstance(history, Tensor) or tuple(history.shape) != (num_slots, *x.shape):
        raise ValueError(f"history must have shape (S, *x.shape) = {(num_slots, *x.shape)} for this table, "
                         "got "
                         f"{tuple(history.shape) if isinstance(history, Tensor) else type(history).__name__}")
    if history.device != x.device:
        raise ValueError(f"history is on {history.device} but x is on {x.device}; they must be on one device")
    _check_float(history, "history")
    if not history.is_contiguous():
        raise ValueError("history must be contiguous (it is written in place)")
    if not isinstance(rows, Tensor) or tuple(rows.shape) != (x.shape[0],):
        raise ValueError(f"rows must be a tensor of shape (N,) = ({x.shape[0]},), got "
                         f"{tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__}")
    if rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rows must be int32 or int64, got {rows.dtype}")
    if rows.device != x.device:
        raise ValueError(f"rows is on {rows.device} but x is on {x.device}; they must be on one device")
    if clip is not None:
        if not isinstance(clip, Tensor) or tuple(clip.shape) != (x.shape[0], 2):
            raise ValueError(f"clip must have shape (N, 2) = ({x.shape[0]}, 2), got "
                             f"{tuple(clip.shape) if isinstance(clip, Tensor) else type(clip).__name__}")
        if clip.device != x.device:
            raise ValueError(f"clip is on {clip.device} but x is on {x.device}; they must be on one device")
        _check_float(clip, "clip")
    if backend is not None:
        _check_backend(backend)
    return _sampler_step_op(x, model_out, history, table, rows, uncond, float(guidance_scale), variance,
                            noise, clip, backend)
