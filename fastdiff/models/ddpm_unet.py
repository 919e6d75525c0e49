"""The DDPM U-Net as diffusers ships it (``UNet2DModel``), on fastdiff's fused ops.

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models" (2020); the released checkpoints
(google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-church-256, ddpm-bedroom-256) are diffusers
``UNet2DModel`` folders. ``DDPMUNet`` is built from the same config keys and has the same state-dict keys
as diffusers' current ``UNet2DModel`` (attention as ``to_q``/``to_k``/``to_v``/``to_out.0``/``group_norm``;
the older ``query``/``key``/``value``/``proj_attn`` names of the hub files are renamed on load), for the
DDPM block types: ``DownBlock2D``, ``AttnDownBlock2D``, ``UpBlock2D``, ``AttnUpBlock2D``,
``UNetMidBlock2D``. Other block types and options raise a ValueError naming the key.

Inside, each GroupNorm + SiLU is one :class:`fastdiff.nn.GroupNormModulate` (with the ``scale_shift``
time conditioning fused too) and attention is :func:`fastdiff.ops.attention`.

    model = DDPMUNet.from_pretrained("path/to/ddpm-cifar10-32")   # config.json + weights
    model = DDPMUNet.from_diffusers(unet2d_model)                  # from a diffusers module
    eps = model(x, timesteps)                                      # a tensor, not UNet2DOutput
"""

from __future__ import annotations

import inspect
import json
import math
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff import ops
from fastdiff.models.checkpoint import CheckpointError, CheckpointNotFoundError, load_state_dict, read_state_dict
from fastdiff.models.common import ZooModule, check_image, check_labels
from fastdiff.nn import GroupNormModulate

__all__ = ["DDPMUNet", "PRESETS", "get_timestep_embedding"]

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
ACTIVATIONS = ("silu", "swish")  # the same function; the fused norm has SiLU only
TIME_SCALE_SHIFTS = ("default", "scale_shift")


def get_timestep_embedding(timesteps: Tensor, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1, max_period: float = 10000.0) -> Tensor:
    """DDPM's sinusoidal embedding, (N,) -> (N, dim) float32: ``[sin(t f_i), cos(t f_i)]`` with
    ``f_i = exp(-ln(max_period) * i / (half - downscale_freq_shift))`` (``[cos, sin]`` when flipped).
    DDPM's own layout is shift 1, not flipped."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


# ---------------------------------------------------------------------------------------------
# blocks (diffusers' module names)
# ---------------------------------------------------------------------------------------------


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """``(x + conv2(drop(SiLU(norm2'(conv1(SiLU(norm1(x))), temb))))) / output_scale_factor``, with a 1x1
    ``conv_shortcut`` on x when the channels change. norm2' is ``GN(h + proj(SiLU(temb)))`` ("default",
    the embedding as the op's pre_shift) or ``GN(h) * (1 + scale) + shift`` ("scale_shift"), both fused;
    a scale factor of 1 is not divided by (a pass over memory for nothing)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, eps: float, groups: int,
                 dropout: float, time_embedding_norm: str, output_scale_factor: float):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNormModulate(groups, in_channels, eps=eps, activation="silu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        proj = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
        self.time_emb_proj = nn.Linear(temb_channels, proj)
        self.norm2 = GroupNormModulate(groups, out_channels, eps=eps, activation="silu")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x))                                  # (N, C_out, H, W)
        t = self.time_emb_proj(F.silu(temb)).to(h.dtype)               # (N, C_out) or (N, 2 C_out)
        if self.time_embedding_norm == "scale_shift":
            scale, shift = (c.contiguous() for c in t.chunk(2, dim=1))
            h = self.norm2(h, scale, shift)                            # SiLU(GN(h) * (1 + scale) + shift)
        else:
            h = self.norm2(h, pre_shift=t)                             # SiLU(GN(h + t))
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h if self.output_scale_factor == 1 else (x + h) / self.output_scale_factor


class SpatialSelfAttention(nn.Module):
    """diffusers' ``Attention`` as its U-Net blocks configure it: ``(x + to_out(attn(GN(x)))) / rescale``
    over the H*W positions, heads of ``dim_head`` channels (one head of all channels when None)."""

    def __init__(self, channels: int, dim_head: Optional[int], norm_num_groups: Optional[int], eps: float,
                 rescale_output_factor: float):
        super().__init__()
        dim_head = dim_head if dim_head is not None else channels
        if channels % dim_head != 0:
            raise ValueError(f"attention_head_dim={dim_head} must divide the block's channels {channels}")
        self.heads = channels // dim_head
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = GroupNormModulate(norm_num_groups, channels, eps=eps) if norm_num_groups else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels), nn.Dropout(0.0)])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Hub files written by diffusers before 0.14 name these query/key/value/proj_attn.
        for old, new in (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")):
            for p in ("weight", "bias"):
                if prefix + f"{old}.{p}" in state_dict:
                    state_dict[prefix + f"{new}.{p}"] = state_dict.pop(prefix + f"{old}.{p}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.group_norm(x) if self.group_norm is not None else x
        h = h.reshape(b, c, hgt * wid).transpose(1, 2)                 # (B, T, C)

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, hgt * wid, self.heads, c // self.heads).transpose(1, 2)  # (B, heads, T, d)

        a = ops.attention(heads(self.to_q(h)), heads(self.to_k(h)), heads(self.to_v(h)))  # (B, heads, T, d)
        a = self.to_out[1](self.to_out[0](a.transpose(1, 2).reshape(b, hgt * wid, c)))   # (B, T, C)
        a = a.transpose(1, 2).reshape(b, c, hgt, wid)
        return a + x if self.rescale_output_factor == 1 else (a + x) / self.rescale_output_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; ``padding=0`` pads right and bottom by one first (DDPM's TF layout)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """``DownBlock2D`` / ``AttnDownBlock2D``: resnets (each followed by attention in the Attn type), then
    a downsampler unless last. Returns the output and every intermediate state for the skips."""

    def __init__(self, attention: bool, num_layers: int, in_channels: int, out_channels: int,
                 temb_channels: int, add_downsample: bool, eps: float, groups: int, dropout: float,
                 time_embedding_norm: str, attention_head_dim: Optional[int], downsample_padding: int):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, eps, groups,
                          dropout, time_embedding_norm, 1.0) for i in range(num_layers)])
        self.attentions = None
        if attention:
            self.attentions = nn.ModuleList(
                [SpatialSelfAttention(out_channels, attention_head_dim, groups, eps, 1.0)
                 for _ in range(num_layers)])
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, downsample_padding)])

    def forward(self, x: Tensor, temb: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        states = ()
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            states += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states += (x,)
        return x, states


class UpBlock(nn.Module):
    """``UpBlock2D`` / ``AttnUpBlock2D``: each resnet takes the previous output concatenated with one skip
    state (popped last-first), attention after it in the Attn type, then an upsampler unless last."""

    def __init__(self, attention: bool, num_layers: int, in_channels: int, prev_output_channel: int,
                 out_channels: int, temb_channels: int, add_upsample: bool, eps: float, groups: int,
                 dropout: float, time_embedding_norm: str, attention_head_dim: Optional[int]):
        super().__init__()
        resnets = []
        for i in range(num_layers):
            skip = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channel if i == 0 else out_channels
            resnets.append(ResnetBlock2D(resnet_in + skip, out_channels, temb_channels, eps, groups, dropout,
                                         time_embedding_norm, 1.0))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = None
        if attention:
            self.attentions = nn.ModuleList(
                [SpatialSelfAttention(out_channels, attention_head_dim, groups, eps, 1.0)
                 for _ in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: Tensor, skips: Sequence[Tensor], temb: Tensor) -> Tensor:
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class UNetMidBlock2D(nn.Module):
    """resnet, (attention, resnet) once; outputs divided by ``output_scale_factor``."""

    def __init__(self, in_channels: int, temb_channels: int, dropout: float, eps: float, groups: int,
                 attn_groups: Optional[int], time_embedding_norm: str, add_attention: bool,
                 attention_head_dim: Optional[int], output_scale_factor: float):
        super().__init__()
        self.add_attention = add_attention
        res = lambda: ResnetBlock2D(in_channels, in_channels, temb_channels, eps, groups, dropout,  # noqa: E731
                                    time_embedding_norm, output_scale_factor)
        self.resnets = nn.ModuleList([res(), res()])
        if add_attention:
            self.attentions = nn.ModuleList([
                SpatialSelfAttention(in_channels, attention_head_dim, attn_groups, eps, output_scale_factor)])
        else:
            self.attentions = None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, temb)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


def _require(cond: bool, key: str, value, allowed) -> None:
    if not cond:
        raise ValueError(f"DDPMUNet does not support {key}={value!r} (supported: {allowed})")


class DDPMUNet(ZooModule):
    """diffusers' ``UNet2DModel`` for the DDPM block types, built from its config keys.

    forward(x (N, in_channels, H, W), timesteps (N,) or scalar, class_labels (N,) or None)
    -> (N, out_channels, H, W), the tensor that diffusers wraps in ``UNet2DOutput.sample``.
    Feature extraction reads ``down_blocks.i``, ``mid_block``, ``up_blocks.i``.
    """

    def __init__(self, sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
                 time_embedding_type="positional", time_embedding_dim=None, freq_shift=0,
                 flip_sin_to_cos=True,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                 mid_block_type="UNetMidBlock2D",
                 up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
                 downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0,
                 act_fn="silu",
                 attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5,
                 resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
                 num_class_embeds=None, num_train_timesteps=None):
        config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        _require(time_embedding_type == "positional", "time_embedding_type", time_embedding_type,
                 "'positional'")
        _require(act_fn in ACTIVATIONS, "act_fn", act_fn, ACTIVATIONS)
        _require(resnet_time_scale_shift in TIME_SCALE_SHIFTS, "resnet_time_scale_shift",
                 resnet_time_scale_shift, TIME_SCALE_SHIFTS)
        _require(downsample_type == "conv", "downsample_type", downsample_type, "'conv'")
        _require(upsample_type == "conv", "upsample_type", upsample_type, "'conv'")
        _require(mid_block_type in ("UNetMidBlock2D", None), "mid_block_type", mid_block_type,
                 "'UNetMidBlock2D' or None")
        _require(class_embed_type is None, "class_embed_type", class_embed_type,
                 "None (with num_class_embeds for an nn.Embedding)")
        _require(norm_num_groups is not None, "norm_num_groups", norm_num_groups, "an int")
        for t in down_block_types:
            _require(t in DOWN_BLOCKS, "down_block_types", t, DOWN_BLOCKS)
        for t in up_block_types:
            _require(t in UP_BLOCKS, "up_block_types", t, UP_BLOCKS)
        if not (len(down_block_types) == len(up_block_types) == len(block_out_channels)):
            lengths = (len(down_block_types), len(up_block_types), len(block_out_channels))
            raise ValueError("down_block_types, up_block_types and block_out_channels must have one entry "
                             f"per level, got {lengths}")
        self.config = config  # the diffusers config keys, as given
        self.sample_size = sample_size
        self.in_channels = in_channels
        self.center_input_sample = center_input_sample
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        ch0 = block_out_channels[0]
        time_embed_dim = time_embedding_dim or ch0 * 4
        common = dict(temb_channels=time_embed_dim, eps=norm_eps, groups=norm_num_groups, dropout=dropout,
                      time_embedding_norm=resnet_time_scale_shift)

        self.conv_in = nn.Conv2d(in_channels, ch0, kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(ch0, time_embed_dim)
        self.class_embedding = None
        if num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim)

        self.down_blocks = nn.ModuleList()
        out_ch = ch0
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(DownBlock(
                block_type == "AttnDownBlock2D", layers_per_block, in_ch, out_ch,
                add_downsample=i < len(block_out_channels) - 1, attention_head_dim=attention_head_dim,
                downsample_padding=downsample_padding, **common))

        if mid_block_type is None:
            self.mid_block = None
        else:
            # diffusers gives the mid attention a norm only for "default" unless attn_norm_num_groups is set
            attn_groups = attn_norm_num_groups if attn_norm_num_groups is not None else (
                norm_num_groups if resnet_time_scale_shift == "default" else None)
            self.mid_block = UNetMidBlock2D(
                block_out_channels[-1], attn_groups=attn_groups, add_attention=add_attention,
                attention_head_dim=attention_head_dim, output_scale_factor=mid_block_scale_factor, **common)

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(block_out_channels))
        out_ch = rev[0]
        for i, block_type in enumerate(up_block_types):
            prev, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, len(rev) - 1)]
            self.up_blocks.append(UpBlock(
                block_type == "AttnUpBlock2D", layers_per_block + 1, in_ch, prev, out_ch,
                add_upsample=i < len(rev) - 1, attention_head_dim=attention_head_dim, **common))

        self.conv_norm_out = GroupNormModulate(norm_num_groups, ch0, eps=norm_eps, activation="silu")
        self.conv_out = nn.Conv2d(ch0, out_channels, kernel_size=3, padding=1)

    # ---- construction from diffusers -------------------------------------------------------

    @classmethod
    def _from_config(cls, config: dict) -> "DDPMUNet":
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"config keys not understood by DDPMUNet: {unknown}")
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder: str, subfolder: Optional[str] = None, map_location="cpu") -> "DDPMUNet":
        """Load a diffusers ``UNet2DModel`` folder: ``config.json`` and
        ``diffusion_pytorch_model.safetensors`` (or ``.bin``). A pipeline folder whose U-Net sits in
        ``unet/`` is found too."""
        path = os.path.join(folder, subfolder) if subfolder else folder
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
                os.path.join(path, "unet", "config.json")):
            path = os.path.join(path, "unet")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"folder {path!r} has no config.json")
        try:
            with open(cfg_path) as f:
                config = json.load(f)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {cfg_path!r} is not readable JSON (truncated or corrupt): {e}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"checkpoint {cfg_path!r} holds no config object")
        cls_name = config.get("_class_name", "UNet2DModel")
        if cls_name != "UNet2DModel":
            raise ValueError(f"{cfg_path} describes a {cls_name}, not a UNet2DModel")
        model = cls._from_config(config)
        st, bin_ = (os.path.join(path, "diffusion_pytorch_model" + e) for e in (".safetensors", ".bin"))
        weights = st if os.path.isfile(st) else bin_ if os.path.isfile(bin_) else None
        if weights is None:
            raise CheckpointNotFoundError(f"folder {path!r} has neither diffusion_pytorch_model.safetensors "
                                          "nor .bin")
        state_dict = read_state_dict(weights)
        load_state_dict(model, state_dict, weights, strict=True)
        return model.eval()

    @classmethod
    def from_diffusers(cls, unet) -> "DDPMUNet":
        """Copy a diffusers ``UNet2DModel`` (config and weights, on its device and dtype)."""
        p = next(unet.parameters())
        model = cls._from_config(dict(unet.config)).to(device=p.device, dtype=p.dtype)
        model.load_state_dict(unet.state_dict(), strict=True)
        return model.train(unet.training)

    # ---- forward ----------------------------------------------------------------------------

    def example_inputs(self, batch: int) -> dict:
        p = self.conv_in.weight
        size = self.sample_size or 32
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        inputs = dict(x=torch.randn(batch, self.in_channels, *size, device=p.device, dtype=p.dtype),
                      timesteps=torch.full((batch,), 500, device=p.device, dtype=torch.long))
        if self.class_embedding is not None:
            inputs["class_labels"] = torch.zeros(batch, device=p.device, dtype=torch.long)
        return inputs

    def forward(self, x: Tensor, timesteps, class_labels: Optional[Tensor] = None) -> Tensor:
        check_image(x, "x", self.in_channels, multiple=2 ** (len(self.down_blocks) - 1))
        n = x.shape[0]
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(f"class_labels must be given: this model is class-conditional "
                                 f"({self.class_embedding.num_embeddings} classes)")
            class_labels = check_labels(class_labels, n, self.class_embedding.num_embeddings,
                                        "class_labels").to(x.device)
        elif class_labels is not None:
            raise ValueError("class_labels must be None: the model has no class embedding "
                             "(num_class_embeds=None)")
        if self.center_input_sample:
            x = 2 * x - 1.0
        if not isinstance(timesteps, Tensor):
            timesteps = torch.tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(n)
        if timesteps.shape != (n,):
            raise ValueError(f"timesteps must have shape ({n},) or be a scalar, got {tuple(timesteps.shape)}")
        t_emb = get_timestep_embedding(timesteps.to(x.device), self.conv_in.out_channels,
                                       self.flip_sin_to_cos, self.freq_shift)  # (N, C0) float32
        emb = self.time_embedding(t_emb.to(self.time_embedding.linear_1.weight.dtype))  # (N, 4 C0)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)

        h = self.conv_in(x)                                                # (N, C0, H, W)
        skips = (h,)
        for block in self.down_blocks:
            h, states = block(h, emb)                                      # (N, C_i, H_i, W_i)
            skips += states
        if self.mid_block is not None:
            h = self.mid_block(h, emb)                                     # (N, C_last, H_last, W_last)
        for block in self.up_blocks:
            k = len(block.resnets)
            h, skips = block(h, skips[-k:], emb), skips[:-k]               # (N, C_j, H_j, W_j)
        return self.conv_out(self.conv_norm_out(h))                        # (N, out_channels, H, W)


# ---------------------------------------------------------------------------------------------
# presets: the config.json of the google/ddpm-* checkpoints (the three 256 ones share one config)
# ---------------------------------------------------------------------------------------------

_DDPM_COMMON = dict(in_channels=3, out_channels=3, center_input_sample=False,
                    time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False, layers_per_block=2,
                    mid_block_scale_factor=1, downsample_padding=0, act_fn="silu", attention_head_dim=None,
                    norm_num_groups=32, norm_eps=1e-6)

_DDPM_CIFAR10 = dict(_DDPM_COMMON, sample_size=32, block_out_channels=(128, 256, 256, 256),
                     down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))

_DDPM_256 = dict(_DDPM_COMMON, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                 down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)

PRESETS = {
    "ddpm-cifar10": (DDPMUNet, _DDPM_CIFAR10),
    "ddpm-256": (DDPMUNet, _DDPM_256),
    "ddpm-celebahq-256": (DDPMUNet, _DDPM_256),
    "ddpm-church-256": (DDPMUNet, _DDPM_256),
    "ddpm-bedroom-256": (DDPMUNet, _DDPM_256),
}
