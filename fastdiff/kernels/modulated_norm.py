"""Conditioning norms: GroupNorm and LayerNorm with per-sample scale/shift (and SiLU) fused.

    group_norm_modulate:  out = act((GN(u) * w[c] + b[c]) * (1 + scale[n, c]) + shift[n, c]),
                          u = x + pre_shift[n, c] (pre_shift optional, never materialised)
    layer_norm_modulate:  out = (LN(x) * w[d] + b[d]) * (1 + scale[n, d]) + shift[n, d]

Statistics are float32 on "shifted data": every (sample, group) or row subtracts its first element
(the pivot) before the moments, so an input with a large common offset keeps its precision
(``x - pivot`` is exact for nearby floats; what is left to average is of the order of the spread).
With a pre_shift the pivot is the first element of u, and u - pivot is formed as
``(x - x[first]) + (pre_shift[c] - pre_shift[first])``, each difference of the order of a spread.
Inputs so large that the squares overflow float32 (|x - pivot| past ~1e19 / sqrt(count)) are detected
where the sum of squares comes out non-finite and taken again divided by the largest |x - pivot|
(``inv``, see _tile_moments): the sum of squares is then in units of inv**2, mean and rstd stay in the
units of x, so the normalising pass is unchanged. Offsets inside a sample are int32 unless a sample
spans 2**31 elements or more (WIDE).

GroupNorm works on x viewed as (N, C, S), S the flattened spatial dims, through strides: NCHW
(channel stride S, spatial stride 1) and channels_last (channel stride 1, spatial stride C) are the
same code, and Triton specialises the unit stride. A tile is (BLOCK_C channels of one group,
BLOCK_S positions).

- one tile (the (n, g) slab fits): one program per (n, g) reads x once, writes out once.
- looped (larger slabs, enough of them to fill the GPU): one program per (n, g) walks its slab for
  the moments, then again to normalise; the second read hits L2, so HBM sees one read, one write.
- split statistics (large slabs, few of them): partial moments per spatial chunk on many programs,
  a combine per (n, g) (Chan et al.'s pairwise update), then the normalising pass: x read twice.

The backward recomputes the statistics (free with one tile, where the slab is on chip) and
returns dx plus per-(n, c) dscale, dshift and per-(n, c) partials of dweight, dbias that the
launcher sums over n.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Largest tile (elements) one program holds in registers on a GPU. Sized so that the sm_90 builds do
# not spill (python -m fastdiff.kernels); the backward keeps more live values per element.
MAX_TILE_FWD = 8192
MAX_TILE_BWD = 4096
# Tile of the looped forward (MODE 1), which re-reads its slab from L2 rather than holding it; with its
# overflow re-scan it keeps three loops live, and 2048 elements on 8 warps build without spills under
# both Triton 3.6 and 3.9 (4096 spilled under one or the other at any warp count).
LOOP_TILE = 2048
# Below this many (n, g) slabs per SM the looped forward leaves the GPU idle: split statistics
# (chunks of one slab on many SMs) instead.
MIN_SLABS_PER_SM = 2


# ----------------------------------------------------------------------------------------------
# shared device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _affine_modulate(xhat, n, c, c_mask, W, B, SCALE, SHIFT, stride_sn, stride_tn,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                     HAS_SHIFT: tl.constexpr):
    """(y, z, one_plus_scale): y = xhat * w + b, z = y * (1 + scale) + shift; c broadcastable to xhat."""
    y = xhat
    if HAS_W:
        y = y * tl.load(W + c, mask=c_mask, other=1.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + c, mask=c_mask, other=0.0).to(tl.float32)
    z = y
    one_plus_scale = 1.0
    if HAS_SCALE:
        one_plus_scale = 1.0 + tl.load(SCALE + n * stride_sn + c, mask=c_mask, other=0.0).to(tl.float32)
        z = z * one_plus_scale
    if HAS_SHIFT:
        z = z + tl.load(SHIFT + n * stride_tn + c, mask=c_mask, other=0.0).to(tl.float32)
    return y, z, one_plus_scale


@triton.jit
def _channel_coefficients(n, c, c_mask, W, B, SCALE, SHIFT, stride_sn, stride_tn,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                          HAS_SHIFT: tl.constexpr):
    """Per-channel (alpha, beta) with (xhat * w + b) * (1 + scale) + shift = xhat * alpha + beta.

    Folding the four per-channel factors into two leaves one multiply-add per element (and fewer
    live registers) in the forward kernels.
    """
    alpha = tl.full(c.shape, 1.0, tl.float32)
    beta = tl.zeros(c.shape, tl.float32)
    if HAS_W:
        alpha = tl.load(W + c, mask=c_mask, other=1.0).to(tl.float32)
    if HAS_B:
        beta = tl.load(B + c, mask=c_mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        one_plus_scale = 1.0 + tl.load(SCALE + n * stride_sn + c, mask=c_mask, other=0.0).to(tl.float32)
        alpha = alpha * one_plus_scale
        beta = beta * one_plus_scale
    if HAS_SHIFT:
        beta = beta + tl.load(SHIFT + n * stride_tn + c, mask=c_mask, other=0.0).to(tl.float32)
    return alpha, beta


@triton.jit
def _group_pivot(X, PRE, n, g, c, c_mask, CG, stride_xc, stride_pn, HAS_PRE: tl.constexpr, WIDE: tl.constexpr):
    """(pivot, delta): x at the group's first element, and per channel pre_shift[n, c] - pre_shift[n, first]
    (unused without a pre_shift); (x - pivot) + delta[c] is u minus its first element (see _shifted)."""
    first = g * CG
    if WIDE:
        first = first.to(tl.int64)
    pivot = tl.load(X + first * stride_xc).to(tl.float32)
    delta = tl.zeros(c.shape, tl.float32)
    if HAS_PRE:
        pre = PRE + n * stride_pn
        delta = tl.load(pre + c, mask=c_mask, other=0.0).to(tl.float32) - tl.load(pre + g * CG).to(tl.float32)
    return pivot, delta


@triton.jit
def _shifted(x, pivot, delta, mask, HAS_PRE: tl.constexpr):
    """The tile of u = x + pre_shift minus the group's first element of u, zero outside the mask."""
    d = x - pivot
    if HAS_PRE:
        d = d + delta[:, None]
    return tl.where(mask, d, 0.0)


@triton.jit
def _gn_tile(chunk, g, CG, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Channels c, positions s, mask and channel mask of the chunk-th spatial tile of group g, and the
    tile's first channel and position (c0, s0)."""
    cc = tl.arange(0, BLOCK_C)
    s0 = chunk * BLOCK_S
    s = s0 + tl.arange(0, BLOCK_S)
    c0 = g * CG
    c = c0 + cc
    mask = (cc < CG)[:, None] & (s < S)[None, :]
    return c, s, mask, cc < CG, c0, s0


@triton.jit
def _ptrs(P, c, s, c0, s0, stride_c, stride_s, WIDE: tl.constexpr):
    """Pointers to the tile (channels c, positions s) of the sample at P, whose first element is (c0, s0).

    Offsets are int32 (half the registers of int64). Where a sample spans 2**31 elements or more (WIDE),
    the tile's base is taken in int64 and the offsets inside the tile stay int32 (the launcher checks
    that one tile spans fewer).
    """
    if WIDE:
        P += c0.to(tl.int64) * stride_c + s0.to(tl.int64) * stride_s
        c -= c0
        s -= s0
    return P + (c[:, None] * stride_c + s[None, :] * stride_s)


@triton.jit
def _row_ptrs(P, rows, cols, row0, stride_l, stride_d, WIDE: tl.constexpr):
    """Pointers to the tile (rows, cols) of an (L, D) sample at P, as _ptrs with the tile based at row0."""
    if WIDE:
        P += row0.to(tl.int64) * stride_l
        rows -= row0
    return P + (rows[:, None] * stride_l + cols[None, :] * stride_d)


@triton.jit
def _overflowed(m2):
    """A sum of squares that is inf or NaN: overflow (or a NaN in the input, which the retry keeps)."""
    return (m2 != m2) | (m2 > 3.0e38)


@triton.jit
def _plain_moments(d, mask, count):
    """Mean and centred sum of squares of the masked tile d (two passes over registers)."""
    mean = tl.sum(tl.sum(d, axis=1), axis=0) / count
    dc = tl.where(mask, d - mean, 0.0)
    m2 = tl.sum(tl.sum(dc * dc, axis=1), axis=0)
    return mean, m2


@triton.jit
def _tile_moments(d, mask, count):
    """(mean, m2, inv): the tile's mean, its centred sum of squares in units of inv**2, and inv.

    inv is 1 unless the squares overflow; then the moments are taken of d / max|d| (inv = 1 / max|d|),
    which cannot overflow, and the mean is brought back to the units of d (it is at most max|d|).
    """
    mean, m2 = _plain_moments(d, mask, count)
    inv = tl.full((), 1.0, tl.float32)
    if _overflowed(m2):
        amax = tl.max(tl.max(tl.abs(d), axis=1), axis=0)
        inv = 1.0 / amax
        mean, m2 = _plain_moments(d * inv, mask, count)
        mean = mean * amax
    return mean, m2, inv


@triton.jit
def _rstd(m2, count, inv, eps):
    """1 / sqrt(var + eps) from a sum of squares in units of inv**2 (inv = 1: the plain formula)."""
    return inv / tl.sqrt(m2 / count + eps * inv * inv)


@triton.jit
def _slab_moments(X, pivot, delta, g, CG, S, stride_xc, stride_xs, inv,
                  HAS_PRE: tl.constexpr, WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Mean and centred sum of squares of (u - pivot) * inv over a whole (n, g) slab, tile by tile,
    merged by Chan et al.'s pairwise update (exact, no E[x^2] - E[x]^2)."""
    mean = 0.0
    m2 = 0.0
    for i in range(0, tl.cdiv(S, BLOCK_S)):
        c, s, mask, c_mask, c0, s0 = _gn_tile(i, g, CG, S, BLOCK_C, BLOCK_S)
        x = tl.load(_ptrs(X, c, s, c0, s0, stride_xc, stride_xs, WIDE), mask=mask, other=0.0).to(tl.float32)
        count = CG * tl.minimum(S - i * BLOCK_S, BLOCK_S)
        chunk_mean, chunk_m2 = _plain_moments(_shifted(x, pivot, delta, mask, HAS_PRE) * inv, mask, count)
        seen = CG * i * BLOCK_S  # elements combined so far
        step = chunk_mean - mean
        mean += step * count / (seen + count)
        m2 += chunk_m2 + step * step * seen * count / (seen + count)
    return mean, m2


@triton.jit
def _slab_amax(X, pivot, delta, g, CG, S, stride_xc, stride_xs,
               HAS_PRE: tl.constexpr, WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """max |u - pivot| over a whole (n, g) slab."""
    amax = 0.0
    for i in range(0, tl.cdiv(S, BLOCK_S)):
        c, s, mask, c_mask, c0, s0 = _gn_tile(i, g, CG, S, BLOCK_C, BLOCK_S)
        x = tl.load(_ptrs(X, c, s, c0, s0, stride_xc, stride_xs, WIDE), mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.max(tl.abs(_shifted(x, pivot, delta, mask, HAS_PRE)), axis=1), axis=0))
    return amax


# ----------------------------------------------------------------------------------------------
# GroupNorm forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gn_forward_kernel(
    X,          # (N, C, S) input, strides (stride_xn, stride_xc, stride_xs)
    OUT,        # (N, C, S) output, strides (stride_on, stride_oc, stride_os)
    W,          # (C,) GroupNorm weight, or a dummy when HAS_W is False
    B,          # (C,) GroupNorm bias, or a dummy
    SCALE,      # (N, C) per-sample scale, channel stride 1, or a dummy
    SHIFT,      # (N, C) per-sample shift, channel stride 1, or a dummy
    PRE,        # (N, C) pre_shift added to x before the statistics, channel stride 1, or a dummy
    MEAN,       # (N * G,) float32 group mean of u - pivot (read in MODE 2)
    RSTD,       # (N * G,) float32 1 / sqrt(var + eps) (read in MODE 2)
    stride_xn, stride_xc, stride_xs,
    stride_on, stride_oc, stride_os,
    stride_sn,  # scale's sample stride
    stride_tn,  # shift's sample stride
    stride_pn,  # pre_shift's sample stride
    G,          # groups
    CG,         # channels per group
    S,          # spatial size
    eps,
    MODE: tl.constexpr,  # 0: slab = one tile; 1: one program loops over the slab; 2: one tile, given stats
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_PRE: tl.constexpr,
    SILU: tl.constexpr,
    WIDE: tl.constexpr,     # int64 offsets inside a sample (one sample spans 2**31 elements or more)
    BLOCK_C: tl.constexpr,  # >= CG, power of two
    BLOCK_S: tl.constexpr,  # spatial positions per tile
):
    """out = act((u - mean) * rstd * w + b) * (1 + scale) + shift), u = x + pre_shift.

    Grid (N * G, K). MODE 0 (K = 1): the (n, g) slab is one tile; statistics in registers; x read
    once, out written once. MODE 1 (K = 1): the program walks the slab twice, moments by Chan's
    update, then the normalising pass, whose re-read of the slab hits L2 (it was just read by this
    program): HBM traffic stays one read and one write. MODE 2: tile `chunk` of a slab whose statistics
    the split path computed (MEAN, RSTD).
    """
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    n = pid // G
    g = pid % G
    X += n.to(tl.int64) * stride_xn
    OUT += n.to(tl.int64) * stride_on
    c, s, mask, c_mask, c0, s0 = _gn_tile(chunk, g, CG, S, BLOCK_C, BLOCK_S)
    pivot, delta = _group_pivot(X, PRE, n, g, c, c_mask, CG, stride_xc, stride_pn, HAS_PRE, WIDE)
    if MODE == 0:
        x = tl.load(_ptrs(X, c, s, c0, s0, stride_xc, stride_xs, WIDE), mask=mask, other=0.0).to(tl.float32)
        d = _shifted(x, pivot, delta, mask, HAS_PRE)
        mean, m2, inv = _tile_moments(d, mask, CG * S)
        rstd = _rstd(m2, CG * S, inv, eps)
    elif MODE == 1:
        args = (X, pivot, delta, g, CG, S, stride_xc, stride_xs)
        mean, m2 = _slab_moments(*args, 1.0, HAS_PRE, WIDE, BLOCK_C, BLOCK_S)
        inv = tl.full((), 1.0, tl.float32)
        if _overflowed(m2):  # the squares overflowed: again, divided by the slab's max |u - pivot|
            amax = _slab_amax(*args, HAS_PRE, WIDE, BLOCK_C, BLOCK_S)
            inv = 1.0 / amax
            mean, m2 = _slab_moments(*args, inv, HAS_PRE, WIDE, BLOCK_C, BLOCK_S)
            mean = mean * amax
        rstd = _rstd(m2, CG * S, inv, eps)
    else:
        mean = tl.load(MEAN + pid)
        rstd = tl.load(RSTD + pid)
    alpha, beta = _channel_coefficients(n, c, c_mask, W, B, SCALE, SHIFT, stride_sn, stride_tn,
                                        HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    a = alpha * rstd  # z = (u - pivot - mean) * rstd * alpha + beta = (x - pivot) * a + b
    b = beta - mean * a
    if HAS_PRE:
        b += delta * a
    num_tiles = tl.cdiv(S, BLOCK_S) if MODE == 1 else 1
    for i in range(0, num_tiles):
        if MODE == 1:
            c, s, mask, c_mask, c0, s0 = _gn_tile(i, g, CG, S, BLOCK_C, BLOCK_S)
        if MODE != 0:
            x = tl.load(_ptrs(X, c, s, c0, s0, stride_xc, stride_xs, WIDE), mask=mask, other=0.0).to(tl.float32)
        z = tl.where(mask, x - pivot, 0.0) * a[:, None] + b[:, None]
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(_ptrs(OUT, c, s, c0, s0, stride_oc, stride_os, WIDE), z.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gn_partial_moments_kernel(
    X,          # (N, C, S) input
    PRE,        # (N, C) pre_shift, or a dummy
    PART_MEAN,  # (N * G, K) float32 chunk mean of u - pivot
    PART_M2,    # (N * G, K) float32 chunk centred sum of squares, in units of PART_INV**2
    PART_INV,   # (N * G, K) float32 the chunk's scale (1 unless its squares overflowed; see _tile_moments)
    stride_xn, stride_xc, stride_xs,
    stride_pn,
    G, CG, S,
    K,          # chunks per (n, g) = cdiv(S, BLOCK_S)
    HAS_PRE: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Moments of one chunk of a slab too large for one tile. Grid (N * G, K); reads x once."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    n = pid // G
    g = pid % G
    c, s, mask, c_mask, c0, s0 = _gn_tile(chunk, g, CG, S, BLOCK_C, BLOCK_S)
    X += n.to(tl.int64) * stride_xn
    pivot, delta = _group_pivot(X, PRE, n, g, c, c_mask, CG, stride_xc, stride_pn, HAS_PRE, WIDE)
    x = tl.load(_ptrs(X, c, s, c0, s0, stride_xc, stride_xs, WIDE), mask=mask, other=0.0).to(tl.float32)
    d = _shifted(x, pivot, delta, mask, HAS_PRE)
    count = CG * tl.minimum(S - chunk * BLOCK_S, BLOCK_S)
    mean, m2, inv = _tile_moments(d, mask, count)
    tl.store(PART_MEAN + pid * K + chunk, mean)
    tl.store(PART_M2 + pid * K + chunk, m2)
    tl.store(PART_INV + pid * K + chunk, inv)


@triton.jit
def _gn_combine_moments_kernel(
    PART_MEAN,  # (N * G, K) float32
    PART_M2,    # (N * G, K) float32, in units of PART_INV**2
    PART_INV,   # (N * G, K) float32
    MEAN,       # (N * G,) float32 out: mean of u - pivot
    RSTD,       # (N * G,) float32 out
    CG, S, K,
    eps,
    BLOCK_S: tl.constexpr,  # the chunk width used by the partial kernel
    BLOCK_K: tl.constexpr,  # >= K, power of two
):
    """Chan et al.'s pairwise combination of K chunk moments: exact, no E[x^2] - E[x]^2. Grid (N * G,).

    The chunks' sums of squares are brought to the smallest chunk scale inv; if the combination still
    overflows (chunk means far apart), inv shrinks to 1 / the largest chunk deviation or spread.
    """
    pid = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    k_mask = k < K
    cnt = tl.where(k_mask, CG * tl.minimum(S - k * BLOCK_S, BLOCK_S), 0).to(tl.float32)
    m = tl.load(PART_MEAN + pid * K + k, mask=k_mask, other=0.0)
    m2 = tl.load(PART_M2 + pid * K + k, mask=k_mask, other=0.0)
    inv_k = tl.load(PART_INV + pid * K + k, mask=k_mask, other=1.0)
    total = CG * S
    mean = tl.sum(cnt / total * m, axis=0)  # weights <= 1: no overflow where the means are finite
    inv = tl.min(inv_k, axis=0)
    ratio = inv / inv_k
    dev = (m - mean) * inv
    m2_total = tl.sum(m2 * ratio * ratio, axis=0) + tl.sum(cnt * dev * dev, axis=0)
    if _overflowed(m2_total):
        spread = tl.sqrt(m2 / tl.maximum(cnt, 1.0)) / inv_k  # each chunk's std, in units of x
        inv = tl.minimum(inv, 1.0 / tl.max(tl.maximum(tl.abs(m - mean), spread), axis=0))
        ratio = inv / inv_k
        dev = (m - mean) * inv
        m2_total = tl.sum(m2 * ratio * ratio, axis=0) + tl.sum(cnt * dev * dev, axis=0)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, _rstd(m2_total, total, inv, eps))


# ----------------------------------------------------------------------------------------------
# GroupNorm backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _gn_backward_kernel(
    X,          # (N, C, S) input
    DOUT,       # (N, C, S) incoming gradient, strides (stride_gn, stride_gc, stride_gs)
    DX,         # (N, C, S) out, strides (stride_dn, stride_dc, stride_ds)
    W, B, SCALE, SHIFT, PRE,   # as in the forward
    MEAN, RSTD,                # (N * G,) statistics (read unless PHASE is 0)
    GSUM,       # (N * G, K, 2) float32 per-chunk sums of dxhat and dxhat * xhat
    DSCALE,     # (N, C, K) float32 per-chunk sums of dz * y
    DSHIFT,     # (N, C, K) float32 per-chunk sums of dz
    DW,         # (N, C, K) float32 per-chunk sums of dy * xhat
    DB,         # (N, C, K) float32 per-chunk sums of dy
    DPRE,       # (N, C, K) float32 per-chunk sums of dx (the gradient of pre_shift), when HAS_PRE
    stride_xn, stride_xc, stride_xs,
    stride_gn, stride_gc, stride_gs,
    stride_dn, stride_dc, stride_ds,
    stride_sn, stride_tn, stride_pn,
    G, CG, S, K,
    eps,
    PHASE: tl.constexpr,  # 0: whole slab in one tile, everything; 1: per-chunk sums; 2: dx from GSUM
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_PRE: tl.constexpr,
    SILU: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gradients of group_norm_modulate over one tile. Grid (N * G, K).

        dz = dout * act'(z);  dshift = sum_s dz;  dscale = sum_s dz * y;  dy = dz * (1 + scale)
        db = sum_s dy;  dw = sum_s dy * xhat;  dxhat = dy * w
        dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat));  dpre_shift = sum_s dx

    PHASE 0 reads x and dout once and writes dx once. Larger slabs run PHASE 1 (reads x, dout; writes
    the per-chunk sums) then PHASE 2 (reads x, dout again; writes dx).
    """
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    n = pid // G
    g = pid % G
    c, s, mask, c_mask, c0, s0 = _gn_tile(chunk, g, CG, S, BLOCK_C, BLOCK_S)
    X += n.to(tl.int64) * stride_xn
    DOUT += n.to(tl.int64) * stride_gn
    DX += n.to(tl.int64) * stride_dn
    pivot, delta = _group_pivot(X, PRE, n, g, c, c_mask, CG, stride_xc, stride_pn, HAS_PRE, WIDE)
    x = tl.load(_ptrs(X, c, s, c0, s0, stride_xc, stride_xs, WIDE), mask=mask, other=0.0).to(tl.float32)
    d = _shifted(x, pivot, delta, mask, HAS_PRE)
    if PHASE == 0:
        mean, m2, inv = _tile_moments(d, mask, CG * S)
        rstd = _rstd(m2, CG * S, inv, eps)
    else:
        mean = tl.load(MEAN + pid)
        rstd = tl.load(RSTD + pid)
    xhat = tl.where(mask, (d - mean) * rstd, 0.0)
    dz = tl.load(_ptrs(DOUT, c, s, c0, s0, stride_gc, stride_gs, WIDE), mask=mask, other=0.0).to(tl.float32)
    y, z, one_plus_scale = _affine_modulate(xhat, n, c[:, None], c_mask[:, None], W, B, SCALE, SHIFT,
                                            stride_sn, stride_tn, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    if SILU:
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    dy = dz * one_plus_scale
    dxhat = dy
    if HAS_W:
        dxhat = dy * tl.load(W + c, mask=c_mask, other=1.0).to(tl.float32)[:, None]
    dxhat = tl.where(mask, dxhat, 0.0)
    pc = (n * CG * G + c).to(tl.int64) * K + chunk  # (N, C, K) partial index
    if PHASE != 2:
        tl.store(DSHIFT + pc, tl.sum(dz, axis=1), mask=c_mask)
        tl.store(DSCALE + pc, tl.sum(dz * y, axis=1), mask=c_mask)
        tl.store(DB + pc, tl.sum(dy, axis=1), mask=c_mask)
        tl.store(DW + pc, tl.sum(dy * xhat, axis=1), mask=c_mask)
    if PHASE == 1:
        tl.store(GSUM + (pid * K + chunk) * 2, tl.sum(tl.sum(dxhat, axis=1), axis=0))
        tl.store(GSUM + (pid * K + chunk) * 2 + 1, tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0))
    else:
        if PHASE == 0:
            sum_g = tl.sum(tl.sum(dxhat, axis=1), axis=0)
            sum_gx = tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0)
        else:
            k = tl.arange(0, BLOCK_K)
            sum_g = tl.sum(tl.load(GSUM + (pid * K + k) * 2, mask=k < K, other=0.0), axis=0)
            sum_gx = tl.sum(tl.load(GSUM + (pid * K + k) * 2 + 1, mask=k < K, other=0.0), axis=0)
        count = CG * S
        dx = rstd * (dxhat - sum_g / count - xhat * (sum_gx / count))
        tl.store(_ptrs(DX, c, s, c0, s0, stride_dc, stride_ds, WIDE), dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_PRE:
            tl.store(DPRE + pc, tl.sum(tl.where(mask, dx, 0.0), axis=1), mask=c_mask)


# ----------------------------------------------------------------------------------------------
# LayerNorm forward and backward over (N, L, D)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ln_rows(X, row0, rows, cols, mask, stride_xl, stride_xd, L, D, eps, WIDE: tl.constexpr):
    """(xhat, rstd): normalised rows (zero outside the mask) and their 1 / sqrt(var + eps), from shifted data.

    A row whose squares overflow is taken again divided by its max |x - pivot| (inv); xhat is the same,
    rstd (in the units of x) is inv times the scaled rows' one.
    """
    x = tl.load(_row_ptrs(X, rows, cols, row0, stride_xl, stride_xd, WIDE), mask=mask, other=0.0).to(tl.float32)
    first = rows * stride_xl  # each row's first feature
    if WIDE:
        first = row0.to(tl.int64) * stride_xl + (rows - row0) * stride_xl
    pivot = tl.load(X + first, mask=rows < L, other=0.0).to(tl.float32)
    d = tl.where(mask, x - pivot[:, None], 0.0)
    mean = tl.sum(d, axis=1) / D
    dc = tl.where(mask, d - mean[:, None], 0.0)
    m2 = tl.sum(dc * dc, axis=1)
    inv = tl.full(mean.shape, 1.0, tl.float32)
    if tl.max(_overflowed(m2).to(tl.int32), axis=0) > 0:
        inv = tl.where(_overflowed(m2), 1.0 / tl.max(tl.abs(d), axis=1), 1.0)
        d = d * inv[:, None]
        mean = tl.sum(d, axis=1) / D
        dc = tl.where(mask, d - mean[:, None], 0.0)
        m2 = tl.sum(dc * dc, axis=1)
    rstd = 1.0 / tl.sqrt(m2 / D + eps * inv * inv)  # of the (scaled) rows dc
    return dc * rstd[:, None], rstd * inv


@triton.jit
def _ln_forward_kernel(
    X,          # (N, L, D) input, strides (stride_xn, stride_xl, stride_xd)
    OUT,        # (N, L, D) output, strides (stride_on, stride_ol, stride_od)
    W, B,       # (D,) LayerNorm affine, or dummies
    SCALE,      # (N, D) per-sample scale, feature stride 1, or a dummy
    SHIFT,      # (N, D) per-sample shift, or a dummy
    stride_xn, stride_xl, stride_xd,
    stride_on, stride_ol, stride_od,
    stride_sn, stride_tn,
    L, D,
    eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    WIDE: tl.constexpr,     # int64 offsets inside a sample (L * D >= 2**31)
    BLOCK_M: tl.constexpr,  # rows (tokens) per program
    BLOCK_D: tl.constexpr,  # >= D, power of two
):
    """out = (LN(x) * w + b) * (1 + scale[n]) + shift[n] for BLOCK_M tokens of sample n.

    Grid (N, cdiv(L, BLOCK_M)). Traffic: x read once, out written once; scale/shift rows once per program.
    """
    n = tl.program_id(0)
    row0 = tl.program_id(1) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    c_mask = cols < D
    mask = (rows < L)[:, None] & c_mask[None, :]
    xhat, _ = _ln_rows(X + n.to(tl.int64) * stride_xn, row0, rows, cols, mask, stride_xl, stride_xd, L, D, eps,
                       WIDE)
    alpha, beta = _channel_coefficients(n, cols, c_mask, W, B, SCALE, SHIFT, stride_sn, stride_tn,
                                        HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    z = xhat * alpha[None, :] + beta[None, :]
    OUT += n.to(tl.int64) * stride_on
    tl.store(_row_ptrs(OUT, rows, cols, row0, stride_ol, stride_od, WIDE), z.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _ln_backward_kernel(
    X,          # (N, L, D) input
    DOUT,       # (N, L, D) incoming gradient
    DX,         # (N, L, D) out
    W, B, SCALE, SHIFT,
    DSCALE,     # (N, LB, D) float32 per-program sums of dz * y
    DSHIFT,     # (N, LB, D) float32 per-program sums of dz
    DW,         # (N, LB, D) float32 per-program sums of dy * xhat
    DB,         # (N, LB, D) float32 per-program sums of dy
    stride_xn, stride_xl, stride_xd,
    stride_gn, stride_gl, stride_gd,
    stride_dn, stride_dl, stride_dd,
    stride_sn, stride_tn,
    L, D, LB,
    eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradients of layer_norm_modulate for BLOCK_M tokens; per-row dx, per-program column sums.

    dx = rstd * (dxhat - mean_d(dxhat) - xhat * mean_d(dxhat * xhat)); reads x and dout once,
    writes dx once. Grid (N, LB).
    """
    n = tl.program_id(0)
    lb = tl.program_id(1)
    row0 = lb * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    c_mask = cols < D
    mask = (rows < L)[:, None] & c_mask[None, :]
    xhat, rstd = _ln_rows(X + n.to(tl.int64) * stride_xn, row0, rows, cols, mask, stride_xl, stride_xd, L, D,
                          eps, WIDE)
    DOUT += n.to(tl.int64) * stride_gn
    dz = tl.load(_row_ptrs(DOUT, rows, cols, row0, stride_gl, stride_gd, WIDE), mask=mask, other=0.0).to(tl.float32)
    y, _, one_plus_scale = _affine_modulate(xhat, n, cols[None, :], c_mask[None, :], W, B, SCALE, SHIFT,
                                            stride_sn, stride_tn, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    dy = dz * one_plus_scale
    dxhat = dy
    if HAS_W:
        dxhat = dy * tl.load(W + cols, mask=c_mask, other=1.0).to(tl.float32)[None, :]
    dxhat = tl.where(mask, dxhat, 0.0)
    sum_g = tl.sum(dxhat, axis=1)
    sum_gx = tl.sum(dxhat * xhat, axis=1)
    dx = rstd[:, None] * (dxhat - (sum_g / D)[:, None] - xhat * (sum_gx / D)[:, None])
    DX += n.to(tl.int64) * stride_dn
    tl.store(_row_ptrs(DX, rows, cols, row0, stride_dl, stride_dd, WIDE), dx.to(DX.dtype.element_ty), mask=mask)
    p = (n * LB + lb).to(tl.int64) * D + cols
    tl.store(DSHIFT + p, tl.sum(dz, axis=0), mask=c_mask)
    tl.store(DSCALE + p, tl.sum(dz * y, axis=0), mask=c_mask)
    tl.store(DB + p, tl.sum(dy, axis=0), mask=c_mask)
    tl.store(DW + p, tl.sum(dy * xhat, axis=0), mask=c_mask)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


# Offsets inside one sample are int32 below this (see _ptrs); a sample reaching it takes WIDE (int64).
INT32_LIMIT = 2**31


def _span(sizes, strides) -> int:
    return sum((n - 1) * st for n, st in zip(sizes, strides, strict=True))


def _wide(sizes: tuple[int, int], block: tuple[int, int], *strides: tuple[int, int]) -> bool:
    """WIDE for the kernels (see _ptrs): whether a sample of a tensor viewed as (N, C, S) or (N, L, D), with
    these in-sample ``sizes`` and any of these in-sample ``strides``, spans INT32_LIMIT elements. Offsets
    inside one ``block`` tile are int32 even then: a tile that spans INT32_LIMIT is refused."""
    if not any(_span(sizes, stride) >= INT32_LIMIT for stride in strides):
        return False
    for stride in strides:
        if _span(block, stride) >= INT32_LIMIT:
            raise ValueError(f"one ({block[0]} x {block[1]}) tile of in-sample strides {tuple(stride)} spans 2**31 "
                             "elements or more, past what the Triton norm kernels address; use backend='reference'")
    return True


def _check_dtype(x: Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the Triton norm kernels take float16, bfloat16 or float32 x (statistics in float32), "
                         f"got {x.dtype}; use backend='reference' (float64 statistics for float64)")


def _flat_spatial(x: Tensor) -> Optional[tuple[int, int, int]]:
    """Strides (n, c, s) of x viewed as (N, C, S), or None if its spatial dims do not flatten."""
    sizes, strides = x.shape[2:], x.stride()[2:]
    for i in range(len(sizes) - 1):
        if sizes[i] > 1 and strides[i] != strides[i + 1] * sizes[i + 1]:
            return None
    dims = [i for i, size in enumerate(sizes) if size > 1]
    stride_s = strides[dims[-1]] if dims else 1
    return x.stride(0), x.stride(1), stride_s


def _as_ncs(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    strides = _flat_spatial(x)
    if strides is None:  # e.g. a slice of the spatial dims: one copy, then the strided kernel
        x = x.contiguous()
        strides = _flat_spatial(x)
    return x, strides


def _num_warps(tile: int) -> int:
    return 4 if tile <= 2048 else 8 if tile <= 4096 else 16


def _forward_warps(mode: int, tile: int) -> int:
    """The looped forward (MODE 1) holds its moment loop, the overflow re-scan and the normalising loop
    live at once: twice the warps (half the elements per thread) keep it from spilling under Triton 3.6."""
    return min(16, _num_warps(tile) * (2 if mode == 1 else 1))


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors (the interpreter counts as one, so it exercises the looped path)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _gn_blocks(cg: int, s: int, max_tile: int) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, K chunks) for a (CG, S) slab with tiles of at most max_tile elements."""
    block_c = triton.next_power_of_2(cg)
    block_s = triton.next_power_of_2(s)
    if block_c * block_s > max_tile:
        block_s = max(1, max_tile // block_c)
    return block_c, block_s, triton.cdiv(s, block_s)


def _dummy(x: Tensor, t: Optional[Tensor]) -> Tensor:
    return t if t is not None else x


def _row_stride(t: Optional[Tensor]) -> int:
    return t.stride(0) if t is not None else 0


def _prepare_vectors(*ts: Optional[Tensor]) -> list[Optional[Tensor]]:
    """Per-channel vectors must have unit stride in their last dim for the kernels' indexing."""
    return [t if t is None or t.stride(-1) == 1 else t.contiguous() for t in ts]


def _gn_moments(x, pre_shift, strides, n, g, cg, s, eps, block_c, block_s, k):
    mean = torch.empty(n * g, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    part_mean, part_m2, part_inv = (torch.empty(n * g, k, device=x.device, dtype=torch.float32) for _ in range(3))
    _gn_partial_moments_kernel[(n * g, k)](
        x, _dummy(x, pre_shift), part_mean, part_m2, part_inv, *strides, _row_stride(pre_shift), g, cg, s, k,
        HAS_PRE=pre_shift is not None, WIDE=_wide((g * cg, s), (block_c, block_s), strides[1:]),
        BLOCK_C=block_c, BLOCK_S=block_s,
        num_warps=_num_warps(block_c * block_s))
    _gn_combine_moments_kernel[(n * g,)](
        part_mean, part_m2, part_inv, mean, rstd, cg, s, k, eps,
        BLOCK_S=block_s, BLOCK_K=triton.next_power_of_2(k), num_warps=4)
    return mean, rstd


def group_norm_modulate_forward(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                                scale: Optional[Tensor], shift: Optional[Tensor], eps: float,
                                activation: Optional[str], pre_shift: Optional[Tensor] = None,
                                max_tile: Optional[int] = None) -> Tensor:
    """Launch the forward; inputs are validated by ``fastdiff.ops.group_norm_modulate``.

    ``max_tile`` caps the elements per program (tests lower it to exercise the split path).
    """
    _check_dtype(x)
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    g, cg = num_groups, c // num_groups
    x, strides = _as_ncs(x)
    out = torch.empty_like(x)
    o_strides = _flat_spatial(out)
    weight, bias, scale, shift, pre_shift = _prepare_vectors(weight, bias, scale, shift, pre_shift)
    block_c, block_s, k = _gn_blocks(cg, s, max_tile or MAX_TILE_FWD)
    empty = torch.empty(0, device=x.device, dtype=torch.float32)
    mean = rstd = empty
    if k == 1:
        mode = 0
    elif n * g >= MIN_SLABS_PER_SM * _sm_count(x.device):
        mode, k = 1, 1
        block_c, block_s, _ = _gn_blocks(cg, s, min(max_tile or LOOP_TILE, LOOP_TILE))
    else:
        mode = 2
        mean, rstd = _gn_moments(x, pre_shift, strides, n, g, cg, s, eps, block_c, block_s, k)
    _gn_forward_kernel[(n * g, k)](
        x, out, _dummy(x, weight), _dummy(x, bias), _dummy(x, scale), _dummy(x, shift), _dummy(x, pre_shift),
        mean, rstd, *strides, *o_strides, _row_stride(scale), _row_stride(shift), _row_stride(pre_shift),
        g, cg, s, eps, MODE=mode, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_PRE=pre_shift is not None,
        SILU=activation == "silu", WIDE=_wide((c, s), (block_c, block_s), strides[1:], o_strides[1:]),
        BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_forward_warps(mode, block_c * block_s))
    return out


def group_norm_modulate_backward(grad: Tensor, x: Tensor, num_groups: int, weight: Optional[Tensor],
                                 bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                                 eps: float, activation: Optional[str], pre_shift: Optional[Tensor] = None,
                                 max_tile: Optional[int] = None):
    """(dx, dweight, dbias, dscale, dshift, dpre_shift) for the forward above; all six always returned."""
    _check_dtype(x)
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    g, cg = num_groups, c // num_groups
    x, strides = _as_ncs(x)
    grad, g_strides = _as_ncs(grad)
    dx = torch.empty_like(x)
    d_strides = _flat_spatial(dx)
    weight, bias, scale, shift, pre_shift = _prepare_vectors(weight, bias, scale, shift, pre_shift)
    block_c, block_s, k = _gn_blocks(cg, s, max_tile or MAX_TILE_BWD)
    f32 = dict(device=x.device, dtype=torch.float32)
    partials = [torch.empty(n, c, k, **f32) for _ in range(5)]  # dscale, dshift, dw, db, dpre_shift
    gsum = torch.empty(n * g, k, 2, **f32)
    if k == 1:
        mean = rstd = torch.empty(0, **f32)
        phases = (0,)
    else:
        mean, rstd = _gn_moments(x, pre_shift, strides, n, g, cg, s, eps, block_c, block_s, k)
        phases = (1, 2)
    for phase in phases:
        _gn_backward_kernel[(n * g, k)](
            x, grad, dx, _dummy(x, weight), _dummy(x, bias), _dummy(x, scale), _dummy(x, shift),
            _dummy(x, pre_shift), mean, rstd, gsum, *partials, *strides, *g_strides, *d_strides,
            _row_stride(scale), _row_stride(shift), _row_stride(pre_shift), g, cg, s, k, eps, PHASE=phase,
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None, HAS_PRE=pre_shift is not None, SILU=activation == "silu",
            WIDE=_wide((c, s), (block_c, block_s), strides[1:], g_strides[1:], d_strides[1:]),
            BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_K=triton.next_power_of_2(k),
            num_warps=_num_warps(block_c * block_s))
    as_dtype = lambda t, like: t.to(like.dtype if like is not None else x.dtype)
    dscale, dshift, dw, db = (p.sum(-1) for p in partials[:4])
    dpre = partials[4].sum(-1) if pre_shift is not None else torch.zeros(n, c, **f32)
    return (dx, as_dtype(dw.sum(0), weight), as_dtype(db.sum(0), bias), as_dtype(dscale, scale),
            as_dtype(dshift, shift), as_dtype(dpre, pre_shift))


MAX_LN_FEATURES = 16384


def _ln_blocks(l: int, d: int) -> tuple[int, int]:
    if d > MAX_LN_FEATURES:
        raise ValueError(f"layer_norm_modulate's Triton kernel takes D <= {MAX_LN_FEATURES} features, x has "
                         f"D={d}; use backend='reference'")
    block_d = triton.next_power_of_2(d)
    block_m = max(1, min(triton.next_power_of_2(l), 4096 // block_d, 16))
    return block_m, block_d


def layer_norm_modulate_forward(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                                weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Launch the forward; inputs are validated by ``fastdiff.ops.layer_norm_modulate``."""
    _check_dtype(x)
    n, l, d = x.shape
    out = torch.empty_like(x)
    weight, bias, scale, shift = _prepare_vectors(weight, bias, scale, shift)
    block_m, block_d = _ln_blocks(l, d)
    _ln_forward_kernel[(n, triton.cdiv(l, block_m))](
        x, out, _dummy(x, weight), _dummy(x, bias), _dummy(x, scale), _dummy(x, shift),
        *x.stride(), *out.stride(), _row_stride(scale), _row_stride(shift), l, d, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None, WIDE=_wide((l, d), (block_m, block_d), x.stride()[1:], out.stride()[1:]),
        BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=_num_warps(block_m * block_d))
    return out


def layer_norm_modulate_backward(grad: Tensor, x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                                 weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """(dx, dscale, dshift, dweight, dbias) for the forward above; all five always returned."""
    _check_dtype(x)
    n, l, d = x.shape
    dx = torch.empty_like(x)
    weight, bias, scale, shift = _prepare_vectors(weight, bias, scale, shift)
    block_m, block_d = _ln_blocks(l, d)
    lb = triton.cdiv(l, block_m)
    partials = [torch.empty(n, lb, d, device=x.device, dtype=torch.float32) for _ in range(4)]
    _ln_backward_kernel[(n, lb)](
        x, grad, dx, _dummy(x, weight), _dummy(x, bias), _dummy(x, scale), _dummy(x, shift), *partials,
        *x.stride(), *grad.stride(), *dx.stride(), _row_stride(scale), _row_stride(shift), l, d, lb, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
        HAS_SHIFT=shift is not None,
        WIDE=_wide((l, d), (block_m, block_d), x.stride()[1:], grad.stride()[1:], dx.stride()[1:]), BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_m * block_d))
    dscale, dshift, dw, db = (p.sum(1) for p in partials)
    as_dtype = lambda t, like: t.to(like.dtype if like is not None else x.dtype)
    return dx, as_dtype(dscale, scale), as_dtype(dshift, shift), as_dtype(dw.sum(0), weight), as_dtype(
        db.sum(0), bias)


# ----------------------------------------------------------------------------------------------
# GPU build check (python -m fastdiff.kernels)
# ----------------------------------------------------------------------------------------------


def build_configs() -> list[dict]:
    """Every launch configuration the launchers above produce at the benchmark's shapes."""
    from fastdiff.kernels import build_spec as spec

    sizes = {"G": "i32", "CG": "i32", "S": "i32", "K": "i32", "L": "i32", "D": "i32", "LB": "i32"}

    def build_spec(name, fn, types, constexprs, num_warps):
        return spec(name, fn, {**sizes, **types}, constexprs, num_warps=num_warps)

    def gn_forward(dtype, block_c, block_s, channels_last, mode=0, modulate=True, pre=False, wide=False):
        unit = {"stride_xc": 1, "stride_oc": 1} if channels_last else {"stride_xs": 1, "stride_os": 1}
        ptr = f"*{dtype}"
        flags = dict(MODE=mode, HAS_W=True, HAS_B=True, HAS_SCALE=modulate, HAS_SHIFT=modulate, HAS_PRE=pre,
                     SILU=True, WIDE=wide, BLOCK_C=block_c, BLOCK_S=block_s)
        layout = "nhwc" if channels_last else "nchw"
        name = f"gn_fwd_{('tile', 'loop', 'apply')[mode]}_{dtype}_{layout}_c{block_c}_s{block_s}"
        name += ("" if modulate else "_plain") + ("_pre" if pre else "") + ("_wide" if wide else "")
        return build_spec(name, _gn_forward_kernel,
                          {"X": ptr, "OUT": ptr, "SCALE": ptr, "SHIFT": ptr, "PRE": ptr},
                          {**unit, **flags}, num_warps=_forward_warps(mode, block_c * block_s))

    def gn_backward(dtype, phase, block_c, block_s, pre=False, wide=False):
        ptr = f"*{dtype}"
        flags = dict(PHASE=phase, HAS_W=True, HAS_B=True, HAS_SCALE=True, HAS_SHIFT=True, HAS_PRE=pre, SILU=True,
                     WIDE=wide, BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_K=1 if phase == 0 else 64)
        name = f"gn_bwd_phase{phase}_{dtype}_c{block_c}_s{block_s}" + ("_pre" if pre else "") + (
            "_wide" if wide else "")
        return build_spec(name, _gn_backward_kernel,
                          {"X": ptr, "DOUT": ptr, "DX": ptr, "SCALE": ptr, "SHIFT": ptr, "PRE": ptr},
                          {"stride_xs": 1, "stride_gs": 1, "stride_ds": 1, **flags},
                          num_warps=_num_warps(block_c * block_s))

    def ln(kernel, dtype, d, wide=False):
        block_m, block_d = _ln_blocks(1024, d)
        ptr = f"*{dtype}"
        ptrs = {"X": ptr, "OUT": ptr, "DOUT": ptr, "DX": ptr, "SCALE": ptr, "SHIFT": ptr}
        unit = {k: 1 for k in kernel.arg_names if k.startswith("stride_") and k.endswith("d")}
        flags = dict(HAS_W=False, HAS_B=False, HAS_SCALE=True, HAS_SHIFT=True, WIDE=wide, BLOCK_M=block_m,
                     BLOCK_D=block_d)
        kind = "fwd" if kernel is _ln_forward_kernel else "bwd"
        return build_spec(f"ln_{kind}_{dtype}_d{d}" + ("_wide" if wide else ""), kernel,
                          {k: v for k, v in ptrs.items() if k in kernel.arg_names},
                          {**unit, **flags}, num_warps=_num_warps(block_m * block_d))

    configs = []
    # U-Net shapes: C=512/32 groups at 8x8 (16 x 64) and 16x16 (16 x 256) fit one tile; C=1024 at
    # 16x16 (32 x 256) is the largest one-tile slab; C=512 at 32x32 (16 x 1024) and C=128 at 64x64
    # (4 x 4096) loop over 4096-element tiles.
    for block_c, block_s, mode in ((16, 64, 0), (16, 256, 0), (32, 256, 0), (16, 128, 1), (4, 512, 1)):
        for channels_last in (False, True):
            configs.append(gn_forward("bf16", block_c, block_s, channels_last, mode))
    for dtype in ("fp16", "fp32"):
        for channels_last in (False, True):
            configs.append(gn_forward(dtype, 16, 128, channels_last, 1))
    configs.append(gn_forward("bf16", 16, 128, False, 1, modulate=False))
    # diffusers' ResnetBlock2D "default" norm2: GN(x + temb) + SiLU, channels_last; SD's C=320 (10 channels a
    # group) and C=640 (20) at 8x8 to 64x64 latents
    for block_c, block_s, mode in ((16, 256, 0), (32, 256, 0), (16, 128, 1)):
        configs.append(gn_forward("bf16", block_c, block_s, True, mode, modulate=False, pre=True))
    # split statistics: C=128 at 128x128 with few samples (4 x 16384 in chunks of 4 x 2048)
    configs.append(gn_forward("bf16", 4, 2048, False, 2))
    for pre in (False, True):
        configs.append(build_spec("gn_partial_moments_bf16_c4_s2048" + ("_pre" if pre else ""),
                                  _gn_partial_moments_kernel, {"X": "*bf16", "PRE": "*bf16"},
                                  {"stride_xs": 1, "HAS_PRE": pre, "WIDE": False, "BLOCK_C": 4, "BLOCK_S": 2048},
                                  num_warps=_num_warps(4 * 2048)))
    configs.append(build_spec("gn_combine_moments_k64", _gn_combine_moments_kernel, {},
                              {"BLOCK_S": 2048, "BLOCK_K": 64}, num_warps=4))
    for dtype in ("bf16", "fp16", "fp32"):
        configs.append(gn_backward(dtype, 0, 16, 256))
    for pre in (False, True):
        configs.append(gn_backward("bf16", 1, 16, 256, pre))
        configs.append(gn_backward("bf16", 2, 16, 256, pre))
    configs.append(gn_backward("bf16", 0, 16, 256, pre=True))
    # a sample of 2**31 elements or more (e.g. C=128 at 4096x4096): int64 offsets inside the sample
    configs.append(gn_forward("bf16", 16, 256, True, 0, wide=True))
    configs.append(gn_forward("bf16", 16, 128, True, 1, wide=True))
    configs.append(gn_backward("bf16", 0, 16, 256, wide=True))
    configs.append(ln(_ln_forward_kernel, "bf16", 1152, wide=True))
    for dtype in ("bf16", "fp16", "fp32"):
        configs.append(ln(_ln_forward_kernel, dtype, 1152))
    configs.append(ln(_ln_forward_kernel, "bf16", 384))
    configs.append(ln(_ln_backward_kernel, "bf16", 1152))
    configs.append(ln(_ln_backward_kernel, "fp32", 384))
    return configs
