"""The conditioning norms: ``group_norm_modulate`` (GroupNorm of x plus an optional per-sample pre_shift,
affine, per-sample scale/shift, SiLU) and ``layer_norm_modulate`` (DiT's adaLN modulate): reference, native
CPU path, Triton routing, autograd."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from fastdiff.ops.norm_cpu import (
    compile_decomposes,
    group_norm_modulate_decomposed,
    group_norm_modulate_native,
    layer_norm_modulate_decomposed,
    layer_norm_modulate_native,
)
from fastdiff.ops.routing import (
    ACTIVATIONS,
    _check_backend,
    _check_float,
    _check_vector,
    _compute_dtype,
    _silu_grad,
    current_backend,
    use_triton,
)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0 (it is added to the variance), got {eps!r}")
    return float(eps)


def _check_triton_dtype(x: Tensor, backend: Optional[str]) -> None:
    if x.dtype == torch.float64 and current_backend(backend) == "triton":
        raise ValueError("x is float64, which the Triton kernels would compute at float32 accuracy; use "
                         "backend='auto' or 'reference' (float64 statistics)")


# A row of shifted data whose max |d| passes this is divided by a power of two near that max before the
# moments: its squares would overflow float32 (past ~1e19), the scaled ones cannot.
_SCALE_ABOVE = 2.0**40


def _moments(d: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(mean, rstd) of d over its last dim (kept), in d's dtype, rstd = 1 / sqrt(var + eps).

    A row with max |d| past ``_SCALE_ABOVE`` is divided by a power of two (exactly) before the moments;
    mean and rstd come back in the units of d, where they stay finite (|mean| <= max |d|, rstd >=
    1 / (2 max |d|)), so |x| ~ 1e30 normalises correctly instead of to 0.
    """
    amax = d.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > _SCALE_ABOVE, torch.ldexp(torch.ones_like(amax), torch.frexp(amax)[1]), 1.0)
    var, mean = torch.var_mean(d / scale, dim=-1, unbiased=False, keepdim=True)
    return mean * scale, torch.rsqrt(var + eps / scale.square()) / scale


def _gn_shifted(x: Tensor, num_groups: int, pre_shift: Optional[Tensor]) -> Tensor:
    """u = x + pre_shift[n, c] minus the first element of its group, as (N, G, C/G * S) in the compute dtype.

    Subtracting the group's first element before the moments ("shifted data") keeps the precision of
    an input with a large common offset (mean 1e4, std 1): ``x - pivot`` is exact when the two are
    close, and the mean then removed is of the order of the spread. With a pre_shift, u is never
    rounded as a whole: ``(x - x[first]) + (pre_shift[c] - pre_shift[first])``.
    """
    n, c = x.shape[:2]
    xg = x.to(_compute_dtype(x.dtype)).reshape(n, num_groups, -1)
    d = xg - xg[:, :, :1]
    if pre_shift is not None:
        p = pre_shift.to(d.dtype).reshape(n, num_groups, c // num_groups)
        d = (d.reshape(n, num_groups, c // num_groups, -1) + (p - p[:, :, :1])[..., None]).reshape(d.shape)
    return d


def _gn_normalize(x: Tensor, num_groups: int, eps: float,
                  pre_shift: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """GroupNorm of u = x + pre_shift without affine: (uhat as (N, C, S), rstd as (N, G, 1)) in the
    compute dtype, from shifted data (:func:`_gn_shifted`)."""
    n, c = x.shape[:2]
    d = _gn_shifted(x, num_groups, pre_shift)
    mean, rstd = _moments(d, eps)
    return ((d - mean) * rstd).reshape(n, c, -1), rstd


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
                                  eps=1e-5, activation=None, pre_shift=None):
    """Plain-PyTorch group_norm_modulate; statistics in float32 (float64 for float64 input).

    The per-channel factors fold into one (N, C) pair, ``z = (u - pivot) * a + b`` (as in the kernel),
    so the CPU path makes few passes over x: the shift, the moments, one multiply-add, the activation.
    """
    n, c = x.shape[:2]
    cd = _compute_dtype(x.dtype)
    d = _gn_shifted(x, num_groups, pre_shift)  # d is kept, the pivot is not
    mean, rstd = (t[..., 0].repeat_interleave(c // num_groups, dim=1) for t in _moments(d, eps))  # (N, C)
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


def group_norm_modulate_backward_reference(grad, x, num_groups, weight, bias, scale, shift, eps,
                                           activation, pre_shift=None):
    """Closed-form gradients of group_norm_modulate: (dx, dweight, dbias, dscale, dshift, dpre_shift).

    All six are always returned (weight/bias as (C,), scale/shift/pre_shift as (N, C)); the autograd
    wrapper drops those of absent inputs. dpre_shift is dx summed over the spatial positions.
    """
    n, c = x.shape[:2]
    cd = _compute_dtype(x.dtype)
    xhat, rstd = _gn_normalize(x, num_groups, eps, pre_shift)  # (N, C, S), (N, G, 1)
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
    dpre = dx.reshape(n, c, -1).sum(-1)
    out_dx = torch.empty_like(x)
    out_dx.copy_(dx.reshape(x.shape))
    pdt = lambda t, like: t.to(like.dtype if like is not None else x.dtype)
    return (out_dx, pdt(dweight, weight), pdt(dbias, bias), pdt(dscale, scale), pdt(dshift, shift),
            pdt(dpre, pre_shift))


@torch.library.custom_op("fastdiff::group_norm_modulate", mutates_args=())
def _group_norm_modulate_op(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                            scale: Optional[Tensor], shift: Optional[Tensor], pre_shift: Optional[Tensor],
                            eps: float, activation: Optional[str], backend: Optional[str]) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    args = (x, num_groups, weight, bias, scale, shift, eps, activation, pre_shift)
    if use_triton(x, backend) and x.dtype != torch.float64:  # float64 under "auto" on CUDA: ATen's float64 GN
        from fastdiff.kernels.modulated_norm import group_norm_modulate_forward
        return group_norm_modulate_forward(*args)
    if current_backend(backend) == "auto":
        return group_norm_modulate_native(*args)
    return group_norm_modulate_reference(*args)


@_group_norm_modulate_op.register_fake
def _(x, num_groups, weight, bias, scale, shift, pre_shift, eps, activation, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastdiff::group_norm_modulate_backward", mutates_args=())
def _group_norm_modulate_backward_op(
        grad: Tensor, x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
        scale: Optional[Tensor], shift: Optional[Tensor], pre_shift: Optional[Tensor], eps: float,
        activation: Optional[str], backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (grad, x, num_groups, weight, bias, scale, shift, eps, activation, pre_shift)
    if x.numel() == 0:
        n, c = x.shape[:2]
        zeros = lambda t, shape: x.new_zeros(shape, dtype=t.dtype if t is not None else x.dtype)
        return (torch.zeros_like(x), zeros(weight, (c,)), zeros(bias, (c,)), zeros(scale, (n, c)),
                zeros(shift, (n, c)), zeros(pre_shift, (n, c)))
    if use_triton(x, backend) and x.dtype != torch.float64:
        from fastdiff.kernels.modulated_norm import group_norm_modulate_backward
        return group_norm_modulate_backward(*args)
    return group_norm_modulate_backward_reference(*args)


@_group_norm_modulate_backward_op.register_fake
def _(grad, x, num_groups, weight, bias, scale, shift, pre_shift, eps, activation, backend):
    n, c = x.shape[:2]
    pick = lambda t, shape: x.new_empty(shape, dtype=t.dtype if t is not None else x.dtype)
    return (torch.empty_like(x), pick(weight, (c,)), pick(bias, (c,)), pick(scale, (n, c)),
            pick(shift, (n, c)), pick(pre_shift, (n, c)))


def _gnm_setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, scale, shift, pre_shift, eps, activation, backend = inputs
    ctx.save_for_backward(x, weight, bias, scale, shift, pre_shift)
    ctx.args = (num_groups, eps, activation, backend)


def _gnm_backward(ctx, grad):
    x, weight, bias, scale, shift, pre_shift = ctx.saved_tensors
    num_groups, eps, activation, backend = ctx.args
    dx, dw, db, ds, dt, dp = torch.ops.fastdiff.group_norm_modulate_backward(
        grad, x, num_groups, weight, bias, scale, shift, pre_shift, eps, activation, backend)
    keep = lambda g, t: g if t is not None and t.requires_grad else None
    return (dx, None, keep(dw, weight), keep(db, bias), keep(ds, scale), keep(dt, shift), keep(dp, pre_shift),
            None, None, None)


_group_norm_modulate_op.register_autograd(_gnm_backward, setup_context=_gnm_setup_context)


def group_norm_modulate(x: Tensor, num_groups: int, weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                        shift: Optional[Tensor] = None, eps: float = 1e-5,
                        activation: Optional[str] = None, backend: Optional[str] = None, *,
                        pre_shift: Optional[Tensor] = None) -> Tensor:
    """``act((GN(x + pre_shift[n, c]) * weight[c] + bias[c]) * (1 + scale[n, c]) + shift[n, c])``.

    The order of ADM's ``use_scale_shift_norm`` ResBlock (norm, then ``* (1 + scale) + shift``, then
    SiLU); with scale and shift absent it is GroupNorm (+ SiLU). ``pre_shift`` is added to x before the
    group statistics: diffusers' ResnetBlock2D "default" time embedding, ``SiLU(norm2(h + temb[:, :, None,
    None]))``, is ``group_norm_modulate(h, G, w, b, activation="silu", pre_shift=temb)``. The sum
    ``x + pre_shift`` is not returned (and not materialised on the Triton path).

    Args:
        x: (N, C, *spatial), spatial rank 1, 2 or 3; float16, bfloat16, float32, or float64 (not on the
            "triton" backend); NCHW or channels_last; the output keeps x's dtype and memory format.
        num_groups: divides C.
        weight, bias: (C,) GroupNorm affine, x's dtype or float32, or None.
        scale, shift: (N, C) per-sample modulation in x's dtype, or None.
        eps: added to the variance; a finite number > 0.
        activation: None or "silu".
        backend: None (follow the switch), "auto", "triton" or "reference".
        pre_shift: (N, C) in x's dtype, added to x before the statistics (keyword only), or None. Its
            gradient is the spatial sum of x's.
    Statistics are float32 (float64 for float64 input) on data shifted by each group's first element, and
    scaled by a power of two where the squares would overflow (|x| ~ 1e30 normalises correctly); NaN in
    one group stays in that group.
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
    _check_vector(pre_shift, "pre_shift", x, (n, c), same_dtype=True)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    eps = _check_eps(eps)
    if backend is not None:
        _check_backend(backend)
    _check_triton_dtype(x, backend)
    if compile_decomposes(x, backend):  # torch.compile on the CPU: aten ops that inductor fuses
        return group_norm_modulate_decomposed(x, num_groups, weight, bias, scale, shift, eps, activation, pre_shift)
    return _group_norm_modulate_op(x, num_groups, weight, bias, scale, shift, pre_shift, eps, activation, backend)


# ---------------------------------------------------------------------------------------------
# layer_norm_modulate: (LN(x) * weight[d] + bias[d]) * (1 + scale[n, d]) + shift[n, d]
# ---------------------------------------------------------------------------------------------


def _ln_normalize(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """LayerNorm without affine over the last dim: (xhat, rstd) in the compute dtype."""
    xf = x.to(_compute_dtype(x.dtype))
    d = xf - xf[..., :1]  # shifted data, as in _gn_normalize
    mean, rstd = _moments(d, eps)
    return (d - mean) * rstd, rstd


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
    if use_triton(x, backend) and x.dtype != torch.float64:
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
    if x.numel() == 0:
        n, _, d = x.shape
        zeros = lambda t, shape: x.new_zeros(shape, dtype=t.dtype if t is not None else x.dtype)
        return (torch.zeros_like(x), zeros(scale, (n, d)), zeros(shift, (n, d)), zeros(weight, (d,)),
                zeros(bias, (d,)))
    if use_triton(x, backend) and x.dtype != torch.float64:
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
        x: (N, L, D) tokens; float16, bfloat16, float32, or float64 (not on the "triton" backend).
        scale, shift: (N, D) in x's dtype, or None (None for both is a plain LayerNorm).
        weight, bias: (D,) LayerNorm affine (DiT uses none), x's dtype or float32, or None.
        eps: added to the variance (DiT: 1e-6); a finite number > 0.
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
    eps = _check_eps(eps)
    if backend is not None:
        _check_backend(backend)
    _check_triton_dtype(x, backend)
    if compile_decomposes(x, backend):
        return layer_norm_modulate_decomposed(x, scale, shift, weight, bias, eps)
    return _layer_norm_modulate_op(x, scale, shift, weight, bias, eps, backend)
