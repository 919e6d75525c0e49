"""``fastdiff.sample``: the sampling engine over :func:`fastdiff.samplers.sample_loop`.

What it adds to the plain loop:

- **Your model is never changed.** Weights, dtype, device, memory format, train/eval mode and
  ``requires_grad`` of the model passed in stay as they were (bitwise). Where the call needs a conversion
  (dtype, device, channels_last, eval mode) it runs a converted copy, cached under a weak reference to your
  model and a fingerprint of its parameters (:mod:`fastdiff.model_cache`): no copy when nothing needs
  converting; a float32 model run in bf16 costs one bf16 copy of its weights (half its float32 size) for as
  long as the model lives or until :func:`clear_cache` (``fastdiff.clear_cache()``); an in-place change of
  your weights is seen by the next call (the copy is rebuilt).
- **Seeds per sample.** Sample i draws its starting noise and every later noise from its own CPU
  generator seeded with ``seeds[i]``, so a sample does not depend on the batch or chunk it is drawn in, nor
  on the device or process that draws it (up to float rounding: a matmul's bits can depend on the batch size
  it runs at). ``seeds=None`` draws fresh seeds from torch's global generator (``return_seeds=True`` gives
  them back).
- **Chunking.** ``batch_size`` (or, on CUDA, a probe of the activation memory against a memory budget,
  cached per model and shape) splits a large request into chunks run one after another.
- **Dtype policy** (:mod:`fastdiff.policy`). ``dtype=None`` picks bfloat16 on CUDA (float16 where the GPU
  has no bf16), bfloat16 on a CPU that computes it natively (AMX-BF16 / AVX512-BF16), float32 otherwise.
  The dtype is the model's weights and activations; the sampler state and history stay float32 (the update
  reads the low-precision model output and accumulates in float32).
- **channels_last** for convolutional models on CUDA, and on the CPU for bf16 conv models of at least
  ``CPU_CHANNELS_LAST_MIN_PARAMS`` parameters (``channels_last=None``: where it pays).
- **Threads.** On the CPU the call runs with :func:`fastdiff.policy.cpu_threads` threads (the CLI's
  policy: one thread on a busy machine) and gives torch its setting back after.
- **CUDA graphs.** On CUDA (``cuda_graph=None`` means on) the whole row (model forward on the guidance
  batch + the fused update) is captured once per batch-size bucket on static buffers
  (:mod:`fastdiff.static_step`) and replayed for every row; the row index, the noise, the labels and the
  batch-dim tensors of ``model_kwargs`` (a transformer's prompt embeddings) are copied into the static
  buffers before each replay, the noise through pinned buffers without a host sync per row. Graphs are
  cached across calls (keyed by the model and its fingerprint, the bucket, the shape, dtype, table,
  guidance, labels, the shapes and dtypes of the batch-dim model keyword arguments and the contents of the
  others, which the graph bakes in), so a repeated call (new prompts of the same shape included) replays
  without capturing again.
- **torch.compile** of the model (``compile=True`` or a mode string), cached per model.
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
import dataclasses
import functools
import hashlib
import inspect
import math
import os
import sys
import weakref
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from fastdiff import model_cache, prepack
from fastdiff.denoiser import Denoiser, call_model
from fastdiff.engine_args import (
    check_choice,
    check_compile,
    check_conditioning,
    check_dtype,
    check_extra_kwargs,
    check_guidance,
    check_int,
    check_labels,
    check_memory_budget,
    check_sampler_options,
    check_shape,
    default_guidance,
    default_y_null,
    resolve_device,
    resolve_seeds,
)
from fastdiff.engine_distributed import dist_info, gather_chunks, min_over_ranks, seeds_of_rank0
from fastdiff.policy import (
    cpu_has_native_bf16,
    cpu_threads_for_call,
    default_dtype,
    use_channels_last,
)
from fastdiff.samplers import (
    SAMPLERS,
    DeviceTable,
    build_table,
    make_generators,
    sample_loop,
    state_frame,
    to_device,
)
from fastdiff.static_step import (
    CudaGraphRunner,
    NoiseStager,
    StaticStep,
    batch_bucket,
    batch_kwargs,
    bucket_floor,
    chunk_kwargs,
    kwargs_key,
    run_static,
    walk_rows,
)

__all__ = [
    "sample",
    "clear_cache",
    "default_dtype",
    "cpu_has_native_bf16",
    "default_spacing",
    "resolve_seeds",
    "StaticStep",
    "CudaGraphRunner",
    "batch_bucket",
    "run_static",
    "RUNTIMES",
    "DEFAULT_SPACING",
]

RUNTIMES = ("torch", "onnxruntime")
CPU_BATCH_SIZE = 32  # chunk size on the CPU (throughput is flat beyond it for small models)
MAX_GRAPHS_PER_MODEL = 4  # cached CUDA graphs per model (least recently used dropped first)

# Each sampler's default spacing, as upstream lays it out: diffusers' DDPMScheduler / DDIMScheduler
# ("leading", steps_offset 0), diffusers' UniPCMultistepScheduler ("linspace" in its multistep form), and
# k-diffusion's Karras sigmas (rho = 7) for the k-diffusion samplers.
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "unipc": "linspace"}
KARRAS = "karras"
_INTEGER_SPACINGS = ("leading", "trailing", "linspace")


def clear_cache() -> None:
    """Free every cache of the engine: the converted model copies and what runs on them (compiled models,
    memory probes, CUDA graphs), and ONNX Runtime's exported step graphs and sessions."""
    model_cache.clear_cache()
    ort = sys.modules.get("fastdiff.export.ort")
    if ort is not None:
        for name in ("_STEP_SESSIONS", "_EXPORTS"):
            cache = getattr(ort, name, None)
            if isinstance(cache, dict):
                cache.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Spacing
# ---------------------------------------------------------------------------------------------


def default_spacing(sampler: str, schedule=None) -> str:
    """The sigma spacing ``spacing=None`` means: a flow schedule's own ``default_spacing``, else
    :data:`DEFAULT_SPACING` (``"karras"`` for samplers not listed); integer spacings need a discrete
    schedule, so a continuous one gets ``"uniform"`` instead."""
    if getattr(schedule, "frame", None) == "flow":  # flow matching lays out diffusers' FlowMatch default
        return schedule.default_spacing
    spacing = DEFAULT_SPACING.get(sampler, KARRAS)
    if spacing in _INTEGER_SPACINGS and schedule is not None and not hasattr(schedule, "num_train_timesteps"):
        return "uniform"
    return spacing


def _sampling_sigmas(denoiser: Denoiser, sampler: str, steps: int, spacing: Optional[str], shape=None):
    """``(sigmas, timesteps)`` for the call: UniPC's integer spacings take diffusers' multistep layout
    (steps + 1 points, the last dropped), every other case ``denoiser.sigmas(steps, spacing, shape)`` (which
    sets a dynamically shifted flow schedule's shift from the token count of ``shape``)."""
    schedule = denoiser.schedule
    if spacing is None:
        spacing = default_spacing(sampler, schedule)
    if sampler == "unipc" and spacing in _INTEGER_SPACINGS and hasattr(schedule, "num_train_timesteps"):
        from fastdiff.schedules import spaced_timesteps

        ts = spaced_timesteps(schedule.num_train_timesteps, steps, spacing, multistep=True).astype(np.float64)
        sig = np.asarray(schedule.timestep_to_sigma(ts), dtype=np.float64)
        return np.concatenate([sig, [0.0]]), ts
    return denoiser.sigmas(steps, spacing=spacing, shape=shape)


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
    raise TypeError(f"denoiser_or_model must be a fastdiff Denoiser, or a model called as "
                    f"model(x, timesteps, y=None), got {type(obj).__name__}")


def _casting_model_fn(inner: Callable, dtype: torch.dtype, channels_last: bool) -> Callable:
    """A Denoiser ``model_fn`` that feeds the model ``dtype`` inputs (channels_last when asked)."""

    def model_fn(model, x, t, y=None, **kwargs):
        x = x.to(dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return inner(model, x, t, y, **kwargs)

    return model_fn


def _compile_key(mode) -> tuple:
    kwargs = dict(mode) if isinstance(mode, dict) else {} if mode is True else {"mode": mode}
    return tuple(sorted((k, repr(v)) for k, v in kwargs.items()))


def _compiled(prep: model_cache.Prepared, mode) -> Callable:
    """``torch.compile`` of the run model, cached with it (compiling again for each call would cost more
    than it saves)."""
    cache = prep.caches.setdefault("compiled", {})
    key = _compile_key(mode)
    if key not in cache:
        kwargs = dict(mode) if isinstance(mode, dict) else {} if mode is True else {"mode": mode}
        cache[key] = torch.compile(prep.model, dynamic=False, **kwargs)
    return cache[key]


def _run_denoiser(denoiser: Denoiser, prep: model_cache.Prepared, dtype: torch.dtype, channels_last: bool,
                  compile_mode) -> Denoiser:
    """A shallow copy of ``denoiser`` that runs the prepared model (compiled when asked) on ``dtype``
    inputs."""
    run = copy.copy(denoiser)
    run.model = prep.model
    if compile_mode and isinstance(prep.model, nn.Module):
        run.model = _compiled(prep, compile_mode)
    run.model_fn = _casting_model_fn(denoiser.model_fn or call_model, dtype, channels_last)
    return run


def _ref(obj):
    try:
        return weakref.ref(obj)
    except TypeError:
        return id(obj)


def _denoiser_key(denoiser: Denoiser) -> tuple:
    """What of the denoiser a captured step depends on besides the model and the table."""
    return (type(denoiser), denoiser.prediction, denoiser.learned_sigma, denoiser.clip_x0,
            denoiser.dynamic_threshold, denoiser.sample_max_value, _ref(denoiser.model_fn))


def _device_table(table, run: Denoiser, device: torch.device, frame: str = "sigma") -> tuple[DeviceTable, str]:
    """The packed table on ``device`` and a digest of its contents (built on the host, copied once)."""
    host = to_device(table, run, "cpu", dtype=torch.float32, frame=frame)
    digest = hashlib.sha1()
    for t in (host.coef, host.c_in, host.timestep):
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.numpy().tobytes())
    digest.update(repr((table.name, table.num_slots, bool(table.learned_range), frame)).encode())
    if device.type == "cpu":
        return host, digest.hexdigest()
    moved = dataclasses.replace(host, coef=host.coef.to(device), c_in=host.c_in.to(device),
                                timestep=host.timestep.to(device), row_ids=host.row_ids.to(device))
    return moved, digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Chunk sizes
# ---------------------------------------------------------------------------------------------


def _probes_memory(device: torch.device) -> bool:
    """Whether the chunk size comes from a memory probe (CUDA) rather than ``CPU_BATCH_SIZE``."""
    return device.type == "cuda"


PROBE_BATCH = 2  # samples in the memory probe's forward (twice that many rows under guidance)


def _measure_capacity(run: Denoiser, raw_model, sample_shape, device: torch.device, memory_budget: Optional[float],
                      *, has_y: bool = False, y_null=None, guidance: float = 1.0, model_kwargs: Optional[dict] = None,
                      batch_keys: frozenset = frozenset()) -> int:
    """The largest chunk whose model activations fit ``memory_budget`` bytes (default 80% of the free
    memory), from a probe forward of ``PROBE_BATCH`` samples called as the run calls the model
    (``Denoiser.model_output``: the guidance batch, the labels, the model keyword arguments, whose batch-dim
    tensors are cut to the probe's samples). Needs at least ``PROBE_BATCH`` samples in ``model_kwargs``."""
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    budget = float(memory_budget) if memory_budget is not None else 0.8 * free
    probe = PROBE_BATCH
    x = torch.zeros((probe, *sample_shape), device=device)
    t = torch.full((probe,), 500.0, device=device)
    yy = torch.zeros((probe,), dtype=torch.int64, device=device) if has_y else None
    kwargs = chunk_kwargs(model_kwargs, batch_keys, 0, probe)
    prober = copy.copy(run)
    prober.model = raw_model  # the eager module: a compiled one would compile once more for the probe's shape
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        prober.model_output(x, t, yy, y_null=y_null, guidance_scale=guidance, model_kwargs=kwargs)
    per_sample = max(1, (torch.cuda.max_memory_allocated(device) - base) / probe)
    state = 4 * math.prod(sample_shape) * 8  # x, history ring, noise, outputs: float32, generous
    return max(1, int(budget // (per_sample + state)))


def _auto_batch_size(prep: model_cache.Prepared, run: Denoiser, sample_shape, device: torch.device, n: int,
                     memory_budget: Optional[float], key: tuple, use_graph: bool, **probe) -> int:
    """On CUDA: the chunk that fits the memory budget (probed once per model, shape and settings, then
    cached); with CUDA graphs a chunk size whose batch bucket is itself, so padding a chunk up to its bucket
    stays within the budget. Elsewhere ``CPU_BATCH_SIZE``, which does not depend on n or on the number of
    processes, so a multi-process run cuts the batch as a single process does. ``probe``: the conditioning
    of :func:`_measure_capacity`."""
    if not _probes_memory(device):
        return CPU_BATCH_SIZE
    if n <= 1:
        return 1
    capacities = prep.caches.setdefault("capacity", {})
    capacity = capacities.get(key)
    if capacity is None:
        capacity = capacities[key] = _measure_capacity(run, prep.model, sample_shape, device, memory_budget, **probe)
    if use_graph:
        capacity = bucket_floor(capacity)
    return max(1, min(n, capacity))


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

# fastdiff.sample's own keywords (for "did you mean" hints), and those only runtime="torch" uses with
# their defaults: runtime="onnxruntime" refuses any of them set to something else.
_TORCH_ONLY = {"batch_size": None, "compile": False, "cuda_graph": None, "model_kwargs": None,
               "channels_last": None, "memory_budget": None, "distributed": None, "backend": None,
               "callback": None}


@functools.lru_cache(maxsize=None)
def _sample_keywords() -> tuple:
    return tuple(p for p in inspect.signature(sample).parameters if p != "runtime_kwargs")


def _ort_keywords() -> list:
    """The keywords sample_onnxruntime takes beyond those fastdiff.sample names itself."""
    from fastdiff.export.ort import sample_onnxruntime

    own = set(_sample_keywords())
    params = inspect.signature(sample_onnxruntime).parameters.values()
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.default is not p.empty and p.name not in own]


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


def sample(denoiser_or_model, shape: Sequence[int], sampler: str = "dpmpp_2m", steps: int = 20,
           guidance_scale: Optional[float] = None, y=None, seeds=None, device=None, dtype=None, progress: bool = True,
           batch_size: Optional[int] = None, compile: Union[bool, str, dict] = False,
           cuda_graph: Optional[bool] = None, runtime: str = "torch", *, schedule=None,
           prediction: str = "eps", learned_sigma: Optional[bool] = None, y_null=None,
           spacing: Optional[str] = None, sigmas=None, timesteps=None, sampler_options: Optional[dict] = None,
           model_kwargs: Optional[dict] = None, channels_last: Optional[bool] = None,
           memory_budget: Optional[float] = None, distributed: Optional[bool] = None,
           backend: Optional[str] = None, callback: Optional[Callable] = None, threads: Optional[int] = None,
           return_seeds: bool = False, decode: bool = False, **runtime_kwargs):
    """Draw ``shape[0]`` samples. Returns (N, C, ...) float32 on ``device``, or ``(samples, seeds)`` with
    ``return_seeds=True``.

    The model passed in is never changed (weights, dtype, device, memory format, train/eval mode,
    requires_grad): a call that needs it converted runs a cached converted copy (see the module docstring
    for what it costs; :func:`clear_cache` frees it). Every argument is checked before any work: a bad one
    raises ValueError or TypeError naming it.

    Args:
        denoiser_or_model: a :class:`fastdiff.Denoiser`, or a model called as ``model(x, timesteps, y=None)``
            (wrapped as ``Denoiser(model, schedule or VPSchedule("linear", 1000), prediction)``).
        shape: (N, C, ...) of the batch.
        sampler: a name in :data:`fastdiff.samplers.SAMPLERS`; steps: sampling steps (int >= 1).
        guidance_scale: classifier-free guidance weight w, a finite number in [0, 1000] (1: no guidance);
            w != 1 needs ``y`` and the null label ``y_null`` (default: the denoiser's or model's ``y_null``).
            None (the default): the Denoiser's ``default_guidance_scale`` when ``y`` is given and there is a
            null label (``fastdiff.load`` sets both: digits 2, DiT 4, U-ViT 1.4 / 1.7), else 1; for a step
            graph path under ``runtime="onnxruntime"``, the default stored in a guided graph. A number wins.
        y: class labels, one int or (N,), each in [0, number of label rows of the model) where the model
            says (its label table, or ``num_classes``); required by a class-conditional model.
        seeds: one int per sample, one int S (sample i gets S + i), or None (fresh seeds from torch's global
            generator, as diffusers without a generator: ``torch.manual_seed`` repeats them); each in
            [0, 2^63). diffusers' ``generator=`` has no place here: pass ``seeds``.
        device: "cpu", "cuda" or "cuda:i" (must exist); default CUDA when available, else CPU.
        dtype: the model's dtype (None: the policy above).
        progress: a tqdm bar over all rows of all chunks.
        batch_size: chunk size (None: ``CPU_BATCH_SIZE`` on CPU; on CUDA what fits ``memory_budget``).
        compile: ``torch.compile`` the model: True, a mode (``"max-autotune-no-cudagraphs"``, the mode to
            combine with ``cuda_graph``), or a dict of ``torch.compile`` keyword arguments.
        cuda_graph: capture the step in a CUDA graph (None: on for CUDA; ignored elsewhere).
        runtime: ``"torch"`` or ``"onnxruntime"`` (:func:`fastdiff.export.ort.sample_onnxruntime`, which also
            takes its own keywords ``providers``, ``frame``, ``x_T``, ``step_path``, ``return_table``; the
            torch-only arguments batch_size, compile, cuda_graph, model_kwargs, channels_last, memory_budget,
            distributed, backend, callback must keep their defaults there).
        schedule, prediction, learned_sigma: used when a bare model is given.
        spacing: the sigma spacing (``denoiser.sigmas(steps, spacing, shape)``), or explicit ``sigmas`` and
            ``timesteps``. None is the sampler's upstream default:

            ======================  =====================================================================
            ``ddpm``, ``ddim``      ``"leading"`` (diffusers' DDPMScheduler / DDIMScheduler, offset 0)
            ``unipc``               ``"linspace"`` (diffusers' UniPCMultistepScheduler: steps + 1 points
                                    from 0 to N - 1, the last dropped; unipc with ``"leading"`` or
                                    ``"trailing"`` also takes that scheduler's multistep layout)
            every other sampler     ``"karras"`` (Karras et al. 2022, rho = 7, as k-diffusion)
            ======================  =====================================================================

            A flow schedule lays out its own default (diffusers' FlowMatchEuler layout, with the dynamic
            shift set by the token count of ``shape``); a continuous schedule (no ``num_train_timesteps``)
            takes ``"uniform"`` where the table says an integer spacing.
        sampler_options: keyword options of the sampler builder (e.g. ``{"eta": 0.5}`` for DDIM).
        model_kwargs: extra keyword arguments of the model (a transformer's prompt embeddings). Tensors go to
            ``device``, floating ones in the run's ``dtype`` (copies: yours are left alone); tensors whose
            first dim is N are cut into chunks with x (and doubled under guidance), the other values are the
            same for every chunk. CUDA graphs take them: the batch-dim tensors through static buffers, the
            rest baked into the graph (a new value is a new capture).
        channels_last: None: on for convolutional models on CUDA, and on CPU in bf16 for models of at
            least ``CPU_CHANNELS_LAST_MIN_PARAMS`` parameters.
        memory_budget: bytes (a number > 0) for one chunk's activations on CUDA (None: 80% of the free
            memory).
        distributed: shard over an initialised process group (None: when one with > 1 rank exists).
        backend: the ops' backend word for the update ("auto" | "triton" | "reference").
        callback: called after each row as in :func:`fastdiff.samplers.sample_loop` (eager loop only).
        threads: CPU intra-op threads for the call (int >= 1; None: :func:`fastdiff.policy.cpu_threads`,
            the CLI's policy); torch's own setting is restored after the call. Used on the CPU only.
        return_seeds: also return the seeds (a list of ints), so that a ``seeds=None`` run can be repeated.
        decode: return images: a latent model's samples go through its VAE (:meth:`Denoiser.decode`, a
            Denoiser from ``fastdiff.load(..., vae=...)``); a pixel model's come back unchanged.
    """
    # ---- every argument, before any work ----
    check_choice("decode", decode, (True, False))
    if decode and not (isinstance(denoiser_or_model, Denoiser) and denoiser_or_model.can_decode()):
        raise ValueError("decode=True needs a Denoiser that is a pixel model or has a VAE: "
                         "fastdiff.load(..., vae=AutoencoderKL or its folder)")
    if not isinstance(runtime, str) or runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    check_extra_kwargs(runtime, runtime_kwargs, _sample_keywords(),
                       _ort_keywords() if runtime == "onnxruntime" else ())
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
    shape = check_shape(shape)
    n = shape[0]
    steps = check_int("steps", steps)
    guidance = None if guidance_scale is None else check_guidance(guidance_scale)  # None: resolved below
    batch_size = check_int("batch_size", batch_size, allow_none=True)
    threads = check_int("threads", threads, allow_none=True)
    memory_budget = check_memory_budget(memory_budget)
    dev = resolve_device(device)
    dtype = check_dtype(dtype) or default_dtype(dev)
    options = check_sampler_options(sampler, sampler_options)
    for name, value, allowed in (("cuda_graph", cuda_graph, (None, True, False)),
                                 ("distributed", distributed, (None, True, False)),
                                 ("channels_last", channels_last, (None, True, False)),
                                 ("return_seeds", return_seeds, (True, False))):
        check_choice(name, value, allowed)
    check_compile(compile)
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if spacing is not None and not isinstance(spacing, str):
        raise TypeError(f"spacing must be a spacing name or None, got {type(spacing).__name__}")
    if y_null is None:
        y_null = default_y_null(denoiser_or_model, getattr(denoiser_or_model, "model", None))

    if runtime == "onnxruntime":
        given = {"batch_size": batch_size, "compile": compile, "cuda_graph": cuda_graph,
                 "model_kwargs": model_kwargs, "channels_last": channels_last, "memory_budget": memory_budget,
                 "distributed": distributed, "backend": backend, "callback": callback}
        bad = sorted(k for k, v in given.items() if v is not _TORCH_ONLY[k] and v != _TORCH_ONLY[k])
        if bad:
            raise ValueError(f"runtime='onnxruntime' does not take {', '.join(f'{k}={given[k]!r}' for k in bad)} "
                             "(runtime='torch' arguments): leave them at their defaults")
        out, seed_list = _sample_onnxruntime(denoiser_or_model, shape, sampler, steps, guidance, y, seeds, dev,
                                             dtype, progress, schedule, prediction, learned_sigma, y_null, spacing,
                                             sigmas, timesteps, sampler_options, threads, runtime_kwargs)
        out = denoiser_or_model.decode(out) if decode else out
        return (out, seed_list) if return_seeds else out

    denoiser = _as_denoiser(denoiser_or_model, schedule, prediction, learned_sigma)
    if guidance is None:
        guidance = default_guidance(denoiser, y is not None, y_null)
    labels, y_null = check_conditioning(denoiser, y, n, y_null, guidance, model_kwargs)
    if channels_last is None:
        channels_last = use_channels_last(denoiser.model, dev, dtype, len(shape))
    use_graph = _graph_capable(dev) if cuda_graph is None else bool(cuda_graph)
    if use_graph and not _graph_capable(dev):
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
        sigmas, timesteps = _sampling_sigmas(denoiser, sampler, steps, spacing, shape)
    table = build_table(sampler, sigmas, schedule=denoiser.schedule, timesteps=timesteps, **options)
    ranks = dist_info(distributed)
    seed_list = resolve_seeds(seeds, n)

    with cpu_threads_for_call(threads) if dev.type == "cpu" else contextlib.nullcontext():
        out, seed_list = _sample_torch(
            denoiser, table, shape, dev, dtype, channels_last, compile, use_graph, guidance, labels, y_null,
            seed_list, seeds is None, batch_size, memory_budget, ranks, model_kwargs, backend, progress,
            callback)
    out = denoiser.decode(out) if decode else out
    return (out, seed_list) if return_seeds else out


def _graph_capable(device: torch.device) -> bool:
    """Whether ``device`` runs the CUDA-graph path."""
    return device.type == "cuda"


def _sample_onnxruntime(denoiser_or_model, shape, sampler, steps, guidance, y, seeds, dev, dtype, progress,
                        schedule, prediction, learned_sigma, y_null, spacing, sigmas, timesteps, sampler_options,
                        threads, runtime_kwargs):
    try:
        from fastdiff.export.ort import sample_onnxruntime
    except ImportError as e:  # the export package or onnxruntime missing
        raise ImportError("runtime='onnxruntime' needs fastdiff.export.ort and onnxruntime "
                          f"(pip install 'fastdiff[onnx]'): {e}") from e
    n = shape[0]
    if not isinstance(denoiser_or_model, (Denoiser, str, os.PathLike)):
        denoiser_or_model = _as_denoiser(denoiser_or_model, schedule, prediction, learned_sigma)
    labels = y
    if isinstance(denoiser_or_model, Denoiser):
        if guidance is None:
            guidance = default_guidance(denoiser_or_model, y is not None, y_null)
        labels, y_null = check_conditioning(denoiser_or_model, y, n, y_null, guidance, None)
        schedule = schedule or denoiser_or_model.schedule
    elif y is not None:
        labels = check_labels(y, n, None)
    seed_list = resolve_seeds(seeds, n)
    with cpu_threads_for_call(threads) if dev.type == "cpu" else contextlib.nullcontext():
        out = sample_onnxruntime(denoiser_or_model, shape, sampler=sampler, steps=steps, guidance_scale=guidance,
                                 y=labels, seeds=seed_list, device=dev, dtype=dtype, progress=progress,
                                 schedule=schedule, sigmas=sigmas, timesteps=timesteps, spacing=spacing,
                                 sampler_options=sampler_options, y_null=y_null, **runtime_kwargs)
    return out, seed_list


def _sample_torch(denoiser: Denoiser, table, shape, dev, dtype, channels_last, compile_mode, use_graph, guidance,
                  labels, y_null, seed_list, fresh_seeds, batch_size, memory_budget, ranks, model_kwargs,
                  backend, progress, callback):
    n, sample_shape = shape[0], shape[1:]
    # bf16 only: there the packed path gives ATen's bits, so a run equals the plain loop's bitwise in every dtype
    packed = (dev.type == "cpu" and dtype == torch.bfloat16 and isinstance(denoiser.model, nn.Module)
              and prepack.available())
    prep = model_cache.prepare(denoiser.model, dev, dtype, channels_last, eval=True,
                               private=bool(compile_mode) or use_graph or packed)
    if packed and "prepacked" not in prep.caches:  # the run copy's Conv2d / Linear on packed weights
        prepack.install(prep.model, dtype)  # a private copy: nothing to undo
        prep.caches["prepacked"] = True
    run = _run_denoiser(denoiser, prep, dtype, channels_last, compile_mode)
    frame = state_frame(denoiser.schedule)  # a flow run starts at sigma = inf: its own frame
    dtab, digest = _device_table(table, run, dev, frame)
    start_scale = denoiser.schedule.initial_scale(float(table.sigma[0]), frame)
    guided = guidance != 1.0
    labels = labels.to(dev) if labels is not None else None
    model_kwargs = _kwargs_on(model_kwargs, dev, dtype)
    kw_batch = batch_kwargs(model_kwargs, n)  # chunked with x; the rest is the same for every sample
    settings = (tuple(sample_shape), dtype, bool(channels_last), _compile_key(compile_mode) if compile_mode
                else None, guided, labels is not None, kwargs_key(model_kwargs, kw_batch, content=False))

    rank, world = ranks
    if world > 1 and fresh_seeds:
        seed_list = seeds_of_rank0(seed_list, dev)
    if batch_size is None:
        batch_size = _auto_batch_size(prep, run, sample_shape, dev, n, memory_budget, settings + (memory_budget,),
                                      use_graph, has_y=labels is not None, y_null=y_null, guidance=guidance,
                                      model_kwargs=model_kwargs, batch_keys=kw_batch)
        if world > 1:  # every rank must cut the batch the same way
            batch_size = min_over_ranks(batch_size, dev)
    chunks = [(c0, min(n, c0 + batch_size)) for c0 in range(0, n, batch_size)]
    mine = chunks[rank::world]
    graph_key = settings + (digest, guidance, _y_null_key(y_null), backend, kwargs_key(model_kwargs, kw_batch),
                            _denoiser_key(denoiser))

    local = torch.zeros((len(mine) * batch_size, *sample_shape), dtype=torch.float32, device=dev)
    bar = None
    if progress and mine:
        from tqdm.auto import tqdm

        bar = tqdm(total=table.num_rows * len(mine), disable=rank != 0)
    with torch.inference_mode() if denoiser.cond_fn is None else contextlib.nullcontext():
        for j, (c0, c1) in enumerate(mine):
            noise = NoiseStager(make_generators(seed_list[c0:c1]), sample_shape, dev)
            x = noise.draw() * start_scale
            yc = labels[c0:c1] if labels is not None else None
            mk = chunk_kwargs(model_kwargs, kw_batch, c0, c1)
            if use_graph:
                x = _run_graph(prep.caches, graph_key, run, dtab, x, yc, noise, y_null, guidance, mk, backend, bar,
                               batch_keys=kw_batch)
            else:
                x = sample_loop(run, x, dtab, y=yc, y_null=y_null, guidance_scale=guidance, model_kwargs=mk,
                                noise_fn=lambda k, r, stager=noise: stager.draw(), backend=backend, frame=frame,
                                callback=_progress_callback(bar, callback))
            local[j * batch_size: j * batch_size + (c1 - c0)].copy_(x)
    if bar is not None:
        bar.close()
    if world == 1:
        return local[:n], seed_list
    return gather_chunks(local, chunks, batch_size, world, sample_shape, dev), seed_list


def _y_null_key(y_null):
    if isinstance(y_null, Tensor):
        return ("tensor", tuple(y_null.shape), tuple(y_null.reshape(-1).tolist()))
    return y_null


def _kwargs_on(model_kwargs: Optional[dict], device: torch.device, dtype: torch.dtype) -> Optional[dict]:
    """The model keyword arguments as the run model takes them: tensors on ``device``, floating ones in the
    run's ``dtype`` (prompt embeddings made in float32 for a bf16 run, as x is cast); the caller's dict and
    tensors are left alone."""
    if not model_kwargs:
        return model_kwargs
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) if isinstance(v, Tensor)
            else v for k, v in model_kwargs.items()}


def _progress_callback(bar, callback):
    if bar is None and callback is None:
        return None

    def cb(info):
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(info)

    return cb


def _run_graph(graphs_cache: dict, key: tuple, run: Denoiser, dtab: DeviceTable, x: Tensor, y: Optional[Tensor],
               noise: NoiseStager, y_null, guidance_scale: float, model_kwargs, backend, bar=None, *,
               batch_keys: Optional[frozenset] = None) -> Tensor:
    """One chunk through the CUDA graph of its batch bucket: found in ``graphs_cache`` (the model's cache)
    under ``key`` + the bucket, else captured and kept there (at most ``MAX_GRAPHS_PER_MODEL``).
    ``batch_keys``: the model keyword arguments that carry the chunk's samples (default: the tensors whose
    first dim is the chunk's); ``key`` must hold the shapes of those and the values of the others."""
    k = x.shape[0]
    if batch_keys is None:
        batch_keys = batch_kwargs(model_kwargs, k)
    bucket = batch_bucket(k)
    graphs = graphs_cache.setdefault("graphs", OrderedDict())
    full_key = key + (bucket,)
    runner = graphs.get(full_key)
    if runner is None:
        static = StaticStep(run, dtab, bucket, x.shape[1:], x.device, y=y, y_null=y_null,
                            guidance_scale=guidance_scale, model_kwargs=model_kwargs, batch_keys=batch_keys,
                            backend=backend)
        static.load(x, y, model_kwargs)
        runner = CudaGraphRunner(static)
        graphs[full_key] = runner
        while len(graphs) > MAX_GRAPHS_PER_MODEL:
            graphs.popitem(last=False)
    else:
        graphs.move_to_end(full_key)
    static = runner.static
    static.load(x, y, model_kwargs)  # again: capturing ran the step on the buffers
    walk_rows(static, noise, k, runner.replay, bar)
    return static.x[:k].clone()
