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
  tracing and export (an exported graph keeps the standard op); under ``torch.compile`` the packed call is
  one opaque op (``fastdiff::packed_conv2d`` / ``fastdiff::packed_linear``) that inductor fuses around;
- the packed weight is made at the first such call and kept in a cache keyed by the weight's storage (held
  weakly: freeing the weight frees its entry's right to be used), data pointer, autograd version counter,
  dtype, shape and strides: ``load_state_dict``, optimizer steps, ``p.copy_`` under ``no_grad``,
  ``p.data = ...`` and moving the module each repack it. Writes through
  ``p.data`` in place (``p.data += d``, as some LoRA merges do) bypass the version counter and are not seen:
  undo (or :func:`forget`) and install again after those;
- a weight oneDNN cannot pack (float16 without AVX512-FP16) is remembered and runs the module's own forward.

The packed copy costs as much memory as the weight itself.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from fastdiff.model_cache import version_counter

__all__ = ["available", "conv2d_forward", "forget", "install", "is_packed", "linear_forward", "linear_gelu",
           "packable", "packed_types", "plan", "PACKED_DTYPES"]

PACKED_DTYPES = (torch.float32, torch.bfloat16)


class _Entry(NamedTuple):
    storage: StorageWeakRef  # the weight's storage, held weakly: an expired one frees the entry
    key: tuple  # the weight's version counter, dtype, shape, strides, offset when packed
    use: tuple  # what else the packed layout depends on (a convolution's padding, stride, dilation, groups)
    packed: Optional[Tensor]  # None: oneDNN cannot pack this weight


_CACHE: dict = {}  # weight data pointer -> _Entry


def available() -> bool:
    """Whether this torch build has oneDNN and the packed-weight ops."""
    ops = getattr(torch.ops, "mkldnn", None)
    return bool(torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_convolution_pointwise") and hasattr(ops, "_linear_pointwise"))


def _weight_key(w: Tensor) -> tuple:
    # an inference tensor keeps no version counter (-1): it is packed once
    return (version_counter(w), w.dtype, tuple(w.shape), w.stride(), w.storage_offset())


def _lookup(w: Tensor, use: Optional[tuple] = None) -> Optional[_Entry]:
    """The cache entry of ``w`` when it is current (and was packed for ``use``, when given), else None."""
    entry = _CACHE.get(w.data_ptr())
    if entry is None or entry.storage.expired() or entry.key != _weight_key(w):
        return None
    return entry if use is None or entry.use == use else None


def _packed(w: Tensor, pack: Callable[[Tensor], Tensor], use: tuple) -> Optional[Tensor]:
    """The packed copy of weight ``w`` for ``use``, made (again) when ``w`` changed; None when oneDNN cannot
    pack it."""
    entry = _lookup(w, use)
    if entry is not None:
        return entry.packed
    for ptr in [p for p, e in _CACHE.items() if e.storage.expired()]:  # weights freed since: drop their copies
        del _CACHE[ptr]
    _CACHE.pop(w.data_ptr(), None)  # the stale copy goes before the new one is made
    try:
        packed = pack(w.detach())
    except RuntimeError:  # e.g. float16 without AVX512-FP16: the module's own forward from now on
        packed = None
    _CACHE[w.data_ptr()] = _Entry(StorageWeakRef(w.untyped_storage()), _weight_key(w), use, packed)
    return packed


def is_packed(weight: Tensor) -> bool:
    """Whether a current packed copy of ``weight`` is cached."""
    entry = _lookup(weight)
    return entry is not None and entry.packed is not None


def _eligible(module: nn.Module, x: Tensor) -> bool:
    """Whether this call may use the packed weight (else the module's own forward runs)."""
    w, b = module.weight, module.bias
    if x.device.type != "cpu" or x.dtype not in PACKED_DTYPES or x.numel() == 0:
        return False
    if type(w) not in (Tensor, nn.Parameter) or w.device.type != "cpu" or w.dtype != x.dtype:
        return False
    if w.layout != torch.strided:
        return False
    if b is not None and (b.dtype != x.dtype or b.device.type != "cpu"):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
        return False
    if torch.compiler.is_compiling():  # torch.compile takes the opaque op; export keeps the standard op
        return not torch.compiler.is_exporting()
    return type(x) is Tensor and not (torch.jit.is_tracing() or torch.jit.is_scripting())


def _channels_last(x: Tensor, w: Tensor) -> bool:
    """ATen's choice of output layout for a convolution: channels_last when the input or the weight is."""
    cl = torch.channels_last
    return any(t.is_contiguous(memory_format=cl) and not t.is_contiguous() for t in (x, w))


def _conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], padding: list, stride: list, dilation: list,
            groups: int) -> Tensor:
    packed = _packed(weight, lambda w: torch.ops.mkldnn._reorder_convolution_weight(
        w, padding, stride, dilation, groups, list(input.shape)), ("conv2d", *padding, *stride, *dilation, groups))
    if packed is None:
        return nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    fmt = torch.channels_last if _channels_last(input, weight) else torch.contiguous_format
    if not (input.is_contiguous() or input.is_contiguous(memory_format=torch.channels_last)):
        input = input.contiguous(memory_format=fmt)  # oneDNN takes NCHW or NHWC strides
    out = torch.ops.mkldnn._convolution_pointwise(input, packed, bias, padding, stride, dilation, groups,
                                                  "none", [], "")
    return out.contiguous(memory_format=fmt)  # the layout ATen's convolution gives (a no-op when it is)


def _linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: str = "") -> Tensor:
    rows = input.numel() // input.shape[-1]
    packed = _packed(weight, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, rows), ("linear",))
    if packed is None:
        out = nn.functional.linear(input, weight, bias)
        return nn.functional.gelu(out, approximate=gelu) if gelu else out
    attr, algorithm = ("gelu", gelu) if gelu else ("none", "")
    return torch.ops.mkldnn._linear_pointwise(input, packed, bias, attr, [], algorithm).contiguous()


# The packed calls as single ops for torch.compile: the packed weight is looked up (or made) when the op runs,
# from the weight tensor the compiled graph passes in, so a compiled model sees weight changes as eager does.
@torch.library.custom_op("fastdiff::packed_conv2d", mutates_args=())
def packed_conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], padding: list[int], stride: list[int],
                  dilation: list[int], groups: int) -> Tensor:
    """``conv2d(input, weight, bias, stride, padding, dilation, groups)`` on the packed weight."""
    return _conv2d(input, weight, bias, padding, stride, dilation, groups)


@packed_conv2d.register_fake
def _(input, weight, bias, padding, stride, dilation, groups):
    out = nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return out.contiguous(memory_format=torch.channels_last if _channels_last(input, weight)
                          else torch.contiguous_format)


@torch.library.custom_op("fastdiff::packed_linear", mutates_args=())
def packed_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: str = "") -> Tensor:
    """``linear(input, weight, bias)`` on the packed weight (bfloat16), then ``gelu(approximate=gelu)`` when
    ``gelu`` is "none" or "tanh"."""
    return _linear(input, weight, bias, gelu)


@packed_linear.register_fake
def _(input, weight, bias, gelu=""):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def conv2d_forward(self: nn.Conv2d, input: Tensor) -> Tensor:
    """``nn.Conv2d.forward`` with the weight packed once (see the module docstring)."""
    if input.dim() != 4 or input.shape[1] != self.in_channels or not _eligible(self, input):
        return nn.Conv2d.forward(self, input)
    args = (input, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups)
    return packed_conv2d(*args) if torch.compiler.is_compiling() else _conv2d(*args)


def _linear_eligible(module: nn.Linear, input: Tensor) -> bool:
    return (input.dtype == torch.bfloat16 and input.dim() >= 2 and input.shape[-1] == module.in_features
            and _eligible(module, input))  # float32: ATen's MKL GEMM, whose sums oneDNN's would not match


def linear_forward(self: nn.Linear, input: Tensor) -> Tensor:
    """``nn.Linear.forward`` with the weight packed once (see the module docstring)."""
    if not _linear_eligible(self, input):
        return nn.Linear.forward(self, input)
    args = (input, self.weight, self.bias)
    return packed_linear(*args) if torch.compiler.is_compiling() else _linear(*args)


def linear_gelu(linear: nn.Linear, input: Tensor, approximate: str = "none") -> Tensor:
    """``gelu(linear(input), approximate=approximate)``; where the packed path applies (a plain ``nn.Linear``,
    bf16 on the CPU, as :func:`linear_forward`) the GELU is oneDNN's post-op of the packed product, applied
    to the float32 accumulator before the bf16 rounding (one pass fewer, and closer to float64 than the two
    ops: bf16 (1, 1152, 768) -> 3072, tanh: relative error 1.7e-3 against 2.7e-3; 6.4 against 8.3 ms)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    own = "forward" not in linear.__dict__ or isinstance(linear.__dict__["forward"], _PackedForward)
    if type(linear) is not nn.Linear or not own or linear._forward_hooks or linear._forward_pre_hooks \
            or not available() or not _linear_eligible(linear, input):  # (hooks the fused call would bypass)
        return nn.functional.gelu(linear(input), approximate=approximate)
    args = (input, linear.weight, linear.bias, approximate)
    return packed_linear(*args) if torch.compiler.is_compiling() else _linear(*args)


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
        _CACHE.pop(module.weight.data_ptr(), None)

    return undo


def packed_types(dtype: Optional[torch.dtype]) -> tuple:
    """The module types whose weights are packed for a run in ``dtype`` (None: any dtype packed)."""
    if dtype is None or dtype == torch.bfloat16:
        return (nn.Conv2d, nn.Linear)
    return (nn.Conv2d,) if dtype == torch.float32 else ()


def plan(model: nn.Module, dtype: Optional[torch.dtype] = None
         ) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, str]]]:
    """([(path, module)] that :func:`install` gives the packed forward, [(path, reason)] for the conv / linear
    modules it leaves alone): those that pack in ``dtype`` (:func:`packed_types`; None: every one)."""
    take, skipped = [], []
    for path, module in model.named_modules():
        if isinstance(module, packed_types(dtype)):
            reason = packable(module)
            if reason is None:
                take.append((path, module))
            else:
                skipped.append((path, f"{type(module).__name__}: {reason}"))
    return take, skipped


def install(model: nn.Module, dtype: Optional[torch.dtype] = None
            ) -> tuple[Callable[[], None], list[str], list[tuple[str, str]]]:
    """Give the modules :func:`plan` takes the packed forward. Returns (undo, their paths, [(path, reason)] for
    the conv / linear modules left alone). Nothing is packed here: each module packs its weight at its
    first eligible call."""
    take, skipped = plan(model, dtype)
    undos = [_swap(module) for _, module in take]

    def undo():
        while undos:
            undos.pop()()

    return undo, [path for path, _ in take], skipped


def forget(model: nn.Module) -> None:
    """Drop the packed copies of ``model``'s weights (each is packed again at its next call)."""
    for p in model.parameters():
        _CACHE.pop(p.data_ptr(), None)
