"""A model forward replayed from CUDA graphs, one graph per input-shape bucket, so that a diffusers pipeline's own
loop (``noise_pred = self.unet(latents, t, ...)``) runs unchanged while each step is one graph launch.

:class:`CudaGraphForward` wraps a forward. Each call's arguments are bound to the forward's signature and
flattened (``torch.utils._pytree``: tuples, lists, dicts such as ``added_cond_kwargs``); the bucket key is the
tree structure, every tensor's shape, dtype and device, every other value (``return_dict``,
``cross_attention_kwargs``) and the autocast setting. The second call of a bucket captures it (PyTorch's recipe:
a warm-up call on a side stream, where cuDNN / Triton autotuning and lazy initialisation happen, then
``torch.cuda.graph``), with static input buffers; every later call copies its tensors into those buffers,
replays, and returns clones of the static outputs (a scheduler may keep the model output of an earlier step,
e.g. PNDM, so outputs must not be overwritten by the next replay). All graphs of one wrapper share one memory
pool.

Calls that are not captured run the forward eagerly: autograd enabled (training, guidance by gradient), a
``timestep`` that is not a tensor (a Python number would make one bucket per value), unhashable arguments, a
bucket's first call, buckets past ``max_graphs``, and a bucket whose capture failed (the failure is kept in
:attr:`CudaGraphForward.failures` and warned once; ``accelerate``'s report reads it). CPU tensors in the inputs
get static buffers on the CUDA device (the model moves them there anyway, and a host-to-device copy cannot be
captured).

What the graph assumes, as every CUDA graph does: the model's parameters keep their storage (undo the
acceleration before ``.to()``), and nothing in the forward reads a tensor value on the host.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections import Counter
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["CudaGraphForward", "cuda_capture"]


def cuda_capture(call: Callable[[], object], pool, warmup: int = 1):
    """Capture ``call()`` (which reads only static buffers) in a CUDA graph: ``(static outputs, replay)``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        static_out = call()
    return static_out, graph.replay


def _autocast_state(device: torch.device) -> tuple:
    """Autocast is recorded into a graph: a call under another autocast setting is another bucket."""
    if not torch.is_autocast_enabled(device.type):
        return ()
    return (torch.get_autocast_dtype(device.type),)


class _Bucket:
    """One captured bucket: static input leaves, the argument tree, static outputs and the replay."""

    def __init__(self, static_leaves: list, static_out, replay: Callable[[], None]):
        self.static_leaves, self.static_out, self.replay = static_leaves, static_out, replay

    def run(self, leaves: list):
        for dst, src in zip(self.static_leaves, leaves, strict=True):
            if isinstance(dst, Tensor):
                dst.copy_(src)
        self.replay()
        return pytree.tree_map_only(Tensor, torch.clone, self.static_out)


class CudaGraphForward:
    """``fn`` replayed from one CUDA graph per input-shape bucket (see the module docstring).

    Args:
        fn: the forward (a bound method or any callable).
        max_graphs: buckets captured at most; later buckets run eagerly.
        name: how failures name this forward (e.g. the module path "unet").
        capture: ``capture(call, pool) -> (static outputs, replay)``; :func:`cuda_capture` by default (tests
            pass an emulation to exercise the bucketing on the CPU).
        device_type: the device whose tensors are captured ("cuda").
    """

    def __init__(self, fn: Callable, *, max_graphs: int = 8, name: str = "", capture: Optional[Callable] = None,
                 device_type: str = "cuda"):
        self.fn = fn
        self.signature = inspect.signature(fn)
        self.max_graphs, self.name, self.device_type = int(max_graphs), name, device_type
        self.capture = capture or cuda_capture
        self.buckets: dict = {}
        self.seen: Counter = Counter()
        self.failures: list[tuple[str, str]] = []
        self._failed: set = set()
        self._pool = None
        functools.update_wrapper(self, fn)
        self.__signature__ = self.signature

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.fn(*args, **kwargs)
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return self.fn(*args, **kwargs)  # let the forward raise its own error
        arguments = dict(bound.arguments)
        if "timestep" in self.signature.parameters and not isinstance(arguments.get("timestep"), Tensor):
            return self.fn(*args, **kwargs)
        leaves, spec = pytree.tree_flatten(arguments)
        device = next((t.device for t in leaves if isinstance(t, Tensor) and t.device.type == self.device_type),
                      None)
        if device is None:
            return self.fn(*args, **kwargs)
        key = (spec, _autocast_state(device), tuple((tuple(t.shape), t.dtype, t.device) if isinstance(t, Tensor)
                                                    else (type(t), t) for t in leaves))
        try:
            bucket = self.buckets.get(key)
        except TypeError:  # an unhashable argument
            return self.fn(*args, **kwargs)
        if bucket is not None:
            return bucket.run(leaves)
        if key in self._failed or len(self.buckets) >= self.max_graphs:
            return self.fn(*args, **kwargs)
        self.seen[key] += 1
        if self.seen[key] < 2:
            return self.fn(*args, **kwargs)
        try:
            bucket = self._capture(leaves, spec, device)
        except Exception as e:  # a forward that cannot be captured runs eagerly, and the report says why
            self._failed.add(key)
            shapes = [tuple(t.shape) for t in leaves if isinstance(t, Tensor)]
            reason = f"CUDA graph capture failed for inputs {shapes}: {type(e).__name__}: {e}"
            self.failures.append((self.name, reason))
            warnings.warn(f"fastdiff.accelerate: {self.name or 'forward'}: {reason}; running it eagerly",
                          stacklevel=2)
            return self.fn(*args, **kwargs)
        self.buckets[key] = bucket
        return bucket.run(leaves)

    def _capture(self, leaves: list, spec, device: torch.device) -> _Bucket:
        static = []
        for t in leaves:
            if isinstance(t, Tensor):
                buf = torch.empty_like(t, device=device) if t.device.type == "cpu" else torch.empty_like(t)
                static.append(buf.copy_(t))
            else:
                static.append(t)
        arguments = pytree.tree_unflatten(static, spec)
        bound = inspect.BoundArguments(self.signature, arguments)
        call = functools.partial(self.fn, *bound.args, **bound.kwargs)
        if self._pool is None and self.device_type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        static_out, replay = self.capture(call, self._pool)
        return _Bucket(static, static_out, replay)

    def clear(self) -> None:
        """Drop every captured graph and its buffers."""
        self.buckets.clear()
        self.seen.clear()
        self._pool = None
