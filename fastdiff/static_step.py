"""The sampling step on static buffers, its CUDA graph, and per-row noise without a host sync.

:class:`StaticStep` is one table row on buffers allocated once: ``x <- update(x, model(x * c_in[row]),
history, noise)``; the row index, the noise, the labels and the batch-dim tensor model keyword arguments
(prompt embeddings) are copied into the buffers before each step, and the step reads no tensor value on the
host. On CUDA :class:`CudaGraphRunner` captures it once and replays it
for every row; elsewhere it runs eagerly (:func:`run_static`) and gives the bits of
:func:`fastdiff.samplers.sample_loop`, so the logic the graph records is tested on the CPU.

Model keyword arguments: :func:`batch_kwargs` names those that carry the batch (tensors whose first dim
is N), :func:`chunk_kwargs` cuts them with x, and :func:`kwargs_key` says what a captured step depends on:
the shapes and dtypes of the batch ones (copied into static buffers), the contents of the others (baked in).

:class:`NoiseStager` brings each row's per-sample noise (drawn from the per-sample CPU generators, the
source of truth for every device) to the device: on CUDA through a small ring of pinned host buffers and
non-blocking copies, so the host draws row r + 1 while the GPU runs row r instead of waiting at a pageable
copy for every row.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from fastdiff.denoiser import Denoiser
from fastdiff.samplers import DeviceTable

__all__ = ["StaticStep", "CudaGraphRunner", "NoiseStager", "walk_rows", "run_static", "batch_bucket",
           "bucket_floor", "batch_kwargs", "chunk_kwargs", "kwargs_key"]


def batch_bucket(n: int) -> int:
    """The captured batch size for a chunk of n: the next power of two up to 64, then multiples of 64."""
    if n <= 64:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 64) * 64


def bucket_floor(n: int) -> int:
    """The largest bucket size <= n (n >= 1): a chunk of at most that many never pads past n."""
    if n <= 64:
        return 1 << (max(1, n).bit_length() - 1)
    return n // 64 * 64


def batch_kwargs(model_kwargs: Optional[dict], n: int) -> frozenset:
    """The names of the model keyword arguments that carry the batch: tensors whose first dim is ``n`` (the
    rule by which the engine cuts them into chunks and ``Denoiser.model_output`` doubles them under
    guidance). The others are the same for every sample."""
    if not model_kwargs:
        return frozenset()
    return frozenset(k for k, v in model_kwargs.items() if isinstance(v, Tensor) and v.dim() and v.shape[0] == n)


def _own_copy(value, device):
    """``value`` with every tensor in it (also inside dicts, lists and tuples) copied to a new tensor on
    ``device``: what a captured graph reads must not be the caller's memory, which may be freed or reused."""
    if isinstance(value, Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, dict):
        return {k: _own_copy(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_own_copy(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_own_copy(v, device) for v in value)
    return value


def _tensor_digest(t: Tensor) -> str:
    flat = t.detach().reshape(-1).contiguous().cpu()
    return hashlib.sha1(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def _value_key(value, content: bool):
    """A hashable key of a model keyword argument that is baked into a captured step: tensors by shape,
    dtype and (``content``) a digest of their bytes, containers element by element, plain values by
    repr, any other object by identity (the cached step keeps it alive, so the id is not reused)."""
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, _tensor_digest(value) if content else None)
    if isinstance(value, dict):
        return ("dict", tuple(sorted((repr(k), _value_key(v, content)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_value_key(v, content) for v in value))
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
        return ("value", type(value).__name__, repr(value))
    return ("object", type(value).__qualname__, id(value))


def kwargs_key(model_kwargs: Optional[dict], batch_keys: frozenset, content: bool = True):
    """What a captured step depends on in ``model_kwargs``: the batch-dim tensors by shape past the batch
    and dtype (their values are copied into static buffers before each chunk), every other argument by
    value (:func:`_value_key`: the step reads the copy made at capture). ``content=False``: shapes only
    (the memory probe's key)."""
    if not model_kwargs:
        return None
    return tuple(sorted((k, ("batch", tuple(v.shape[1:]), v.dtype) if k in batch_keys else _value_key(v, content))
                        for k, v in model_kwargs.items()))


def chunk_kwargs(model_kwargs: Optional[dict], batch_keys: frozenset, c0: int, c1: int) -> Optional[dict]:
    """Samples c0..c1 of ``model_kwargs``: the batch-dim tensors cut, the rest as they are."""
    if not model_kwargs:
        return model_kwargs
    return {k: v[c0:c1] if k in batch_keys else v for k, v in model_kwargs.items()}


class NoiseStager:
    """Per-row noise ``(k, *sample_shape)`` float32 from one CPU generator per sample, on ``device``.

    Each draw calls ``torch.randn(sample_shape, generator=g)`` for every sample in order, as
    :func:`fastdiff.samplers.randn_per_sample` does, so the numbers are the same. On CUDA the draws go into
    one of ``slots`` pinned host buffers and reach the device by a non-blocking copy; a buffer is refilled
    only after the copy out of it has completed (a CUDA event), which lets the host run a few rows ahead.
    """

    def __init__(self, generators: Sequence[torch.Generator], sample_shape: Sequence[int], device,
                 slots: int = 3):
        self.generators = list(generators)
        self.shape = tuple(int(s) for s in sample_shape)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.buffers: list = [None] * (slots if self.cuda else 0)  # allocated on first use
        self.events: list = [None] * len(self.buffers)
        self.draws = 0

    def _fill(self, out: Tensor) -> Tensor:
        for i, g in enumerate(self.generators):
            torch.randn(self.shape, generator=g, dtype=torch.float32, out=out[i])
        return out

    def _staged(self, consume: Callable[[Tensor], Tensor]) -> Tensor:
        slot = self.draws % len(self.buffers)
        self.draws += 1
        if self.events[slot] is not None:
            self.events[slot].synchronize()  # the copy from this buffer (a few rows ago) has finished
        if self.buffers[slot] is None:
            self.buffers[slot] = torch.empty((len(self.generators), *self.shape), dtype=torch.float32,
                                             pin_memory=True)
        out = consume(self._fill(self.buffers[slot]))
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.events[slot] = event
        return out

    def draw(self) -> Tensor:
        """The next row of noise as a new tensor on the device."""
        if not self.cuda:
            self.draws += 1
            host = self._fill(torch.empty((len(self.generators), *self.shape), dtype=torch.float32))
            return host.to(self.device)
        return self._staged(lambda buf: buf.to(self.device, non_blocking=True))

    def draw_into(self, dst: Tensor) -> None:
        """The next row of noise copied into ``dst`` (k, *sample_shape) on the device, in stream order."""
        if not self.cuda:
            if dst.device.type == "cpu" and dst.dtype == torch.float32 and dst.is_contiguous():
                self.draws += 1
                self._fill(dst)
            else:
                dst.copy_(self.draw())
            return
        self._staged(lambda buf: dst.copy_(buf, non_blocking=True))


class StaticStep:
    """One table row on static buffers: ``x <- update(x, model(x * c_in[row]), history, noise)``.

    Buffers (allocated once for a batch of n): ``x`` (n, ...) float32 state, ``history`` (S, n, ...),
    ``noise`` (n, ...) (zeros on rows without noise), ``row`` (1,) int32, ``y`` (n,) int64 or None, and one
    buffer (n, ...) per batch-dim tensor of ``model_kwargs`` (``batch_keys``; default: the tensors whose first
    dim is n), in that tensor's dtype. The other model keyword arguments are constants of the step: the
    step keeps its own copy of every tensor in them, made here (a caller that reuses a step for other
    constants must capture another: the engine keys its graphs on their contents).
    :meth:`step` reads the buffers and writes ``x`` and ``history`` in place; it reads no tensor value on the
    host, so on CUDA it can be captured once and replayed for every row (:class:`CudaGraphRunner`).
    """

    def __init__(self, denoiser: Denoiser, table: DeviceTable, n: int, sample_shape: Sequence[int],
                 device, *, y: Optional[Tensor] = None, y_null=None, guidance_scale: float = 1.0,
                 model_kwargs: Optional[dict] = None, batch_keys: Optional[Iterable[str]] = None,
                 backend: Optional[str] = None):
        if denoiser.cond_fn is not None:
            raise ValueError("classifier guidance (cond_fn) needs autograd: use the plain loop "
                             "(cuda_graph=False)")
        host = table.table
        self.denoiser, self.table, self.n = denoiser, table, int(n)
        self.guidance_scale, self.y_null, self.backend = float(guidance_scale), y_null, backend
        self.has_noise = bool(host.needs_noise.any())
        self.learned_range = bool(host.learned_range)
        shape = (self.n, *sample_shape)
        self.x = torch.zeros(shape, dtype=torch.float32, device=device)
        self.history = torch.zeros((host.num_slots, *shape), dtype=torch.float32, device=device)
        self.noise = torch.zeros(shape, dtype=torch.float32, device=device) if self.has_noise else None
        self.row = torch.zeros((1,), dtype=torch.int32, device=device)
        self.y = None if y is None else torch.zeros((self.n,), dtype=torch.int64, device=device)
        kwargs = dict(model_kwargs or {})
        keys = batch_kwargs(kwargs, self.n) if batch_keys is None else frozenset(batch_keys)
        for name in sorted(keys):
            v = kwargs.get(name)
            if not isinstance(v, Tensor) or v.dim() == 0:
                raise ValueError(f"batch_keys: model_kwargs[{name!r}] must be a tensor with a batch dim, got "
                                 f"{type(v).__name__ if not isinstance(v, Tensor) else tuple(v.shape)}")
        self.kwargs_buffers = {name: torch.zeros((self.n, *kwargs[name].shape[1:]), dtype=kwargs[name].dtype,
                                                 device=device) for name in keys}
        self.kwargs_constant = {k: _own_copy(v, device) for k, v in kwargs.items() if k not in keys}
        self.model_kwargs = {k: self.kwargs_buffers.get(k, self.kwargs_constant.get(k)) for k in kwargs} or None

    def load(self, x: Tensor, y: Optional[Tensor] = None, model_kwargs: Optional[dict] = None) -> None:
        """Copy a chunk's starting state, labels and batch-dim model keyword arguments in, zero the history;
        a short chunk is padded with copies of its first sample (the padded outputs are dropped).
        ``model_kwargs`` has the keys the step was built with; its constants are not read (see the class)."""
        k = x.shape[0]
        given = dict(model_kwargs or {})
        if set(given) != set(self.model_kwargs or {}):
            raise ValueError(f"model_kwargs must have the keys this step was built with "
                             f"{sorted(self.model_kwargs or {})}, got {sorted(given)}")
        for name, buf in self.kwargs_buffers.items():  # checked before anything is written
            v = given[name]
            want = (k, *buf.shape[1:])
            if not isinstance(v, Tensor) or tuple(v.shape) != want:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"model_kwargs[{name!r}] must have shape {want} (the chunk's samples first), "
                                 f"got {got}")
        _copy_padded(self.x, x)
        self.history.zero_()
        if self.y is not None:
            _copy_padded(self.y, y)
        for name, buf in self.kwargs_buffers.items():
            _copy_padded(buf, given[name])

    def set_row(self, r: int, noise: Optional[NoiseStager] = None, k: Optional[int] = None) -> None:
        """Point the step at row ``r``; draw its noise for the first ``k`` samples from ``noise`` when the
        row adds noise (the padding rows get zeros), else zero the noise buffer."""
        self.row.fill_(r)
        if self.noise is None:
            return
        if noise is None:
            self.noise.zero_()
            return
        k = self.n if k is None else k
        noise.draw_into(self.noise[:k])
        if k < self.n:
            self.noise[k:].zero_()

    def step(self) -> None:
        from fastdiff import ops

        tab, n, x = self.table, self.n, self.x
        rows = self.row.expand(n)
        t = tab.timestep.index_select(0, self.row).expand(n)
        c_in = tab.c_in.index_select(0, self.row)
        guided = self.guidance_scale != 1.0
        cond, uncond, var = self.denoiser.model_output(
            x * c_in, t, y=self.y, y_null=self.y_null, guidance_scale=self.guidance_scale,
            model_kwargs=self.model_kwargs)
        if self.learned_range and var is None:
            raise ValueError("this DDPM table uses learned-range variance: the Denoiser needs "
                             "learned_sigma=True")
        clip = self.denoiser.clip_bounds(x, cond, uncond, self.guidance_scale, tab.coef, rows)
        x_next = ops.sampler_step(x, cond, self.history, tab.coef, rows, uncond=uncond,
                                  guidance_scale=self.guidance_scale if guided else 1.0,
                                  variance=var if self.learned_range else None, noise=self.noise, clip=clip,
                                  backend=self.backend)
        x.copy_(x_next)


def _copy_padded(dst: Tensor, src: Tensor) -> None:
    """``dst[:k] = src`` (k = len(src)) and the rows past k copies of ``src[0]``."""
    k = src.shape[0]
    dst[:k].copy_(src)
    if k < dst.shape[0]:
        dst[k:].copy_(src[:1].expand(dst.shape[0] - k, *src.shape[1:]))


class CudaGraphRunner:
    """A :class:`StaticStep` captured in one CUDA graph; :meth:`replay` runs the whole row.

    Capture follows PyTorch's recipe: warm-up iterations on a side stream (cuDNN / Triton autotuning and
    lazy initialisation happen there), then ``torch.cuda.graph`` records one step. The warm-up steps write
    the static buffers, so :meth:`StaticStep.load` must follow capture. ``CudaGraphRunner.captures`` counts
    the captures made in this process.
    """

    captures = 0

    def __init__(self, static: StaticStep, warmup: int = 2):
        if not torch.cuda.is_available() or static.x.device.type != "cuda":
            raise ValueError("CUDA graphs need CUDA tensors")
        self.static = static
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                static.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            static.step()
        CudaGraphRunner.captures += 1

    def replay(self) -> None:
        self.graph.replay()


def walk_rows(static: StaticStep, noise: Optional[NoiseStager], k: int, advance: Callable[[], None],
              bar=None) -> None:
    """Every row of the table on the static buffers: per-sample noise for the first ``k`` samples where the
    row needs it, then one ``advance()`` (a graph replay, or the eager step)."""
    host = static.table.table
    for r in range(host.num_rows):
        static.set_row(r, noise if host.needs_noise[r] else None, k)
        advance()
        if bar is not None:
            bar.update(1)


def run_static(run: Denoiser, dtab: DeviceTable, x: Tensor, y: Optional[Tensor], gens, *, y_null=None,
               guidance_scale: float = 1.0, model_kwargs=None, backend=None,
               pad_to: Optional[int] = None) -> Tensor:
    """The graph path without the graph: the :class:`StaticStep` called eagerly for every row (any device).

    Gives the bits of :func:`fastdiff.samplers.sample_loop` for the same inputs (tests rely on it), so the
    static-buffer logic that the CUDA graph records is exercised on the CPU.
    """
    k = x.shape[0]
    static = StaticStep(run, dtab, pad_to or k, x.shape[1:], x.device, y=y, y_null=y_null,
                        guidance_scale=guidance_scale, model_kwargs=model_kwargs,
                        batch_keys=batch_kwargs(model_kwargs, k), backend=backend)
    static.load(x, y, model_kwargs)
    walk_rows(static, NoiseStager(gens, x.shape[1:], x.device), k, static.step)
    return static.x[:k].clone()
