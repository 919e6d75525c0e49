"""QK-RMSNorm + RoPE: the per-head RMSNorm of q and k (Flux, SD3.5) and Flux's rotary embedding, fused.

For every row x = q[b, h, s, :] (and likewise k, with its own weight):

    y      = x * rsqrt(mean(x^2) + eps) * w                          (diffusers' RMSNorm, weight w or none)
    out[d] = y[d] * cos[s, d] + sign(d) * y[d ^ 1] * sin[s, d]       (sign = -1 for even d, +1 for odd d)

that is, each pair (y[2i], y[2i+1]) is rotated by the angle whose cosine and sine sit, repeated, in
cos[s, 2i:2i+2] and sin[s, 2i:2i+2]: the interleaved real form of diffusers' ``apply_rotary_emb(...,
use_real=True, use_real_unbind_dim=-1)`` (what ``FluxPosEmbed`` returns). Without cos and sin it is
the RMSNorm alone (SD3.5). Statistics and rotation in float32; the output is rounded once.

Memory: q and k are read once and written once (``4 * B*H*S*D`` elements); the rotation's partner
element ``x[d ^ 1]`` is a second load of the same row, which the L1 cache serves. A program holds a
(BLOCK_H heads, BLOCK_S positions, D) tile of q and the same tile of k, so each cos/sin row it loads
(float32, from L2 after its first use) serves ``2 * BLOCK_H`` rows. Every tensor is read through its
strides: q and k may be (B, S, H, D) storage seen as (B, H, S, D) (Flux's processor before its
transpose) or slices of a fused projection, and the outputs may be views into a joint (text + image)
buffer, all without a copy. A unit stride of the head dim is specialised by the JIT (vector loads);
any other stride is read element by element.

The backward recomputes the statistics. With ``dy = R^T dout`` (the inverse rotation:
``dy[d] = dout[d] * cos[s, d] - sign(d) * dout[d ^ 1] * sin[s, d ^ 1]``) and ``xhat = x * rstd``:

    dw = sum over rows of dy * xhat          (per-program partial sums, added up by the launcher)
    dx = rstd * (dy * w - xhat * mean(dy * w * xhat))

reading x and dout once (plus dout's partner element) and writing dx once.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["qk_norm_rope_forward", "qk_norm_rope_backward", "build_configs", "blocks"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Elements of one (BLOCK_H, BLOCK_S, BLOCK_D) tile per tensor; sized so that the sm_90 builds hold the
# tile, its rotation partner and the folded cos/sin factors in registers without spilling.
TILE = 2048
# Most heads in one tile: more reuse each cos/sin row over more heads, fewer leave more positions per tile.
MAX_BLOCK_H = 8


# ----------------------------------------------------------------------------------------------
# shared device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile(pid_s, pid_h, H, S, D, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Heads h (BLOCK_H, 1, 1), positions s (1, BLOCK_S, 1), features d and their partners d ^ 1
    (1, 1, BLOCK_D), and the mask of the tile."""
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)[:, None, None]
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = (h < H) & (s < S) & (d < D)
    return h, s, d, d ^ 1, mask


@triton.jit
def _load_row_tile(X, h, s, d, mask, stride_h, stride_s, stride_d):
    return tl.load(X + h * stride_h + s * stride_s + d * stride_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rstd(x, D, eps):
    """1 / sqrt(mean(x^2) + eps) over the last axis of a zero-padded tile: (BLOCK_H, BLOCK_S, 1)."""
    return (1.0 / tl.sqrt(tl.sum(x * x, axis=2) / D + eps))[:, :, None]


@triton.jit
def _rope_factors(W, COS, SIN, s, d, d_swap, s_mask, d_mask, stride_cs, stride_cd, stride_ss, stride_sd,
                  HAS_W: tl.constexpr):
    """(a, b) of shape (1, BLOCK_S, BLOCK_D) with out = rstd * (x * a + x[d ^ 1] * b): the weight folded
    into the rotation, a = w[d] cos[s, d], b = sign(d) w[d ^ 1] sin[s, d]."""
    cs_mask = s_mask & d_mask
    a = tl.load(COS + s * stride_cs + d * stride_cd, mask=cs_mask, other=0.0).to(tl.float32)
    b = tl.load(SIN + s * stride_ss + d * stride_sd, mask=cs_mask, other=0.0).to(tl.float32)
    b = tl.where(d % 2 == 0, -b, b)
    if HAS_W:
        a = a * tl.load(W + d, mask=d_mask, other=0.0).to(tl.float32)
        b = b * tl.load(W + d_swap, mask=d_mask, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _norm_rope_tile(
    X, OUT, W, COS, SIN,
    h, s, d, d_swap, mask, s_mask, d_mask,
    stride_xh, stride_xs, stride_xd,
    stride_oh, stride_os, stride_od,
    stride_cs, stride_cd, stride_ss, stride_sd,
    D, eps,
    HAS_W: tl.constexpr, ROPE: tl.constexpr,
):
    """Normalise (and rotate) one tile of one tensor: x read once (plus its partner), out written once."""
    x = _load_row_tile(X, h, s, d, mask, stride_xh, stride_xs, stride_xd)
    rstd = _rstd(x, D, eps)
    if ROPE:
        a, b = _rope_factors(W, COS, SIN, s, d, d_swap, s_mask, d_mask, stride_cs, stride_cd, stride_ss,
                             stride_sd, HAS_W)
        x_swap = _load_row_tile(X, h, s, d_swap, mask, stride_xh, stride_xs, stride_xd)
        y = (x * a + x_swap * b) * rstd
    else:
        y = x * rstd
        if HAS_W:
            y = y * tl.load(W + d, mask=d_mask, other=0.0).to(tl.float32)
    tl.store(OUT + h * stride_oh + s * stride_os + d * stride_od, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_grad_tile(
    X, DOUT, DX, W, COS, SIN, DW_PART,
    h, s, d, d_swap, mask, s_mask, d_mask,
    stride_xh, stride_xs, stride_xd,
    stride_gh, stride_gs, stride_gd,
    stride_dh, stride_ds, stride_dd,
    stride_cs, stride_cd, stride_ss, stride_sd,
    D, eps,
    HAS_W: tl.constexpr, ROPE: tl.constexpr,
):
    """dx of one tile (written) and this tile's partial sum of dw (stored at DW_PART[0:D])."""
    x = _load_row_tile(X, h, s, d, mask, stride_xh, stride_xs, stride_xd)
    rstd = _rstd(x, D, eps)
    xhat = x * rstd
    dy = _load_row_tile(DOUT, h, s, d, mask, stride_gh, stride_gs, stride_gd)
    if ROPE:
        cs_mask = s_mask & d_mask
        c = tl.load(COS + s * stride_cs + d * stride_cd, mask=cs_mask, other=0.0).to(tl.float32)
        sn = tl.load(SIN + s * stride_ss + d_swap * stride_sd, mask=cs_mask, other=0.0).to(tl.float32)
        sn = tl.where(d % 2 == 0, sn, -sn)  # -sign(d) sin[s, d ^ 1]
        g_swap = _load_row_tile(DOUT, h, s, d_swap, mask, stride_gh, stride_gs, stride_gd)
        dy = dy * c + g_swap * sn
    if HAS_W:
        dw = tl.sum(tl.sum(dy * xhat, axis=1, keep_dims=True), axis=0, keep_dims=True)
        tl.store(DW_PART + d, dw, mask=d_mask)
        dy = dy * tl.load(W + d, mask=d_mask, other=0.0).to(tl.float32)
    dx = rstd * (dy - xhat * (tl.sum(dy * xhat, axis=2)[:, :, None] / D))
    tl.store(DX + h * stride_dh + s * stride_ds + d * stride_dd, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q,          # (B, H, S, D) query, strides (stride_qb, stride_qh, stride_qs, stride_qd)
    K,          # (B, H, S, D) key, strides (stride_kb, ...)
    QO,         # (B, H, S, D) normalised (and rotated) query, strides (stride_pb, ...)
    KO,         # (B, H, S, D) normalised (and rotated) key, strides (stride_ob, ...)
    QW,         # (D,) RMSNorm weight of q, or a dummy when HAS_QW is False
    KW,         # (D,) RMSNorm weight of k, or a dummy
    COS,        # (S, D) float32/float64 rotation cosines (interleaved pairs), or a dummy when ROPE is False
    SIN,        # (S, D) rotation sines, or a dummy
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_cs, stride_cd,  # cos
    stride_ss, stride_sd,  # sin
    H,          # heads
    S,          # positions
    D,          # head dim (even when ROPE)
    eps,
    HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,  # heads per tile
    BLOCK_S: tl.constexpr,  # positions per tile
    BLOCK_D: tl.constexpr,  # >= D, power of two
):
    """q_out = rope(rmsnorm(q) * qw), k_out = rope(rmsnorm(k) * kw) over one tile of each.

    Grid (cdiv(S, BLOCK_S), cdiv(H, BLOCK_H), B). FLOPs about 8 per element; traffic: q, k read once,
    q_out, k_out written once, ``2 * S * D`` cos/sin values per (head block, batch), L2-resident.
    """
    b = tl.program_id(2).to(tl.int64)
    h, s, d, d_swap, mask = _tile(tl.program_id(0), tl.program_id(1), H, S, D, BLOCK_H, BLOCK_S, BLOCK_D)
    s_mask = s < S
    d_mask = d < D
    _norm_rope_tile(Q + b * stride_qb, QO + b * stride_pb, QW, COS, SIN, h, s, d, d_swap, mask, s_mask, d_mask,
                    stride_qh, stride_qs, stride_qd, stride_ph, stride_ps, stride_pd,
                    stride_cs, stride_cd, stride_ss, stride_sd, D, eps, HAS_QW, ROPE)
    _norm_rope_tile(K + b * stride_kb, KO + b * stride_ob, KW, COS, SIN, h, s, d, d_swap, mask, s_mask, d_mask,
                    stride_kh, stride_ks, stride_kd, stride_oh, stride_os, stride_od,
                    stride_cs, stride_cd, stride_ss, stride_sd, D, eps, HAS_KW, ROPE)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    Q,          # (B, H, S, D) query of the forward
    K,          # (B, H, S, D) key of the forward
    GQ,         # (B, H, S, D) gradient of q_out, strides (stride_gqb, ...)
    GK,         # (B, H, S, D) gradient of k_out
    DQ,         # (B, H, S, D) out: gradient of q, strides (stride_dqb, ...)
    DK,         # (B, H, S, D) out: gradient of k
    QW,         # (D,) or a dummy
    KW,         # (D,) or a dummy
    COS,        # (S, D) or a dummy
    SIN,        # (S, D) or a dummy
    DQW_PART,   # (P, D) float32 out: per-program partial sums of dqw (P = number of programs)
    DKW_PART,   # (P, D) float32 out: per-program partial sums of dkw
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_gqb, stride_gqh, stride_gqs, stride_gqd,
    stride_gkb, stride_gkh, stride_gks, stride_gkd,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_cs, stride_cd,
    stride_ss, stride_sd,
    H, S, D,
    eps,
    HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq, dk (and partial dqw, dkw) over one tile of each. Grid as in the forward; q, k and both
    gradients read once (plus the gradients' partner elements), dq, dk written once."""
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    part = ((b * tl.num_programs(1) + pid_h) * tl.num_programs(0) + pid_s) * D
    h, s, d, d_swap, mask = _tile(pid_s, pid_h, H, S, D, BLOCK_H, BLOCK_S, BLOCK_D)
    s_mask = s < S
    d_mask = d < D
    _norm_rope_grad_tile(Q + b * stride_qb, GQ + b * stride_gqb, DQ + b * stride_dqb, QW, COS, SIN, DQW_PART + part,
                         h, s, d, d_swap, mask, s_mask, d_mask,
                         stride_qh, stride_qs, stride_qd, stride_gqh, stride_gqs, stride_gqd,
                         stride_dqh, stride_dqs, stride_dqd, stride_cs, stride_cd, stride_ss, stride_sd,
                         D, eps, HAS_QW, ROPE)
    _norm_rope_grad_tile(K + b * stride_kb, GK + b * stride_gkb, DK + b * stride_dkb, KW, COS, SIN, DKW_PART + part,
                         h, s, d, d_swap, mask, s_mask, d_mask,
                         stride_kh, stride_ks, stride_kd, stride_gkh, stride_gks, stride_gkd,
                         stride_dkh, stride_dks, stride_dkd, stride_cs, stride_cd, stride_ss, stride_sd,
                         D, eps, HAS_KW, ROPE)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def blocks(h: int, s: int, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_S, BLOCK_D, num_warps) for (H, S, D): a tile of about TILE elements, heads first
    (each cos/sin row then serves more of them), positions filling the rest."""
    block_d = triton.next_power_of_2(d)
    rows = max(1, TILE // block_d)
    block_h = min(triton.next_power_of_2(h), MAX_BLOCK_H, rows)
    block_s = min(triton.next_power_of_2(s), max(1, rows // block_h))
    block_h = min(triton.next_power_of_2(h), max(block_h, rows // block_s))
    tile = block_h * block_s * block_d
    return block_h, block_s, block_d, 4 if tile <= 1024 else 8


def _check_offsets(*ts: Tensor) -> None:
    """The kernels index within one batch entry in int32 (the batch offset is int64)."""
    for t in ts:
        span = sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:], strict=True))
        if span >= 2**31:
            raise ValueError(f"one batch entry of a (B, H, S, D) tensor spans {span} elements; the Triton kernel "
                             "indexes within it in int32 (< 2**31): use backend='reference'")


def _dummy(x: Tensor, t: Optional[Tensor]) -> Tensor:
    return t if t is not None else x


def _rope_strides(cos: Optional[Tensor], sin: Optional[Tensor]) -> tuple[int, int, int, int]:
    if cos is None:
        return 0, 0, 0, 0
    return (*cos.stride(), *sin.stride())


def _grid(b: int, h: int, s: int, block_h: int, block_s: int) -> tuple[int, int, int]:
    return triton.cdiv(s, block_s), triton.cdiv(h, block_h), b


def qk_norm_rope_forward(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                         cos: Optional[Tensor], sin: Optional[Tensor], eps: float,
                         q_out: Optional[Tensor] = None, k_out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Launch the forward into ``q_out``, ``k_out`` (allocated like q and k when None); inputs are
    validated by ``fastdiff.ops.qk_norm_rope``."""
    q_out = torch.empty_like(q) if q_out is None else q_out
    k_out = torch.empty_like(k) if k_out is None else k_out
    b, h, s, d = q.shape
    if q.numel() == 0:
        return q_out, k_out
    _check_offsets(q, k, q_out, k_out)
    block_h, block_s, block_d, num_warps = blocks(h, s, d)
    _qk_norm_rope_fwd_kernel[_grid(b, h, s, block_h, block_s)](
        q, k, q_out, k_out, _dummy(q, q_weight), _dummy(q, k_weight), _dummy(q, cos), _dummy(q, sin),
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *_rope_strides(cos, sin), h, s, d, eps,
        HAS_QW=q_weight is not None, HAS_KW=k_weight is not None, ROPE=cos is not None,
        BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps)
    return q_out, k_out


def qk_norm_rope_backward(grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, q_weight: Optional[Tensor],
                          k_weight: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], eps: float):
    """(dq, dk, dq_weight, dk_weight); the weight gradients are always returned ((D,) in the weight's
    dtype, or q's dtype for an absent weight, then zeros)."""
    b, h, s, d = q.shape
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    wdt = lambda w: w.dtype if w is not None else q.dtype
    if q.numel() == 0:
        return dq, dk, q.new_zeros(d, dtype=wdt(q_weight)), q.new_zeros(d, dtype=wdt(k_weight))
    _check_offsets(q, k, grad_q, grad_k, dq, dk)
    block_h, block_s, block_d, num_warps = blocks(h, s, d)
    grid = _grid(b, h, s, block_h, block_s)
    parts = grid[0] * grid[1] * grid[2]
    f32 = dict(device=q.device, dtype=torch.float32)
    dqw_part = torch.empty(parts if q_weight is not None else 0, d, **f32)  # every row written
    dkw_part = torch.empty(parts if k_weight is not None else 0, d, **f32)
    _qk_norm_rope_bwd_kernel[grid](
        q, k, grad_q, grad_k, dq, dk, _dummy(q, q_weight), _dummy(q, k_weight), _dummy(q, cos), _dummy(q, sin),
        dqw_part, dkw_part, *q.stride(), *k.stride(), *grad_q.stride(), *grad_k.stride(), *dq.stride(),
        *dk.stride(), *_rope_strides(cos, sin), h, s, d, eps,
        HAS_QW=q_weight is not None, HAS_KW=k_weight is not None, ROPE=cos is not None,
        BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps)
    return dq, dk, dqw_part.sum(0).to(wdt(q_weight)), dkw_part.sum(0).to(wdt(k_weight))


# ----------------------------------------------------------------------------------------------
# GPU build check (python -m fastdiff.kernels)
# ----------------------------------------------------------------------------------------------


def build_configs() -> list[dict]:
    """The launch configurations of the benchmark's and the models' shapes: Flux (24 heads of 128,
    rope), SD3.5 (heads of 64, norm only), in bf16, fp16 and fp32, with q in (B, S, H, D) storage (the
    transposed view of Flux's processor: unit feature stride, strided positions)."""
    from fastdiff.kernels import build_spec

    def spec(kernel, dtype, h, d, rope, weights=True, wdtype=None):
        block_h, block_s, block_d, num_warps = blocks(h, 4096, d)
        ptr, wptr = f"*{dtype}", f"*{wdtype or dtype}"
        tensors = ("Q", "K", "QO", "KO", "GQ", "GK", "DQ", "DK")
        types = {name: ptr for name in tensors if name in kernel.arg_names}
        types.update(QW=wptr, KW=wptr, H="i32", S="i32", D="i32")
        unit = {a: 1 for a in kernel.arg_names if a.startswith("stride_") and a.endswith("d")}  # features
        flags = dict(HAS_QW=weights, HAS_KW=weights, ROPE=rope, BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d)
        kind = "fwd" if kernel is _qk_norm_rope_fwd_kernel else "bwd"
        name = f"qk_norm_rope_{kind}_{dtype}_h{h}_d{d}" + ("_rope" if rope else "") + ("" if weights else "_noaffine")
        if wdtype:
            name += f"_w{wdtype}"
        cfg = build_spec(name, kernel, types, {**unit, **flags}, num_warps=num_warps)
        # what the JIT sees at these shapes: 16-byte aligned pointers; strides and D multiples of 16
        aligned = [i for i, a in enumerate(kernel.arg_names) if cfg["signature"][a] != "constexpr"
                   and (cfg["signature"][a].startswith("*") or a.startswith("stride_") or a == "D")]
        cfg["attrs"] = {(i,): [["tt.divisibility", 16]] for i in aligned}
        return cfg

    fwd, bwd = _qk_norm_rope_fwd_kernel, _qk_norm_rope_bwd_kernel
    configs = []
    for dtype in ("bf16", "fp16", "fp32"):
        configs.append(spec(fwd, dtype, 24, 128, rope=True))  # Flux
        configs.append(spec(fwd, dtype, 24, 64, rope=False))  # SD3.5 medium (24 heads of 64)
    configs.append(spec(fwd, "bf16", 24, 128, rope=False))
    configs.append(spec(fwd, "bf16", 24, 128, rope=True, weights=False))
    configs.append(spec(fwd, "bf16", 24, 128, rope=True, wdtype="fp32"))
    configs.append(spec(fwd, "bf16", 38, 64, rope=False))  # SD3.5 large
    configs.append(spec(fwd, "bf16", 12, 64, rope=True))
    for dtype in ("bf16", "fp16", "fp32"):
        configs.append(spec(bwd, dtype, 24, 128, rope=True))
    configs.append(spec(bwd, "bf16", 24, 64, rope=False))
    return configs
