"""Modules built on fastdiff's ops, with the parameter names of the PyTorch modules they replace,
so upstream checkpoints load unchanged and the fused kernels run inside the model zoo."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastdiff import ops

__all__ = ["GroupNormModulate", "LayerNormModulate", "Attention", "Mlp", "CrossAttention"]


class GroupNormModulate(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys) with optional per-sample modulation and
    SiLU fused in: ``act((GN(x + pre_shift[n, c]) * weight + bias) * (1 + scale[n, c]) + shift[n, c])``.

    Statistics are float32 whatever the input dtype, as guided-diffusion's ``GroupNorm32``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: Optional[str] = None, device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"activation must be one of {ops.ACTIVATIONS}, got {activation!r}")
        self.activation = activation

    def forward(self, x: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, *,
                pre_shift: Optional[Tensor] = None) -> Tensor:
        """``pre_shift`` (N, C) is added to x before the statistics (diffusers' ``norm(h + temb)``)."""
        return ops.group_norm_modulate(x, self.num_groups, self.weight, self.bias, scale, shift,
                                       eps=self.eps, activation=self.activation, pre_shift=pre_shift)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"


class LayerNormModulate(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim of (N, L, D) tokens (same parameters and keys) with DiT's
    adaLN modulation fused in: ``(LN(x) * weight + bias) * (1 + scale[n]) + shift[n]``."""

    def __init__(self, normalized_shape: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, x: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 3:  # the op is (N, L, D); other ranks are flattened to it
            if scale is not None or shift is not None:
                raise ValueError(f"x must be (N, L, D) when scale/shift are given, got {tuple(x.shape)}")
            return self.forward(x.reshape(1, -1, x.shape[-1])).reshape(x.shape)
        return ops.layer_norm_modulate(x, scale=scale, shift=shift, weight=self.weight, bias=self.bias,
                                       eps=self.eps)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (``qkv``, ``proj``), as DiT and U-ViT use.

    x (B, L, dim) -> (B, L, dim); the core is ``fastdiff.ops.attention``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        b, l, c = x.shape
        qkv = self.qkv(x).reshape(b, l, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, L, hd) each
        out = ops.attention(q, k, v, scale=self.scale)  # (B, H, L, hd)
        return self.proj(out.transpose(1, 2).reshape(b, l, c))


class CrossAttention(nn.Module):
    """Multi-head attention from tokens x to a context of another length and width, with separate
    q / k / v projections named as diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``),
    so its checkpoints load; ``context=None`` makes it self-attention.

    x (B, L, query_dim), context (B, M, context_dim) -> (B, L, query_dim); the core is
    ``fastdiff.ops.attention``. ``context_mask`` (B, M) bool, True = attend (a key-padding mask, e.g.
    padded text tokens); a query whose keys are all masked gets zeros.
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 qkv_bias: bool = False, out_bias: bool = True):
        super().__init__()
        context_dim = query_dim if context_dim is None else context_dim
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(0.0)])

    def forward(self, x: Tensor, context: Optional[Tensor] = None,
                context_mask: Optional[Tensor] = None) -> Tensor:
        context = x if context is None else context
        b, l, _ = x.shape
        m = context.shape[1]
        q = self.to_q(x).view(b, l, self.heads, self.dim_head).transpose(1, 2)  # (B, H, L, dh)
        k = self.to_k(context).view(b, m, self.heads, self.dim_head).transpose(1, 2)  # (B, H, M, dh)
        v = self.to_v(context).view(b, m, self.heads, self.dim_head).transpose(1, 2)  # (B, H, M, dh)
        bias = None
        if context_mask is not None:
            if tuple(context_mask.shape) != (b, m) or context_mask.dtype != torch.bool:
                raise ValueError(f"context_mask must be a bool tensor of shape (B, M) = {(b, m)}, got "
                                 f"{context_mask.dtype} {tuple(context_mask.shape)}")
            bias = context_mask[:, None, None, :]  # (B, 1, 1, M)
        out = ops.attention(q, k, v, scale=self.scale, bias=bias)  # (B, H, L, dh)
        out = out.transpose(1, 2).reshape(b, l, self.heads * self.dim_head)
        return self.to_out[1](self.to_out[0](out))


class Mlp(nn.Module):
    """timm's Mlp as DiT and U-ViT use it: fc1, activation, fc2 (no dropout); same parameter names."""

    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
