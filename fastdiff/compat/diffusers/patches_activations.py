"""Patches for diffusers' activation modules, applied on the CPU where the Linear before the activation runs
on a oneDNN-packed weight (:mod:`fastdiff.prepack`):

- :class:`GELUPatch` (``diffusers.models.activations.GELU``: ``gelu(proj(x))``, the feed-forward input of
  DiT, PixArt, SD3 and Flux's double blocks): the GELU becomes oneDNN's post-op of the packed bf16 product,
  applied to the float32 accumulator before the rounding to bf16: one pass over the (tokens, 4 x hidden)
  activation fewer, and closer to float64 than the two ops. Elsewhere (float32, CUDA, autograd) the patched
  forward is diffusers' own: ``gelu(proj(x))``.
"""

from __future__ import annotations

from typing import Optional

from diffusers.models.activations import GELU
from torch import Tensor, nn

from fastdiff import prepack
from fastdiff.compat.diffusers.patching import ModulePatch, hooks_on

__all__ = ["GELUPatch", "ACTIVATION_PATCHES"]

# Digests (fastdiff.compat.diffusers.patching.code_digest) of the GELU methods the patch reproduces, for the
# diffusers releases read: ``gelu`` changed only its MPS branch in 0.32.
GELU_FORWARD = {"5e94b0190cb1359d": "0.27.0-0.42.1"}
GELU_GELU = {"bb8f70127ca42abc": "0.27.0-0.31.0", "f5032495f517ea1c": "0.32.0-0.42.1"}


def gelu_forward(self: GELU, hidden_states: Tensor) -> Tensor:
    """GELU.forward: ``gelu(proj(hidden_states))`` with the GELU fused into the packed Linear where it runs."""
    return prepack.linear_gelu(self.proj, hidden_states, self.approximate)  # (..., dim_out)


class GELUPatch(ModulePatch):
    """``diffusers.models.activations.GELU``."""

    target = GELU
    checked = {"forward": GELU_FORWARD, "gelu": GELU_GELU}
    forward_fn = gelu_forward

    def check_structure(self, module: GELU) -> Optional[str]:
        if type(module.proj) is not nn.Linear:
            return f"proj is a {type(module.proj).__name__}, not a plain nn.Linear"
        if module.approximate not in ("none", "tanh"):
            return f"approximate={module.approximate!r}"
        hooks = hooks_on(module.proj)
        return f"hooks the fused forward would bypass: {', '.join(hooks)}" if hooks else None


ACTIVATION_PATCHES = (GELUPatch(),)
