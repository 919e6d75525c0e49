"""``qk_norm_rope``: the per-head RMSNorm of q and k followed by Flux's rotary embedding, in one pass.

The reference, the native CPU path, the Triton routing, the ``out=`` variant (writing into views of a
joint buffer) and autograd through a backward op with its own reference and Triton kernel.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastdiff.ops.routing import _check_backend, _check_vector, _compute_dtype, current_backend, use_triton

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ROPE_DTYPES = (torch.float32, torch.float64)


def _rotate_pairs(y: Tensor) -> Tensor:
    """(y[2i], y[2i+1]) -> (-y[2i+1], y[2i]) over the last dim: the rotation by a quarter turn."""
    pairs = y.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def _norm_rope_one(x: Tensor, weight: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor],
                   eps: float) -> Tensor:
    """rope(x * rsqrt(mean(x^2) + eps) * weight) in the compute dtype (float32, float64 for float64 x)."""
    cd = _compute_dtype(x.dtype)
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(cd)
    if cos is not None:
        y = y * cos.to(cd) + _rotate_pairs(y) * sin.to(cd)
    return y


def qk_norm_rope_reference(q: Tensor, k: Tensor, q_weight: Optional[Tensor] = None,
                           k_weight: Optional[Tensor] = None, cos: Optional[Tensor] = None,
                           sin: Optional[Tensor] = None, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch qk_norm_rope: float32 throughout (float64 for float64 input), rounded once to the
    input dtype; outputs laid out like q and k (``torch.empty_like``)."""
    outs = []
    for x, w in ((q, q_weight), (k, k_weight)):
        out = torch.empty_like(x)
        out.copy_(_norm_rope_one(x, w, cos, sin, eps))
        outs.append(out)
    return outs[0], outs[1]


def _native_one(x: Tensor, weight: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], eps: float,
                out: Tensor) -> Tensor:
    cd = _compute_dtype(x.dtype)
    # Work in x's memory order (Flux's (B, S, H, D) storage of a (B, H, S, D) view): the outer dims
    # permuted by stride make a dense input contiguous, so every pass below streams through memory
    # (elementwise ops that transpose on the fly are several times slower on the CPU).
    perm = sorted(range(3), key=lambda i: -x.stride(i)) + [3]
    xp = x.permute(perm)
    xf = xp.to(cd, memory_format=torch.contiguous_format)
    rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    # the last op writes straight into the output (rounding once); a copy made above is scaled in place
    out_p = out.permute(perm)
    if cos is None and weight is None:
        torch.mul(xf, rstd, out=out_p)
        return out
    y = xf.mul_(rstd) if xf.data_ptr() != xp.data_ptr() else xf * rstd
    wf = None if weight is None else weight.to(cd)
    if cos is None:
        torch.mul(y, wf, out=out_p)
        return out
    # the weight folded into the (S, D) factors: y w c + rot(y w) s = y (w c) + rot(y) (w' s), w' pair-swapped
    a = cos.to(cd) if wf is None else cos.to(cd) * wf
    b = sin.to(cd) if wf is None else sin.to(cd) * wf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    positions = [1, 1, 1, x.shape[-1]]
    positions[perm.index(2)] = x.shape[2]
    torch.addcmul(y * a.view(positions), _rotate_pairs(y), b.view(positions), out=out_p)
    return out


def qk_norm_rope_native(q: Tensor, k: Tensor, q_weight: Optional[Tensor] = None, k_weight: Optional[Tensor] = None,
                        cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, eps: float = 1e-6,
                        q_out: Optional[Tensor] = None, k_out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The ``auto`` path off CUDA: float32 statistics from one norm reduction, the weight folded into the
    rotation's (S, D) factors, the rotation as one multiply and one multiply-add, one rounding into the
    output (the reference's numerics in fewer passes over memory)."""
    q_out = torch.empty_like(q) if q_out is None else q_out
    k_out = torch.empty_like(k) if k_out is None else k_out
    return _native_one(q, q_weight, cos, sin, eps, q_out), _native_one(k, k_weight, cos, sin, eps, k_out)


def _norm_rope_backward_one(grad: Tensor, x: Tensor, weight: Optional[Tensor], cos: Optional[Tensor],
                            sin: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor]:
    """(dx, dweight) of one tensor in the compute dtype.

    With y = xhat * w, out = y * cos + P(y) * sin (P the quarter-turn of _rotate_pairs, P^T = -P):
    dy = g * cos - P(g * sin); dw = sum dy * xhat; dx = rstd * (dy w - xhat * mean(dy w * xhat)).
    """
    cd = _compute_dtype(x.dtype)
    xf = x.to(cd)
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    dy = grad.to(cd)
    if cos is not None:
        dy = dy * cos.to(cd) - _rotate_pairs(dy * sin.to(cd))
    dweight = (dy * xhat).flatten(0, -2).sum(0)
    if weight is not None:
        dy = dy * weight.to(cd)
    dx = rstd * (dy - xhat * (dy * xhat).mean(-1, keepdim=True))
    return dx, dweight


def qk_norm_rope_backward_reference(grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor,
                                    q_weight: Optional[Tensor], k_weight: Optional[Tensor], cos: Optional[Tensor],
                                    sin: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closed-form gradients (dq, dk, dq_weight, dk_weight); the weight gradients are always returned,
    (D,) in the weight's dtype (q's dtype for an absent weight); cos and sin get none."""
    result = []
    for g, x, w in ((grad_q, q, q_weight), (grad_k, k, k_weight)):
        dx, dw = _norm_rope_backward_one(g, x, w, cos, sin, eps)
        out = torch.empty_like(x)
        result.append((out.copy_(dx), dw))
    (dq, dqw), (dk, dkw) = result
    wdt = lambda w: w.dtype if w is not None else q.dtype
    return dq, dk, dqw.to(wdt(q_weight)), dkw.to(wdt(k_weight))


# ---------------------------------------------------------------------------------------------
# the ops
# ---------------------------------------------------------------------------------------------


def _forward(q, k, q_weight, k_weight, cos, sin, eps, backend, q_out=None, k_out=None):
    if q.dtype != torch.float64 and use_triton(q, backend):
        from fastdiff.kernels.qk_norm_rope import qk_norm_rope_forward
        return qk_norm_rope_forward(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out)
    if current_backend(backend) == "auto":
        return qk_norm_rope_native(q, k, q_weight, k_weight, cos, sin, eps, q_out, k_out)
    ref = qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)
    if q_out is None:
        return ref
    return q_out.copy_(ref[0]), k_out.copy_(ref[1])


@torch.library.custom_op("fastdiff::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                     cos: Optional[Tensor], sin: Optional[Tensor], eps: float,
                     backend: Optional[str]) -> tuple[Tensor, Tensor]:
    if q.numel() == 0:
        return torch.empty_like(q), torch.empty_like(k)
    return _forward(q, k, q_weight, k_weight, cos, sin, eps, backend)


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps, backend):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("fastdiff::qk_norm_rope_out", mutates_args=("q_out", "k_out"))
def _qk_norm_rope_out_op(q: Tensor, k: Tensor, q_weight: Optional[Tensor], k_weight: Optional[Tensor],
                         cos: Optional[Tensor], sin: Optional[Tensor], eps: float, backend: Optional[str],
                         q_out: Tensor, k_out: Tensor) -> None:
    if q.numel() > 0:
        _forward(q, k, q_weight, k_weight, cos, sin, eps, backend, q_out, k_out)


@_qk_norm_rope_out_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps, backend, q_out, k_out):
    return None


@torch.library.custom_op("fastdiff::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(
        grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, q_weight: Optional[Tensor],
        k_weight: Optional[Tensor], cos: Optional[Tensor], sin: Optional[Tensor], eps: float,
        backend: Optional[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if q.numel() > 0 and q.dtype != torch.float64 and use_triton(q, backend):
        from fastdiff.kernels.qk_norm_rope import qk_norm_rope_backward
        return qk_norm_rope_backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps)
    return qk_norm_rope_backward_reference(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps)


@_qk_norm_rope_backward_op.register_fake
def _(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps, backend):
    d = q.shape[-1]
    pick = lambda w: q.new_empty((d,), dtype=w.dtype if w is not None else q.dtype)
    return torch.empty_like(q), torch.empty_like(k), pick(q_weight), pick(k_weight)


def _setup_context(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, eps, backend = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
    ctx.args = (eps, backend)


def _backward(ctx, grad_q, grad_k):
    q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
    eps, backend = ctx.args
    grad_q = torch.zeros_like(q) if grad_q is None else grad_q
    grad_k = torch.zeros_like(k) if grad_k is None else grad_k
    dq, dk, dqw, dkw = torch.ops.fastdiff.qk_norm_rope_backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin,
                                                                eps, backend)
    keep = lambda g, t: g if t is not None and t.requires_grad else None
    return dq, dk, keep(dqw, q_weight), keep(dkw, k_weight), None, None, None, None


_qk_norm_rope_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# the public function: argument checks, then one of the two ops
# ---------------------------------------------------------------------------------------------


def _memory_span(t: Tensor) -> tuple[int, int]:
    """First and last byte address that t's elements touch (torch strides are non-negative)."""
    start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return start, start + (last + 1) * t.element_size() - 1


def _same_layout_disjoint(a: Tensor, b: Tensor) -> bool:
    """For two views with one shape and one set of strides whose dims nest (each stride exceeds the span
    of the smaller ones, as in any slice or permutation of a dense tensor): whether no element of one
    is an element of the other, that is, whether the offset between them is no combination
    ``sum i_j * stride_j`` with ``|i_j| < size_j``. False where the layout does not qualify."""
    dims = sorted(((st, n) for st, n in zip(a.stride(), a.shape, strict=True) if n > 1), reverse=True)
    if a.shape != b.shape or a.dtype != b.dtype or dims != sorted(
            ((st, n) for st, n in zip(b.stride(), b.shape, strict=True) if n > 1), reverse=True):
        return False
    if any(st <= 0 for st, _ in dims):
        return False
    for i, (st, _) in enumerate(dims):
        if st <= sum(s2 * (n2 - 1) for s2, n2 in dims[i + 1:]):
            return False

    def reachable(delta: int, i: int) -> bool:
        if i == len(dims):
            return delta == 0
        st, n = dims[i]
        rest = sum(s2 * (n2 - 1) for s2, n2 in dims[i + 1:])
        return any(abs(c) < n and abs(delta - c * st) <= rest and reachable(delta - c * st, i + 1)
                   for c in {delta // st, -(-delta // st)})

    return not reachable(b.storage_offset() - a.storage_offset(), 0)


def _may_overlap(a: Tensor, b: Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _memory_span(a), _memory_span(b)
    if a1 < b0 or b1 < a0:
        return False
    return not _same_layout_disjoint(a, b)


def _check_like_q(name: str, t: Tensor, q: Tensor) -> None:
    """``t`` (k or an output) has q's shape, dtype and device."""
    if tuple(t.shape) != tuple(q.shape):
        raise ValueError(f"{name} must have q's shape (B, H, S, D) = {tuple(q.shape)}, got {tuple(t.shape)}")
    if t.dtype != q.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must be on one device")


def _check_out(out, q: Tensor, inputs: dict) -> tuple[Tensor, Tensor]:
    if not isinstance(out, (tuple, list)) or len(out) != 2 or not all(isinstance(t, Tensor) for t in out):
        raise ValueError(f"out must be a pair (q_out, k_out) of tensors, got {type(out).__name__}")
    q_out, k_out = out
    for name, t in (("out[0] (q_out)", q_out), ("out[1] (k_out)", k_out)):
        _check_like_q(name, t, q)
        if torch.compiler.is_compiling():
            continue  # fake tensors have no addresses: the checks below ran in eager mode
        if t.numel() > 0 and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(f"{name} has overlapping elements (an expanded or stride-0 view); each output "
                             "element must have its own memory")
        for other, u in inputs.items():
            if u is not None and _may_overlap(t, u):
                raise ValueError(f"{name} shares memory with {other}; the outputs must not alias the inputs")
    if not torch.compiler.is_compiling() and _may_overlap(q_out, k_out):
        raise ValueError("out[0] (q_out) and out[1] (k_out) share memory; they must be disjoint")
    return q_out, k_out


def qk_norm_rope(q: Tensor, k: Tensor, q_weight: Optional[Tensor] = None, k_weight: Optional[Tensor] = None,
                 cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, eps: float = 1e-6,
                 backend: Optional[str] = None, out: Optional[Sequence[Tensor]] = None) -> tuple[Tensor, Tensor]:
    """Per-head RMSNorm of q and k with their own weights, then the rotary embedding: ``(q_out, k_out)``.

    For each row ``x`` (a head of a position) of q (with ``q_weight``) and of k (with ``k_weight``)::

        y = x * rsqrt(mean(x^2) + eps) * weight      # diffusers' RMSNorm(D, eps, elementwise_affine=True)
        out = y * cos[s] + rotate_pairs(y) * sin[s]  # diffusers' apply_rotary_emb(y, (cos, sin), use_real=True,
                                                     #   use_real_unbind_dim=-1): pairs (y[2i], y[2i+1])
                                                     #   -> (y[2i] c - y[2i+1] s, y[2i+1] c + y[2i] s)

    in float32 (float64 for float64 input), rounded once to q's dtype: one read and one write of q and k.
    Flux runs it with cos/sin from ``FluxPosEmbed``; SD3.5 without them (the RMSNorm alone).

    Args:
        q, k: (B, H, S, D), one shape, dtype (float16, bfloat16, float32; float64 on the reference and
            native paths) and device; any strides (Flux's (B, S, H, D) projections ``.transpose(1, 2)``
            are read as they are, without a copy; D need not be contiguous).
        q_weight, k_weight: (D,) RMSNorm weights in q's dtype or float32, or None (no affine).
        cos, sin: (S, D) float32 or float64, both or neither; row ``s`` rotates position ``s`` of q and k.
            D must be even with them. To rotate a stream that sits at positions ``start:start + S`` of a
            longer (joint) sequence, pass ``cos[start:start + S]``, ``sin[start:start + S]``: a row slice
            is a view (no copy), and the kernel reads cos/sin through their strides.
        eps: added to the mean square (diffusers' Flux and SD3.5: 1e-6).
        backend: None (follow the switch), "auto", "triton" or "reference".
        out: None, or a pair ``(q_out, k_out)`` of (B, H, S, D) tensors in q's dtype, typically views into
            a joint (text + image) buffer, written in place and returned; they must not share memory with
            the inputs or with each other. Not differentiable (as PyTorch's ``out=``): with inputs that
            require grad under grad mode it raises.

    Returns:
        ``(q_out, k_out)``: new tensors laid out like q and k (``torch.empty_like``), or ``out``.

    Differences from diffusers: its RMSNorm rounds the normalised value to a half-precision weight's dtype
    before the weight multiply and again after the rotation, and returns float32 when the weight is float32
    and the input half; here the whole chain is float32 with one rounding to q's dtype. Gradients flow to
    q, k, q_weight and k_weight; cos and sin get none.

    A Flux double block, joint sequence = [text (S_t) ; image (S_i)], rotated as one::

        jq = q_buf.view(B, S_t + S_i, H, D).transpose(1, 2)      # (B, H, S, D) views of (B, S, H, D) memory
        jk = k_buf.view(B, S_t + S_i, H, D).transpose(1, 2)
        qk_norm_rope(tq, tk, norm_added_q.weight, norm_added_k.weight, cos[:S_t], sin[:S_t],
                     out=(jq[:, :, :S_t], jk[:, :, :S_t]))
        qk_norm_rope(iq, ik, norm_q.weight, norm_k.weight, cos[S_t:], sin[S_t:],
                     out=(jq[:, :, S_t:], jk[:, :, S_t:]))
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, S, D), got {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be one of {_DTYPES}, got {t.dtype}")
    _check_like_q("k", k, q)
    _, _, s, d = q.shape
    if d == 0:
        raise ValueError(f"q and k must have a head dim D >= 1, got shape {tuple(q.shape)}")
    _check_vector(q_weight, "q_weight", q, (d,), same_dtype=False)
    _check_vector(k_weight, "k_weight", q, (d,), same_dtype=False)
    if (cos is None) != (sin is None):
        given = "cos" if cos is not None else "sin"
        raise ValueError(f"cos and sin must be given together or not at all; got {given} alone")
    if cos is not None:
        for name, t in (("cos", cos), ("sin", sin)):
            if not isinstance(t, Tensor):
                raise ValueError(f"{name} must be a tensor or None, got {type(t).__name__}")
            if tuple(t.shape) != (s, d):
                raise ValueError(f"{name} must have shape (S, D) = {(s, d)}, got {tuple(t.shape)}; for a stream at "
                                 f"positions start:start+S of a longer sequence pass {name}[start:start + S]")
            if t.dtype not in _ROPE_DTYPES:
                raise ValueError(f"{name} must be float32 or float64, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must be on one device")
        if d % 2:
            raise ValueError(f"the rotary embedding rotates pairs of features: D must be even with cos/sin, "
                             f"q has D={d}")
    eps = float(eps)
    if not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if backend is not None:
        _check_backend(backend)
    if q.dtype == torch.float64 and current_backend(backend) == "triton":
        raise ValueError("backend 'triton' computes in float32: float64 q/k run on backend='reference' or 'auto'")
    if out is None:
        return _qk_norm_rope_op(q, k, q_weight, k_weight, cos, sin, eps, backend)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, q_weight, k_weight)):
        raise ValueError("qk_norm_rope with out= is not differentiable (as PyTorch's out= arguments); call it "
                         "without out= where gradients are needed, or under torch.no_grad()")
    q_out, k_out = _check_out(out, q, dict(q=q, k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin))
    if torch.compiler.is_exporting():  # exporters see the functional op and a copy into the views
        q_new, k_new = _qk_norm_rope_op(q, k, q_weight, k_weight, cos, sin, eps, backend)
        q_out.copy_(q_new)
        k_out.copy_(k_new)
    else:
        torch.ops.fastdiff.qk_norm_rope_out(q, k, q_weight, k_weight, cos, sin, eps, backend, q_out, k_out)
    return q_out, k_out
