"""What the diffusion-transformer patches share: the adaLN norms of diffusers (each norm + modulate as one
``fd.ops.layer_norm_modulate``), the gated residual, and the joint (text + image) q/k RMSNorm + RoPE.

Patches here, for every transformer family that uses these norms (DiT, SD3, Flux):

- :class:`AdaLayerNormZeroPatch` (``AdaLayerNormZero``: DiT's block norm with its own label/timestep
  embedding, SD3's and Flux's ``norm1`` / ``norm1_context``): ``LN(x) * (1 + scale_msa) + shift_msa`` as one op.
- :class:`AdaLayerNormZeroSinglePatch` (Flux's single-stream block norm): the same with three chunks.
- :class:`SD35AdaLayerNormZeroXPatch` (SD3.5's dual-attention blocks): one normalised x modulated twice, as two
  fused ops (each reads x once and writes its output once, where diffusers writes the norm and reads it twice).
- :class:`AdaLayerNormContinuousPatch` (SD3's and Flux's ``norm_out``, SD3's last ``norm1_context``): the same
  with ``scale`` first (diffusers' ``scale, shift = chunk(emb, 2)``) and the norm's own affine, if any.

The block patches (:mod:`patches_dit`, :mod:`patches_mmdit`, :mod:`patches_flux`) call these norms as diffusers
does, fuse the norms the blocks apply themselves (``norm2`` + the MLP modulation) with
:func:`layer_norm_modulated`, and add gated branches with :func:`gated_residual`. Where an input does not fit
the fused op (another dtype, a broadcast shape), the helpers compute diffusers' own expression, so a patched
forward never refuses an input the original takes.

:func:`transformer_patches` is every transformer patch, for ``accelerate._patches()``.
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.normalization import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    SD35AdaLayerNormZeroX,
)
from torch import Tensor, nn

from fastdiff import ops
from fastdiff.compat.diffusers.patching import ModulePatch, hooks_on

__all__ = ["layer_norm_modulated", "gated_residual", "joint_qk_norm_rope", "plain_layer_norm", "plain_layer_norms",
           "transformer_patches",
           "AdaLayerNormZeroPatch", "AdaLayerNormZeroSinglePatch", "SD35AdaLayerNormZeroXPatch",
           "AdaLayerNormContinuousPatch"]

# diffusers releases whose code of the replaced method was read, by digest (patching.code_digest); every release
# from the first to the last listed has that digest (checked on each tag of diffusers' repository and the 0.41.0
# and 0.42.1 wheels).
ADA_LAYER_NORM_ZERO_FORWARD = {"d0e069e3bcecc8af": "0.29.0-0.42.1"}
ADA_LAYER_NORM_ZERO_SINGLE_FORWARD = {"53ce121fedcb9db7": "0.30.0-0.42.1"}
SD35_ADA_LAYER_NORM_ZERO_X_FORWARD = {"deb2a1b5aa22119d": "0.31.0-0.42.1"}
ADA_LAYER_NORM_CONTINUOUS_FORWARD = {"ccad75356bb94473": "0.29.0-0.42.1"}


# ---------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------


def layer_norm_modulated(norm: nn.LayerNorm, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``norm(x) * (1 + scale[:, None]) + shift[:, None]`` for x (N, L, D) and scale / shift (N, D): one
    ``fd.ops.layer_norm_modulate`` with the LayerNorm's eps and affine (float32 statistics, one rounding),
    or diffusers' expression where the inputs do not fit the op (dtypes that differ, other shapes).

    The output is contiguous, as LayerNorm's: tokens that arrive transposed (PixArt's and DiT's patch
    embedding gives (B, L, D) views of (B, D, L) memory) are made contiguous first, so the projections that
    read the output get dense rows."""
    n = x.shape[0] if x.dim() == 3 else -1
    d = x.shape[-1]
    w, b = norm.weight, norm.bias
    if (x.dim() == 3 and scale.shape == (n, d) and shift.shape == (n, d) and scale.dtype == shift.dtype == x.dtype
            and scale.device == x.device == shift.device and x.is_floating_point()
            and all(t is None or t.dtype in (x.dtype, torch.float32) for t in (w, b))):
        return ops.layer_norm_modulate(x.contiguous(), scale=scale, shift=shift, weight=w, bias=b, eps=norm.eps)
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """``x + gate * y`` (gate broadcast over the tokens) in one pass (``torch.addcmul``) where the three share a
    dtype and y has x's shape; else diffusers' two-step expression. x is not changed.

    The sum is laid out like the branch y (a fresh, dense activation) when x is laid out otherwise (the
    transposed tokens of a patch embedding): addcmul would follow x's layout, and every later block would
    then read and write the residual stream transposed."""
    if x.shape == y.shape and x.dtype == y.dtype == gate.dtype:
        if x.stride() != y.stride() and y.is_contiguous():
            x = x.contiguous()
        return torch.addcmul(x, gate, y)
    return x + gate * y


def plain_layer_norm(norm, name: str) -> Optional[str]:
    """None when ``norm`` is a torch.nn.LayerNorm over the last dim (what layer_norm_modulate computes), with
    no hooks and its forward not replaced; else the reason."""
    if type(norm) is not nn.LayerNorm:
        return f"{name} is {type(norm).__name__}, not torch.nn.LayerNorm"
    if len(norm.normalized_shape) != 1:
        return f"{name} normalises over {tuple(norm.normalized_shape)}, not the last dim"
    if "forward" in norm.__dict__:
        return f"{name}'s forward was replaced on the instance"
    hooks = hooks_on(norm)
    if hooks:
        return f"hooks on {name}, which the fused forward does not call: {', '.join(hooks)}"
    return None


def plain_layer_norms(module: nn.Module, names) -> Optional[str]:
    """:func:`plain_layer_norm` of each named submodule of ``module``: the first reason, or None."""
    for name in names:
        reason = plain_layer_norm(getattr(module, name, None), name)
        if reason:
            return reason
    return None


def _rms_weight(norm) -> Optional[Tensor]:
    return None if norm is None else norm.weight


def _rms_eps(norm, x: Tensor) -> float:
    eps = norm.eps
    return torch.finfo(x.dtype).eps if eps is None else eps  # torch.nn.RMSNorm(eps=None): the dtype's eps


def joint_qk_norm_rope(parts: list, cos: Optional[Tensor], sin: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """q and k of a joint sequence, each stream RMS-normalised with its own norms and the whole sequence rotated.

    ``parts``: ``[(q, k, norm_q, norm_k)]`` in sequence order; q, k (B, H, S_i, D) (any strides, e.g. views of
    (B, S, H, D) projections); the norms are RMSNorm modules (their weight and eps are read) or both None (the
    stream is copied as it is). ``cos`` / ``sin``: (sum S_i, D) float32 or float64, or None. Returns q, k of
    shape (B, H, sum S_i, D), views of (B, S, H, D) buffers written once (``qk_norm_rope(out=...)``; under
    autograd the functional op and a concatenation, which are differentiable)."""
    q0 = parts[0][0]
    b, h, _, d = q0.shape
    total = sum(p[0].shape[2] for p in parts)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for p in parts for t in (p[0], p[1], _rms_weight(p[2]), _rms_weight(p[3])))
    if needs_grad:
        qs, ks, start = [], [], 0
        for q, k, nq, nk in parts:
            s = q.shape[2]
            if nq is None:
                qs.append(q)
                ks.append(k)
            else:
                rope = (None, None) if cos is None else (cos[start:start + s], sin[start:start + s])
                qn, kn = ops.qk_norm_rope(q, k, _rms_weight(nq), _rms_weight(nk), *rope, eps=_rms_eps(nq, q))
                qs.append(qn)
                ks.append(kn)
            start += s
        return torch.cat(qs, dim=2), torch.cat(ks, dim=2)
    jq = torch.empty(b, total, h, d, dtype=q0.dtype, device=q0.device).transpose(1, 2)  # (B, H, S, D)
    jk = torch.empty(b, total, h, d, dtype=q0.dtype, device=q0.device).transpose(1, 2)
    start = 0
    for q, k, nq, nk in parts:
        s = q.shape[2]
        out = (jq[:, :, start:start + s], jk[:, :, start:start + s])
        if nq is None:
            out[0].copy_(q)
            out[1].copy_(k)
        else:
            rope = (None, None) if cos is None else (cos[start:start + s], sin[start:start + s])
            ops.qk_norm_rope(q, k, _rms_weight(nq), _rms_weight(nk), *rope, eps=_rms_eps(nq, q), out=out)
        start += s
    return jq, jk


def check_qk_norms(norm_q, norm_k, norm_cls: tuple, name: str, head_dim: int) -> Optional[str]:
    """None when the pair is absent or two RMSNorm modules of ``norm_cls`` over the head dim (``head_dim``
    features) that ``qk_norm_rope`` computes (one eps, no bias, no hooks); else the reason."""
    if norm_q is None and norm_k is None:
        return None
    for which, norm in (("q", norm_q), ("k", norm_k)):
        if type(norm) not in norm_cls:
            return (f"{name} {which}-norm is {type(norm).__name__}; fused: "
                    f"{' / '.join(c.__module__.split('.')[0] + '.' + c.__name__ for c in norm_cls)}")
        if getattr(norm, "bias", None) is not None:
            return f"{name} {which}-norm has a bias"
        if "forward" in norm.__dict__:
            return f"{name} {which}-norm's forward was replaced on the instance"
        shape = tuple(getattr(norm, "normalized_shape", getattr(norm, "dim", None)) or ())
        if shape != (head_dim,):
            return f"{name} {which}-norm normalises over {shape}, not the head dim ({head_dim})"
    if norm_q.eps != norm_k.eps:
        return f"{name} q- and k-norms have different eps ({norm_q.eps}, {norm_k.eps})"
    hooks = hooks_on(norm_q, norm_k)
    if hooks:
        return f"hooks on {name} q/k norms, which the fused forward does not call: {', '.join(hooks)}"
    return None


# ---------------------------------------------------------------------------------------------
# the adaLN norms
# ---------------------------------------------------------------------------------------------


def ada_layer_norm_zero_forward(self: AdaLayerNormZero, x: Tensor, timestep: Optional[Tensor] = None,
                                class_labels: Optional[Tensor] = None, hidden_dtype=None,
                                emb: Optional[Tensor] = None) -> tuple[Tensor, ...]:
    """AdaLayerNormZero.forward with norm + (shift_msa, scale_msa) as one op."""
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))  # (N, 6 D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    x = layer_norm_modulated(self.norm, x, scale_msa, shift_msa)  # (N, L, D)
    return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def ada_layer_norm_zero_single_forward(self: AdaLayerNormZeroSingle, x: Tensor,
                                       emb: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """AdaLayerNormZeroSingle.forward with norm + modulate as one op."""
    emb = self.linear(self.silu(emb))  # (N, 3 D)
    shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
    return layer_norm_modulated(self.norm, x, scale_msa, shift_msa), gate_msa


def sd35_ada_layer_norm_zero_x_forward(self: SD35AdaLayerNormZeroX, hidden_states: Tensor,
                                       emb: Optional[Tensor] = None) -> tuple[Tensor, ...]:
    """SD35AdaLayerNormZeroX.forward: the two modulations of one norm as two fused ops."""
    emb = self.linear(self.silu(emb))  # (N, 9 D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = emb.chunk(
        9, dim=1)
    out = layer_norm_modulated(self.norm, hidden_states, scale_msa, shift_msa)  # (N, L, D)
    out2 = layer_norm_modulated(self.norm, hidden_states, scale_msa2, shift_msa2)
    return out, gate_msa, shift_mlp, scale_mlp, gate_mlp, out2, gate_msa2


def ada_layer_norm_continuous_forward(self: AdaLayerNormContinuous, x: Tensor,
                                      conditioning_embedding: Tensor) -> Tensor:
    """AdaLayerNormContinuous.forward (layer_norm type) with norm + modulate as one op; scale comes first."""
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))  # (N, 2 D)
    scale, shift = torch.chunk(emb, 2, dim=1)
    return layer_norm_modulated(self.norm, x, scale, shift)


class _AdaNormPatch(ModulePatch):
    """An adaLN module whose ``norm`` (a plain LayerNorm) the fused forward replaces; its ``silu`` and
    ``linear`` are still called."""

    def check_structure(self, module: nn.Module) -> Optional[str]:
        reason = plain_layer_norm(getattr(module, "norm", None), "norm")
        if reason:
            return reason
        if type(module.silu) is not nn.SiLU:
            return f"silu is {type(module.silu).__name__}"
        return None


class AdaLayerNormZeroPatch(_AdaNormPatch):
    """``AdaLayerNormZero`` (layer_norm type): norm + modulate as one ``layer_norm_modulate``."""

    target = AdaLayerNormZero
    checked = {"forward": ADA_LAYER_NORM_ZERO_FORWARD}
    forward_fn = ada_layer_norm_zero_forward


class AdaLayerNormZeroSinglePatch(_AdaNormPatch):
    """``AdaLayerNormZeroSingle``: norm + modulate as one ``layer_norm_modulate``."""

    target = AdaLayerNormZeroSingle
    checked = {"forward": ADA_LAYER_NORM_ZERO_SINGLE_FORWARD}
    forward_fn = ada_layer_norm_zero_single_forward


class SD35AdaLayerNormZeroXPatch(_AdaNormPatch):
    """``SD35AdaLayerNormZeroX``: each of its two modulations as one ``layer_norm_modulate``."""

    target = SD35AdaLayerNormZeroX
    checked = {"forward": SD35_ADA_LAYER_NORM_ZERO_X_FORWARD}
    forward_fn = sd35_ada_layer_norm_zero_x_forward


class AdaLayerNormContinuousPatch(_AdaNormPatch):
    """``AdaLayerNormContinuous`` with a LayerNorm (its ``rms_norm`` type is left alone and reported)."""

    target = AdaLayerNormContinuous
    checked = {"forward": ADA_LAYER_NORM_CONTINUOUS_FORWARD}
    forward_fn = ada_layer_norm_continuous_forward


def transformer_patches() -> tuple:
    """Every diffusion-transformer patch: the adaLN norms, then each family's blocks, processors and models."""
    from fastdiff.compat.diffusers.patches_dit import DIT_PATCHES
    from fastdiff.compat.diffusers.patches_flux import FLUX_PATCHES
    from fastdiff.compat.diffusers.patches_mmdit import MMDIT_PATCHES

    return ADANORM_PATCHES + DIT_PATCHES + MMDIT_PATCHES + FLUX_PATCHES


ADANORM_PATCHES = (AdaLayerNormZeroPatch(), AdaLayerNormZeroSinglePatch(), SD35AdaLayerNormZeroXPatch(),
                   AdaLayerNormContinuousPatch())
