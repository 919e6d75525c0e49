"""ADM: the U-Net of guided-diffusion and its noisy-image classifier, on fastdiff's fused ops.

Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (2021), code openai/guided-diffusion
(``guided_diffusion/unet.py``: ``UNetModel``, ``EncoderUNetModel``). ``ADMUNet`` and ``ADMClassifier``
take the same constructor keywords and have the same module names and state-dict keys, so the released
checkpoints load with ``load_state_dict(sd, strict=True)``; forward returns what upstream returns.

What changes inside, not outside:

- Every GroupNorm (upstream ``GroupNorm32``: statistics in float32, output in the input dtype) is a
  :class:`fastdiff.nn.GroupNormModulate`, with the SiLU that follows it and, in the
  ``use_scale_shift_norm`` ResBlock, the ``* (1 + scale) + shift`` fused in (AdaGN in one op). The
  ``nn.SiLU`` slots of upstream's ``nn.Sequential`` stay as ``nn.Identity`` so the checkpoint's indices
  (``in_layers.2``, ``out_layers.3``, ``out.2``) still name the convolutions.
- QKV attention (both head orders) runs through :func:`fastdiff.ops.attention`.
- ``use_fp16=True`` converts the torso's convolutions to float16 at construction (upstream's scripts call
  ``convert_to_fp16()`` right after building); the time embedding is cast to the dtype of ``time_embed``
  so a model moved wholesale to bf16/fp16 also runs.
- ``use_checkpoint`` uses ``torch.utils.checkpoint`` (upstream's own ``CheckpointFunction`` is the same
  idea); attention blocks are checkpointed only when it is set.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastdiff import ops
from fastdiff.models.common import ZooModule, check_image, check_labels
from fastdiff.nn import GroupNormModulate

__all__ = ["ADMUNet", "ADMClassifier", "PRESETS", "timestep_embedding"]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims}")
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def normalization(channels: int, activation: Optional[str] = None) -> GroupNormModulate:
    """guided-diffusion's ``normalization``: GroupNorm with 32 groups, eps 1e-5, float32 statistics;
    ``activation="silu"`` folds in the SiLU that follows it everywhere but in attention."""
    return GroupNormModulate(32, channels, eps=1e-5, activation=activation)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding, (N,) -> (N, dim) float32: ``[cos(t f_i), sin(t f_i)]`` with
    ``f_i = max_period ** (-i / half)``, zero-padded when dim is odd (guided-diffusion's layout)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _check_x(model, x, size: Optional[tuple] = None) -> None:
    """x must be (N, in_channels, *spatial) floating, each halved axis a multiple of 2^(levels - 1)."""
    check_image(x, "x", model.in_channels, model.dims, multiple=2 ** (len(model.channel_mult) - 1), size=size)


def _check_timesteps(timesteps, n: int, device) -> Tensor:
    """Timesteps as a (N,) tensor; a Python number or 0-d tensor is broadcast to the batch."""
    if not isinstance(timesteps, Tensor):
        timesteps = torch.tensor(timesteps, device=device)
    if timesteps.dim() == 0:
        timesteps = timesteps.expand(n)
    if timesteps.shape != (n,):
        raise ValueError(f"timesteps must have shape ({n},) (one per sample) or be a scalar, "
                         f"got {tuple(timesteps.shape)}")
    return timesteps.to(device)


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """``nn.Sequential`` that hands the embedding to the children that take it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2 (the inner two dims for 3-D), then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling (inner two dims for 3-D)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without a conv cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling.

    use_scale_shift_norm: ``h = SiLU(GN(h) * (1 + scale) + shift)`` with (scale, shift) from the
    embedding (AdaGN), one fused op. Otherwise the embedding is added before the second norm:
    ``h = SiLU(GN(h + emb))``, the add outside the op since it changes the group statistics.
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        # The nn.Identity slots held upstream's SiLU (now inside the norm): they keep the indices.
        self.in_layers = nn.Sequential(
            normalization(channels, activation="silu"),
            nn.Identity(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, activation="silu"),
            nn.Identity(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        in_norm, in_conv = self.in_layers[0], self.in_layers[2]
        out_norm, out_drop, out_conv = self.out_layers[0], self.out_layers[2], self.out_layers[3]
        h = in_norm(x)                                   # (N, C_in, *S)  SiLU(GN(x))
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)          # (N, C_in, *S')
        h = in_conv(h)                                   # (N, C, *S')
        emb_out = self.emb_layers(emb).to(h.dtype)       # (N, 2C) or (N, C)
        if self.use_scale_shift_norm:
            scale, shift = (t.contiguous() for t in emb_out.chunk(2, dim=1))  # (N, C) each
            h = out_norm(h, scale, shift)                # SiLU(GN(h) * (1 + scale) + shift)
        else:
            h = out_norm(h + emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - 2))))
        h = out_conv(out_drop(h))
        return self.skip_connection(x) + h


def _split_heads(qkv: Tensor, num_heads: int, new_order: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 3 * H * ch, T) -> q, k, v as (B, H, T, ch).

    Legacy order (``QKVAttentionLegacy``): channels are [head 0: q k v | head 1: q k v | ...].
    New order (``QKVAttention``): channels are [q: heads 0..H-1 | k: ... | v: ...].
    """
    b, width, t = qkv.shape
    ch = width // (3 * num_heads)
    if new_order:
        q, k, v = qkv.reshape(b, 3, num_heads, ch, t).unbind(1)
    else:
        q, k, v = qkv.reshape(b, num_heads, 3, ch, t).unbind(2)
    return q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual: ``x + proj_out(attn(qkv(GN(x))))`` over all positions."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels != 0:
                raise ValueError(f"channels {channels} is not divisible by "
                                 f"num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads != 0:
            raise ValueError(f"channels {channels} is not divisible by num_heads {self.num_heads}")
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        t = math.prod(spatial)  # explicit sizes: reshape cannot infer -1 for an empty batch
        qkv = self.qkv(self.norm(x).reshape(b, c, t))                       # (B, 3C, T)
        q, k, v = _split_heads(qkv, self.num_heads, self.use_new_attention_order)  # (B, H, T, ch)
        a = ops.attention(q, k, v)                                          # (B, H, T, ch)
        h = self.proj_out(a.transpose(-1, -2).reshape(b, c, t))             # (B, C, T)
        return (x.reshape(b, c, t) + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling as guided-diffusion's classifier uses it: the mean token (plus a learned
    position embedding) attends over the mean and all positions; new-order heads of
    ``num_heads_channels`` channels. Only the mean token's query is computed, since only its output is
    returned (upstream computes all and keeps token 0: the same numbers)."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int,
                 output_dim: Optional[int] = None):
        super().__init__()
        self.spacial_dim = spacial_dim
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        if len(spatial) != 2 or spatial[0] * spatial[1] != self.spacial_dim ** 2:
            raise ValueError(f"AttentionPool2d expects (N, {c}, {self.spacial_dim}, {self.spacial_dim}) "
                             f"features, got {tuple(x.shape)}: the input image has the wrong size")
        x = x.reshape(b, c, spatial[0] * spatial[1])                        # (B, C, HW)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)            # (B, C, HW + 1)
        x = x + self.positional_embedding[None].to(x.dtype)
        qkv = self.qkv_proj(x)                                              # (B, 3C, HW + 1)
        q, k, v = _split_heads(qkv, self.num_heads, new_order=True)          # (B, H, HW + 1, ch)
        a = ops.attention(q[:, :, :1], k, v)                                # (B, H, 1, ch)
        return self.c_proj(a.transpose(-1, -2).reshape(b, c, 1))[:, :, 0]  # (B, output_dim)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def _build_encoder(self: nn.Module, *, in_channels, model_channels, num_res_blocks, attention_resolutions,
                   dropout, channel_mult, conv_resample, dims, use_checkpoint, num_heads, num_head_channels,
                   use_scale_shift_norm, resblock_updown, use_new_attention_order) -> tuple[int, int, list]:
    """Build ``time_embed``, ``input_blocks`` and ``middle_block`` on ``self`` (shared by the U-Net and
    the classifier, as upstream's two constructors share this code). Returns the channels and downsample
    rate at the bottom, and the channels of every input block (the U-Net's skip connections)."""
    time_embed_dim = model_channels * 4
    self.time_embed = nn.Sequential(
        nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))

    def res(ch_in, ch_out, **kw):
        return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out, dims=dims,
                        use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, **kw)

    def attn(ch):
        return AttentionBlock(ch, use_checkpoint=use_checkpoint, num_heads=num_heads,
                              num_head_channels=num_head_channels,
                              use_new_attention_order=use_new_attention_order)

    ch = int(channel_mult[0] * model_channels)
    self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
    self._feature_size = ch
    input_block_chans = [ch]
    ds = 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [res(ch, int(mult * model_channels))]
            ch = int(mult * model_channels)
            if ds in attention_resolutions:
                layers.append(attn(ch))
            self.input_blocks.append(TimestepEmbedSequential(*layers))
            self._feature_size += ch
            input_block_chans.append(ch)
        if level != len(channel_mult) - 1:
            down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims=dims)
            self.input_blocks.append(TimestepEmbedSequential(down))
            input_block_chans.append(ch)
            ds *= 2
            self._feature_size += ch
    self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
    self._feature_size += ch
    return ch, ds, input_block_chans


def _convert_convs(modules: Sequence[nn.Module], dtype: torch.dtype) -> None:
    """upstream ``convert_module_to_f16/f32``: only the convolutions change dtype."""
    for root in modules:
        for m in root.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                m.to(dtype)


class ADMUNet(ZooModule):
    """guided-diffusion's ``UNetModel`` (same keywords, module names, state-dict keys, outputs).

    forward(x (N, in_channels, *S), timesteps (N,), y (N,) int64 or None) -> (N, out_channels, *S).
    ``attention_resolutions`` are downsample rates (image_size // resolution), as upstream takes them.
    Feature extraction reads ``input_blocks.i``, ``middle_block``, ``output_blocks.i``.
    """

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.dims = dims
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        ch, ds, input_block_chans = _build_encoder(
            self, in_channels=in_channels, model_channels=model_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=self.attention_resolutions, dropout=dropout, channel_mult=channel_mult,
            conv_resample=conv_resample, dims=dims, use_checkpoint=use_checkpoint, num_heads=num_heads,
            num_head_channels=num_head_channels, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order)
        time_embed_dim = model_channels * 4
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                out_ch = int(model_channels * mult)
                layers = [ResBlock(ch + ich, time_embed_dim, dropout, out_channels=out_ch, dims=dims,
                                   use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm)]
                ch = out_ch
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, use_checkpoint=use_checkpoint,
                                                 num_heads=num_heads_upsample,
                                                 num_head_channels=num_head_channels,
                                                 use_new_attention_order=use_new_attention_order))
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(ch, time_embed_dim, dropout, out_channels=ch, dims=dims,
                                 use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm,
                                 up=True)
                        if resblock_updown else Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
                self._feature_size += ch

        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            normalization(ch, activation="silu"),
            nn.Identity(),  # upstream's SiLU, fused into the norm
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        """Torso convolutions to float16 (upstream's ``convert_to_fp16``); norms and linears stay."""
        _convert_convs([self.input_blocks, self.middle_block, self.output_blocks], torch.float16)

    def convert_to_fp32(self) -> None:
        _convert_convs([self.input_blocks, self.middle_block, self.output_blocks], torch.float32)

    @property
    def dtype(self) -> torch.dtype:
        """The torso's compute dtype (upstream's ``self.dtype``): float16 after ``convert_to_fp16``."""
        return self.input_blocks[0][0].weight.dtype

    def example_inputs(self, batch: int) -> dict:
        p = self.out[2].weight
        x = torch.randn(batch, self.in_channels, *([self.image_size] * self.dims), device=p.device,
                        dtype=p.dtype)
        inputs = dict(x=x, timesteps=torch.full((batch,), 500, device=p.device, dtype=torch.long))
        if self.num_classes is not None:
            inputs["y"] = torch.zeros(batch, device=p.device, dtype=torch.long)
        return inputs

    def forward(self, x: Tensor, timesteps, y: Optional[Tensor] = None) -> Tensor:
        _check_x(self, x)
        n = x.shape[0]
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("y must be given if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        timesteps = _check_timesteps(timesteps, n, x.device)
        if self.num_classes is not None:
            y = check_labels(y, n, self.label_emb.num_embeddings, "y").to(x.device)
        t_emb = timestep_embedding(timesteps, self.model_channels)             # (N, model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))       # (N, 4 * model_channels)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)

        hs = []
        h = x.to(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)                                                 # (N, C_i, *S_i)
            hs.append(h)
        h = self.middle_block(h, emb)                                          # (N, C_mid, *S_mid)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)                   # (N, C_j, *S_j)
        return self.out(h.to(x.dtype))                                         # (N, out_channels, *S)


class ADMClassifier(ZooModule):
    """guided-diffusion's ``EncoderUNetModel``, the noisy-image classifier used for classifier guidance.

    The U-Net's encoder and middle block, then a head chosen by ``pool``: ``"attention"`` (the released
    classifiers), ``"adaptive"``, ``"spatial"`` or ``"spatial_v2"``.
    forward(x (N, in_channels, H, W), timesteps (N,)) -> logits (N, out_channels).
    """

    POOLS = ("adaptive", "attention", "spatial", "spatial_v2")

    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks,
                 attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False,
                 use_new_attention_order=False, pool="adaptive"):
        super().__init__()
        if pool not in self.POOLS:
            raise ValueError(f"pool must be one of {self.POOLS}, got {pool!r}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.conv_resample = conv_resample
        self.dims = dims
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.pool = pool

        ch, ds, _ = _build_encoder(
            self, in_channels=in_channels, model_channels=model_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=self.attention_resolutions, dropout=dropout, channel_mult=channel_mult,
            conv_resample=conv_resample, dims=dims, use_checkpoint=use_checkpoint, num_heads=num_heads,
            num_head_channels=num_head_channels, use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order)
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch, activation="silu"), nn.Identity(), nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)), nn.Flatten())
        elif pool == "attention":
            if num_head_channels == -1:
                raise ValueError("pool='attention' needs num_head_channels (the released classifiers use 64)")
            self.out = nn.Sequential(
                normalization(ch, activation="silu"), nn.Identity(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels))
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:  # spatial_v2: the (N, 2048) features are normalised as (N, 2048, 1), the same statistics
            self.out = nn.Sequential(
                nn.Linear(self._feature_size, 2048), normalization(2048, activation="silu"), nn.Identity(),
                nn.Linear(2048, out_channels))
        if use_fp16:
            self.convert_to_fp16()

    def convert_to_fp16(self) -> None:
        _convert_convs([self.input_blocks, self.middle_block], torch.float16)

    def convert_to_fp32(self) -> None:
        _convert_convs([self.input_blocks, self.middle_block], torch.float32)

    @property
    def dtype(self) -> torch.dtype:
        return self.input_blocks[0][0].weight.dtype

    def example_inputs(self, batch: int) -> dict:
        p = self.time_embed[0].weight
        x = torch.randn(batch, self.in_channels, *([self.image_size] * self.dims), device=p.device,
                        dtype=p.dtype)
        return dict(x=x, timesteps=torch.full((batch,), 500, device=p.device, dtype=torch.long))

    def forward(self, x: Tensor, timesteps) -> Tensor:
        # the attention pool's position embedding fixes the resolution; the other heads take any multiple
        _check_x(self, x, size=(self.image_size,) * self.dims if self.pool == "attention" else None)
        timesteps = _check_timesteps(timesteps, x.shape[0], x.device)
        t_emb = timestep_embedding(timesteps, self.model_channels)             # (N, model_channels)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))       # (N, 4 * model_channels)
        spatial = self.pool.startswith("spatial")
        results = []
        h = x.to(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)                                                 # (N, C_i, *S_i)
            if spatial:
                results.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)                                          # (N, C_mid, *S_mid)
        if spatial:
            results.append(h.to(x.dtype).mean(dim=(2, 3)))
            h = torch.cat(results, dim=-1)                                     # (N, feature_size)
            if self.pool == "spatial_v2":
                h = self.out[0](h)
                h = self.out[1](h[:, :, None])[:, :, 0]                        # GN + SiLU over (N, 2048, 1)
                return self.out[3](h)
            return self.out(h)                                                 # (N, out_channels)
        return self.out(h.to(x.dtype))                                         # (N, out_channels)


# ---------------------------------------------------------------------------------------------
# presets: the released checkpoints (guided-diffusion README flags, script_util.create_model /
# create_classifier). attention_resolutions there are "32,16,8" in pixels, here image_size // res.
# use_fp16 is left False: it is a run-time precision choice (the checkpoints hold float32 weights).
# ---------------------------------------------------------------------------------------------

_CHANNEL_MULT = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4),
                 512: (0.5, 1, 1, 2, 2, 4, 4)}


def _ds(image_size: int, resolutions=(32, 16, 8)) -> tuple:
    return tuple(image_size // r for r in resolutions)


def _adm(image_size: int, num_classes: Optional[int] = 1000, **kw) -> dict:
    cfg = dict(image_size=image_size, in_channels=3, model_channels=256, out_channels=6,  # learn_sigma
               num_res_blocks=2, attention_resolutions=_ds(image_size), dropout=0.0,
               channel_mult=_CHANNEL_MULT[image_size], num_classes=num_classes, use_fp16=False, num_heads=4,
               num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True,
               use_new_attention_order=False)
    cfg.update(kw)
    return cfg


def _classifier(image_size: int, depth: int = 2) -> dict:
    return dict(image_size=image_size, in_channels=3, model_channels=128, out_channels=1000,
                num_res_blocks=depth, attention_resolutions=_ds(image_size),
                channel_mult=_CHANNEL_MULT[image_size], use_fp16=False, num_head_channels=64,
                use_scale_shift_norm=True, resblock_updown=True, pool="attention")


PRESETS = {
    "adm-64-cond": (ADMUNet, _adm(64, model_channels=192, num_res_blocks=3, dropout=0.1,
                                  use_new_attention_order=True)),
    "adm-128-cond": (ADMUNet, _adm(128, num_head_channels=-1)),
    "adm-256-cond": (ADMUNet, _adm(256)),
    "adm-256-uncond": (ADMUNet, _adm(256, num_classes=None)),
    "adm-512-cond": (ADMUNet, _adm(512)),
    "adm-classifier-64": (ADMClassifier, _classifier(64, depth=4)),  # README: --classifier_depth 4
    "adm-classifier-128": (ADMClassifier, _classifier(128)),
    "adm-classifier-256": (ADMClassifier, _classifier(256)),
    "adm-classifier-512": (ADMClassifier, _classifier(512)),
}
