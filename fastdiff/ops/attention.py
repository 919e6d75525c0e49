"""``attention``: softmax(q k^T * scale + bias) v over (B, H, S, D), with the reference, SDPA, xformers and
Triton backends and the backward op."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastdiff.ops.routing import (
    _check_float,
    _compute_dtype,
    current_backend,
    use_triton,
)

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


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo (about 1 s of
    ``import fastdiff``): that decorator only sets this attribute, which dynamo reads when it traces a
    call (torch 2.0 to 2.13; tests/test_import.py checks it against torch's own decorator)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
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
    empty batch (or Skv = 0) gives an empty (zero) result and zero gradients; a head dim of 0 is refused.
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
    if d == 0:  # no features to compare: softmax of nothing, and D ** -0.5 has no value
        raise ValueError("q, k, v must have a head dim D >= 1 (1 to 128 for the triton backend), got D=0")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape (B, H, Skv, D) = {tuple(k.shape)}, got {tuple(v.shape)}")
    if scale is None:
        scale = d ** -0.5
    elif not isinstance(scale, (int, float)) or not float("-inf") < float(scale) < float("inf"):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    bias = _check_attention_bias(bias, q, k)
    word = resolve_attention_backend(q, bias, backend)
    return _attention_op(q, k, v, float(scale), word, bias)[0]
