"""QK-RMSNorm + RoPE: the per-head RMSNorm of q and k (Flux, SD3.5) and Flux's rotary embedding, fused.

For every row x = q[b, h, s, :] (and likewise k, with its own weight):

    y      = x * rsqrt(mean(x^2) + eps) * w                          (diffusers' RMSNorm, weight w or none)
    out[2i]   = y[2i] * cos[s, 2i] - y[2i+1] * sin[s, 2i]
    out[2i+1] = y[2i+1] * cos[s, 2i+1] + y[2i] * sin[s, 2i+1]

that is, each pair (y[2i], y[2i+1]) is rotated by the angle whose cosine and sine sit, repeated, in
cos[s, 2i:2i+2] and sin[s, 2i:2i+2]: the interleaved real form of diffusers' ``apply_rotary_emb(...,
use_real=True, use_real_unbind_dim=-1)`` (what ``FluxPosEmbed`` returns). Without cos and sin it is
the RMSNorm alone (SD3.5). Statistics and rotation in float32; the output is rounded once.

Memory: q and k are read once and written once (``4 * B*H*S*D`` elements). The rotation needs both
features of a pair; a thread loads consecutive features of a row (one 16-byte vector load), so the
pairs are split and joined in registers (``tl.split`` / ``tl.join``) and no element is loaded twice. A
program holds a (BLOCK_H heads, BLOCK_S positions, D) tile of q and the same tile of k, so each cos/sin
row it loads (float32, from L2 after its first use) serves ``2 * BLOCK_H`` rows. Every tensor is read
through its strides: q and k may be (B, S, H, D) storage seen as (B, H, S, D) (Flux's processor before
its transpose) or slices of a fused projection, and the outputs may be views into a joint (text +
image) buffer, all without a copy. A unit stride of the head dim is specialised by the JIT (vector
loads); any other stride is read element by element.

The backward recomputes the statistics. With ``dy = R^T dout`` (the inverse rotation: each pair
``(g0, g1) -> (g0 c0 + g1 s1, g1 c1 - g0 s0)``) and ``xhat = x * rstd``:

    dw = sum over rows of dy * xhat          (per-program partial sums, added up by the launcher)
    dx = rstd * (dy * w - xhat * mean(dy * w * xhat))

reading x and dout once and writing dx once.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["qk_norm_rope_forward", "qk_norm_rope_backward", "build_configs", "blocks"]

# Elements of one (BLOCK_H, BLOCK_S, BLOCK_D) tile per tensor: with 8 warps, 8 consecutive features per
# thread (one 16-byte load in bf16), the q and k tiles both in registers (no spills at sm_90 / sm_80).
TILE = 2048
# Most heads in one tile: more reuse each cos/sin row over more heads, fewer leave more positions per tile.
MAX_BLOCK_H = 8


# ----------------------------------------------------------------------------------------------
# shared device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile(H, S, D, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch entry b (int64), heads h (BLOCK_H, 1, 1), positions s (1, BLOCK_S, 1), features
    d (1, 1, BLOCK_D) and the tile's mask. One grid axis, position blocks fastest, then head blocks, then
    the batch (no 65535 limit of the other axes)."""
    pid = tl.program_id(0)
    blocks_s = tl.cdiv(S, BLOCK_S)
    blocks_h = tl.cdiv(H, BLOCK_H)
    h = (pid // blocks_s) % blocks_h * BLOCK_H + tl.arange(0, BLOCK_H)[:, None, None]
    s = pid % blocks_s * BLOCK_S + tl.arange(0, BLOCK_S)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    b = (pid // (blocks_s * blocks_h)).to(tl.int64)
    return b, h, s, d, (h < H) & (s < S) & (d < D)


@triton.jit
def _load_tile(X, h, s, d, mask, stride_h, stride_s, stride_d):
    return tl.load(X + h * stride_h + s * stride_s + d * stride_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rstd(x, D, eps):
    """1 / sqrt(mean(x^2) + eps) over the last axis of a zero-padded tile: (BLOCK_H, BLOCK_S, 1)."""
    return (1.0 / tl.sqrt(tl.sum(x * x, axis=2) / D + eps))[:, :, None]


@triton.jit
def _pairs(t, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """(t[..., 0::2], t[..., 1::2]) of a (BLOCK_H or 1, BLOCK_S, BLOCK_D) tile, broadcast over heads. A
    thread holds whole pairs of the loaded row (vector loads of consecutive features), so the split
    stays in registers."""
    t = tl.broadcast_to(t, (BLOCK_H, BLOCK_S, BLOCK_D))
    return tl.split(tl.reshape(t, (BLOCK_H, BLOCK_S, BLOCK_D // 2, 2)))


@triton.jit
def _rotate(y, c, sn, INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
            BLOCK_D: tl.constexpr):
    """Each pair (y0, y1) of the last axis -> (y0 c0 - y1 s0, y1 c1 + y0 s1), c/s at each feature of the
    pair; INVERSE applies the transpose, (y0 c0 + y1 s1, y1 c1 - y0 s0) (the backward's dy = R^T dout)."""
    y0, y1 = _pairs(y, BLOCK_H, BLOCK_S, BLOCK_D)
    c0, c1 = _pairs(c, BLOCK_H, BLOCK_S, BLOCK_D)
    s0, s1 = _pairs(sn, BLOCK_H, BLOCK_S, BLOCK_D)
    if INVERSE:
        out = tl.join(y0 * c0 + y1 * s1, y1 * c1 - y0 * s0)
    else:
        out = tl.join(y0 * c0 - y1 * s0, y1 * c1 + y0 * s1)
    return tl.reshape(out, (BLOCK_H, BLOCK_S, BLOCK_D))


@triton.jit
def _rope_tables(COS, SIN, s, d, S, D, stride_cs, stride_cd, stride_ss, stride_sd):
    """cos[s, d] and sin[s, d] as (1, BLOCK_S, BLOCK_D) float32 tiles."""
    mask = (s < S) & (d < D)
    c = tl.load(COS + s * stride_cs + d * stride_cd, mask=mask, other=0.0).to(tl.float32)
    sn = tl.load(SIN + s * stride_ss + d * stride_sd, mask=mask, other=0.0).to(tl.float32)
    return c, sn


@triton.jit
def _norm_rope(x, c, sn, W, d, D, eps, HAS_W: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """rope(x * rstd * w) of one tile, float32."""
    y = x * _rstd(x, D, eps)
    if HAS_W:
        y = y * tl.load(W + d, mask=d < D, other=0.0).to(tl.float32)
    if ROPE:
        y = _rotate(y, c, sn, False, BLOCK_H, BLOCK_S, BLOCK_D)
    return y


@triton.jit
def _norm_rope_grad(x, dout, c, sn, W, d, D, eps, HAS_W: tl.constexpr, ROPE: tl.constexpr,
                    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """(dx, this tile's dw summed over its rows (1, 1, BLOCK_D)) of one tile, float32."""
    rstd = _rstd(x, D, eps)
    xhat = x * rstd
    dy = dout
    if ROPE:
        dy = _rotate(dout, c, sn, True, BLOCK_H, BLOCK_S, BLOCK_D)
    dw = tl.sum(tl.sum(dy * xhat, axis=1, keep_dims=True), axis=0, keep_dims=True)
    if HAS_W:
        dy = dy * tl.load(W + d, mask=d < D, other=0.0).to(tl.float32)
    dx = rstd * (dy - xhat * (tl.sum(dy * xhat, axis=2)[:, :, None] / D))
    return dx, dw


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

    Grid (cdiv(S, BLOCK_S) * cdiv(H, BLOCK_H) * B,). About 8 FLOPs per element; traffic: q and k read once,
    q_out and k_out written once, a (BLOCK_S, D) slice of cos and sin per program (L2-resident).
    """
    b, h, s, d, mask = _tile(H, S, D, BLOCK_H, BLOCK_S, BLOCK_D)
    # every load first: both tiles in flight before the first reduction waits on them
    xq = _load_tile(Q + b * stride_qb, h, s, d, mask, stride_qh, stride_qs, stride_qd)
    xk = _load_tile(K + b * stride_kb, h, s, d, mask, stride_kh, stride_ks, stride_kd)
    c = 0.0
    sn = 0.0
    if ROPE:
        c, sn = _rope_tables(COS, SIN, s, d, S, D, stride_cs, stride_cd, stride_ss, stride_sd)
    yq = _norm_rope(xq, c, sn, QW, d, D, eps, HAS_QW, ROPE, BLOCK_H, BLOCK_S, BLOCK_D)
    tl.store(QO + b * stride_pb + h * stride_ph + s * stride_ps + d * stride_pd, yq.to(QO.dtype.element_ty),
             mask=mask)
    yk = _norm_rope(xk, c, sn, KW, d, D, eps, HAS_KW, ROPE, BLOCK_H, BLOCK_S, BLOCK_D)
    tl.store(KO + b * stride_ob + h * stride_oh + s * stride_os + d * stride_od, yk.to(KO.dtype.element_ty),
             mask=mask)


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
    gradients read once, dq and dk written once, (P, D) float32 partials of the weight gradients."""
    b, h, s, d, mask = _tile(H, S, D, BLOCK_H, BLOCK_S, BLOCK_D)
    part = tl.program_id(0).to(tl.int64) * D
    c = 0.0
    sn = 0.0
    if ROPE:
        c, sn = _rope_tables(COS, SIN, s, d, S, D, stride_cs, stride_cd, stride_ss, stride_sd)
    x = _load_tile(Q + b * stride_qb, h, s, d, mask, stride_qh, stride_qs, stride_qd)
    g = _load_tile(GQ + b * stride_gqb, h, s, d, mask, stride_gqh, stride_gqs, stride_gqd)
    dx, dw = _norm_rope_grad(x, g, c, sn, QW, d, D, eps, HAS_QW, ROPE, BLOCK_H, BLOCK_S, BLOCK_D)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + s * stride_dqs + d * stride_dqd, dx.to(DQ.dtype.element_ty),
             mask=mask)
    if HAS_QW:
        tl.store(DQW_PART + part + d, dw, mask=d < D)
    x = _load_tile(K + b * stride_kb, h, s, d, mask, stride_kh, stride_ks, stride_kd)
    g = _load_tile(GK + b * stride_gkb, h, s, d, mask, stride_gkh, stride_gks, stride_gkd)
    dx, dw = _norm_rope_grad(x, g, c, sn, KW, d, D, eps, HAS_KW, ROPE, BLOCK_H, BLOCK_S, BLOCK_D)
    tl.store(DK + b * stride_dkb + h * stride_dkh + s * stride_dks + d * stride_dkd, dx.to(DK.dtype.element_ty),
             mask=mask)
    if HAS_KW:
        tl.store(DKW_PART + part + d, dw, mask=d < D)


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


def _grid(b: int, h: int, s: int, block_h: int, block_s: int) -> tuple[int]:
    return (triton.cdiv(s, block_s) * triton.cdiv(h, block_h) * b,)


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
    parts = grid[0]
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

    def spec(kernel, dtype, h, d, rope, weights=True, wdtype=None, s=4096):
        block_h, block_s, block_d, num_warps = blocks(h, s, d)
        ptr, wptr = f"*{dtype}", f"*{wdtype or dtype}"
        tensors = ("Q", "K", "QO", "KO", "GQ", "GK", "DQ", "DK")
        types = {name: ptr for name in tensors if name in kernel.arg_names}
        types.update(QW=wptr, KW=wptr, H="i32", S="i32", D="i32")
        unit = {a: 1 for a in kernel.arg_names if a.startswith("stride_") and a.endswith("d")}  # features
        flags = dict(HAS_QW=weights, HAS_KW=weights, ROPE=rope, BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_D=block_d)
        kind = "fwd" if kernel is _qk_norm_rope_fwd_kernel else "bwd"
        name = f"qk_norm_rope_{kind}_{dtype}_h{h}_d{d}" + ("_rope" if rope else "") + ("" if weights else "_noaffine")
        if s != 4096:
            name += f"_s{s}"
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
    # the tests' small tiles (a few heads and positions, 4 warps, head dims 16 and 72 in padded tiles)
    for kernel in (fwd, bwd):
        configs.append(spec(kernel, "fp16", 3, 16, rope=True, s=5))
        configs.append(spec(kernel, "fp32", 2, 72, rope=True, s=1))
    return configs
