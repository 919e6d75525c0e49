"""``fastdiff.sample``: the sampling engine over :func:`fastdiff.samplers.sample_loop`.

What it adds to the plain loop:

- **Seeds per sample.** Sample i draws its starting noise and every later noise from its own CPU
  generator seeded with ``seeds[i]`` (default ``i``), so a sample does not depend on the batch or chunk
  it is drawn in, nor on the process that draws it (up to float rounding: a matmul's bits can depend on
  the batch size it runs at).
- **Chunking.** ``batch_size`` (or, on CUDA, a probe of the activation memory against a memory budget)
  splits a large request into chunks run one after another.
- **Dtype policy.** ``dtype=None`` picks bfloat16 on CUDA (float16 where the GPU has no bf16), bfloat16 on
  a CPU that computes it natively (AMX-BF16 / AVX512-BF16), float32 otherwise. The dtype is the model's
  weights and activations; the sampler state and history stay float32 (the update reads the low-precision
  model output and accumulates in float32).
- **channels_last** for convolutional models on CUDA, and on the CPU for bf16 conv models of at least
  ``CPU_CHANNELS_LAST_MIN_PARAMS`` parameters (``channels_last=None``: where it pays).
- **CUDA graphs.** On CUDA (``cuda_graph=None`` means on) the whole row (model forward on the guidance
  batch + the fused update) is captured once per batch-size bucket on static buffers and replayed for
  every row: the row index, the noise and the labels are copied into the static buffers before each replay.
  :class:`StaticStep` is that step on static buffers; it also runs eagerly (CPU, tests), where it gives the
  same bits as :func:`fastdiff.samplers.sample_loop`.
- **torch.compile** of the model (``compile=True`` or a mode string).
- **torch.distributed.** Inside an initialised process group (``distributed=None`` means: when one is
  initialised with more than one rank) the batch is cut into the same chunks of ``batch_size`` as a single
  process cuts it, chunk j runs on rank ``j % world_size`` with the same per-sample seeds, and the chunks
  are all-gathered: every rank returns the whole batch, bitwise identical in float32 to a single-process
  run with the same seeds and batch size (the CPU default chunk size does not depend on the world size).
- ``runtime="onnxruntime"`` hands the call to :func:`fastdiff.export.ort.sample_onnxruntime`.

The returned tensor is the final state (N, C, ...) in float32 on ``device``: images in the model's data
range ([-1, 1] for the bundled digits model), or latents for a latent model.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from fastdiff.denoiser import Denoiser, call_model
from fastdiff.policy import (
    as_dtype,
    cpu_has_native_bf16,
    default_dtype,
    module_device,
    module_dtype,
    use_channels_last,
)
from fastdiff.samplers import (
    SAMPLERS,
    DeviceTable,
    build_table,
    make_generators,
    randn_per_sample,
    sample_loop,
    to_device,
)

__all__ = [
    "sample",
    "default_dtype",
    "cpu_has_native_bf16",
    "resolve_seeds",
    "StaticStep",
    "CudaGraphRunner",
    "batch_bucket",
    "RUNTIMES",
]

RUNTIMES = ("torch", "onnxruntime")
CPU_BATCH_SIZE = 32  # chunk size on the CPU (throughput is flat beyond it for small models)


def resolve_seeds(seeds, n: int) -> list:
    """One int seed per sample: a sequence of n ints, one int S (sample i gets S + i), or None (0..n-1)."""
    if seeds is None:
        return list(range(n))
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        return [int(seeds) + i for i in range(n)]
    if isinstance(seeds, Tensor):
        seeds = seeds.tolist()
    seeds = list(seeds)
    if len(seeds) != n:
        raise ValueError(f"seeds must hold one seed per sample ({n}), got {len(seeds)}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ValueError(f"seeds must be integers, got {s!r}")
    return [int(s) for s in seeds]


def batch_bucket(n: int) -> int:
    """The captured batch size for a chunk of n: the next power of two up to 64, then multiples of 64."""
    if n <= 64:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 64) * 64


def _labels(y, n: int, device) -> Optional[Tensor]:
    if y is None:
        return None
    yt = torch.as_tensor(y)
    if yt.is_floating_point() or yt.is_complex():
        raise ValueError(f"y must hold integer class labels, got {yt.dtype}")
    if yt.dim() == 0 or (yt.numel() == 1 and n != 1):
        yt = yt.reshape(1).expand(n)
    if tuple(yt.shape) != (n,):
        raise ValueError(f"y must be an int or have shape (N,) = ({n},), got {tuple(yt.shape)}")
    return yt.to(device=device, dtype=torch.int64).contiguous()


# ---------------------------------------------------------------------------------------------
# The denoiser the engine runs
# ---------------------------------------------------------------------------------------------


def _as_denoiser(obj, schedule, prediction: str, learned_sigma: Optional[bool]) -> Denoiser:
    if isinstance(obj, Denoiser):
        return obj
    if isinstance(obj, nn.Module) or callable(obj):
        if schedule is None:
            from fastdiff.schedules import VPSchedule

            schedule = VPSchedule("linear", 1000)
        if learned_sigma is None:
            learned_sigma = bool(getattr(obj, "learn_sigma", False))
        return Denoiser(obj, schedule, prediction=prediction, learned_sigma=learned_sigma)
    raise ValueError(f"denoiser_or_model must be a fastdiff Denoiser or a model called as "
                     f"model(x, timesteps, y=None), got {type(obj).__name__}")


def _casting_model_fn(inner: Callable, dtype: torch.dtype, channels_last: bool) -> Callable:
    """A Denoiser ``model_fn`` that feeds the model ``dtype`` inputs (channels_last when asked)."""

    def model_fn(model, x, t, y=None, **kwargs):
        x = x.to(dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return inner(model, x, t, y, **kwargs)

    return model_fn


_COMPILED: dict = {}


def _compiled(model: nn.Module, mode) -> Callable:
    """``torch.compile(model)``, cached per model and mode (compiling again for each call would cost more
    than it saves)."""
    kwargs = dict(mode) if isinstance(mode, dict) else {} if mode is True else {"mode": mode}
    key = (id(model), tuple(sorted(kwargs.items())))
    hit = _COMPILED.get(key)
    if hit is not None and hit[0]() is model:
        return hit[1]
    import weakref

    fn = torch.compile(model, dynamic=False, **kwargs)
    _COMPILED[key] = (weakref.ref(model), fn)
    return fn


def _prepare(denoiser: Denoiser, device: torch.device, dtype: torch.dtype, channels_last: bool,
             compile_mode) -> Denoiser:
    """A shallow copy of ``denoiser`` whose model runs in ``dtype`` on ``device``.

    The model module itself is moved to ``device`` / ``dtype`` (in place, as ``nn.Module.to``) and set to
    eval mode.
    """
    model = denoiser.model
    if isinstance(model, nn.Module):
        model.eval()
        if module_device(model) not in (None, device) or (module_dtype(model) not in (None, dtype)):
            model.to(device=device, dtype=dtype)
        if channels_last:
            model.to(memory_format=torch.channels_last)
    run = copy.copy(denoiser)
    if compile_mode and isinstance(model, nn.Module):
        run.model = _compiled(model, compile_mode)
    run.model_fn = _casting_model_fn(denoiser.model_fn or call_model, dtype, channels_last)
    return run


# ---------------------------------------------------------------------------------------------
# The step on static buffers (eager on any device; captured in a CUDA graph on CUDA)
# ---------------------------------------------------------------------------------------------


class StaticStep:
    """One table row on static buffers: ``x <- update(x, model(x * c_in[row]), history, noise)``.

    Buffers (allocated once for a batch of n): ``x`` (n, ...) float32 state, ``history`` (S, n, ...),
    ``noise`` (n, ...) (zeros on rows without noise), ``row`` (1,) int32, ``y`` (n,) int64 or None.
    :meth:`step` reads them and writes ``x`` and ``history`` in place; it reads no tensor value on the host,
    so on CUDA it can be captured once and replayed for every row (:class:`CudaGraphRunner`).
    """

    def __init__(self, denoiser: Denoiser, table: DeviceTable, n: int, sample_shape: Sequence[int],
                 device, *, y: Optional[Tensor] = None, y_null=None, guidance_scale: float = 1.0,
                 model_kwargs: Optional[dict] = None, backend: Optional[str] = None):
        if denoiser.cond_fn is not None:
            raise ValueError("classifier guidance (cond_fn) needs autograd: use the plain loop "
                             "(cuda_graph=False)")
        host = table.table
        self.denoiser, self.table, self.n = denoiser, table, int(n)
        self.guidance_scale, self.y_null, self.backend = float(guidance_scale), y_null, backend
        self.model_kwargs = model_kwargs
        self.has_noise = bool(host.needs_noise.any())
        self.learned_range = bool(host.learned_range)
        shape = (self.n, *sample_shape)
        self.x = torch.zeros(shape, dtype=torch.float32, device=device)
        self.history = torch.zeros((host.num_slots, *shape), dtype=torch.float32, device=device)
        self.noise = torch.zeros(shape, dtype=torch.float32, device=device) if self.has_noise else None
        self.row = torch.zeros((1,), dtype=torch.int32, device=device)
        self.y = None if y is None else torch.zeros((self.n,), dtype=torch.int64, device=device)

    def load(self, x: Tensor, y: Optional[Tensor] = None) -> None:
        """Copy a chunk's starting state (and labels) in, zero the history; a short chunk is padded with
        copies of its first sample (the padded outputs are dropped)."""
        k = x.shape[0]
        self.x[:k].copy_(x)
        if k < self.n:
            self.x[k:].copy_(x[:1].expand(self.n - k, *x.shape[1:]))
        self.history.zero_()
        if self.y is not None:
            self.y[:k].copy_(y)
            if k < self.n:
                self.y[k:].copy_(y[:1].expand(self.n - k))

    def set_row(self, r: int, noise: Optional[Tensor]) -> None:
        self.row.fill_(r)
        if self.noise is not None:
            if noise is None:
                self.noise.zero_()
            else:
                k = noise.shape[0]
                self.noise[:k].copy_(noise)
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


class CudaGraphRunner:
    """A :class:`StaticStep` captured in one CUDA graph; :meth:`replay` runs the whole row.

    Capture follows PyTorch's recipe: warm-up iterations on a side stream (cuDNN / Triton autotuning and
    lazy initialisation happen there), then ``torch.cuda.graph`` records one step. The warm-up steps write
    the static buffers, so :meth:`StaticStep.load` must follow capture.
    """

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

    def replay(self) -> None:
        self.graph.replay()


# ---------------------------------------------------------------------------------------------
# Chunk sizes
# ---------------------------------------------------------------------------------------------


def _auto_batch_size(run: Denoiser, raw_model, sample_shape, device: torch.device, guided: bool, y, n: int,
                     memory_budget: Optional[float]) -> int:
    """On CUDA: the chunk whose model activations fit ``memory_budget`` bytes (default 80% of the free
    memory), from a probe forward at batch 2; elsewhere ``CPU_BATCH_SIZE``. The CPU default does not depend
    on n or on the number of processes, so a multi-process run cuts the batch as a single process does."""
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    if n <= 1:
        return 1
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    budget = float(memory_budget) if memory_budget is not None else 0.8 * free
    probe = 2
    x = torch.zeros((probe * (2 if guided else 1), *sample_shape), device=device)
    t = torch.full((x.shape[0],), 500.0, device=device)
    yy = None if y is None else torch.zeros((x.shape[0],), dtype=torch.int64, device=device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.no_grad():  # the eager module: a compiled one would compile once more for the probe's shape
        run.model_fn(raw_model, x, t, yy)
    per_sample = max(1, (torch.cuda.max_memory_allocated(device) - base) / probe)
    state = 4 * math.prod(sample_shape) * 8  # x, history ring, noise, outputs: float32, generous
    return max(1, min(n, int(budget // (per_sample + state))))


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


def _dist_info(distributed) -> tuple[int, int]:
    if distributed is False:
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if distributed:
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    return 0, 1


def _min_over_ranks(value: int, device: torch.device) -> int:
    import torch.distributed as dist

    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(value)], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _gather(local: Tensor, chunks: list, batch_size: int, world: int, sample_shape,
            device: torch.device) -> Tensor:
    """All-gather the ranks' chunks (rank r holds chunks r, r + world, ...) into the (n, ...) batch."""
    import torch.distributed as dist

    per_rank = -(-len(chunks) // world) * batch_size
    comm_device = device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        comm_device = torch.device("cuda", torch.cuda.current_device())
    buf = torch.zeros((per_rank, *sample_shape), dtype=local.dtype, device=comm_device)
    buf[: local.shape[0]].copy_(local)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    n = chunks[-1][1] if chunks else 0
    out = torch.empty((n, *sample_shape), dtype=local.dtype, device=device)
    for j, (c0, c1) in enumerate(chunks):
        k = (j // world) * batch_size
        out[c0:c1].copy_(parts[j % world][k: k + (c1 - c0)])
    return out



def sample(denoiser_or_model, shape: Sequence[int], sampler: str = "dpmpp_2m", steps: int = 20,
           guidance_scale: float = 1.0, y=None, seeds=None, device=None, dtype=None, progress: bool = True,
           batch_size: Optional[int] = None, compile: Union[bool, str] = False,
           cuda_graph: Optional[bool] = None, runtime: str = "torch", *, schedule=None,
           prediction: str = "eps", learned_sigma: Optional[bool] = None, y_null=None,
           spacing: Optional[str] = None, sigmas=None, timesteps=None, sampler_options: Optional[dict] = None,
           model_kwargs: Optional[dict] = None, channels_last: Optional[bool] = None,
           memory_budget: Optional[float] = None, distributed: Optional[bool] = None,
           backend: Optional[str] = None, callback: Optional[Callable] = None, **runtime_kwargs) -> Tensor:
    """Draw ``shape[0]`` samples. Returns (N, C, ...) float32 on ``device``.

    Args:
        denoiser_or_model: a :class:`fastdiff.Denoiser`, or a model called as ``model(x, timesteps, y=None)``
            (wrapped as ``Denoiser(model, schedule or VPSchedule("linear", 1000), prediction)``). The model
            module is moved to ``device`` and ``dtype`` in place and set to eval mode.
        shape: (N, C, ...) of the batch.
        sampler: a name in :data:`fastdiff.samplers.SAMPLERS`; steps: sampling steps.
        guidance_scale: classifier-free guidance weight w (1: no guidance); needs ``y`` and the null label
            ``y_null`` (default: the denoiser's or model's ``y_null`` attribute).
        y: class labels, one int or (N,).
        seeds: one int per sample, one int S (sample i gets S + i) or None (0..N-1).
        device: default CUDA when available, else CPU. dtype: the model's dtype (None: the policy above).
        progress: a tqdm bar over all rows of all chunks.
        batch_size: chunk size (None: ``CPU_BATCH_SIZE`` on CPU; on CUDA what fits ``memory_budget``).
        compile: ``torch.compile`` the model: True, a mode (``"max-autotune-no-cudagraphs"``, the mode to
            combine with ``cuda_graph``), or a dict of ``torch.compile`` keyword arguments.
        cuda_graph: capture the step in a CUDA graph (None: on for CUDA; ignored elsewhere).
        runtime: ``"torch"`` or ``"onnxruntime"`` (:func:`fastdiff.export.ort.sample_onnxruntime`, which
            receives ``runtime_kwargs``).
        schedule, prediction, learned_sigma: used when a bare model is given.
        spacing: the sigma spacing (``denoiser.sigmas(steps, spacing, shape)``; None: the schedule's default,
            Karras for VP/VE, diffusers' flow layout for a flow schedule, whose dynamic shift is set by the
            token count of ``shape``); or explicit ``sigmas`` and ``timesteps``.
        sampler_options: keyword options of the sampler builder (e.g. ``{"eta": 0.5}`` for DDIM).
        model_kwargs: extra keyword arguments of the model (tensors with a batch dim are chunked with x).
        channels_last: None: on for convolutional models on CUDA, and on CPU in bf16 for models of at
            least ``CPU_CHANNELS_LAST_MIN_PARAMS`` parameters.
        distributed: shard over an initialised process group (None: when one with > 1 rank exists).
        backend: the ops' backend word for the update ("auto" | "triton" | "reference").
        callback: called after each row as in :func:`fastdiff.samplers.sample_loop` (eager loop only).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 0 for s in shape):
        raise ValueError(f"shape must be (N, C, ...) with non-negative sizes, got {shape}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    n, sample_shape = shape[0], shape[1:]
    seed_list = resolve_seeds(seeds, n)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = as_dtype(dtype) or default_dtype(device)
    if y_null is None:
        y_null = getattr(denoiser_or_model, "y_null", None)
        if y_null is None:
            y_null = getattr(getattr(denoiser_or_model, "model", None), "y_null", None)

    if runtime == "onnxruntime":
        try:
            from fastdiff.export.ort import sample_onnxruntime
        except ImportError as e:  # the export package or onnxruntime missing
            raise ImportError("runtime='onnxruntime' needs fastdiff.export.ort and onnxruntime "
                              f"(pip install 'fastdiff[onnx]'): {e}") from e
        if not isinstance(denoiser_or_model, (Denoiser, str, os.PathLike)):
            denoiser_or_model = _as_denoiser(denoiser_or_model, schedule, prediction, learned_sigma)
        return sample_onnxruntime(denoiser_or_model, shape, sampler=sampler, steps=steps,
                                  guidance_scale=guidance_scale, y=y, seeds=seed_list, device=device,
                                  dtype=dtype,
                                  progress=progress, schedule=schedule, sigmas=sigmas, timesteps=timesteps,
                                  spacing=spacing, sampler_options=sampler_options, y_null=y_null,
                                  **runtime_kwargs)
    if runtime_kwargs:
        raise ValueError(f"unexpected keyword arguments for runtime='torch': {sorted(runtime_kwargs)}")

    denoiser = _as_denoiser(denoiser_or_model, schedule, prediction, learned_sigma)
    labels = _labels(y, n, device)
    guided = float(guidance_scale) != 1.0
    if guided and labels is not None and y_null is None:
        raise ValueError("guidance_scale != 1 with class labels needs y_null (the null label)")
    if channels_last is None:
        channels_last = use_channels_last(denoiser.model, device, dtype, len(shape))
    use_graph = device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
    if use_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs a CUDA device")
    if use_graph and compile == "reduce-overhead":  # that mode records its own CUDA graphs
        if cuda_graph:
            raise ValueError("compile='reduce-overhead' captures its own CUDA graphs: use cuda_graph=False "
                             "or compile='max-autotune-no-cudagraphs'")
        use_graph = False
    if use_graph and (denoiser.cond_fn is not None or callback is not None):
        if cuda_graph:
            raise ValueError("cuda_graph=True cannot run classifier guidance (cond_fn) or a callback")
        use_graph = False

    if sigmas is None:
        sigmas, timesteps = denoiser.sigmas(int(steps), spacing=spacing, shape=shape)
    table = build_table(sampler, sigmas, schedule=denoiser.schedule, timesteps=timesteps,
                        **(sampler_options or {}))
    run = _prepare(denoiser, device, dtype, channels_last, compile)
    frame = "flow" if getattr(denoiser.schedule, "frame", None) == "flow" else "sigma"  # flow starts at inf
    dtab = to_device(table, run, device, dtype=torch.float32, frame=frame)
    start_scale = denoiser.schedule.initial_scale(float(table.sigma[0]), frame)

    rank, world = _dist_info(distributed)
    if batch_size is None:
        batch_size = _auto_batch_size(run, denoiser.model, sample_shape, device, guided, labels, n,
                                      memory_budget)
        if world > 1:  # every rank must cut the batch the same way
            batch_size = _min_over_ranks(batch_size, device)
    batch_size = int(batch_size)
    chunks = [(c0, min(n, c0 + batch_size)) for c0 in range(0, n, batch_size)]
    mine = chunks[rank::world]

    local = torch.zeros((len(mine) * batch_size, *sample_shape), dtype=torch.float32, device=device)
    bar = None
    if progress and mine:
        from tqdm.auto import tqdm

        bar = tqdm(total=table.num_rows * len(mine), disable=rank != 0)
    runners: dict = {}
    with torch.inference_mode() if denoiser.cond_fn is None else contextlib.nullcontext():
        for j, (c0, c1) in enumerate(mine):
            gens = make_generators(seed_list[c0:c1])
            x = randn_per_sample(gens, sample_shape, device=device, dtype=torch.float32) * start_scale
            yc = labels[c0:c1] if labels is not None else None
            mk = _chunk_kwargs(model_kwargs, n, c0, c1)
            if use_graph:
                x = _run_graph(runners, run, dtab, x, yc, gens, y_null, guidance_scale, mk, backend, bar)
            else:
                x = sample_loop(run, x, dtab, y=yc, y_null=y_null, guidance_scale=guidance_scale,
                                model_kwargs=mk, generators=gens, backend=backend, frame=frame,
                                callback=_progress_callback(bar, callback))
            local[j * batch_size: j * batch_size + (c1 - c0)].copy_(x)
    if bar is not None:
        bar.close()
    if world == 1:
        return local[:n]
    return _gather(local, chunks, batch_size, world, sample_shape, device)


def _chunk_kwargs(model_kwargs: Optional[dict], n: int, c0: int, c1: int) -> Optional[dict]:
    if not model_kwargs:
        return model_kwargs
    return {k: v[c0:c1] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in model_kwargs.items()}


def _progress_callback(bar, callback):
    if bar is None and callback is None:
        return None

    def cb(info):
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(info)

    return cb


def _run_graph(runners: dict, run: Denoiser, dtab: DeviceTable, x: Tensor, y: Optional[Tensor], gens,
               y_null, guidance_scale: float, model_kwargs, backend, bar) -> Tensor:
    """One chunk through the CUDA graph of its batch bucket (captured on first use)."""
    k = x.shape[0]
    bucket = batch_bucket(k)
    if model_kwargs and any(isinstance(v, Tensor) for v in model_kwargs.values()):
        raise ValueError("cuda_graph with tensor model_kwargs is not supported: pass cuda_graph=False")
    runner = runners.get(bucket)
    if runner is None:
        static = StaticStep(run, dtab, bucket, x.shape[1:], x.device, y=y, y_null=y_null,
                            guidance_scale=guidance_scale, model_kwargs=model_kwargs, backend=backend)
        static.load(x, y)
        runner = runners[bucket] = CudaGraphRunner(static)
    static = runner.static
    static.load(x, y)  # again: capturing ran the step on the buffers
    _walk_rows(static, dtab, gens, x.shape[1:], runner.replay, bar)
    return static.x[:k].clone()


def _walk_rows(static: "StaticStep", dtab: DeviceTable, gens, sample_shape, advance: Callable[[], None],
               bar=None) -> None:
    """Every row of the table on the static buffers: per-sample noise where the row needs it, then one
    ``advance()`` (a graph replay, or the eager step)."""
    host = dtab.table
    for r in range(host.num_rows):
        noise = None
        if host.needs_noise[r]:
            noise = randn_per_sample(gens, sample_shape, device=static.x.device, dtype=torch.float32)
        static.set_row(r, noise)
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
                        guidance_scale=guidance_scale, model_kwargs=model_kwargs, backend=backend)
    static.load(x, y)
    _walk_rows(static, dtab, gens, x.shape[1:], static.step)
    return static.x[:k].clone()
