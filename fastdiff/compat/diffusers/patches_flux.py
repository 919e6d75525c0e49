"""Patches for Flux (``FluxTransformer2DModel``): its double- and single-stream blocks and their attention.

- :class:`FluxTransformerBlockPatch` (double stream): ``norm2`` / ``norm2_context`` + the MLP modulations as one
  ``layer_norm_modulate`` each, the gated residuals as one ``addcmul`` each. ``norm1`` / ``norm1_context``
  (``AdaLayerNormZero``) and the model's ``norm_out`` (``AdaLayerNormContinuous``) are patched on their own.
- :class:`FluxSingleTransformerBlockPatch` (single stream): the gated residual as one ``addcmul`` (its norm,
  ``AdaLayerNormZeroSingle``, is patched on its own).
- :class:`FluxAttnProcessorPatch` (``FluxAttention`` running ``FluxAttnProcessor``):
  :class:`FastdiffFluxAttnProcessor`. q/k RMSNorm + RoPE as one ``fd.ops.qk_norm_rope`` per stream: in a
  double block the text stream (``norm_added_q`` / ``norm_added_k``) and the image stream (``norm_q`` /
  ``norm_k``) each write their rows of the joint (text + image) q and k buffers, rotated at their positions of
  the joint sequence, so norm, concatenation and rotation are one pass; attention is ``fd.ops.attention``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import Tensor, nn

from fastdiff import ops, prepack
from fastdiff.compat.diffusers.patches_transformer import (
    check_qk_norms,
    gated_residual,
    joint_qk_norm_rope,
    layer_norm_modulated,
    plain_layer_norms,
)
from fastdiff.compat.diffusers.patching import ModulePatch, hooks_on, swap_processor

__all__ = ["FluxTransformerBlockPatch", "FluxSingleTransformerBlockPatch", "FluxAttnProcessorPatch",
           "FastdiffFluxAttnProcessor", "FLUX_PATCHES"]

FLUX_TRANSFORMER_BLOCK_FORWARD = {"762baa19704f984a": "0.32.0-0.42.1"}
FLUX_SINGLE_TRANSFORMER_BLOCK_FORWARD = {"8babe0be8e76d55d": "0.35.0-0.42.1"}
# FluxAttnProcessor.__call__: 0.35 (no parallel config), 0.36 (no .contiguous() before the output projections),
# 0.37-0.39 (heads split by count, not by head_dim) compute the same values as 0.40-0.42.1.
FLUX_ATTN_PROCESSOR_CALL = {"e9a88d2324d88383": "0.35.0-0.35.2", "f30cd43421f6aa07": "0.36.0",
                            "6d08860b1711aba2": "0.37.0-0.39.0", "32732aeb56a62baa": "0.40.0-0.42.1"}
FLUX_ATTENTION_FORWARD = {"3f3072167c5f0bdf": "0.35.0-0.42.1"}


def flux_transformer_block_forward(self: FluxTransformerBlock, hidden_states: Tensor, encoder_hidden_states: Tensor,
                                   temb: Tensor, image_rotary_emb: Optional[tuple[Tensor, Tensor]] = None,
                                   joint_attention_kwargs: Optional[dict[str, Any]] = None):
    """FluxTransformerBlock.forward with the MLP norms + modulations fused and the gated residuals as addcmul;
    hidden_states (B, S_img, D), encoder_hidden_states (B, S_txt, D), temb (B, D)."""
    norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
        encoder_hidden_states, emb=temb)
    joint_attention_kwargs = joint_attention_kwargs or {}
    attention_outputs = self.attn(hidden_states=norm_hidden_states, encoder_hidden_states=norm_encoder_hidden_states,
                                  image_rotary_emb=image_rotary_emb, **joint_attention_kwargs)
    if len(attention_outputs) == 2:
        attn_output, context_attn_output = attention_outputs
    elif len(attention_outputs) == 3:  # an IP-Adapter processor's third output
        attn_output, context_attn_output, ip_attn_output = attention_outputs

    hidden_states = gated_residual(hidden_states, gate_msa.unsqueeze(1), attn_output)
    norm_hidden_states = layer_norm_modulated(self.norm2, hidden_states, scale_mlp, shift_mlp)
    hidden_states = gated_residual(hidden_states, gate_mlp.unsqueeze(1), self.ff(norm_hidden_states))
    if len(attention_outputs) == 3:
        hidden_states = hidden_states + ip_attn_output

    encoder_hidden_states = gated_residual(encoder_hidden_states, c_gate_msa.unsqueeze(1), context_attn_output)
    norm_encoder_hidden_states = layer_norm_modulated(self.norm2_context, encoder_hidden_states, c_scale_mlp,
                                                      c_shift_mlp)
    encoder_hidden_states = gated_residual(encoder_hidden_states, c_gate_mlp.unsqueeze(1),
                                           self.ff_context(norm_encoder_hidden_states))
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def flux_single_transformer_block_forward(self: FluxSingleTransformerBlock, hidden_states: Tensor,
                                          encoder_hidden_states: Tensor, temb: Tensor,
                                          image_rotary_emb: Optional[tuple[Tensor, Tensor]] = None,
                                          joint_attention_kwargs: Optional[dict[str, Any]] = None):
    """FluxSingleTransformerBlock.forward with the gated residual as one addcmul and, on the CPU in bf16, the
    MLP's GELU as the packed Linear's post-op (:func:`fastdiff.prepack.linear_gelu`); the joint sequence is
    (text + image) tokens, (B, S, D)."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)  # (B, S, D)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    # one op on the CPU in bf16 (linear_gelu itself runs proj_mlp as a module where it has hooks)
    if type(self.act_mlp) is nn.GELU and not hooks_on(self.act_mlp):
        mlp_hidden_states = prepack.linear_gelu(self.proj_mlp, norm_hidden_states, self.act_mlp.approximate)
    else:
        mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))  # (B, S, mlp_ratio D)
    joint_attention_kwargs = joint_attention_kwargs or {}
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                            **joint_attention_kwargs)
    hidden_states = torch.cat([attn_output, mlp_hidden_states], dim=2)
    hidden_states = gated_residual(residual, gate.unsqueeze(1), self.proj_out(hidden_states))
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


class FluxTransformerBlockPatch(ModulePatch):
    """``FluxTransformerBlock`` (double stream)."""

    target = FluxTransformerBlock
    checked = {"forward": FLUX_TRANSFORMER_BLOCK_FORWARD}
    forward_fn = flux_transformer_block_forward

    def check_structure(self, block: FluxTransformerBlock) -> Optional[str]:
        return plain_layer_norms(block, ("norm2", "norm2_context"))


class FluxSingleTransformerBlockPatch(ModulePatch):
    """``FluxSingleTransformerBlock`` (single stream)."""

    target = FluxSingleTransformerBlock
    checked = {"forward": FLUX_SINGLE_TRANSFORMER_BLOCK_FORWARD}
    forward_fn = flux_single_transformer_block_forward


# ---------------------------------------------------------------------------------------------
# FluxAttnProcessor -> fd.ops.qk_norm_rope + fd.ops.attention
# ---------------------------------------------------------------------------------------------


def _rope_fits(image_rotary_emb, length: int, head_dim: int, device: torch.device) -> bool:
    """Whether diffusers' (cos, sin) is what qk_norm_rope takes: two (S, D) float32 / float64 tensors on q's
    device."""
    if image_rotary_emb is None:
        return True
    if not (isinstance(image_rotary_emb, (tuple, list)) and len(image_rotary_emb) == 2):
        return False
    return all(isinstance(t, Tensor) and tuple(t.shape) == (length, head_dim) and t.device == device
               and t.dtype in (torch.float32, torch.float64) for t in image_rotary_emb)


class FastdiffFluxAttnProcessor:
    """diffusers' ``FluxAttnProcessor`` on fastdiff's ops (same call signature and outputs). Joint sequence:
    text first, then image, as diffusers; ``image_rotary_emb`` (cos, sin) covers it whole."""

    def __call__(self, attn: FluxAttention, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None,
                 image_rotary_emb: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)  # (B, S_img, H * D) each
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        split = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731 (B, S, H, D)
        parts = [(split(query), split(key), attn.norm_q, attn.norm_k)]
        values = [split(value)]
        if joint:
            if attn.fused_projections and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq, ek, ev = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                              attn.add_v_proj(encoder_hidden_states))
            parts.insert(0, (split(eq), split(ek), attn.norm_added_q, attn.norm_added_k))
            values.insert(0, split(ev))
        length = sum(p[0].shape[1] for p in parts)
        parts = [(q.transpose(1, 2), k.transpose(1, 2), nq, nk) for q, k, nq, nk in parts]  # (B, H, S, D) views
        if _rope_fits(image_rotary_emb, length, attn.head_dim, hidden_states.device):
            cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
            query, key = joint_qk_norm_rope(parts, cos, sin)  # (B, H, S, D)
        else:  # a rotary embedding of another form: normalise here, rotate with diffusers' own function
            query, key = joint_qk_norm_rope(parts, None, None)
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=2)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=2)
        value = (torch.cat(values, dim=1) if len(values) > 1 else values[0]).transpose(1, 2)

        hidden_states = ops.attention(query, key, value, bias=attention_mask)  # (B, H, S, D)
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3).to(query.dtype)  # (B, S, H * D)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxAttnProcessorPatch(ModulePatch):
    """``FluxAttention`` running diffusers' ``FluxAttnProcessor`` with its default attention backend: the
    processor becomes :class:`FastdiffFluxAttnProcessor`. IP-Adapter processors, an attention backend chosen
    with ``set_attention_backend`` and context parallelism are left alone and reported."""

    target = FluxAttention
    checked = {"forward": FLUX_ATTENTION_FORWARD}

    @property
    def name(self) -> str:
        return "FluxAttnProcessor"

    def check_structure(self, attn: FluxAttention) -> Optional[str]:
        processor = getattr(attn, "processor", None)
        if type(processor) is not FluxAttnProcessor:
            return f"attention processor {type(processor).__name__} (patched: FluxAttnProcessor)"
        reason = self._code_mismatch(FluxAttnProcessor.__call__, FLUX_ATTN_PROCESSOR_CALL)
        if reason:
            return reason
        if getattr(processor, "_attention_backend", None) is not None:
            return f"attention backend {processor._attention_backend!r} chosen with set_attention_backend"
        if getattr(processor, "_parallel_config", None) is not None:
            return "context parallelism (the processor has a parallel config)"
        pairs = [("image", attn.norm_q, attn.norm_k)]
        if attn.added_kv_proj_dim is not None:
            pairs.append(("text", attn.norm_added_q, attn.norm_added_k))
        for name, nq, nk in pairs:
            if nq is None or nk is None:
                return f"{name} q/k norms missing"
            reason = check_qk_norms(nq, nk, (torch.nn.RMSNorm,), name, attn.head_dim)
            if reason:
                return reason
        return None

    def apply(self, attn: FluxAttention) -> Callable[[], None]:
        return swap_processor(attn, FastdiffFluxAttnProcessor())


FLUX_PATCHES = (FluxTransformerBlockPatch(), FluxSingleTransformerBlockPatch(), FluxAttnProcessorPatch())
