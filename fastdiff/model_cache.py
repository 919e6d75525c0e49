"""Run copies: fastdiff never changes the model it is given.

The engine, the feature extractor and the export functions run a model in a given dtype, on a given device,
channels_last, in eval mode. Where the caller's model is not already so, they run a *converted copy*:

    run = run_copy(model, device="cuda", dtype=torch.bfloat16, channels_last=True)

- **No copy when nothing needs converting**: the caller's model itself comes back.
- **What is copied**: the module objects (``copy.deepcopy`` of the tree) and every parameter or buffer that
  needs converting, built directly in its new dtype / device / memory format (so a float32 model run in
  bf16 costs one bf16 copy of its weights: half its size, never a float32 copy first). Tensors that need no
  conversion are *shared* with the caller's model, not copied: an eval-only copy costs the module objects
  and no weight memory. Non-tensor attributes are deep-copied.
- **Cached** under a weak reference to the caller's model (one copy per model: a call asking for another
  dtype / device / layout replaces it), together with a fingerprint of the model: the identity of every
  submodule, parameter and buffer, and per tensor its data pointer, autograd version counter, dtype, device,
  shape and strides. So the copy is rebuilt (never stale) when the caller changes weights in place through
  any tracked op (optimizer steps, ``load_state_dict``, ``with torch.no_grad(): p.copy_(...)``, writes
  through ``p.detach()``), assigns new tensors (``p.data = ...``, ``load_state_dict(assign=True)``),
  swaps a submodule, or moves / casts the model. It does **not** see writes through ``p.data`` (they bypass
  the version counter) nor changes of non-tensor attributes: call :func:`clear_cache` after those.
- The copy lives as long as the caller's model, or until :func:`clear_cache` (``fastdiff.clear_cache()``).

The engine also keeps its per-model caches (compiled models, memory probes, CUDA graphs) in the same entry
(:func:`prepare`), so they are dropped with the copy when the fingerprint changes.
"""

from __future__ import annotations

import copy
import threading
import weakref
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["Prepared", "clear_cache", "needs_conversion", "prepare", "run_copy"]

_ENTRIES: "weakref.WeakKeyDictionary[nn.Module, _Entry]" = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()


class Prepared(NamedTuple):
    """``model``: what to run (the caller's model or a converted copy); ``caches``: a dict that lives as long
    as the copy (empty after any change of the caller's weights) for the caller's own per-model caches."""

    model: object
    caches: dict


def version_counter(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return -1


def _tensors(model: nn.Module) -> list:
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return [t for _, t in named if t is not None]


def _meta(tensors: list) -> tuple:
    return tuple((t.data_ptr(), version_counter(t), t.dtype, t.device, tuple(t.shape), tuple(t.stride()))
                 for t in tensors)


def _ref(obj):
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


class _Entry:
    """A model's fingerprint, its run copy and the caller's caches."""

    def __init__(self, modules: list, tensors: list, meta: tuple):
        self.modules = [_ref(m) for m in modules]
        self.tensors = [_ref(t) for t in tensors]
        self.meta = meta
        self.key: Optional[tuple] = None
        self.copy: Optional[nn.Module] = None
        self.caches: dict = {}

    def matches(self, modules: list, tensors: list, meta: tuple) -> bool:
        return (meta == self.meta and len(modules) == len(self.modules) and len(tensors) == len(self.tensors)
                and all(r() is m for r, m in zip(self.modules, modules, strict=True))
                and all(r() is t for r, t in zip(self.tensors, tensors, strict=True)))


def _device(device) -> Optional[torch.device]:
    if device is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _converted(t: Tensor, device, dtype, channels_last: bool) -> Tensor:
    """``t`` as ``nn.Module.to`` would make it (floating tensors take ``dtype``; 4-D ones the layout), or
    ``t`` itself when it already is."""
    out = t.detach()
    if (device is not None and t.device != device) or (dtype is not None and t.is_floating_point()
                                                       and t.dtype != dtype):
        out = out.to(device=device, dtype=dtype if t.is_floating_point() else None)
    if channels_last and out.dim() == 4 and not out.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return t if out.data_ptr() == t.data_ptr() and out.dtype == t.dtype and out.device == t.device else out


def needs_conversion(model, device=None, dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                     eval: bool = True) -> bool:
    """Whether running ``model`` so needs a copy (False for anything that is not an ``nn.Module``)."""
    if not isinstance(model, nn.Module):
        return False
    device = _device(device)
    if eval and any(m.training for m in model.modules()):
        return True
    return any(_converted(t, device, dtype, channels_last) is not t for t in _tensors(model))


def _build(model: nn.Module, device, dtype, channels_last: bool, eval: bool) -> nn.Module:
    memo: dict = {}
    for t in _tensors(model):
        if id(t) in memo:
            continue
        new = _converted(t, device, dtype, channels_last)
        if new is not t and isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        memo[id(t)] = new
    try:
        clone = copy.deepcopy(model, memo)
    except Exception as e:  # an attribute that cannot be copied (a lock, an open file, ...)
        raise TypeError(
            f"model: fastdiff runs a converted copy of {type(model).__name__} (dtype={dtype}, device={device}, "
            f"channels_last={channels_last}, eval) so as not to change yours, and copying it failed: {e}. "
            "Pass a model that is already so converted and in eval mode.") from e
    if eval:
        clone.eval()
    return clone


def prepare(model, device=None, dtype: Optional[torch.dtype] = None, channels_last: bool = False,
            eval: bool = True, private: bool = False) -> Prepared:
    """The model to run and the per-model caches (see the module docstring).

    Args:
        model: the caller's model; anything that is not an ``nn.Module`` comes back as it is (with a fresh,
            uncached ``caches`` dict).
        device, dtype, channels_last, eval: what the run needs (None: as the model is).
        private: never return the caller's model itself: a copy that shares every tensor when nothing
            needs converting (for callers that keep objects referencing the run model, e.g. a compiled
            module or a CUDA graph, in ``caches``: those must not keep the caller's model alive).
    """
    if not isinstance(model, nn.Module):
        return Prepared(model, {})
    device = _device(device)
    with _LOCK:
        modules, tensors = list(model.modules()), _tensors(model)
        meta = _meta(tensors)
        entry = _ENTRIES.get(model)
        if entry is None or not entry.matches(modules, tensors, meta):
            entry = _ENTRIES[model] = _Entry(modules, tensors, meta)
        need = (eval and any(m.training for m in modules)) or any(
            _converted(t, device, dtype, channels_last) is not t for t in tensors)
        if not need and not private:
            return Prepared(model, entry.caches)
        key = (device, dtype, bool(channels_last), bool(eval))
        if entry.copy is None or entry.key != key:
            if entry.copy is not None:  # one copy per model: drop the old one (and what ran on it) first
                entry.copy, entry.caches = None, {}
            entry.copy, entry.key = _build(model, device, dtype, channels_last, eval), key
        return Prepared(entry.copy, entry.caches)


def run_copy(model, device=None, dtype: Optional[torch.dtype] = None, channels_last: bool = False,
             eval: bool = True) -> Union[nn.Module, object]:
    """``model`` itself when it already runs so, else its cached converted copy (see the module docstring)."""
    return prepare(model, device, dtype, channels_last, eval).model


def clear_cache() -> None:
    """Drop every cached run copy and the caches kept with it."""
    with _LOCK:
        _ENTRIES.clear()
