"""U-ViT of Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models" (arXiv:2209.12152),
as baofff/U-ViT ``libs/uvit.py`` builds it.

Time (and class) enter as tokens; the blocks form a U: each of the ``depth // 2`` in-blocks' outputs
is concatenated to the input of the matching out-block and projected back (``skip_linear``). Same
constructor keywords, submodule names and state-dict keys as upstream, so the released checkpoints
load with ``strict=True``. Norms are :class:`fastdiff.nn.LayerNormModulate` (plain LayerNorm: no
scale or shift) and attention :class:`fastdiff.nn.Attention`, so the Triton kernels swap in.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from fastdiff.models.common import ZooModule, check_image, check_labels
from fastdiff.nn import Attention, LayerNormModulate, Mlp

__all__ = ["UViT", "PRESETS"]


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim) float32, cosines then sines, as guided-diffusion's."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / half)
    args = timesteps[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def unpatchify(x: Tensor, channels: int, patch_size: int) -> Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); each token's values are ordered (row in patch, col, channel)."""
    b, hw, _ = x.shape
    h = w = math.isqrt(hw)
    x = x.reshape(b, h, w, patch_size, patch_size, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, h * patch_size, w * patch_size)


class PatchEmbed(nn.Module):
    """Stride-p convolution, (B, C, H, W) -> (B, H*W/p^2, D)."""

    def __init__(self, patch_size: int, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block; with ``skip`` it first fuses the long skip: ``Linear(cat(x, skip))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, act_layer=nn.GELU, norm_layer: Callable = None,
                 skip: bool = False, use_checkpoint: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        if qk_scale:  # upstream's math path honours qk_scale; every released config leaves it None
            self.attn.scale = qk_scale
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        # Recomputation only pays where there is a backward to save memory for.
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        # x, skip (B, extras + L, D)
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class UViT(ZooModule):
    """U-ViT (baofff/U-ViT ``libs.uvit.UViT``), upstream keywords and defaults.

    Args:
        img_size, patch_size, in_chans: input resolution (pixels or latents), patch side, channels.
        embed_dim, depth, num_heads, mlp_ratio: width, block count (depth // 2 in-blocks, one mid-block,
            depth // 2 out-blocks), heads, MLP expansion.
        qkv_bias, qk_scale: bias on the qkv projection; attention scale (None: head_dim ** -0.5).
        norm_layer: norm constructor taking the width (default LayerNorm, eps 1e-5, fused op).
        mlp_time_embed: pass the time embedding through a 4x SiLU MLP (else used as is).
        num_classes: > 0 adds a label token (ImageNet latents: 1001, the last being the null label).
        use_checkpoint: recompute blocks in the backward pass (memory for training; no effect on values).
        conv: a 3x3 convolution on the output image.
        skip: long skip connections into the out-blocks.

    forward(x (B, in_chans, img_size, img_size), timesteps (B,), y (B,) int64 or None) -> same shape as x.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, norm_layer: Optional[Callable] = None,
                 mlp_time_embed: bool = False, num_classes: int = -1, use_checkpoint: bool = False,
                 conv: bool = True, skip: bool = True):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"patch_size={patch_size} must divide img_size={img_size}")
        if norm_layer is None:
            norm_layer = functools.partial(LayerNormModulate, eps=1e-5)  # nn.LayerNorm's defaults
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.patch_size = patch_size

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim),
            nn.SiLU(),
            nn.Linear(4 * embed_dim, embed_dim),
        ) if mlp_time_embed else nn.Identity()
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
            self.extras = 2  # label token, time token
        else:
            self.extras = 1  # time token
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        block = functools.partial(Block, dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                  qkv_bias=qkv_bias, qk_scale=qk_scale, norm_layer=norm_layer,
                                  use_checkpoint=use_checkpoint)
        self.in_blocks = nn.ModuleList([block() for _ in range(depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block(skip=skip) for _ in range(depth // 2)])

        self.norm = norm_layer(embed_dim)
        self.patch_dim = patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Upstream's initialisation: truncated N(0, 0.02) for pos_embed and linears, zero biases,
        LayerNorm at identity (the convolutions keep PyTorch's default)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _check_inputs(self, x: Tensor, timesteps: Tensor, y: Optional[Tensor]) -> Optional[Tensor]:
        """Raise ValueError naming the argument; returns the labels as int64 on x's device (or None)."""
        check_image(x, "x", self.in_chans, size=(self.img_size, self.img_size))
        b = x.shape[0]
        if not isinstance(timesteps, Tensor) or tuple(timesteps.shape) != (b,):
            got = tuple(timesteps.shape) if isinstance(timesteps, Tensor) else type(timesteps).__name__
            raise ValueError(f"timesteps must be a tensor of shape ({b},), got {got}")
        if self.num_classes > 0 and y is None:
            raise ValueError(f"y is required: this U-ViT is class-conditional "
                             f"(num_classes={self.num_classes})")
        if self.num_classes <= 0 and y is not None:
            raise ValueError("y must be None: this U-ViT is unconditional (num_classes <= 0)")
        if y is None:
            return None
        # the released ImageNet configs count the null label as the last class (1001 rows, null 1000)
        return check_labels(y, b, self.label_emb.num_embeddings, "y").to(x.device)

    def forward(self, x: Tensor, timesteps: Tensor, y: Optional[Tensor] = None) -> Tensor:
        y = self._check_inputs(x, timesteps, y)
        x = self.patch_embed(x)                                            # (B, L, D)
        time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dim).to(x.dtype))
        x = torch.cat((time_token.unsqueeze(1), x), dim=1)                 # (B, 1 + L, D)
        if y is not None:
            x = torch.cat((self.label_emb(y).unsqueeze(1), x), dim=1)      # (B, 2 + L, D)
        x = x + self.pos_embed                                             # (B, extras + L, D)

        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())                                        # (B, extras + L, D)

        x = self.decoder_pred(self.norm(x))                                # (B, extras + L, p*p*C)
        x = unpatchify(x[:, self.extras:, :], self.in_chans, self.patch_size)  # (B, C, H, W)
        return self.final_layer(x)

    def example_inputs(self, batch: int) -> dict:
        like = self.pos_embed
        inputs = {
            "x": torch.randn(batch, self.in_chans, self.img_size, self.img_size, device=like.device,
                             dtype=like.dtype),
            "timesteps": torch.full((batch,), 500.0, device=like.device),
        }
        if self.num_classes > 0:
            inputs["y"] = torch.zeros(batch, device=like.device, dtype=torch.int64)
        return inputs


# One preset per upstream config file (configs/*_uvit*.py, the ``nnet`` dict less ``name``);
# ImageNet 256/512 run on 4-channel Stable Diffusion latents (32x32, 64x64).
PRESETS = {
    "uvit-cifar10-small": (UViT, {
        "img_size": 32, "patch_size": 2, "embed_dim": 512, "depth": 12, "num_heads": 8, "mlp_ratio": 4,
        "qkv_bias": False, "mlp_time_embed": False, "num_classes": -1,
    }),
    "uvit-celeba64-small": (UViT, {
        "img_size": 64, "patch_size": 4, "embed_dim": 512, "depth": 12, "num_heads": 8, "mlp_ratio": 4,
        "qkv_bias": False, "mlp_time_embed": False, "num_classes": -1,
    }),
    "uvit-imagenet64-mid": (UViT, {
        "img_size": 64, "patch_size": 4, "embed_dim": 768, "depth": 16, "num_heads": 12, "mlp_ratio": 4,
        "qkv_bias": False, "mlp_time_embed": False, "num_classes": 1000, "use_checkpoint": True,
    }),
    "uvit-imagenet64-large": (UViT, {
        "img_size": 64, "patch_size": 4, "embed_dim": 1024, "depth": 20, "num_heads": 16, "mlp_ratio": 4,
        "qkv_bias": False, "mlp_time_embed": False, "num_classes": 1000, "use_checkpoint": True,
    }),
    "uvit-imagenet256-large": (UViT, {
        "img_size": 32, "patch_size": 2, "in_chans": 4, "embed_dim": 1024, "depth": 20, "num_heads": 16,
        "mlp_ratio": 4, "qkv_bias": False, "mlp_time_embed": False, "num_classes": 1001,
        "use_checkpoint": True,
    }),
    "uvit-imagenet256-huge": (UViT, {
        "img_size": 32, "patch_size": 2, "in_chans": 4, "embed_dim": 1152, "depth": 28, "num_heads": 16,
        "mlp_ratio": 4, "qkv_bias": False, "mlp_time_embed": False, "num_classes": 1001,
        "use_checkpoint": True,
        "conv": False,
    }),
    "uvit-imagenet512-large": (UViT, {
        "img_size": 64, "patch_size": 4, "in_chans": 4, "embed_dim": 1024, "depth": 20, "num_heads": 16,
        "mlp_ratio": 4, "qkv_bias": False, "mlp_time_embed": False, "num_classes": 1001,
        "use_checkpoint": True,
    }),
    "uvit-imagenet512-huge": (UViT, {
        "img_size": 64, "patch_size": 4, "in_chans": 4, "embed_dim": 1152, "depth": 28, "num_heads": 16,
        "mlp_ratio": 4, "qkv_bias": False, "mlp_time_embed": False, "num_classes": 1001,
        "use_checkpoint": True,
        "conv": False,
    }),
}
