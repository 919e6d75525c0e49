"""The CPU paths of the conditioning norms (the ``auto`` backend off CUDA): what eager calls run, and the
plain-aten form that ``torch.compile`` sees instead of the opaque custom op.

Eager (:func:`group_norm_modulate_native`, :func:`layer_norm_modulate_native`): ATen's GroupNorm /
LayerNorm kernels with the modulation folded into their affine where the layout allows, except where
ATen's kernel is slow: for a half-precision channels_last input of fewer than 1024 positions ATen's
GroupNorm runs one program per (sample, group), vectorised 16 channels at a time, so a group width that
is not a multiple of 16 runs scalar (measured on one core: bf16 (8, 256, 16, 16), 8 channels a group,
1.67 ms with the SiLU against 0.39 ms from per-channel sums, :func:`_gn_channel_sums`; at 16 channels a
group ATen is the faster, 0.59 against 0.86 ms for (8, 512, 16, 16)).

Compiled (:func:`group_norm_modulate_decomposed`, :func:`layer_norm_modulate_decomposed`): the same math in
aten ops that inductor fuses with their neighbours (GroupNorm statistics into one reduction, the
normalisation, modulation and SiLU into one pointwise pass); the statistics are float64 sums of data
shifted by each group's first element, so they neither lose precision to a large mean nor overflow for
|x| ~ 1e30. Taken only while tracing for ``torch.compile`` on CPU tensors under ``auto``; never during
``torch.export`` / ONNX export (which keep the op and its standard-op translation) nor on CUDA (Triton).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdiff.ops.routing import _compute_dtype, current_backend

# ATen accumulates a float32 input's moments in float32, so its output error grows with the offset of a
# group, about 5e-8 * |mean| / std: where that ratio passes this limit (error 1e-6), the native paths
# recompute on pivot-shifted data. Measured: 9e-7 at 16, 5e-4 at 1e4. The per-channel sums path holds to
# the same limit (its float32 sums lose about 1e-7 * (1 + ratio**2) of the variance).
_NATIVE_OFFSET_LIMIT = 16.0
# ATen's channels_last GroupNorm uses per-(sample, group) programs below this many positions (its
# ``feature_map_threshold``), vectorised this many channels at a time: for bf16/fp16 groups of another
# width the per-channel sums path takes over.
_CHANNEL_SUMS_MAX_POSITIONS = 1024
_ATEN_GROUP_VECTOR = 16


def compile_decomposes(x: Tensor, backend: Optional[str]) -> bool:
    """Whether a norm op call is being traced by torch.compile for a CPU tensor under ``auto`` (then the
    op is written out as aten ops). The choice is made when the graph is traced: a backend switched by the
    context manager or environment after compiling takes effect at the next recompile."""
    return (torch.compiler.is_compiling() and not torch.compiler.is_exporting() and x.device.type == "cpu"
            and current_backend(backend) == "auto")


def _bcast(x: Tensor) -> tuple:
    return (slice(None), slice(None)) + (None,) * (x.dim() - 2)


def _modulate_inplace(y: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], activation=None) -> Tensor:
    """``act(y * (1 + scale) + shift)`` written into y; scale/shift already shaped to broadcast over y."""
    if scale is not None and shift is not None:
        torch.addcmul(shift, y, 1 + scale, out=y)
    elif scale is not None:
        y.mul_(1 + scale)
    elif shift is not None:
        y.add_(shift)
    if activation == "silu":
        F.silu(y, inplace=True)
    return y


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


def _native_moments_unusable(x: Tensor, mean: Tensor, rstd: Tensor) -> tuple[bool, bool]:
    """(not finite, offset) for ATen's moments: ``not finite`` where some rstd is NaN or 0 (the float32
    squares overflowed, |x| past ~1e19, or the input holds a NaN), ``offset`` where a float32 group's
    |mean| / std passes _NATIVE_OFFSET_LIMIT. The common case (neither) costs one small expression and
    one host sync."""
    if x.dtype != torch.float32:
        return not bool((rstd > 0).all()), False  # (False for NaN)
    if bool((mean.abs() < _NATIVE_OFFSET_LIMIT * rstd).all()):  # (False for NaN and for rstd = 0)
        return False, False
    nonfinite = not bool((rstd > 0).all())
    return nonfinite, not nonfinite


def _use_channel_sums(x: Tensor, num_groups: int) -> bool:
    return (x.dim() == 4 and x.dtype in (torch.bfloat16, torch.float16) and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
            and x.shape[2] * x.shape[3] < _CHANNEL_SUMS_MAX_POSITIONS
            and (x.shape[1] // num_groups) % _ATEN_GROUP_VECTOR != 0)


def _gn_channel_sums(x, num_groups, weight, bias, scale, shift, eps, activation, pre_shift) -> Optional[Tensor]:
    """group_norm_modulate of a half-precision channels_last x from per-channel sums, or None where those
    moments cannot be trusted (non-finite, or |mean| / std past _NATIVE_OFFSET_LIMIT: the caller then
    takes the reference).

    x is converted to float32 once; its per-channel sums and sums of squares (reductions over the outer
    dims of the NHWC layout, which ATen vectorises along the channels; squares of bf16/fp16 values are
    exact in float32) give each group's moments, pre_shift included without forming x + pre_shift (its
    variance loses about 1e-7 * (1 + (|mean| / std)**2), at most 3e-5 within the limit, far below the
    output's rounding); then one multiply-add per element with every per-channel factor folded in, the
    SiLU, and the conversion back. Few small ops: their Python and dispatch cost is paid per call.
    """
    n, c, h, w = x.shape
    g, cg, hw = num_groups, c // num_groups, h * w
    xf = x.float()
    s1 = xf.sum((2, 3))  # (N, C)
    s2 = xf.square().sum((2, 3))
    if pre_shift is not None:  # sums of u = x + p: S2 + 2 p (S1 + HW p / 2) and S1 + HW p
        s2 = torch.addcmul(s2, pre_shift, torch.add(s1, pre_shift, alpha=hw / 2), value=2)
        s1 = torch.add(s1, pre_shift, alpha=hw)
    sums = torch.stack([s1, s2]).view(2, n, g, cg).sum(-1) / (cg * hw)  # E[u], E[u^2] per (n, g)
    mean = sums[0]
    rstd = torch.addcmul(sums[1], mean, mean, value=-1).clamp_min_(0).add_(eps).rsqrt_()
    if not bool((mean.abs() < _NATIVE_OFFSET_LIMIT * rstd).all()):  # (False for NaN and for rstd = 0)
        return None
    mean, rstd = mean[:, :, None], rstd[:, :, None]  # z = x * alpha + beta, both (N, G, C/G)
    alpha = rstd.expand(n, g, cg) if weight is None else rstd * weight.reshape(g, cg)
    centre = mean if pre_shift is None else pre_shift.reshape(n, g, cg) - mean
    beta = (-centre if pre_shift is None else centre) * alpha
    if bias is not None:
        beta = beta + bias.reshape(g, cg)
    if scale is not None:
        one_plus = 1 + scale.reshape(n, g, cg)
        alpha, beta = alpha * one_plus, beta * one_plus
    if shift is not None:
        beta = beta + shift.reshape(n, g, cg)
    torch.addcmul(beta.reshape(n, c, 1, 1), xf, alpha.reshape(n, c, 1, 1), out=xf)
    if activation == "silu":
        F.silu(xf, inplace=True)
    return xf.to(x.dtype)


def group_norm_modulate_native(x, num_groups, weight=None, bias=None, scale=None, shift=None, eps=1e-5,
                               activation=None, pre_shift=None):
    """The ``auto`` path off CUDA in eager mode.

    - half-precision channels_last x of fewer than 1024 positions and a group width that is not a
      multiple of 16: :func:`_gn_channel_sums`;
    - otherwise ATen's GroupNorm (Welford moments, float32 for half types). For NCHW x the per-sample
      scale/shift fold into its affine (x viewed as one sample of N * C channels in N * G groups), so
      the op is ATen's GroupNorm plus an in-place SiLU; for channels_last the modulation is one more
      in-place pass. A pre_shift is added in x's dtype first (one more pass, as diffusers'
      ``norm2(h + temb)``).

    A float32 group whose mean is far from zero relative to its spread is recomputed on shifted data
    (``_NATIVE_OFFSET_LIMIT``); where the moments are not finite (squares past float32's range, or a NaN
    in the input) the call is the reference's (scaled moments, NaN kept to its group).
    """
    from fastdiff.ops.norm import group_norm_modulate_reference

    args = (x, num_groups, weight, bias, scale, shift, eps, activation, pre_shift)
    x = _dense(x)
    if _use_channel_sums(x, num_groups):
        out = _gn_channel_sums(x, *args[1:])
        return out if out is not None else group_norm_modulate_reference(*args)
    n, c = x.shape[:2]
    bcast = _bcast(x)
    u = x if pre_shift is None else _dense(x + pre_shift[bcast])
    fold = x.is_contiguous() and (scale is not None or shift is not None)
    if fold:  # per-sample affine (float32 for half types): one sample of N * C channels in N * G groups
        cd = _compute_dtype(x.dtype)
        w = x.new_ones(c, dtype=cd) if weight is None else weight.to(cd)
        b = x.new_zeros(c, dtype=cd) if bias is None else bias.to(cd)
        if scale is not None:
            w, b = w * (1 + scale.to(cd)), b * (1 + scale.to(cd))
        if shift is not None:
            b = b + shift.to(cd)
        y, mean, rstd = torch.ops.aten.native_group_norm(u.reshape(1, n * c, -1), w.expand(n, c).reshape(-1),
                                                         b.expand(n, c).reshape(-1), 1, n * c,
                                                         x.numel() // (n * c), n * num_groups, eps)
        y = y.reshape(x.shape)
    else:
        y, mean, rstd = torch.ops.aten.native_group_norm(u, weight, bias, n, c, x.numel() // (n * c), num_groups,
                                                         eps)
    nonfinite, offset = _native_moments_unusable(u, mean, rstd)
    if nonfinite or (offset and pre_shift is not None):  # (x + pre_shift was rounded as a whole)
        return group_norm_modulate_reference(*args)
    if offset:
        pivot = x[(slice(None), slice(None, None, c // num_groups)) + (0,) * (x.dim() - 2)]  # (N, G)
        y = F.group_norm(x - pivot.repeat_interleave(c // num_groups, dim=1)[bcast], num_groups, weight, bias,
                         eps)
        fold = False
    if fold:
        scale = shift = None
    return _modulate_inplace(y, None if scale is None else scale[bcast], None if shift is None else shift[bcast],
                             activation)


def layer_norm_modulate_native(x, scale=None, shift=None, weight=None, bias=None, eps=1e-6):
    """The ``auto`` path off CUDA: ATen's LayerNorm and the modulation in place on its output (a float32
    row far from zero mean is recomputed shifted by its first feature, non-finite moments go to the
    reference, as in group_norm_modulate_native)."""
    from fastdiff.ops.norm import layer_norm_modulate_reference

    y, mean, rstd = torch.ops.aten.native_layer_norm(x, x.shape[-1:], weight, bias, eps)
    nonfinite, offset = _native_moments_unusable(x, mean, rstd)
    if nonfinite:
        return layer_norm_modulate_reference(x, scale, shift, weight, bias, eps)
    if offset:
        y = F.layer_norm(x - x[..., :1], x.shape[-1:], weight, bias, eps)
    y = _modulate_inplace(y, None if scale is None else scale[:, None, :],
                          None if shift is None else shift[:, None, :])
    if not x.is_contiguous():  # ATen's output is contiguous; the op's (and its fake's) is laid out like x
        y = torch.empty_like(x).copy_(y)
    return y


# ---------------------------------------------------------------------------------------------
# what torch.compile sees on the CPU
# ---------------------------------------------------------------------------------------------


def group_norm_modulate_decomposed(x, num_groups, weight=None, bias=None, scale=None, shift=None, eps=1e-5,
                                   activation=None, pre_shift=None):
    """group_norm_modulate in aten ops for inductor, in the structure of torch's own CPU GroupNorm
    decomposition (which inductor turns into one reduction kernel and one vectorised pass):

    1. per (n, g), float64 sums of d and d**2 over x viewed as (N, G, C/G, S), d = x minus its group's
       first element (+ pre_shift[c] - pre_shift[first]): float64 keeps E[d^2] - E[d]^2 exact enough
       and cannot overflow for any finite input (|x| ~ 1e30 included);
    2. (N, C) buffers made contiguous (so that the next pass indexes them by channel and vectorises): the
       channel's pivot q, the pre_shift difference delta, scale a and offset b;
    3. ``act(((x - q) + delta) * a + b)`` over x in its own shape and layout (x - q is exact for nearby
       values, as in the reference).
    """
    n, c = x.shape[:2]
    g, cg = num_groups, c // num_groups
    cd = _compute_dtype(x.dtype)
    xg = x.reshape(n, g, cg, -1).to(cd)
    pivot = xg[:, :, :1, :1]  # (N, G, 1, 1)
    d = xg - pivot
    delta = None
    if pre_shift is not None:
        p = pre_shift.to(cd).reshape(n, g, cg, 1)
        delta = p - p[:, :, :1]  # u - (its group's first element) = (x - pivot) + delta
        d = d + delta
    d64 = d.double()
    count = cg * d.shape[-1]
    mean = d64.sum((2, 3), keepdim=True) / count
    var = (d64 * d64).sum((2, 3), keepdim=True) / count - mean * mean
    a = torch.rsqrt(var.clamp_min(0) + eps).to(cd).expand(n, g, cg, 1)
    b = -mean.to(cd) * a
    if weight is not None:
        w = weight.to(cd).reshape(1, g, cg, 1)
        a, b = a * w, b * w
    if bias is not None:
        b = b + bias.to(cd).reshape(1, g, cg, 1)
    if scale is not None:
        s = 1 + scale.to(cd).reshape(n, g, cg, 1)
        a, b = a * s, b * s
    if shift is not None:
        b = b + shift.to(cd).reshape(n, g, cg, 1)
    # as_strided (not a view of the expression) makes inductor realise each (N, C) buffer, as torch's own
    # CPU GroupNorm decomposition does, instead of recomputing it per element through c // (C/G) indexing
    per_channel = lambda t: t.expand(n, g, cg, 1).contiguous().as_strided((n, c), (c, 1))[_bcast(x)]
    z = x.to(cd) - per_channel(pivot)
    if delta is not None:
        z = z + per_channel(delta)
    z = z * per_channel(a) + per_channel(b)
    if activation == "silu":
        z = F.silu(z)
    return z.to(x.dtype)


def layer_norm_modulate_decomposed(x, scale=None, shift=None, weight=None, bias=None, eps=1e-6):
    """layer_norm_modulate in aten ops for inductor: float64 moments of the row-shifted data, then one
    fused pointwise pass."""
    cd = _compute_dtype(x.dtype)
    xf = x.to(cd)
    d = xf - xf[..., :1]
    d64 = d.double()
    mean = d64.mean(-1, keepdim=True)
    var = d64.square().mean(-1, keepdim=True) - mean.square()
    z = (d - mean.to(cd)) * torch.rsqrt(var.clamp_min(0) + eps).to(cd)
    if weight is not None:
        z = z * weight.to(cd)
    if bias is not None:
        z = z + bias.to(cd)
    if scale is not None:
        z = z * (1 + scale.to(cd)[:, None, :])
    if shift is not None:
        z = z + shift.to(cd)[:, None, :]
    return z.to(x.dtype)
