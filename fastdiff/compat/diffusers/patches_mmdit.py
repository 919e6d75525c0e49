"""Patches for SD3 / SD3.5 (``SD3Transformer2DModel``, MMDiT): the joint blocks and their attention.

- :class:`JointTransformerBlockPatch`: ``norm2`` + the MLP modulation (image stream) and ``norm2_context`` + its
  modulation (text stream) as one ``layer_norm_modulate`` each; every gated residual as one ``addcmul``. The
  block's ``norm1`` (``AdaLayerNormZero``, or SD3.5's ``SD35AdaLayerNormZeroX``) and ``norm1_context``
  (``AdaLayerNormZero``, or ``AdaLayerNormContinuous`` in the last block) are patched on their own
  (:mod:`patches_transformer`).
- :class:`JointAttnProcessorPatch` (``Attention`` running ``JointAttnProcessor2_0``: the joint attention and
  SD3.5's second, image-only attention): :class:`FastdiffJointAttnProcessor`. The projections are diffusers';
  SD3.5's q/k RMSNorm of each stream is one ``fd.ops.qk_norm_rope`` (no rotation) writing straight into the
  joint (image + text) q and k buffers, so the norm and the concatenation are one pass; attention is
  ``fd.ops.attention``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from diffusers.models.attention import JointTransformerBlock, _chunked_feed_forward
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.normalization import RMSNorm
from torch import Tensor

from fastdiff import ops
from fastdiff.compat.diffusers.patches_transformer import (
    check_qk_norms,
    gated_residual,
    joint_qk_norm_rope,
    layer_norm_modulated,
    plain_layer_norms,
)
from fastdiff.compat.diffusers.patching import ModulePatch, swap_processor

__all__ = ["JointTransformerBlockPatch", "JointAttnProcessorPatch", "FastdiffJointAttnProcessor", "MMDIT_PATCHES"]

JOINT_TRANSFORMER_BLOCK_FORWARD = {"694d999ed0a7501a": "0.32.0-0.42.1"}
JOINT_ATTN_PROCESSOR_2_0_CALL = {"dc4d447a4f09d59a": "0.31.0-0.42.1"}


def _feed_forward(block, ff, x: Tensor) -> Tensor:
    if block._chunk_size is not None:
        return _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size)
    return ff(x)


def joint_transformer_block_forward(self: JointTransformerBlock, hidden_states: Tensor,
                                    encoder_hidden_states: Tensor, temb: Tensor,
                                    joint_attention_kwargs: Optional[dict[str, Any]] = None):
    """JointTransformerBlock.forward with the MLP norms + modulations fused and the gated residuals as addcmul;
    hidden_states (B, S_img, D), encoder_hidden_states (B, S_txt, D), temb (B, D)."""
    joint_attention_kwargs = joint_attention_kwargs or {}
    if self.use_dual_attention:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden_states2, gate_msa2 = self.norm1(
            hidden_states, emb=temb)
    else:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    if self.context_pre_only:
        norm_encoder_hidden_states = self.norm1_context(encoder_hidden_states, temb)
    else:
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb)

    attn_output, context_attn_output = self.attn(hidden_states=norm_hidden_states,
                                                 encoder_hidden_states=norm_encoder_hidden_states,
                                                 **joint_attention_kwargs)
    hidden_states = gated_residual(hidden_states, gate_msa.unsqueeze(1), attn_output)
    if self.use_dual_attention:
        attn_output2 = self.attn2(hidden_states=norm_hidden_states2, **joint_attention_kwargs)
        hidden_states = gated_residual(hidden_states, gate_msa2.unsqueeze(1), attn_output2)

    norm_hidden_states = layer_norm_modulated(self.norm2, hidden_states, scale_mlp, shift_mlp)
    ff_output = _feed_forward(self, self.ff, norm_hidden_states)
    hidden_states = gated_residual(hidden_states, gate_mlp.unsqueeze(1), ff_output)

    if self.context_pre_only:
        encoder_hidden_states = None
    else:
        encoder_hidden_states = gated_residual(encoder_hidden_states, c_gate_msa.unsqueeze(1), context_attn_output)
        norm_encoder_hidden_states = layer_norm_modulated(self.norm2_context, encoder_hidden_states, c_scale_mlp,
                                                          c_shift_mlp)
        context_ff_output = _feed_forward(self, self.ff_context, norm_encoder_hidden_states)
        encoder_hidden_states = gated_residual(encoder_hidden_states, c_gate_mlp.unsqueeze(1), context_ff_output)
    return encoder_hidden_states, hidden_states


class JointTransformerBlockPatch(ModulePatch):
    """``JointTransformerBlock`` (SD3, SD3.5): the MLP norms + modulations fused, gated residuals as addcmul."""

    target = JointTransformerBlock
    checked = {"forward": JOINT_TRANSFORMER_BLOCK_FORWARD}
    forward_fn = joint_transformer_block_forward

    def check_structure(self, block: JointTransformerBlock) -> Optional[str]:
        return plain_layer_norms(block, ("norm2",) if block.context_pre_only else ("norm2", "norm2_context"))


# ---------------------------------------------------------------------------------------------
# JointAttnProcessor2_0 -> fd.ops.qk_norm_rope + fd.ops.attention
# ---------------------------------------------------------------------------------------------


class FastdiffJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` on fastdiff's ops (same call signature and outputs): the image
    stream first, then the text stream, in one joint sequence; diffusers' processor takes no attention mask
    (an ``attention_mask`` argument is ignored there too)."""

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, *args, **kwargs) -> Tensor:
        residual = hidden_states
        if residual.dim() != 3 or (encoder_hidden_states is not None and encoder_hidden_states.dim() != 3):
            return JointAttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, *args,
                                           **kwargs)
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)  # (B, S_img, H * D)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        heads = lambda t: t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # noqa: E731 (B, H, S, D)
        parts = [(heads(query), heads(key), attn.norm_q, attn.norm_k)]
        values = [value]
        if encoder_hidden_states is not None:
            parts.append((heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states)),
                          attn.norm_added_q, attn.norm_added_k))
            values.append(attn.add_v_proj(encoder_hidden_states))
        if len(parts) == 1 and attn.norm_q is None:
            query, key = parts[0][0], parts[0][1]
        else:
            query, key = joint_qk_norm_rope(parts, None, None)  # (B, H, S, D) views of (B, S, H, D) buffers
        value = heads(torch.cat(values, dim=1) if len(values) > 1 else values[0])

        hidden_states = ops.attention(query, key, value)  # (B, H, S, D)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, :residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class JointAttnProcessorPatch(ModulePatch):
    """``Attention`` modules running diffusers' ``JointAttnProcessor2_0`` (SD3's joint attention, SD3.5's second
    attention): the processor becomes :class:`FastdiffJointAttnProcessor`."""

    target = Attention
    checked = {}

    @property
    def name(self) -> str:
        return "JointAttnProcessor2_0"

    def matches(self, attn) -> bool:
        return isinstance(attn, Attention) and isinstance(getattr(attn, "processor", None), JointAttnProcessor2_0)

    def check(self, attn: Attention) -> Optional[str]:
        if type(attn) is not Attention:
            return f"{type(attn).__name__} is a subclass of Attention; its code may differ"
        if type(attn.processor) is not JointAttnProcessor2_0:
            return f"attention processor {type(attn.processor).__name__} is a subclass of JointAttnProcessor2_0"
        reason = self._code_mismatch(JointAttnProcessor2_0.__call__, JOINT_ATTN_PROCESSOR_2_0_CALL)
        if reason:
            return reason
        head_dim = attn.inner_dim // attn.heads
        for name, pair in (("image", (attn.norm_q, attn.norm_k)),
                           ("text", (getattr(attn, "norm_added_q", None), getattr(attn, "norm_added_k", None)))):
            reason = check_qk_norms(*pair, (RMSNorm,), name, head_dim)
            if reason:
                return reason
        return None

    def apply(self, attn: Attention) -> Callable[[], None]:
        return swap_processor(attn, FastdiffJointAttnProcessor())


MMDIT_PATCHES = (JointTransformerBlockPatch(), JointAttnProcessorPatch())
