"""Fused sampler update: one row of a sampler table (fastdiff.samplers) in one pass over memory.

Per sample n, with ``r = rows[n]`` and that row's coefficients from the table (all math in float32):

    m      = u + w (c - u)                                  (HAS_UNCOND; else m = c)
    x0     = clamp(p x + q m, -bound_n, bound_n) * scale_n  (CLIP; else p x + q m)
    h      = e x + f x0                                     new history entry (x0 or d)
    c'     = c exp((lv_lo + (v + 1)/2 (lv_hi - lv_lo)) / 2)  (LEARNED_VAR; else c' = c)
    x_next = a x + g m + b0 h + sum_s b_s H[s] + c' z       (HAS_NOISE for the z term)
    H[write] = h                                            (when write >= 0)

Memory traffic per element: reads x, c, (u), (v), (z) and the ring slots whose coefficient is nonzero
(a uniform branch per program, so a first-order row reads no history), writes x_next and at most one
history slot. The table row (11 + S scalars) is read once per program. Nothing else is touched, so the
kernel runs at copy bandwidth; the floor is ``(reads + writes) * bytes / copy_bandwidth``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

NUM_FIXED_COLUMNS = 11  # p q e f a g b0 c lv_lo lv_hi write, then one column per ring slot
BLOCK = 1024
NUM_WARPS = 4
_MAX_GRID_Y = 65535  # samples are the grid's second axis


@triton.jit
def _sampler_step_kernel(
    x_ptr,  # (N, M) state, sample stride stride_x, each sample contiguous
    m_ptr,  # (N, M) model output (cond half), sample stride stride_m
    u_ptr,  # (N, M) unconditional output (read when HAS_UNCOND), sample stride stride_u
    v_ptr,  # (N, M) learned-range variance output (read when LEARNED_VAR), sample stride stride_v
    z_ptr,  # (N, M) noise (read when HAS_NOISE), sample stride stride_z
    hist_ptr,  # (S, N, M) history ring, contiguous (slot offsets s * N * M in int64)
    table_ptr,  # (R, NCOL) coefficients, contiguous, float64 or float32
    rows_ptr,  # (N,) int32/int64 row per sample, stride stride_rows (0: one row for all)
    clip_ptr,  # (N, 2) per-sample (bound, scale) (read when CLIP), sample stride stride_clip
    out_ptr,  # (N, M) x_next, contiguous
    M,  # elements per sample
    num_rows,  # R
    hist_slot_stride,  # N * M
    stride_x,  # sample strides, in elements
    stride_m,
    stride_u,
    stride_v,
    stride_z,
    stride_rows,
    stride_clip,
    guidance_scale,  # w
    NCOL: tl.constexpr,  # 11 + NUM_SLOTS
    NUM_SLOTS: tl.constexpr,  # S
    HAS_UNCOND: tl.constexpr,
    LEARNED_VAR: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M

    row = tl.load(rows_ptr + n * stride_rows).to(tl.int32)
    row = tl.minimum(tl.maximum(row, 0), num_rows - 1)
    tbl = table_ptr + row.to(tl.int64) * NCOL
    p = tl.load(tbl + 0).to(tl.float32)
    q = tl.load(tbl + 1).to(tl.float32)
    e = tl.load(tbl + 2).to(tl.float32)
    f = tl.load(tbl + 3).to(tl.float32)
    a = tl.load(tbl + 4).to(tl.float32)
    g = tl.load(tbl + 5).to(tl.float32)
    b0 = tl.load(tbl + 6).to(tl.float32)
    c = tl.load(tbl + 7).to(tl.float32)
    write = tl.load(tbl + 10).to(tl.int32)

    x = tl.load(x_ptr + n * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + n * stride_m + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(u_ptr + n * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
        m = u + guidance_scale * (m - u)
    x0 = p * x + q * m
    if CLIP:
        bound = tl.load(clip_ptr + n * stride_clip).to(tl.float32)
        scale = tl.load(clip_ptr + n * stride_clip + 1).to(tl.float32)
        x0 = tl.minimum(tl.maximum(x0, -bound), bound) * scale
    h = e * x + f * x0
    acc = a * x + g * m + b0 * h

    hist_row = hist_ptr + n * M + offs
    # N * M fits int32 when the launcher passes it as i32, but s * N * M (slot s > 0) need not: int64.
    slot_stride = hist_slot_stride.to(tl.int64)
    for s in tl.static_range(NUM_SLOTS):
        b = tl.load(tbl + 11 + s).to(tl.float32)
        if b != 0.0:
            hv = tl.load(hist_row + s * slot_stride, mask=mask, other=0.0).to(tl.float32)
            acc += b * hv

    if HAS_NOISE:
        z = tl.load(z_ptr + n * stride_z + offs, mask=mask, other=0.0).to(tl.float32)
        if LEARNED_VAR:
            lo = tl.load(tbl + 8).to(tl.float32)
            hi = tl.load(tbl + 9).to(tl.float32)
            v = tl.load(v_ptr + n * stride_v + offs, mask=mask, other=0.0).to(tl.float32)
            acc += c * tl.exp(0.5 * (lo + (v + 1.0) * 0.5 * (hi - lo))) * z
        else:
            acc += c * z

    tl.store(out_ptr + n * M + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if write >= 0:
        tl.store(hist_row + write.to(tl.int64) * slot_stride, h.to(hist_ptr.dtype.element_ty), mask=mask)


def _inner_contiguous(t: Tensor) -> bool:
    """Whether each sample ``t[n]`` is one contiguous block in logical order."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _per_sample(t: Optional[Tensor], fallback: Tensor) -> tuple[Tensor, int]:
    """(tensor, sample stride) with each sample contiguous; copies only a tensor that is not."""
    if t is None:
        return fallback, 0
    if not _inner_contiguous(t):
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0)


def sampler_step_forward(x: Tensor, model_out: Tensor, history: Tensor, table: Tensor, rows: Tensor,
                         uncond: Optional[Tensor], guidance_scale: float, variance: Optional[Tensor],
                         noise: Optional[Tensor], clip: Optional[Tensor]) -> Tensor:
    """Launch the fused update (inputs validated by ``fastdiff.ops.sampler_step``). Returns x_next."""
    n = x.shape[0]
    m_el = x[0].numel() if n else 0
    num_slots = table.shape[1] - NUM_FIXED_COLUMNS
    if history.shape != (num_slots, *x.shape) or not history.is_contiguous():
        raise ValueError(f"history must be a contiguous (S, *x.shape) = {(num_slots, *x.shape)} tensor")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the sampler_step kernel takes float16, bfloat16 or float32 x, got {x.dtype}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n == 0 or m_el == 0:
        return out
    if m_el >= 2**31 or n > _MAX_GRID_Y:
        raise ValueError(f"the sampler_step kernel takes at most {_MAX_GRID_Y} samples of fewer than 2^31 "
                         f"elements each; x has {n} samples of {m_el}")
    xc, sx = _per_sample(x, x)
    mc, sm = _per_sample(model_out, x)
    uc, su = _per_sample(uncond, x)
    vc, sv = _per_sample(variance, x)
    zc, sz = _per_sample(noise, x)
    tbl = table.contiguous()
    clip_t = clip if clip is not None else tbl
    stride_clip = clip.stride(0) if clip is not None else 0
    if clip is not None and clip.stride(1) != 1:
        clip_t = clip.contiguous()
        stride_clip = clip_t.stride(0)
    grid = (triton.cdiv(m_el, BLOCK), n)
    _sampler_step_kernel[grid](
        xc, mc, uc, vc, zc, history, tbl, rows, clip_t, out,
        m_el, table.shape[0], n * m_el,
        sx, sm, su, sv, sz, rows.stride(0), stride_clip,
        float(guidance_scale),
        NCOL=table.shape[1], NUM_SLOTS=num_slots,
        HAS_UNCOND=uncond is not None, LEARNED_VAR=variance is not None, HAS_NOISE=noise is not None,
        CLIP=clip is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) and x.dim() == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def build_configs() -> list:
    """Kernel configurations for the build check (``python -m fastdiff.kernels``).

    Covers the state dtypes (fp32 / bf16 / fp16 with a float32 history and a float64 table), the common
    flag sets (plain ODE row with 1 slot, guided + noise + clip with 2 slots, learned-range DDPM, LMS with
    3 slots) so that every branch of the kernel is compiled.
    """
    configs = []
    variants = [
        # name, NUM_SLOTS, HAS_UNCOND, LEARNED_VAR, HAS_NOISE, CLIP
        ("ode", 1, False, False, False, False),
        ("cfg_noise_clip", 2, True, False, True, True),
        ("ddpm_learned_range", 1, True, True, True, True),
        ("lms", 3, False, False, False, False),
    ]
    for dt in ("fp32", "bf16", "fp16"):
        for name, slots, unc, lv, noise, clip in variants:
            sig = {
                "x_ptr": f"*{dt}", "m_ptr": f"*{dt}", "u_ptr": f"*{dt}", "v_ptr": f"*{dt}", "z_ptr": f"*{dt}",
                "hist_ptr": "*fp32", "table_ptr": "*fp64", "rows_ptr": "*i32", "clip_ptr": "*fp32",
                "out_ptr": f"*{dt}",
                "M": "i32", "num_rows": "i32", "hist_slot_stride": "i32",
                "stride_x": "i32", "stride_m": "i32", "stride_u": "i32", "stride_v": "i32", "stride_z": "i32",
                "stride_rows": "i32", "stride_clip": "i32", "guidance_scale": "fp32",
                "NCOL": "constexpr", "NUM_SLOTS": "constexpr", "HAS_UNCOND": "constexpr",
                "LEARNED_VAR": "constexpr", "HAS_NOISE": "constexpr", "CLIP": "constexpr",
                "BLOCK": "constexpr",
            }
            constexprs = {"NCOL": NUM_FIXED_COLUMNS + slots, "NUM_SLOTS": slots, "HAS_UNCOND": unc,
                          "LEARNED_VAR": lv, "HAS_NOISE": noise, "CLIP": clip, "BLOCK": BLOCK}
            configs.append({"name": f"sampler_step_{name}_{dt}", "fn": _sampler_step_kernel, "signature": sig,
                            "constexprs": constexprs, "num_warps": NUM_WARPS, "num_stages": 1})
    return configs
