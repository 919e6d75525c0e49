"""Flash attention for diffusion shapes: ``out = softmax(q k^T * scale + bias) v``, non-causal.

q is (B, H, Sq, D), k and v are (B, H, Skv, D), Sq and Skv independent (self- and cross-attention),
any D from 1 to 128 (40, 72, 80, 96 included; tiles are at least 16 wide). Inputs are read
through their strides as given (views of a fused qkv projection after a permute work unchanged;
nothing is copied or padded in memory); the launcher passes the outer strides divided by the
largest power of two (<= 16) dividing them all (``STRIDE_MULT``) so that the compiler can prove
16-byte alignment and vectorise and pipeline the loads, e.g. for rows of 72 elements.
Accumulation is float32; fp16 and bf16 on a GPU (float32 there is SDPA's job: the exact-fp32 dot
of the kernel spills), float32 and float16 under the Triton interpreter on the CPU.

Forward (``_attn_fwd_kernel``, one program per (BLOCK_M query rows, batch*head)): the online
softmax of FlashAttention-2. For each block of BLOCK_N keys: ``s = q k^T * scale*log2(e) +
bias*log2(e)``; ``m' = max(m, rowmax(s))``; ``p = exp2(s - m')``; ``l = l*exp2(m - m') + rowsum(p)``;
``acc = acc*exp2(m - m') + p v``. At the end ``out = acc / l`` and ``lse2 = m + log2(l)`` (the
row's log-sum-exp in log2 units, kept for the backward). The Sq x Skv score matrix never leaves
the chip. FLOPs ``4 * B*H*Sq*Skv*D``; memory traffic ``q, out`` once and ``k, v`` once per query
block, i.e. ``2*B*H*Sq*D + 2*B*H*Skv*D*ceil(Sq/BLOCK_M)`` elements (plus the bias tile if any).

Head dims that are not a power of two are handled inside the kernel in one of two ways, chosen by
the launcher (``split_d``): a padded tile (``BLOCK_D0 = next_pow2(D)``, masked loads, e.g. 72 in a
128 tile: 78% extra matrix work), or a split into two power-of-two pieces (``BLOCK_D0 + BLOCK_D1``,
e.g. 72 = 64 + 16-with-8-masked: 11% extra; 80 = 64 + 16 and 96 = 64 + 32 exactly) with two dots
per product and two accumulators. The split is the default where it shrinks the tile.

Fully masked rows (every key's bias is -inf) give zeros, not NaN, and no NaN gradient.

Backward (a Triton backward, FlashAttention-2's two-kernel form, padded tile ``next_pow2(D)``):
``delta = rowsum(dout * out)`` (in torch, float32); ``_attn_bwd_dkdv_kernel`` (one program per
BLOCK_N keys) recomputes ``p^T = exp2(k q^T * c + bias - lse2)`` block by block over the queries
and accumulates ``dv += p^T dout``, ``dk += (p^T * (v dout^T - delta)) q * scale``;
``_attn_bwd_dq_kernel`` (one program per BLOCK_M queries) accumulates
``dq += (p * (dout v^T - delta)) k * scale`` over the keys. No atomics; each writes its rows once.
FLOPs ``14 * B*H*Sq*Skv*D`` (``q k^T`` and ``dout v^T`` are computed in both kernels; the
single-kernel form with atomic dq does 10); memory: q, dout read once per key block, k, v once
per query block, dq, dk, dv written once. The bias gets no gradient here (``fastdiff.ops`` falls
back to its reference backward when the bias requires one).

Block sizes: one fixed config under ``TRITON_INTERPRET=1`` (autotuning with 2+ configs fails
there); on a GPU the forward autotunes over a short list per (tile width, dtype, bias) keyed on
(D, Sq, Skv), the backward uses one fixed config per (tile width, bias). ``build_configs()`` lists every
configuration for the sm_90 / sm_80 build check (``python -m fastdiff.kernels``).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["attention_forward", "attention_backward", "build_configs", "tile_widths", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_GPU_DTYPES = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float32, torch.float16)  # the interpreter: no faithful bfloat16


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _hint3(a, b, c, MULT: tl.constexpr):
    # The launcher passes these strides divided by MULT; multiplying by the constant here lets the
    # compiler prove their alignment (a hint on a scalar argument is not carried through).
    return a * MULT, b * MULT, c * MULT


@triton.jit
def _fwd_kv_block(
    acc0, acc1, m_i, l_i,
    q0, q1,
    k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1,
    bias_base, bias_offs,
    start_n, offs_m, offs_n, mask_m, mask_d0, mask_d1,
    Sq, Skv, qk_scale,
    stride_ks, stride_vs, stride_bias_n,
    BLOCK_D1: tl.constexpr,
    MASK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INT64_OFFSETS: tl.constexpr,
):
    """One BLOCK_N slab of keys into the running (acc, m, l) of a block of queries."""
    if INT64_OFFSETS:
        start_n = tl.cast(start_n, tl.int64)
    cols = start_n + offs_n
    mask_n = cols < Skv
    if MASK_N:
        k0 = tl.load(k_ptrs0 + start_n * stride_ks, mask=mask_n[:, None] & mask_d0[None, :], other=0.0)
        v0 = tl.load(v_ptrs0 + start_n * stride_vs, mask=mask_n[:, None] & mask_d0[None, :], other=0.0)
    else:
        k0 = tl.load(k_ptrs0 + start_n * stride_ks, mask=mask_d0[None, :], other=0.0)
        v0 = tl.load(v_ptrs0 + start_n * stride_vs, mask=mask_d0[None, :], other=0.0)
    s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PRECISION)
    if BLOCK_D1 > 0:
        if MASK_N:
            k1 = tl.load(k_ptrs1 + start_n * stride_ks, mask=mask_n[:, None] & mask_d1[None, :], other=0.0)
            v1 = tl.load(v_ptrs1 + start_n * stride_vs, mask=mask_n[:, None] & mask_d1[None, :], other=0.0)
        else:
            k1 = tl.load(k_ptrs1 + start_n * stride_ks, mask=mask_d1[None, :], other=0.0)
            v1 = tl.load(v_ptrs1 + start_n * stride_vs, mask=mask_d1[None, :], other=0.0)
        s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PRECISION)
    s = s * qk_scale
    if HAS_BIAS:
        b = tl.load(bias_base + (bias_offs + start_n * stride_bias_n), mask=mask_m[:, None] & mask_n[None, :],
                    other=0.0)
        s += b.to(tl.float32) * 1.4426950408889634
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if HAS_BIAS:
        # A row whose keys are all -inf so far keeps m = -inf; subtract 0 instead so that
        # exp2(-inf - -inf) never makes a NaN (p and alpha are then 0).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PRECISION)
    if BLOCK_D1 > 0:
        acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, H, Sq, D), any strides
    K,  # (B, H, Skv, D), any strides
    V,  # (B, H, Skv, D), any strides
    Bias,  # (B, H, Sq, Skv) through broadcast strides (0 where broadcast); unused unless HAS_BIAS
    Out,  # (B, H, Sq, D), any strides
    Lse,  # (B * H, Sq) float32, contiguous: the row log-sum-exp in log2 units
    qk_scale,  # float: softmax scale * log2(e)
    stride_qb,  # q strides, in elements
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,  # k strides
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,  # v strides
    stride_vh,
    stride_vs,
    stride_vd,
    stride_bias_b,  # bias strides (0 on broadcast dims)
    stride_bias_h,
    stride_bias_m,
    stride_bias_n,
    stride_ob,  # out strides
    stride_oh,
    stride_os,
    stride_od,
    H,  # int: heads
    Sq,  # int: query length
    Skv,  # int: key/value length
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D0: tl.constexpr,  # first tile of the head dim (power of two >= 16)
    BLOCK_D1: tl.constexpr,  # second tile (0, or a power of two >= 16); BLOCK_D0 + BLOCK_D1 >= D
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (the interpreter), ignored for fp16/bf16
    STRIDE_MULT: tl.constexpr,  # power of two dividing the q/k/v/out strides; those args are divided by it
    INT64_OFFSETS: tl.constexpr,  # row/column offsets in int64 (a (batch, head) slice or bias past 2^31)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # Alignment: without it the loads are neither vectorised nor pipelined (cp.async) whenever a
    # stride is not a multiple of 16 elements, e.g. rows of 72.
    stride_qb, stride_qh, stride_qs = _hint3(stride_qb, stride_qh, stride_qs, STRIDE_MULT)
    stride_kb, stride_kh, stride_ks = _hint3(stride_kb, stride_kh, stride_ks, STRIDE_MULT)
    stride_vb, stride_vh, stride_vs = _hint3(stride_vb, stride_vh, stride_vs, STRIDE_MULT)
    stride_ob, stride_oh, stride_os = _hint3(stride_ob, stride_oh, stride_os, STRIDE_MULT)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    if INT64_OFFSETS:  # every index * stride product below is then 64-bit
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_d0 = offs_d0.to(tl.int64)
    mask_m = offs_m < Sq
    mask_d0 = offs_d0 < HEAD_DIM
    if BLOCK_D1 > 0:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        if INT64_OFFSETS:
            offs_d1 = offs_d1.to(tl.int64)
        mask_d1 = offs_d1 < HEAD_DIM
    else:
        offs_d1 = offs_d0
        mask_d1 = mask_d0

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    q_ptrs0 = q_base + offs_m[:, None] * stride_qs + offs_d0[None, :] * stride_qd
    k_ptrs0 = k_base + offs_n[:, None] * stride_ks + offs_d0[None, :] * stride_kd
    v_ptrs0 = v_base + offs_n[:, None] * stride_vs + offs_d0[None, :] * stride_vd
    q0 = tl.load(q_ptrs0, mask=mask_m[:, None] & mask_d0[None, :], other=0.0)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if BLOCK_D1 > 0:
        q_ptrs1 = q_base + offs_m[:, None] * stride_qs + offs_d1[None, :] * stride_qd
        k_ptrs1 = k_base + offs_n[:, None] * stride_ks + offs_d1[None, :] * stride_kd
        v_ptrs1 = v_base + offs_n[:, None] * stride_vs + offs_d1[None, :] * stride_vd
        q1 = tl.load(q_ptrs1, mask=mask_m[:, None] & mask_d1[None, :], other=0.0)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    else:
        # Placeholders: no second tile (scalars, so nothing extra is carried through the loop).
        k_ptrs1 = K
        v_ptrs1 = V
        q1 = 0.0
        acc1 = 0.0
    if HAS_BIAS:
        # a scalar base and int32 offsets: a tensor of 64-bit pointers would hold twice the registers
        bias_base = Bias + off_b * stride_bias_b + off_h * stride_bias_h
        if INT64_OFFSETS:  # a column of row pointers and a row of int64 column offsets, broadcast per block
            bias_base = bias_base + offs_m[:, None] * stride_bias_m
            bias_offs = offs_n[None, :] * stride_bias_n
        else:
            bias_offs = offs_m[:, None] * stride_bias_m + offs_n[None, :] * stride_bias_n
    else:
        bias_base = Bias
        bias_offs = 0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Full key blocks without the key mask, then the ragged tail with it.
    n_full = (Skv // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _fwd_kv_block(
            acc0, acc1, m_i, l_i, q0, q1, k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1, bias_base, bias_offs,
            start_n, offs_m, offs_n, mask_m, mask_d0, mask_d1, Sq, Skv, qk_scale,
            stride_ks, stride_vs, stride_bias_n,
            BLOCK_D1, False, HAS_BIAS, DOT_PRECISION, INT64_OFFSETS)
    if n_full < Skv:
        acc0, acc1, m_i, l_i = _fwd_kv_block(
            acc0, acc1, m_i, l_i, q0, q1, k_ptrs0, k_ptrs1, v_ptrs0, v_ptrs1, bias_base, bias_offs,
            n_full, offs_m, offs_n, mask_m, mask_d0, mask_d1, Sq, Skv, qk_scale,
            stride_ks, stride_vs, stride_bias_n,
            BLOCK_D1, True, HAS_BIAS, DOT_PRECISION, INT64_OFFSETS)

    # l == 0 only for a fully masked row, where acc is 0 too: the row comes out as zeros.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    tl.store(Lse + pid_bh.to(tl.int64) * Sq + offs_m, m_safe + tl.log2(l_safe), mask=mask_m)
    inv_l = 1.0 / l_safe
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    o_ptrs0 = o_base + offs_m[:, None] * stride_os + offs_d0[None, :] * stride_od
    tl.store(o_ptrs0, (acc0 * inv_l[:, None]).to(Out.dtype.element_ty),
             mask=mask_m[:, None] & mask_d0[None, :])
    if BLOCK_D1 > 0:
        o_ptrs1 = o_base + offs_m[:, None] * stride_os + offs_d1[None, :] * stride_od
        tl.store(o_ptrs1, (acc1 * inv_l[:, None]).to(Out.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d1[None, :])


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # (B, H, Sq, D), any strides
    K,  # (B, H, Skv, D), any strides
    V,  # (B, H, Skv, D), any strides
    Bias,  # (B, H, Sq, Skv) through broadcast strides; unused unless HAS_BIAS
    DO,  # (B, H, Sq, D), any strides: gradient of out
    Lse,  # (B * H, Sq) float32 contiguous: forward's log-sum-exp, log2 units
    Delta,  # (B * H, Sq) float32 contiguous: rowsum(dout * out)
    DK,  # (B, H, Skv, D) contiguous
    DV,  # (B, H, Skv, D) contiguous
    sm_scale,  # float: softmax scale
    qk_scale,  # float: sm_scale * log2(e)
    stride_qb,  # q strides
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,  # k strides
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,  # v strides
    stride_vh,
    stride_vs,
    stride_vd,
    stride_bias_b,  # bias strides (0 on broadcast dims)
    stride_bias_h,
    stride_bias_m,
    stride_bias_n,
    stride_dob,  # dout strides
    stride_doh,
    stride_dos,
    stride_dod,
    H,  # int: heads
    Sq,  # int: query length
    Skv,  # int: key/value length
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next_pow2(D), >= 16
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # keys per program
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STRIDE_MULT: tl.constexpr,  # power of two dividing the q/k/v/dout strides; those args are divided by it
    INT64_OFFSETS: tl.constexpr,  # row/column offsets in int64 (a (batch, head) slice or bias past 2^31)
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    stride_qb, stride_qh, stride_qs = _hint3(stride_qb, stride_qh, stride_qs, STRIDE_MULT)
    stride_kb, stride_kh, stride_ks = _hint3(stride_kb, stride_kh, stride_ks, STRIDE_MULT)
    stride_vb, stride_vh, stride_vs = _hint3(stride_vb, stride_vh, stride_vs, STRIDE_MULT)
    stride_dob, stride_doh, stride_dos = _hint3(stride_dob, stride_doh, stride_dos, STRIDE_MULT)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if INT64_OFFSETS:
        offs_n = offs_n.to(tl.int64)
        offs_m = offs_m.to(tl.int64)
        offs_d = offs_d.to(tl.int64)
    mask_n = offs_n < Skv
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]

    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_ks
                + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vs
                + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs
              + offs_d[None, :] * stride_qd)
    do_ptrs = (DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos
               + offs_d[None, :] * stride_dod)
    lse_ptrs = Lse + pid_bh.to(tl.int64) * Sq + offs_m
    delta_ptrs = Delta + pid_bh.to(tl.int64) * Sq + offs_m
    if HAS_BIAS:
        # the bias tile transposed: (BLOCK_N keys, BLOCK_M queries)
        bias_ptrs = (Bias + off_b * stride_bias_b + off_h * stride_bias_h
                     + offs_m[None, :] * stride_bias_m + offs_n[:, None] * stride_bias_n)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, Sq, BLOCK_M):
        if INT64_OFFSETS:
            start_m = tl.cast(start_m, tl.int64)
        rows = start_m + offs_m
        mask_m = rows < Sq
        q = tl.load(q_ptrs + start_m * stride_qs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        do = tl.load(do_ptrs + start_m * stride_dos, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lse = tl.load(lse_ptrs + start_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptrs + start_m, mask=mask_m, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        if HAS_BIAS:
            b = tl.load(bias_ptrs + start_m * stride_bias_m, mask=mask_n[:, None] & mask_m[None, :],
                        other=0.0)
            st += b.to(tl.float32) * 1.4426950408889634
        pt = tl.exp2(st - lse[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    dk *= sm_scale
    out_offs = pid_bh.to(tl.int64) * Skv * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # (B, H, Sq, D), any strides
    K,  # (B, H, Skv, D), any strides
    V,  # (B, H, Skv, D), any strides
    Bias,  # (B, H, Sq, Skv) through broadcast strides; unused unless HAS_BIAS
    DO,  # (B, H, Sq, D), any strides: gradient of out
    Lse,  # (B * H, Sq) float32 contiguous, log2 units
    Delta,  # (B * H, Sq) float32 contiguous
    DQ,  # (B, H, Sq, D) contiguous
    sm_scale,  # float: softmax scale
    qk_scale,  # float: sm_scale * log2(e)
    stride_qb,  # q strides
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,  # k strides
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,  # v strides
    stride_vh,
    stride_vs,
    stride_vd,
    stride_bias_b,  # bias strides (0 on broadcast dims)
    stride_bias_h,
    stride_bias_m,
    stride_bias_n,
    stride_dob,  # dout strides
    stride_doh,
    stride_dos,
    stride_dod,
    H,  # int: heads
    Sq,  # int: query length
    Skv,  # int: key/value length
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next_pow2(D), >= 16
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STRIDE_MULT: tl.constexpr,  # power of two dividing the q/k/v/dout strides; those args are divided by it
    INT64_OFFSETS: tl.constexpr,  # row/column offsets in int64 (a (batch, head) slice or bias past 2^31)
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    stride_qb, stride_qh, stride_qs = _hint3(stride_qb, stride_qh, stride_qs, STRIDE_MULT)
    stride_kb, stride_kh, stride_ks = _hint3(stride_kb, stride_kh, stride_ks, STRIDE_MULT)
    stride_vb, stride_vh, stride_vs = _hint3(stride_vb, stride_vh, stride_vs, STRIDE_MULT)
    stride_dob, stride_doh, stride_dos = _hint3(stride_dob, stride_doh, stride_dos, STRIDE_MULT)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if INT64_OFFSETS:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_d = offs_d.to(tl.int64)
    mask_m = offs_m < Sq
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs
                + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos
                 + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * Sq + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * Sq + offs_m, mask=mask_m, other=0.0)
    k_ptrs = (K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_ks
              + offs_d[None, :] * stride_kd)
    v_ptrs = (V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vs
              + offs_d[None, :] * stride_vd)
    if HAS_BIAS:
        bias_ptrs = (Bias + off_b * stride_bias_b + off_h * stride_bias_h
                     + offs_m[:, None] * stride_bias_m + offs_n[None, :] * stride_bias_n)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Skv, BLOCK_N):
        if INT64_OFFSETS:
            start_n = tl.cast(start_n, tl.int64)
        cols = start_n + offs_n
        mask_n = cols < Skv
        k = tl.load(k_ptrs + start_n * stride_ks, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            b = tl.load(bias_ptrs + start_n * stride_bias_n, mask=mask_m[:, None] & mask_n[None, :],
                        other=0.0)
            s += b.to(tl.float32) * 1.4426950408889634
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    dq *= sm_scale
    out_offs = pid_bh.to(tl.int64) * Sq * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out_offs, dq.to(DQ.dtype.element_ty), mask=mask_md)


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------


def tile_widths(head_dim: int, split_d: bool | None = None) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1) covering ``head_dim``: one padded power-of-two tile, or two pieces.

    ``split_d=None`` splits where that makes the tile narrower (40 -> 32+16, 72 -> 64+16,
    80 -> 64+16, 96 -> 64+32); True/False force the choice (True still pads where no split helps).
    """
    padded = max(16, triton.next_power_of_2(head_dim))
    if split_d is False or head_dim <= 16:
        return padded, 0
    d0 = 1 << (head_dim.bit_length() - 1)  # largest power of two <= head_dim
    if d0 == head_dim:
        return head_dim, 0
    d1 = max(16, triton.next_power_of_2(head_dim - d0))
    if split_d is None and d0 + d1 >= padded:
        return padded, 0
    return d0, d1


# Forward configs on a GPU, (BLOCK_M, BLOCK_N, num_warps, num_stages), by arch (90: Hopper and
# newer, 80: Ampere/Ada) and (tile width class, bias): started from the FlashAttention-2 /
# Triton-tutorial settings and kept where ptxas reports no spills for that arch (sm_90a, sm_80;
# python -m fastdiff.kernels). The autotuner picks among them per (D, Sq, Skv, dtype). A bias tile
# costs registers, hence the shorter lists; Ampere's mma keeps more in registers than Hopper's
# wgmma, hence smaller tiles there. To be re-tuned on a GPU with benchmarks/bench_attention.py.
_FWD_GPU_CONFIGS = {
    90: {
        (64, False): [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
        (96, False): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
        (128, False): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)],
        (64, True): [(64, 64, 8, 3), (64, 32, 4, 2), (128, 32, 8, 2)],
        (96, True): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2)],
        (128, True): [(64, 32, 4, 2), (128, 32, 8, 2), (128, 32, 8, 3)],
    },
    80: {
        (64, False): [(128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
        (96, False): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        (128, False): [(128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3)],
        (64, True): [(64, 32, 4, 2), (128, 32, 8, 2)],
        (96, True): [(128, 32, 8, 2), (64, 32, 4, 1)],
        (128, True): [(32, 64, 8, 2), (32, 32, 4, 2)],
    },
}
# Backward configs on a GPU by arch and (padded tile width, bias): (BLOCK_M, BLOCK_N, num_warps,
# num_stages) of the dkdv kernel (BLOCK_N keys per program, BLOCK_M queries per step) and of the dq kernel
# (BLOCK_M queries per program, BLOCK_N keys per step). Where the head dim is masked inside its tile
# (D = 72/80/96 in 128) or a bias tile is loaded, the dkdv kernel at (64, 64, 8, 2) spills under
# Triton 3.6 (sm_90a), as it does on sm_80 at width 64: those take 32 queries per step instead, keeping
# the 64-key block and the pipelining; the dq kernel keeps its tile.
_BWD_GPU_CONFIG = {
    90: {(16, False): ((64, 64, 4, 2),) * 2, (32, False): ((64, 64, 4, 2),) * 2,
         (64, False): ((64, 64, 4, 2),) * 2,
         (128, False): ((64, 64, 8, 2),) * 2, ("masked128", False): ((32, 64, 8, 2), (64, 64, 8, 2)),
         (16, True): ((64, 64, 8, 2),) * 2, (32, True): ((64, 64, 8, 2),) * 2, (64, True): ((64, 64, 8, 2),) * 2,
         (128, True): ((32, 64, 8, 2), (64, 64, 8, 2))},
    80: {(16, False): ((64, 64, 8, 2),) * 2, (32, False): ((64, 64, 8, 2),) * 2,
         (64, False): ((32, 64, 8, 2), (64, 64, 8, 2)), (128, False): ((64, 64, 8, 2),) * 2,
         (16, True): ((32, 32, 4, 2),) * 2, (32, True): ((32, 32, 4, 2),) * 2, (64, True): ((32, 32, 4, 2),) * 2,
         (128, True): ((64, 32, 8, 2),) * 2},
}
# The INT64_OFFSETS variant (a (batch, head) slice or a bias past 2^31 elements: rare, huge tensors) holds
# 64-bit offset tiles, so it takes one small tile of its own per arch and kernel instead of the autotuner:
# (BLOCK_M, BLOCK_N, num_warps, num_stages), the largest found with no spills under Triton 3.6 and 3.9.
# The forward's by tile width: up to 96, and 128.
_WIDE_GPU_CONFIG = {
    90: {"fwd": (64, 32, 8, 2), "fwd128": (64, 32, 4, 2), "dkdv": (32, 32, 4, 2), "dq": (32, 32, 4, 2)},
    80: {"fwd": (64, 16, 4, 2), "fwd128": (32, 16, 4, 2), "dkdv": (32, 32, 4, 2), "dq": (32, 32, 4, 2)},
}


def _wide_fwd_config(arch: int, width: int) -> tuple[int, int, int, int]:
    return _WIDE_GPU_CONFIG[arch]["fwd128" if width > 96 else "fwd"]
_ARCHS = (90, 80)
_MAX_GRID_Y = 65535
# Under the interpreter bigger tiles mean fewer (slow, Python-level) program instances.
_INTERPRET_CONFIG = (64, 64, 4, 1)


def _arch(device: torch.device) -> int:
    """The config table for this GPU: 90 from Hopper on, 80 below."""
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _width_class(width: int) -> int:
    return 64 if width <= 64 else 96 if width <= 96 else 128


def _fwd_configs(arch: int, width: int, has_bias: bool) -> list[tuple[int, int, int, int]]:
    return list(_FWD_GPU_CONFIGS[arch][(_width_class(width), has_bias)])


def _bwd_configs(arch: int, head_dim: int, has_bias: bool) -> tuple[tuple, tuple]:
    """(dkdv config, dq config) of the backward for this head dim on this arch."""
    width = max(16, triton.next_power_of_2(head_dim))
    table = _BWD_GPU_CONFIG[arch]
    if width == 128 and head_dim < 128 and ("masked128", has_bias) in table:
        return table[("masked128", has_bias)]
    return table[(width, has_bias)]


_autotuned: dict = {}


def _fwd_autotuned(arch: int, width: int, has_bias: bool):
    """The forward kernel wrapped in an autotuner over its short config list (GPU only)."""
    key = (arch, _width_class(width), has_bias)
    if key not in _autotuned:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in _fwd_configs(arch, width, has_bias)]
        _autotuned[key] = triton.autotune(configs=configs, key=["HEAD_DIM", "Sq", "Skv"])(_attn_fwd_kernel)
    return _autotuned[key]


def _stride_mult(*tensors: torch.Tensor) -> int:
    """The largest power of two, at most 16, dividing every stride but the last of ``tensors``; 1 where a
    stride passes 2^31 - 1 (passed whole, the JIT makes it an int64 argument; a divided one could fit
    int32 and overflow when the kernel multiplies it back)."""
    g = 16
    for t in tensors:
        for st in t.stride()[:-1]:
            if abs(st) > _INT32_MAX:
                return 1
            g = math.gcd(g, st)
    return g


def _div_strides(t: torch.Tensor, mult: int) -> tuple[int, ...]:
    """``t``'s strides with all but the last divided by ``mult`` (the kernels multiply them back)."""
    *outer, last = t.stride()
    return (*(st // mult for st in outer), last)


_INT32_MAX = 2**31 - 1


def needs_int64_offsets(*tensors: torch.Tensor | None) -> bool:
    """Whether an element offset inside one (batch, head) slice of any of ``tensors`` can pass 2^31 - 1.
    The kernels index the query/key rows, the head dim and the bias tile with int32 offsets from a 64-bit
    (batch, head) base; past 2^31 they must switch to int64 (``INT64_OFFSETS``), e.g. a full
    (B, H, Sq, Skv) bias with Sq * Skv >= 2^31, or a qkv view whose row stride times S does. (Batch and
    head strides are multiplied by an int64 index; :func:`_stride_mult` keeps those past 2^31 whole.)"""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        inner = sum((size - 1) * abs(st) for size, st in zip(t.shape[2:], t.stride()[2:], strict=True))
        if inner > _INT32_MAX:
            return True
    return False


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, bias):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, S, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h) or k.shape[3] != d or v.shape[3] != d \
            or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have shape (B={b}, H={h}, Skv, D={d}); got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention kernel takes head dims 1..{MAX_HEAD_DIM}; q has D={d}")
    dtypes = _GPU_DTYPES if q.is_cuda else _CPU_DTYPES
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among {dtypes} on {q.device.type}; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if bias is not None and bias.shape != (b, h, q.shape[2], k.shape[2]):
        raise ValueError(f"bias must be expanded to (B, H, Sq, Skv) = {(b, h, q.shape[2], k.shape[2])}, "
                         f"got {tuple(bias.shape)}")


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      bias: torch.Tensor | None = None, split_d: bool | None = None,
                      config: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: returns (out (B, H, Sq, D) contiguous, lse2 (B, H, Sq) float32).

    ``bias`` must already be expanded (a stride-0 ``expand`` view, not a copy) to (B, H, Sq, Skv).
    ``split_d`` chooses the head-dim tiling (see :func:`tile_widths`); ``config`` forces
    (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of the autotuner (benchmarks, build checks).
    """
    _check_inputs(q, k, v, bias)
    b, h, sq, d = q.shape
    skv = k.shape[2]
    out = torch.empty((b, h, sq, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, sq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if skv == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    if b * h > _MAX_GRID_Y:  # batch*heads is the grid's second axis (at most 65535): launch in slices
        step = max(1, _MAX_GRID_Y // h)
        for i in range(0, b, step):
            sl = slice(i, i + step)
            bias_sl = None if bias is None else bias[sl]
            out[sl], lse[sl] = attention_forward(q[sl], k[sl], v[sl], scale, bias_sl, split_d, config)
        return out, lse
    d0, d1 = tile_widths(d, split_d)
    has_bias = bias is not None
    bias_arg = bias if has_bias else q
    bias_strides = bias.stride() if has_bias else (0, 0, 0, 0)
    wide = needs_int64_offsets(q, k, v, out, bias)
    mult = 1 if wide else _stride_mult(q, k, v, out)  # strides past 2^31 stay whole (int64 arguments)
    args = (q, k, v, bias_arg, out, lse, scale * LOG2E, *_div_strides(q, mult), *_div_strides(k, mult),
            *_div_strides(v, mult), *bias_strides, *_div_strides(out, mult), h, sq, skv)
    consts = dict(HEAD_DIM=d, BLOCK_D0=d0, BLOCK_D1=d1, HAS_BIAS=has_bias,
                  DOT_PRECISION=_dot_precision(q.dtype), STRIDE_MULT=mult,
                  INT64_OFFSETS=wide)
    if config is None and (_INTERPRET or not q.is_cuda):
        config = _INTERPRET_CONFIG
    elif config is None and wide:
        config = _wide_fwd_config(_arch(q.device), d0 + d1)
    if config is not None:
        bm, bn, warps, stages = config
        grid = (triton.cdiv(sq, bm), b * h)
        _attn_fwd_kernel[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    else:
        grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h)
        _fwd_autotuned(_arch(q.device), d0 + d1, has_bias)[grid](*args, **consts)
    return out, lse


def attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float,
                       bias: torch.Tensor | None = None,
                       config: tuple[int, int, int, int] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels: (dq, dk, dv), contiguous, in q's dtype.

    ``out`` and ``lse`` are the forward's outputs (``lse`` from :func:`attention_forward`);
    ``bias`` as there (expanded view); it gets no gradient.
    """
    _check_inputs(q, k, v, bias)
    b, h, sq, d = q.shape
    skv = k.shape[2]
    if grad.shape != out.shape or lse.shape != (b, h, sq):
        raise ValueError(f"grad must have out's shape {tuple(out.shape)} and lse (B, H, Sq); got "
                         f"{tuple(grad.shape)}, {tuple(lse.shape)}")
    dq = torch.empty((b, h, sq, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, h, skv, d), device=q.device, dtype=q.dtype)
    dv = torch.empty((b, h, skv, d), device=q.device, dtype=q.dtype)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if b * h > _MAX_GRID_Y:
        step = max(1, _MAX_GRID_Y // h)
        for i in range(0, b, step):
            sl = slice(i, i + step)
            bias_sl = None if bias is None else bias[sl]
            dq[sl], dk[sl], dv[sl] = attention_backward(grad[sl], q[sl], k[sl], v[sl], out[sl], lse[sl],
                                                        scale, bias_sl, config)
        return dq, dk, dv
    grad = grad.to(q.dtype)
    lse = lse.contiguous()
    delta = (out.float() * grad.float()).sum(-1).contiguous()  # (B, H, Sq)
    width = max(16, triton.next_power_of_2(d))
    has_bias = bias is not None
    wide = needs_int64_offsets(q, k, v, grad, dq, dk, bias)
    if config is not None:
        dkdv_config = dq_config = config
    elif not q.is_cuda or _INTERPRET:
        dkdv_config = dq_config = _INTERPRET_CONFIG
    elif wide:
        dkdv_config, dq_config = _WIDE_GPU_CONFIG[_arch(q.device)]["dkdv"], _WIDE_GPU_CONFIG[_arch(q.device)]["dq"]
    else:
        dkdv_config, dq_config = _bwd_configs(_arch(q.device), d, has_bias)
    bias_arg = bias if has_bias else q
    bias_strides = bias.stride() if has_bias else (0, 0, 0, 0)
    mult = 1 if wide else _stride_mult(q, k, v, grad)
    common = (scale, scale * LOG2E, *_div_strides(q, mult), *_div_strides(k, mult), *_div_strides(v, mult),
              *bias_strides, *_div_strides(grad, mult), h, sq, skv)
    consts = dict(HEAD_DIM=d, BLOCK_D=width, HAS_BIAS=has_bias, DOT_PRECISION=_dot_precision(q.dtype),
                  STRIDE_MULT=mult, INT64_OFFSETS=wide)
    bm, bn, warps, stages = dkdv_config
    _attn_bwd_dkdv_kernel[(triton.cdiv(skv, bn), b * h)](q, k, v, bias_arg, grad, lse, delta, dk, dv, *common,
                                                          **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                                          num_stages=stages)
    bm, bn, warps, stages = dq_config
    _attn_bwd_dq_kernel[(triton.cdiv(sq, bm), b * h)](q, k, v, bias_arg, grad, lse, delta, dq, *common,
                                                      **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                                      num_stages=stages)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# build check
# ---------------------------------------------------------------------------------------------

# Head-dim classes the build check compiles: every tiling the launcher can pick.
_BUILD_HEAD_DIMS = (16, 32, 40, 64, 72, 80, 96, 128)
_BUILD_WIDE_HEAD_DIMS = (64, 72, 128)  # the INT64_OFFSETS variant: one per tiling kind
_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16"}


# A launch on contiguous-last-dim tensors has these strides equal to 1, which Triton's JIT turns into
# compile-time constants (and vectorises the loads on); the build check compiles that case.
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod", "stride_bias_n")


def _signature(fn, ptr_dtypes: dict, consts: dict, stride_type: str = "i32") -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``fn`` as Triton's JIT builds them for a typical launch:
    pointers 16-byte aligned, unit strides as constants, other strides ``stride_type`` (i64 where a
    stride passes 2^31), other ints i32, scales fp32."""
    sig, consts, attrs = {}, dict(consts), {}
    for i, name in enumerate(fn.arg_names):
        if name in _UNIT_STRIDES:
            consts[name] = 1
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptr_dtypes:
            sig[name] = "*" + ptr_dtypes[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = stride_type if name.startswith("stride_") else "i32"
    return sig, consts, attrs


def _entry(fn, ptrs: dict, consts: dict, stride_type: str = "i32") -> dict:
    sig, consts, attrs = _signature(fn, ptrs, consts, stride_type)
    return dict(signature=sig, constexprs=consts, attrs=attrs)


def build_configs() -> list[dict]:
    """Every kernel configuration a GPU launch can use, for ``python -m fastdiff.kernels``.

    Each entry: {"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "attrs", "archs"}
    (``attrs``: the JIT's 16-byte alignment hints, ``ASTSource(fn, signature, constexprs, attrs)``;
    the unit strides are in ``constexprs``, as the JIT specialises them; ``archs``: the compute
    capabilities the entry is launched on, since sm_90 and sm_80 have their own config tables).
    Covers fp16 and bf16 at each head-dim class (the tilings the launcher picks), every autotune
    config of the forward, with and without a bias, and the backward kernels; and the int64-offset
    variant (``INT64_OFFSETS``, whole int64 strides, its own small tile) of each kernel at a few head dims.
    """
    entries = []

    def add(name, arch, fn, ptrs, consts, config, stride_type="i32"):
        bm, bn, warps, stages = config
        consts = dict(consts, BLOCK_M=bm, BLOCK_N=bn)
        entries.append(dict(name=f"{name}_m{bm}n{bn}w{warps}s{stages}", fn=fn,
                            **_entry(fn, ptrs, consts, stride_type), num_warps=warps, num_stages=stages,
                            archs=(arch,)))

    def family(arch, dtype, d, has_bias, wide):
        t = _TL_DTYPE[dtype]
        d0, d1 = tile_widths(d)
        common = dict(HEAD_DIM=d, DOT_PRECISION=_dot_precision(dtype), HAS_BIAS=has_bias,
                      STRIDE_MULT=1 if wide else math.gcd(16, d), INT64_OFFSETS=wide)
        tag = f"sm{arch}_{t}_d{d}" + ("_bias" if has_bias else "") + ("_i64" if wide else "")
        stride_type = "i64" if wide else "i32"
        fwd_configs = [_wide_fwd_config(arch, d0 + d1)] if wide else _fwd_configs(arch, d0 + d1, has_bias)
        for config in fwd_configs:
            add(f"attn_fwd_{tag}_{d0}+{d1}", arch, _attn_fwd_kernel,
                dict(Q=t, K=t, V=t, Bias=t, Out=t, Lse="fp32"), dict(common, BLOCK_D0=d0, BLOCK_D1=d1),
                config, stride_type)
        if wide:
            dkdv_config, dq_config = _WIDE_GPU_CONFIG[arch]["dkdv"], _WIDE_GPU_CONFIG[arch]["dq"]
        else:
            dkdv_config, dq_config = _bwd_configs(arch, d, has_bias)
        consts = dict(common, BLOCK_D=max(16, triton.next_power_of_2(d)))
        grads = dict(Q=t, K=t, V=t, Bias=t, DO=t, Lse="fp32", Delta="fp32")
        add(f"attn_bwd_dkdv_{tag}", arch, _attn_bwd_dkdv_kernel, dict(grads, DK=t, DV=t), consts, dkdv_config,
            stride_type)
        add(f"attn_bwd_dq_{tag}", arch, _attn_bwd_dq_kernel, dict(grads, DQ=t), consts, dq_config, stride_type)

    for arch in _ARCHS:
        for dtype in _GPU_DTYPES:
            for d in _BUILD_HEAD_DIMS:
                for has_bias in (False, True):
                    family(arch, dtype, d, has_bias, wide=False)
        for d in _BUILD_WIDE_HEAD_DIMS:
            for has_bias in (False, True):
                family(arch, torch.bfloat16, d, has_bias, wide=True)
    return entries

