"""Patches for diffusers' ``AutoencoderKL``: its ``Encoder`` and ``Decoder`` are built from the U-Net's blocks, so
the patches are those of :mod:`patches_unet` (``ResnetBlock2D``, the mid-block ``Attention`` with its input
GroupNorm) plus the coders' output GroupNorm + SiLU.

Decoding at 1024x1024 is mostly GroupNorm and SiLU over 128-512 channels at full resolution (memory-bound
work), which is where the fused norm pays on a GPU.
"""

from __future__ import annotations

from diffusers.models.autoencoders.vae import Decoder, DiagonalGaussianDistribution, Encoder
from torch import Tensor

from fastdiff.compat.diffusers.patches_unet import NormActPatch

__all__ = ["VAE_PATCHES", "VAE_METHODS", "cast_vae_output"]

# The coders' own patches; their ResnetBlock2D and Attention modules get patches_unet.UNET_PATCHES'.
VAE_PATCHES = (NormActPatch(Encoder), NormActPatch(Decoder))

# The entry points of an AutoencoderKL that accelerate wraps (input dtype cast when it converts the model).
VAE_METHODS = ("encode", "decode", "forward")


def cast_vae_output(value, dtype):
    """One output leaf of a VAE entry point in ``dtype``: floating tensors, and the latent distribution of
    ``encode`` rebuilt from its parameters (so its ``sample()`` / ``mode()`` come back in the caller's dtype)."""
    if isinstance(value, DiagonalGaussianDistribution):
        return DiagonalGaussianDistribution(value.parameters.to(dtype), deterministic=value.deterministic)
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value
