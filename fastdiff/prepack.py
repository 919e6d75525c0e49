"""oneDNN-prepacked weights for CPU inference of ``nn.Conv2d`` and ``nn.Linear``.

ATen's CPU convolution and (bf16) linear hand oneDNN a plain weight, which oneDNN reorders into its blocked
layout on every call. Where a layer has many weights and few positions, the deep blocks of a latent U-Net
(1280 channels at 8x8 or 4x4) or any Linear on a short sequence, that reorder is a large part of the call.
Packing the weight once, as inductor's freezing pass does for compiled graphs
(``torch.ops.mkldnn._reorder_convolution_weight`` / ``_reorder_linear_weight``, then
``_convolution_pointwise`` / ``_linear_pointwise``), removes it from eager inference. The result is the
same oneDNN primitive's: in bfloat16 bitwise equal to ATen's in the cases tested; a float32 convolution
runs oneDNN's algorithm where ATen may run its own (differences at float32 rounding, ~1e-7 relative). Linear
is packed in bfloat16 only: ATen runs float32 Linear through MKL. Measured on the 2-core AVX-512-BF16
machine (AMD EPYC), batch 2, median of 8 calls, ms eager -> packed: bf16 3x3 conv 1280->1280 at 8x8
6.6 -> 4.5, at 4x4 4.0 -> 1.8, 320 channels at 32x32 3.9 -> 3.8; float32 at 8x8 32.7 -> 9.8; bf16 Linear
1280->1280 on 2 rows 0.105 -> 0.040, on 2x77 rows 0.65 -> 0.54.

:func:`install` gives a module tree's plain ``nn.Conv2d`` / ``nn.Linear`` instances a forward that uses the
packed weight when the call allows it and the module's own forward otherwise:

- only on CPU tensors of the weight's dtype (float32 or bfloat16 convolutions, bfloat16 linears), outside
  autograd (``torch.no_grad`` / ``inference_mode``, or nothing requiring a gradient), outside
  ``torch.compile``, tracing and export (inductor packs weights itself, an exported graph keeps the
  standard op);
- the packed weight is made at the first such call and kept beside the module, keyed by the weight's
  identity, data pointer, autograd version counter, dtype, shape and strides: ``load_state_dict``, optimizer
  steps, ``p.copy_`` under ``no_grad``, ``p.data = ...`` and moving the module each repack it. Writes through
  ``p.data`` in place (``p.data += d``, as some LoRA merges do) bypass the version counter and are not seen:
  undo (or :func:`forget`) and install again after those;
- a weight oneDNN cannot pack (float16 without AVX512-FP16) is remembered and runs the module's own forward.

The packed copy costs as much memory as the weight itself.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["available", "conv2d_forward", "forget", "install", "linear_forward", "packable", "packed_types",
           "PACKED_DTYPES"]

PACKED_DTYPES = (torch.float32, torch.bfloat16)
_ATTR = "_fastdiff_packed"


def available() -> bool:
    """Whether this torch build has oneDNN and the packed-weight ops."""
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_convolution_pointwise") and hasattr(ops, "_linear_pointwise"))


class _Packed:
    """The packed weight of one module and the key of the weight it was made from. Not copied with the module
    (``copy.deepcopy``, pickling): a copy packs its own weight at its first call."""

    __slots__ = ("key", "weight")

    def __init__(self):
        self.key, self.weight = None, None

    def __deepcopy__(self, memo):
        return _Packed()

    def __reduce__(self):
        return (_Packed, ())


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter: pack it once
        return -1


def _weight_key(w: Tensor) -> tuple:
    return (id(w), w.data_ptr(), _version(w), w.dtype, tuple(w.shape), w.stride())


def _eligible(module: nn.Module, x: Tensor) -> bool:
    """Whether this call may use the packed weight (else the module's own forward runs)."""
    w, b = module.weight, module.bias
    if type(x) is not Tensor or x.device.type != "cpu" or x.dtype not in PACKED_DTYPES or x.numel() == 0:
        return False
    if type(w) not in (Tensor, nn.Parameter) or w.device.type != "cpu" or w.dtype != x.dtype:
        return False
    if w.layout != torch.strided:
        return False
    if b is not None and (b.dtype != x.dtype or b.device.type != "cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return False
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting())


def _packed(module: nn.Module, pack: Callable[[Tensor], Tensor]) -> Optional[Tensor]:
    """The module's packed weight, made (again) when the weight changed; None when oneDNN cannot pack it."""
    holder = module.__dict__.get(_ATTR)
    if holder is None:
        holder = module.__dict__[_ATTR] = _Packed()
    key = _weight_key(module.weight)
    if holder.key != key:
        holder.weight = None  # drop the stale copy before making the new one
        try:
            holder.weight = pack(module.weight.detach())
        except RuntimeError:  # e.g. float16 without AVX512-FP16: the module's own forward from now on
            holder.weight = None
        holder.key = key
    return holder.weight


def conv2d_forward(self: nn.Conv2d, input: Tensor) -> Tensor:
    """``nn.Conv2d.forward`` with the weight packed once (see the module docstring)."""
    if input.dim() != 4 or input.shape[1] != self.in_channels or not _eligible(self, input):
        return nn.Conv2d.forward(self, input)
    padding, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
    weight = _packed(self, lambda w: torch.ops.mkldnn._reorder_convolution_weight(
        w, padding, stride, dilation, self.groups, list(input.shape)))
    if weight is None:
        return nn.Conv2d.forward(self, input)
    if not (input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last)):
        input = input.contiguous()  # oneDNN takes NCHW or NHWC strides
    return torch.ops.mkldnn._convolution_pointwise(input, weight, self.bias, padding, stride, dilation,
                                                   self.groups, "none", [], "")


def linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    """``nn.Linear.forward`` with the weight packed once (see the module docstring)."""
    if input.dtype != torch.bfloat16 or input.dim() < 2 or input.shape[-1] != self.in_features \
            or not _eligible(self, input):  # float32: ATen's MKL GEMM, whose sums oneDNN's would not match
        return nn.Linear.forward(self, input)
    rows = input.numel() // input.shape[-1]
    weight = _packed(self, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows))
    if weight is None:
        return nn.Linear.forward(self, input)
    return torch.ops.mkldnn._linear_pointwise(input, weight, self.bias, "none", [], "")


def packable(module: nn.Module) -> Optional[str]:
    """None when :func:`install` would give ``module`` the packed forward, else the reason it would not."""
    if type(module) not in (nn.Conv2d, nn.Linear):
        return f"{type(module).__name__} is not a plain nn.Conv2d or nn.Linear"
    if "forward" in module.__dict__:
        return "the instance's forward was replaced (by another tool or an earlier patch)"
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is packed)"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} (only explicit padding is packed)"
    if not available():
        return "this torch build has no oneDNN packed-weight ops"
    return None


class _PackedForward:
    """The instance forward :func:`install` sets: a bound :func:`conv2d_forward` / :func:`linear_forward` that
    survives ``copy.deepcopy`` and pickling of the module (a bound method of a function outside the class
    does not unpickle)."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, input: Tensor) -> Tensor:
        m = self.module
        return conv2d_forward(m, input) if isinstance(m, nn.Conv2d) else linear_forward(m, input)

    def __reduce__(self):
        return (_PackedForward, (self.module,))


def _swap(module: nn.Module) -> Callable[[], None]:
    module.forward = _PackedForward(module)

    def undo():
        module.__dict__.pop("forward", None)
        module.__dict__.pop(_ATTR, None)

    return undo


def packed_types(dtype: Optional[torch.dtype]) -> tuple:
    """The module types whose weights are packed for a run in ``dtype`` (None: any dtype packed)."""
    if dtype is None or dtype == torch.bfloat16:
        return (nn.Conv2d, nn.Linear)
    return (nn.Conv2d,) if dtype == torch.float32 else ()


def install(model: nn.Module, dtype: Optional[torch.dtype] = None
            ) -> tuple[Callable[[], None], list[str], list[tuple[str, str]]]:
    """Give the plain ``nn.Conv2d`` / ``nn.Linear`` modules of ``model`` the packed forward: those that pack
    in ``dtype`` (:func:`packed_types`; None: every one).

    Returns (undo, the paths of the modules given it, [(path, reason)] for the conv / linear modules left
    alone). Nothing is packed here: each module packs its weight at its first eligible call.
    """
    undos, done, skipped = [], [], []
    types = packed_types(dtype)
    for path, module in model.named_modules():
        if not isinstance(module, types):
            continue
        reason = packable(module)
        if reason is None:
            undos.append(_swap(module))
            done.append(path)
        else:
            skipped.append((path, reason))

    def undo():
        while undos:
            undos.pop()()

    return undo, done, skipped


def forget(model: nn.Module) -> None:
    """Drop the packed weights of ``model``'s modules (each repacks at its next call)."""
    for module in model.modules():
        module.__dict__.pop(_ATTR, None)
