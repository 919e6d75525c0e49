"""``sampler_step``: one row of a sampler table (fastdiff.samplers), fused; the reference is the math."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastdiff.ops.routing import (
    _check_backend,
    _check_float,
    _compute_dtype,
    use_triton,
)

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
