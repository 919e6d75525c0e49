"""Patches for the DiT family: ``DiTTransformer2DModel`` and ``PixArtTransformer2DModel``, both built from
diffusers' ``BasicTransformerBlock``.

- :class:`BasicTransformerBlockPatch`, for the adaLN norm types only (a U-Net's spatial-transformer blocks,
  ``norm_type="layer_norm"``, are not about this patch):

  - ``"ada_norm_zero"`` (DiT): ``norm1`` is an ``AdaLayerNormZero`` (patched on its own,
    :mod:`patches_transformer`); the block's ``norm3`` + the MLP modulation become one ``layer_norm_modulate``;
  - ``"ada_norm_single"`` (PixArt): the six modulation vectors are ``scale_shift_table + timestep`` (the
    embedding ``AdaLayerNormSingle`` made once per forward); ``norm1`` + (shift_msa, scale_msa) and ``norm2`` +
    (shift_mlp, scale_mlp) become one op each;

  and in both the gated residuals ``h + gate * branch`` one ``addcmul`` each. Attention runs in the block's
  ``Attention`` modules, whose ``AttnProcessor2_0`` the U-Net patch replaces (``fd.ops.attention``; PixArt's
  cross-attention mask as a bias).
- :class:`PixArtTransformer2DModelPatch` / :class:`DiTTransformer2DModelPatch`: the model's output norm
  (``norm_out``, a LayerNorm without affine) + its modulation as one op.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from torch import Tensor

from fastdiff.compat.diffusers.patches_transformer import (
    gated_residual,
    layer_norm_modulated,
    plain_layer_norm,
    plain_layer_norms,
)
from fastdiff.compat.diffusers.patching import ModulePatch

__all__ = ["BasicTransformerBlockPatch", "PixArtTransformer2DModelPatch", "DiTTransformer2DModelPatch", "DIT_PATCHES"]

BASIC_TRANSFORMER_BLOCK_FORWARD = {"5f16352552ea9f3e": "0.30.0-0.42.1"}
PIXART_TRANSFORMER_2D_FORWARD = {"f3175ab37331e512": "0.33.0-0.42.1"}
DIT_TRANSFORMER_2D_FORWARD = {"50d8a6006d4f9317": "0.33.0-0.42.1"}

ADA_NORM_TYPES = ("ada_norm_zero", "ada_norm_single")


def basic_transformer_block_forward(self: BasicTransformerBlock, hidden_states: Tensor,
                                    attention_mask: Optional[Tensor] = None,
                                    encoder_hidden_states: Optional[Tensor] = None,
                                    encoder_attention_mask: Optional[Tensor] = None,
                                    timestep: Optional[Tensor] = None,
                                    cross_attention_kwargs: Optional[dict[str, Any]] = None,
                                    class_labels: Optional[Tensor] = None,
                                    added_cond_kwargs: Optional[dict[str, Tensor]] = None) -> Tensor:
    """BasicTransformerBlock.forward for ``ada_norm_zero`` / ``ada_norm_single`` with each norm + modulate as
    one op and each gated residual as one ``addcmul``; hidden_states (B, L, D)."""
    batch_size = hidden_states.shape[0]
    single = self.norm_type == "ada_norm_single"
    if single:  # six (B, 1, D) vectors
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + timestep.reshape(batch_size, 6, -1)).chunk(6, dim=1)
        norm_hidden_states = layer_norm_modulated(self.norm1, hidden_states, scale_msa[:, 0], shift_msa[:, 0])
    else:  # AdaLayerNormZero: (B, D) vectors
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(
            hidden_states, timestep, class_labels, hidden_dtype=hidden_states.dtype)
        gate_msa, gate_mlp = gate_msa.unsqueeze(1), gate_mlp.unsqueeze(1)
    if self.pos_embed is not None:
        norm_hidden_states = self.pos_embed(norm_hidden_states)

    cross_attention_kwargs = cross_attention_kwargs.copy() if cross_attention_kwargs is not None else {}
    gligen_kwargs = cross_attention_kwargs.pop("gligen", None)
    attn_output = self.attn1(norm_hidden_states,
                             encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                             attention_mask=attention_mask, **cross_attention_kwargs)
    hidden_states = gated_residual(hidden_states, gate_msa, attn_output)  # (B, L, D)
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    if gligen_kwargs is not None:
        hidden_states = self.fuser(hidden_states, gligen_kwargs["objs"])

    if self.attn2 is not None:
        # PixArt applies no norm before its cross-attention; DiT's norm2 is a plain LayerNorm
        norm_hidden_states = hidden_states if single else self.norm2(hidden_states)
        if self.pos_embed is not None and not single:
            norm_hidden_states = self.pos_embed(norm_hidden_states)
        attn_output = self.attn2(norm_hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=encoder_attention_mask, **cross_attention_kwargs)
        hidden_states = attn_output + hidden_states

    if single:
        norm_hidden_states = layer_norm_modulated(self.norm2, hidden_states, scale_mlp[:, 0], shift_mlp[:, 0])
    else:
        norm_hidden_states = layer_norm_modulated(self.norm3, hidden_states, scale_mlp, shift_mlp)
    if self._chunk_size is not None:
        ff_output = _chunked_feed_forward(self.ff, norm_hidden_states, self._chunk_dim, self._chunk_size)
    else:
        ff_output = self.ff(norm_hidden_states)
    hidden_states = gated_residual(hidden_states, gate_mlp, ff_output)
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.squeeze(1)
    return hidden_states


class BasicTransformerBlockPatch(ModulePatch):
    """``BasicTransformerBlock`` with ``norm_type`` ``"ada_norm_zero"`` (DiT) or ``"ada_norm_single"`` (PixArt)."""

    target = BasicTransformerBlock
    checked = {"forward": BASIC_TRANSFORMER_BLOCK_FORWARD}
    forward_fn = basic_transformer_block_forward

    def matches(self, module) -> bool:
        return isinstance(module, BasicTransformerBlock) and getattr(module, "norm_type", None) in ADA_NORM_TYPES

    def check_structure(self, block: BasicTransformerBlock) -> Optional[str]:
        reason = plain_layer_norms(block, ("norm1", "norm2") if block.norm_type == "ada_norm_single" else ("norm3",))
        if reason:
            return reason
        if block.norm_type == "ada_norm_single" and block.scale_shift_table.shape[0] != 6:
            return f"scale_shift_table has {block.scale_shift_table.shape[0]} rows, not 6"
        return None


# ---------------------------------------------------------------------------------------------
# the models' output norms
# ---------------------------------------------------------------------------------------------


def _unpatchify(hidden_states: Tensor, height: int, width: int, p: int, channels: int) -> Tensor:
    """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p), as the models' own einsum."""
    hidden_states = hidden_states.reshape(shape=(-1, height, width, p, p, channels))
    hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
    return hidden_states.reshape(shape=(-1, channels, height * p, width * p))


def pixart_transformer_2d_forward(self: PixArtTransformer2DModel, hidden_states: Tensor,
                                  encoder_hidden_states: Optional[Tensor] = None, timestep: Optional[Tensor] = None,
                                  added_cond_kwargs: Optional[dict[str, Tensor]] = None,
                                  cross_attention_kwargs: Optional[dict[str, Any]] = None,
                                  attention_mask: Optional[Tensor] = None,
                                  encoder_attention_mask: Optional[Tensor] = None, return_dict: bool = True):
    """PixArtTransformer2DModel.forward with norm_out + its modulation as one op."""
    if self.use_additional_conditions and added_cond_kwargs is None:
        raise ValueError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")
    if attention_mask is not None and attention_mask.ndim == 2:  # keep (1) / discard (0) -> a bias
        attention_mask = ((1 - attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)
    if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
        encoder_attention_mask = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)

    batch_size = hidden_states.shape[0]
    p = self.config.patch_size
    height, width = hidden_states.shape[-2] // p, hidden_states.shape[-1] // p
    hidden_states = self.pos_embed(hidden_states)  # (B, h*w, D)
    timestep, embedded_timestep = self.adaln_single(timestep, added_cond_kwargs, batch_size=batch_size,
                                                    hidden_dtype=hidden_states.dtype)  # (B, 6 D), (B, D)
    if self.caption_projection is not None:
        encoder_hidden_states = self.caption_projection(encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states.view(batch_size, -1, hidden_states.shape[-1])

    for block in self.transformer_blocks:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            hidden_states = self._gradient_checkpointing_func(block, hidden_states, attention_mask,
                                                              encoder_hidden_states, encoder_attention_mask,
                                                              timestep, cross_attention_kwargs, None)
        else:
            hidden_states = block(hidden_states, attention_mask=attention_mask,
                                  encoder_hidden_states=encoder_hidden_states,
                                  encoder_attention_mask=encoder_attention_mask, timestep=timestep,
                                  cross_attention_kwargs=cross_attention_kwargs, class_labels=None)

    shift, scale = (self.scale_shift_table[None]
                    + embedded_timestep[:, None].to(self.scale_shift_table.device)).chunk(2, dim=1)  # (B, 1, D)
    hidden_states = layer_norm_modulated(self.norm_out, hidden_states, scale[:, 0].to(hidden_states.device),
                                         shift[:, 0].to(hidden_states.device))
    hidden_states = self.proj_out(hidden_states)
    hidden_states = hidden_states.squeeze(1)
    output = _unpatchify(hidden_states, height, width, p, self.out_channels)
    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


def dit_transformer_2d_forward(self: DiTTransformer2DModel, hidden_states: Tensor,
                               timestep: Optional[Tensor] = None, class_labels: Optional[Tensor] = None,
                               cross_attention_kwargs: Optional[dict[str, Any]] = None, return_dict: bool = True):
    """DiTTransformer2DModel.forward with norm_out + its modulation as one op."""
    hidden_states = self.pos_embed(hidden_states)  # (B, h*w, D)
    for block in self.transformer_blocks:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            hidden_states = self._gradient_checkpointing_func(block, hidden_states, None, None, None, timestep,
                                                              cross_attention_kwargs, class_labels)
        else:
            hidden_states = block(hidden_states, attention_mask=None, encoder_hidden_states=None,
                                  encoder_attention_mask=None, timestep=timestep,
                                  cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels)

    conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)
    shift, scale = self.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)  # (B, D) each
    hidden_states = layer_norm_modulated(self.norm_out, hidden_states, scale, shift)
    hidden_states = self.proj_out_2(hidden_states)
    height = width = int(hidden_states.shape[1] ** 0.5)
    output = _unpatchify(hidden_states, height, width, self.patch_size, self.out_channels)
    if not return_dict:
        return (output,)
    return Transformer2DModelOutput(sample=output)


class _ModelOutputNormPatch(ModulePatch):
    def check_structure(self, model) -> Optional[str]:
        if hasattr(type(model).forward, "__wrapped__"):  # a decorator the instance forward would bypass
            return f"{type(model).__name__}.forward is decorated"
        return plain_layer_norm(getattr(model, "norm_out", None), "norm_out")


class PixArtTransformer2DModelPatch(_ModelOutputNormPatch):
    """``PixArtTransformer2DModel``: ``norm_out`` + the ``scale_shift_table`` modulation as one op."""

    target = PixArtTransformer2DModel
    checked = {"forward": PIXART_TRANSFORMER_2D_FORWARD}
    forward_fn = pixart_transformer_2d_forward


class DiTTransformer2DModelPatch(_ModelOutputNormPatch):
    """``DiTTransformer2DModel``: ``norm_out`` + the ``proj_out_1`` modulation as one op."""

    target = DiTTransformer2DModel
    checked = {"forward": DIT_TRANSFORMER_2D_FORWARD}
    forward_fn = dit_transformer_2d_forward


DIT_PATCHES = (BasicTransformerBlockPatch(), PixArtTransformer2DModelPatch(), DiTTransformer2DModelPatch())
