"""Patches for diffusers' U-Net building blocks (``UNet2DModel``, ``UNet2DConditionModel``; the VAE reuses them).

- :class:`ResnetBlock2DPatch` (``ResnetBlock2D``, with its ``up`` / ``down`` variants): norm1 + SiLU as one
  ``group_norm_modulate``; norm2 with the time embedding folded in, also one op: ``"default"`` (embedding added
  before the statistics, then GroupNorm + SiLU) and ``"scale_shift"`` (``GN * (1 + scale) + shift``, SiLU).
- :class:`AttentionPatch` (``Attention`` running diffusers' ``AttnProcessor2_0``): the processor becomes
  :class:`FastdiffAttnProcessor`: the same projections, ``fd.ops.attention`` for softmax(q k^T) v (self and
  cross attention, the mask as an additive bias), and a block's input GroupNorm (``group_norm``, the VAE's and
  ``UNet2DModel``'s attention blocks) as ``group_norm_modulate`` on the 4-D input.
- :class:`NormActPatch` (``conv_norm_out`` + ``conv_act`` of ``UNet2DModel``, ``UNet2DConditionModel`` and the
  VAE's ``Encoder`` / ``Decoder``): GroupNorm + SiLU as one op; the activation module passes its input through.
- :class:`Transformer2DModelPatch` (the U-Net's spatial transformers): their input GroupNorm as
  ``group_norm_modulate`` (the Triton kernel on CUDA, which reads channels_last directly).

Every patched forward computes what the forward it replaces computes, with the same modules called in the same
order, except the GroupNorm / SiLU pairs that become one op.
"""

from __future__ import annotations

import types
from typing import Callable, Optional

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from torch import Tensor, nn

from fastdiff import ops
from fastdiff.compat.diffusers.patching import (
    ModulePatch,
    hooks_on,
    identity_forward,
    pair_fusable,
    swap_forward,
    swap_processor,
)

__all__ = ["ResnetBlock2DPatch", "AttentionPatch", "FastdiffAttnProcessor", "NormActPatch",
           "Transformer2DModelPatch", "group_norm"]

# The diffusers releases whose code of the methods a patch reproduces was read and found equivalent to what the
# patch computes, by digest (fastdiff.compat.diffusers.patching.code_digest, which ignores formatting, comments
# and annotations). ResnetBlock2D: the three forms differ only in when conv_shortcut's input is made contiguous,
# which changes no value; 0.26 and older passed a LoRA `scale` through and are not covered. AttnProcessor2_0:
# 0.30 added norm_q / norm_k, which FastdiffAttnProcessor reads.
RESNET_BLOCK_2D_FORWARD = {
    "1a0273cf43871a0a": "0.27.0-0.32.2",
    "4f26023fe7104c55": "0.33.0-0.36.0",
    "353b04767645f944": "0.37.0-0.42.1",
}
ATTN_PROCESSOR_2_0_CALL = {
    "4aa14ef70e28d5dd": "0.30.0-0.42.1",
}
TRANSFORMER_2D_OUTPUT = {  # Transformer2DModel._get_output_for_continuous_inputs (0.28 split it out)
    "464105b0cec3b79c": "0.28.0-0.42.1",
}


def group_norm(norm: nn.GroupNorm, x: Tensor, activation: Optional[str] = None, *, scale: Optional[Tensor] = None,
               shift: Optional[Tensor] = None, pre_shift: Optional[Tensor] = None) -> Tensor:
    """``act(norm(x + pre_shift) * (1 + scale) + shift)`` as one ``fd.ops.group_norm_modulate`` call, with the
    GroupNorm module's groups, affine parameters and eps; scale / shift / pre_shift are (N, C) or None."""
    return ops.group_norm_modulate(x, norm.num_groups, norm.weight, norm.bias, scale=scale, shift=shift,
                                   eps=norm.eps, activation=activation, pre_shift=pre_shift)


def _is_plain(module, cls) -> bool:
    return type(module) is cls


# ---------------------------------------------------------------------------------------------
# ResnetBlock2D
# ---------------------------------------------------------------------------------------------


def resnet_block_2d_forward(self: ResnetBlock2D, input_tensor: Tensor, temb: Optional[Tensor], *args,
                            **kwargs) -> Tensor:
    """ResnetBlock2D.forward with norm1 + SiLU and norm2 (+ time embedding) + SiLU each as one op."""
    n = input_tensor.shape[0]
    if args or kwargs.get("scale") is not None or (self.time_emb_proj is None and temb is not None):
        return ResnetBlock2D.forward(self, input_tensor, temb, *args, **kwargs)  # deprecated / unusual calls
    if self.time_emb_proj is not None:
        temb_in = temb
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)  # (N, C) "default", (N, 2C) "scale_shift"
        if temb.dim() != 2 or temb.shape[0] != n or temb.dtype != input_tensor.dtype:
            return ResnetBlock2D.forward(self, input_tensor, temb_in)  # an embedding that broadcasts: unfused
    h = group_norm(self.norm1, input_tensor, "silu")
    if self.upsample is not None:
        if h.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails for large batches
            input_tensor = input_tensor.contiguous()
            h = h.contiguous()
        input_tensor = self.upsample(input_tensor)
        h = self.upsample(h)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        h = self.downsample(h)
    h = self.conv1(h)  # (N, C, H, W)
    if self.time_embedding_norm == "default":  # the embedding is added before the statistics
        h = group_norm(self.norm2, h, "silu", pre_shift=temb)
    elif self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        scale, shift = torch.chunk(temb, 2, dim=1)  # (N, C) each
        h = group_norm(self.norm2, h, "silu", scale=scale, shift=shift)
    else:  # e.g. the VAE decoder's "group" (no embedding): norm2 alone, as diffusers
        h = group_norm(self.norm2, h, "silu")
    h = self.dropout(h)
    h = self.conv2(h)
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return _residual(h, input_tensor, self.output_scale_factor)


def _residual(out: Tensor, residual: Tensor, factor: float = 1.0) -> Tensor:
    """``(residual + out) / factor`` with ``out`` a fresh activation that nobody else holds: added in place, and
    the division (a whole pass over the activation for diffusers' usual factor 1) skipped when the factor is 1.
    The same values bit for bit: IEEE addition commutes and x / 1 is x."""
    if out.shape != residual.shape or out.dtype != residual.dtype:
        return (residual + out) / factor  # a broadcast or a promotion: diffusers' own expression
    out = out.add_(residual)
    return out if factor == 1 else out / factor


class ResnetBlock2DPatch(ModulePatch):
    """``ResnetBlock2D`` (incl. ``up=True`` / ``down=True``): two GroupNorm + SiLU pairs fused, the time
    embedding folded into the second."""

    target = ResnetBlock2D
    checked = {"forward": RESNET_BLOCK_2D_FORWARD}
    forward_fn = resnet_block_2d_forward

    def check_structure(self, block: ResnetBlock2D) -> Optional[str]:
        for name in ("norm1", "norm2"):
            norm = getattr(block, name, None)
            if not _is_plain(norm, nn.GroupNorm):
                return f"{name} is {type(norm).__name__}, not torch.nn.GroupNorm"
        if not _is_plain(block.nonlinearity, nn.SiLU):
            return f"nonlinearity is {type(block.nonlinearity).__name__}; the fused op applies SiLU only"
        hooks = hooks_on(block.norm1, block.norm2, block.nonlinearity)
        if hooks:
            return f"hooks on modules the fused forward does not call: {', '.join(hooks)}"
        return None


# ---------------------------------------------------------------------------------------------
# Attention (AttnProcessor2_0 -> fd.ops.attention)
# ---------------------------------------------------------------------------------------------


class FastdiffAttnProcessor:
    """diffusers' ``AttnProcessor2_0`` with ``fd.ops.attention`` for the attention itself and, where the block
    has an input GroupNorm, ``group_norm_modulate`` on the 4-D input (the same statistics as diffusers'
    GroupNorm over the flattened tokens). Installed by :class:`AttentionPatch`; same call signature."""

    def __init__(self, fuse_group_norm: bool = True):
        self.fuse_group_norm = fuse_group_norm

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        if args or kwargs.get("scale") is not None:  # diffusers' deprecation path, unchanged
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args,
                                      **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        norm_done = False
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            if attn.group_norm is not None and self.fuse_group_norm:
                hidden_states = group_norm(attn.group_norm, hidden_states)  # (B, C, H, W)
                norm_done = True
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, S, C)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None and not norm_done:
            if self.fuse_group_norm:
                hidden_states = group_norm(attn.group_norm, hidden_states.transpose(1, 2)).transpose(1, 2)
            else:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)  # (B, Sq, H * D)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (B, Skv, H * D)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Sq, D)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Skv, D)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # the scale SDPA uses by default, as AttnProcessor2_0 (which does not read attn.scale)
        hidden_states = ops.attention(query, key, value, bias=attention_mask)  # (B, H, Sq, D)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            return _residual(hidden_states, residual, attn.rescale_output_factor)
        return hidden_states if attn.rescale_output_factor == 1 else hidden_states / attn.rescale_output_factor


class AttentionPatch(ModulePatch):
    """``Attention`` blocks whose processor is diffusers' ``AttnProcessor2_0`` (the default): the processor
    is replaced by :class:`FastdiffAttnProcessor`; any other processor (custom, IP-Adapter, fused QKV,
    xformers, sliced) is left alone and reported."""

    target = Attention
    checked = {}

    @property
    def name(self) -> str:
        return "AttnProcessor2_0"

    def check(self, attn: Attention) -> Optional[str]:
        if type(attn) is not Attention:
            return f"{type(attn).__name__} is a subclass of Attention; its code may differ"
        processor = getattr(attn, "processor", None)
        if type(processor) is not AttnProcessor2_0:
            return f"attention processor {type(processor).__name__} (patched: AttnProcessor2_0)"
        return self._code_mismatch(AttnProcessor2_0.__call__, ATTN_PROCESSOR_2_0_CALL)

    def apply(self, attn: Attention) -> Callable[[], None]:
        norm = attn.group_norm
        fuse = norm is None or (_is_plain(norm, nn.GroupNorm) and not hooks_on(norm))
        return swap_processor(attn, FastdiffAttnProcessor(fuse_group_norm=fuse))


# ---------------------------------------------------------------------------------------------
# conv_norm_out + conv_act, and the spatial transformer's input norm
# ---------------------------------------------------------------------------------------------


def _group_norm_silu_forward(self: nn.GroupNorm, x: Tensor) -> Tensor:
    return group_norm(self, x, "silu")


def _group_norm_forward(self: nn.GroupNorm, x: Tensor) -> Tensor:
    return group_norm(self, x)


class NormActPatch(ModulePatch):
    """The output GroupNorm + SiLU of a U-Net or a VAE coder as one op: the norm's forward returns
    ``silu(norm(x))`` and the activation's forward passes its input through. Applies only where the model's
    ``forward`` calls the activation once, right after the norm (read from its code, so a release that changes
    that order is reported, not patched)."""

    norm, act = "conv_norm_out", "conv_act"

    def __init__(self, target: type):
        self.target = target
        self.checked = {}

    def check_structure(self, model: nn.Module) -> Optional[str]:
        norm, act = getattr(model, self.norm, None), getattr(model, self.act, None)
        if norm is None:
            return f"no {self.norm} (the model has no output norm)"
        if not _is_plain(norm, nn.GroupNorm):
            return f"{self.norm} is {type(norm).__name__}, not torch.nn.GroupNorm"
        if not _is_plain(act, nn.SiLU):
            return f"{self.act} is {type(act).__name__}; the fused op applies SiLU only"
        if norm is act:
            return f"{self.norm} and {self.act} are one module"
        for m in (norm, act):
            if "forward" in m.__dict__:
                return f"{type(m).__name__}'s forward was replaced on the instance"
        hooks = hooks_on(norm, act)
        if hooks:
            return f"hooks on {self.norm} / {self.act}: {', '.join(hooks)}"
        return pair_fusable(type(model).forward, self.norm, self.act)

    def apply(self, model: nn.Module) -> Callable[[], None]:
        undo_norm = swap_forward(getattr(model, self.norm), _group_norm_silu_forward)
        undo_act = swap_forward(getattr(model, self.act), identity_forward)

        def undo():
            undo_act()
            undo_norm()

        return undo


def transformer_2d_output(self: Transformer2DModel, hidden_states: Tensor, residual: Tensor, batch_size: int,
                          height: int, width: int, inner_dim: int) -> Tensor:
    """Transformer2DModel._get_output_for_continuous_inputs keeping the block's memory format: where the input
    (``residual``) is channels_last, the tokens (B, H*W, C) already are channels_last memory, so diffusers'
    ``.contiguous()`` (an NCHW copy, then converted back by the next channels_last convolution) is skipped; the
    residual is added in place."""
    fmt = torch.contiguous_format
    if residual.is_contiguous(memory_format=torch.channels_last) and not residual.is_contiguous():
        fmt = torch.channels_last
    if not self.use_linear_projection:
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        hidden_states = self.proj_out(hidden_states.contiguous(memory_format=fmt))  # (B, C, H, W)
    else:
        hidden_states = self.proj_out(hidden_states)  # (B, H*W, C)
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        hidden_states = hidden_states.contiguous(memory_format=fmt)
    return _residual(hidden_states, residual)


class Transformer2DModelPatch(ModulePatch):
    """A U-Net's spatial transformer: its input ``norm`` (GroupNorm, no activation) as ``group_norm_modulate``
    (the same function wherever it is called), and its output keeping channels_last
    (:func:`transformer_2d_output`)."""

    target = Transformer2DModel
    checked = {"_get_output_for_continuous_inputs": TRANSFORMER_2D_OUTPUT}

    def check_structure(self, model: Transformer2DModel) -> Optional[str]:
        norm = getattr(model, "norm", None)
        if not _is_plain(norm, nn.GroupNorm):
            return f"norm is {type(norm).__name__}, not torch.nn.GroupNorm (only continuous inputs are patched)"
        if "forward" in norm.__dict__ or "_get_output_for_continuous_inputs" in model.__dict__:
            return "norm's forward or _get_output_for_continuous_inputs was replaced on the instance"
        return None

    def apply(self, model: Transformer2DModel) -> Callable[[], None]:
        undo_norm = swap_forward(model.norm, _group_norm_forward)
        model._get_output_for_continuous_inputs = types.MethodType(transformer_2d_output, model)

        def undo():
            model.__dict__.pop("_get_output_for_continuous_inputs", None)
            undo_norm()

        return undo


UNET_PATCHES = (ResnetBlock2DPatch(), AttentionPatch(), Transformer2DModelPatch(), NormActPatch(UNet2DModel),
                NormActPatch(UNet2DConditionModel))
