"""DiT: the Diffusion Transformer of Peebles & Xie, "Scalable Diffusion Models with Transformers"
(arXiv:2212.09748), as facebookresearch/DiT ``models.DiT`` builds it.

Same constructor keywords, submodule names and state-dict keys as upstream, so a released checkpoint
(``DiT-XL-2-256x256.pt``) loads with ``strict=True``; ``forward(x, t, y)`` and
``forward_with_cfg(x, t, y, cfg_scale)`` return what upstream returns. The adaLN norm-and-modulate
runs through :class:`fastdiff.nn.LayerNormModulate` (one fused op) and attention through
:class:`fastdiff.nn.Attention`, so the Triton kernels swap in under ``fastdiff.ops.backend``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from fastdiff.models.common import ZooModule, check_image, check_labels
from fastdiff.nn import Attention, LayerNormModulate, Mlp

__all__ = ["DiT", "PRESETS"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """GLIDE's sinusoidal embedding: (N,) timesteps, possibly fractional -> (N, dim) float32,
    cosines first, then sines; frequencies ``max_period ** (-i / (dim // 2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, device=None) -> Tensor:
    """MAE's fixed 2-D sin-cos table, (grid_size**2, embed_dim) float32, tokens in row-major order.

    The first half of the channels encodes the column index, the second half the row index (MAE builds
    its grid with ``meshgrid(w, h)`` and feeds ``grid[0]``, the column, to the first half); each half is
    ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 10000 ** (-i / (embed_dim / 4))``.
    Computed in float64 and rounded once, as upstream does in numpy.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"hidden_size={embed_dim} must be divisible by 4 for the 2-D sin-cos table")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    col = coords.repeat(grid_size)  # token m = row * grid_size + col
    row = coords.repeat_interleave(grid_size)

    def one_axis(pos: Tensor) -> Tensor:
        out = pos[:, None] * omega[None]  # (M, quarter)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_axis(col), one_axis(row)], dim=1).float()


class PatchEmbed(nn.Module):
    """timm's PatchEmbed as DiT uses it: a stride-p convolution, (N, C, H, W) -> (N, H*W/p^2, D)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the timestep (256 frequencies) then a SiLU MLP to hidden_size."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label table with one extra row, index ``num_classes``, for the null label of
    classifier-free guidance; labels are dropped to it at rate ``dropout_prob`` while training."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor, force_drop_ids: Optional[Tensor] = None) -> Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Optional[Tensor] = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the condition c gives a shift, scale and gate for each of
    the attention and MLP branches; the norm and its modulation are one fused op."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = LayerNormModulate(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = LayerNormModulate(hidden_size, elementwise_affine=False, eps=1e-6)
        tanh_gelu = lambda: nn.GELU(approximate="tanh")
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=tanh_gelu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # x (N, T, D), c (N, D); each chunk (N, D)
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa.unsqueeze(1) * self.attn(self.norm1(x, scale=scale_msa, shift=shift_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(self.norm2(x, scale=scale_mlp, shift=shift_mlp))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map of each token to its p*p*out_channels patch values."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNormModulate(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        return self.linear(self.norm_final(x, scale=scale, shift=shift))  # (N, T, p*p*out_channels)


class DiT(ZooModule):
    """Diffusion model with a Transformer backbone (facebookresearch/DiT ``models.DiT``).

    Args (upstream names and defaults, which are DiT-XL/2 at 256x256):
        input_size: latent height = width (image size / 8 for the released models).
        patch_size: p; the sequence has (input_size / p)^2 tokens.
        in_channels: latent channels; the output has 2 * in_channels when learn_sigma.
        hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
        class_dropout_prob: label drop rate while training; > 0 adds the null label ``num_classes``.
        num_classes: class count (1000 for ImageNet).
        learn_sigma: output the variance interpolation channels as well (guided-diffusion style).

    forward(x (N, in_channels, input_size, input_size), t (N,), y (N,) int64) ->
    (N, out_channels, input_size, input_size).
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, learn_sigma: bool = True):
        super().__init__()
        if input_size % patch_size != 0:
            raise ValueError(f"patch_size={patch_size} must divide input_size={input_size}")
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # A frozen parameter, as upstream: it is in the checkpoint and in the published parameter count.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Upstream's initialisation: xavier-uniform linears with zero bias, the patch convolution as a
        linear, N(0, 0.02) label table and timestep MLP, the sin-cos pos_embed, and adaLN-Zero (every
        modulation and the output layer start at zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        grid = self.input_size // self.patch_size
        self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid, self.pos_embed.device)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); each token's values are ordered (row in patch, col, channel)."""
        c, p = self.out_channels, self.patch_size
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Raise ValueError naming the argument; returns the labels as int64 on x's device."""
        check_image(x, "x", self.in_channels, size=(self.input_size, self.input_size))
        n = x.shape[0]
        if not isinstance(t, Tensor) or tuple(t.shape) != (n,):
            raise ValueError(f"t must be a tensor of shape ({n},) (one timestep per sample), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        rows = self.y_embedder.embedding_table.num_embeddings
        null = self.num_classes if rows > self.num_classes else None  # the extra row of class dropout
        if y is None:
            raise ValueError(f"y must be given: DiT is class-conditional (labels 0..{self.num_classes - 1}"
                             f"{'' if null is None else f', null label {null}'})")
        return check_labels(y, n, rows, "y", null_label=null).to(x.device)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        y = self._check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed   # (N, T, D), T = (input_size / p)^2
        t = self.t_embedder(t)                    # (N, D)
        y = self.y_embedder(y, self.training)     # (N, D)
        c = t + y                                 # (N, D)
        for block in self.blocks:
            x = block(x, c)                       # (N, T, D)
        x = self.final_layer(x, c)                # (N, T, p*p*out_channels)
        return self.unpatchify(x)                 # (N, out_channels, input_size, input_size)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float,
                         guided_channels: Optional[int] = 3) -> Tensor:
        """Conditional and unconditional passes in one batch, with classifier-free guidance.

        The batch holds the conditional half first and the unconditional half (y = num_classes) second;
        only the first half of ``x`` is read, and both halves of the result hold the guided output
        ``uncond + cfg_scale * (cond - uncond)``. Upstream (commit ed81ce2) guides only the first 3 of
        the 4 latent channels, kept for exact reproduction of its samples; ``guided_channels=None``
        guides all ``in_channels``, the standard form. The remaining channels (the rest of eps and the
        learned variance) are returned unguided.
        """
        if x.shape[0] % 2 != 0:
            raise ValueError(f"x must hold an even batch (cond half, uncond half) for forward_with_cfg, "
                             f"got {x.shape[0]}")
        k = self.in_channels if guided_channels is None else guided_channels
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :k], model_out[:, k:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    def example_inputs(self, batch: int) -> dict:
        like = self.pos_embed
        return {
            "x": torch.randn(batch, self.in_channels, self.input_size, self.input_size,
                             device=like.device, dtype=like.dtype),
            "t": torch.full((batch,), 500, device=like.device, dtype=torch.int64),
            "y": torch.zeros(batch, device=like.device, dtype=torch.int64),
        }


# DiT's DiT_models table (depth, width, heads) with each patch size, at 256 and 512 (latents image / 8).
_DIT_SIZES = {
    "s": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "b": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "l": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "xl": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}

PRESETS = {
    f"dit-{size}-{patch}-{image}": (DiT, {
        "input_size": image // 8, "patch_size": patch, "in_channels": 4, **dims, "mlp_ratio": 4.0,
        "class_dropout_prob": 0.1, "num_classes": 1000, "learn_sigma": True,
    })
    for size, dims in _DIT_SIZES.items() for patch in (2, 4, 8) for image in (256, 512)
}
