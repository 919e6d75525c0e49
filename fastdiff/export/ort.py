"""ONNX Runtime as a fastdiff runtime: a model graph as a drop-in model, and the step graph's loop.

- :class:`OrtDenoiser` ``(path, providers=None)``: an exported model graph (:func:`fastdiff.export.to_onnx`)
  called like the zoo model it came from, ``model(x, timesteps, y=None)``, so ``fastdiff.Denoiser`` and
  ``fastdiff.sample`` drive it unchanged.
- :func:`sample_onnxruntime`: a whole sampling loop through a step graph
  (:func:`fastdiff.export.step_to_onnx`): one session run per table row (model, guidance and the fused
  update in one graph), nothing between runs but the per-sample noise. CPU: numpy buffers. CUDA
  (onnxruntime-gpu with a GPU): IO binding on torch tensors, so the state, the history and the table stay
  on the device; ORT and torch share one stream.

The noise is fastdiff's (:func:`fastdiff.samplers.make_generators`,
:func:`~fastdiff.samplers.randn_per_sample`: one CPU generator per seed), drawn in the same order as
:func:`fastdiff.samplers.sample_loop`, so ONNX Runtime and PyTorch give the same samples for the same seeds.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from fastdiff.export.onnx import read_metadata

__all__ = ["OrtDenoiser", "OrtStep", "default_providers", "sample_onnxruntime", "initial_state"]

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
              torch.int64: np.int64, torch.int32: np.int32}


def default_providers(device=None) -> list:
    """CUDA (then CPU) when onnxruntime-gpu sees a GPU and ``device`` is CUDA (or None), else CPU only."""
    import onnxruntime as ort

    want_cuda = device is None or torch.device(device).type == "cuda"
    if want_cuda and torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def graph_metadata(path, argument: str = "path") -> dict:
    """The fastdiff metadata of the ONNX file at ``path``, after checking that the file exists and parses:
    FileNotFoundError / ValueError naming ``argument`` and the path otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{argument} must be the path of an .onnx file, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{argument}: ONNX file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{argument}: {path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{argument}: ONNX file {path!r} is empty (0 bytes)")
    try:
        return read_metadata(path)
    except Exception as e:  # protobuf's DecodeError, bad JSON in the metadata
        raise ValueError(f"{argument}: {path!r} is not a readable ONNX graph (truncated or corrupt): "
                         f"{_first_line(e)}") from None


def _session(path, providers, device=None, stream: Optional[int] = None):
    """An InferenceSession; on CUDA, ``stream`` (a nonzero cudaStream_t of torch) becomes ORT's compute
    stream, so torch and ORT order their work on one stream without synchronising."""
    import onnxruntime as ort

    path = os.fspath(path)
    graph_metadata(path)  # a missing or corrupt file: the clear error
    providers = list(providers) if providers is not None else default_providers(device)
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    if "CUDAExecutionProvider" in names and torch.cuda.is_available():
        dev = torch.device(device) if device is not None else torch.device("cuda")
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        options = {"device_id": idx}
        if stream:  # ORT ignores stream 0 (torch's legacy default stream)
            options.update(has_user_compute_stream="1", user_compute_stream=str(stream))
        providers = [("CUDAExecutionProvider", options)
                     if n == "CUDAExecutionProvider" and not isinstance(p, tuple) else p
                     for p, n in zip(providers, names, strict=True)]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = ort.get_available_providers()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"providers: {unknown} are not available here; available: {available}")
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as e:  # a truncated graph or external-data file, an invalid model
        raise ValueError(f"path: ONNX Runtime cannot load {path!r} (truncated, corrupt, or its external data "
                         f"missing): {_first_line(e)}") from None


def _uses_cuda(session) -> bool:
    return session.get_providers()[0] == "CUDAExecutionProvider"


def _shares_stream(session) -> bool:
    options = session.get_provider_options().get("CUDAExecutionProvider", {})
    return options.get("has_user_compute_stream") == "1" or bool(int(options.get("user_compute_stream") or 0))


def _check_batch(meta: dict, n: int, what: str = "x") -> None:
    fixed = meta.get("batch")
    if fixed is not None and n != fixed:
        raise ValueError(f"this graph was exported with a fixed batch of {fixed} (dynamic_batch=False); "
                         f"{what} has batch {n}. Pass {fixed} samples, or re-export with dynamic_batch=True")


class _Bound:
    """Run a session on torch tensors: numpy on the CPU, IO binding on CUDA (no host copies)."""

    def __init__(self, session):
        self.session = session
        self.cuda = _uses_cuda(session)
        self.shared_stream = self.cuda and _shares_stream(session)
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.outputs = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict, out_shapes: dict, device) -> list:
        """``feeds`` name -> tensor; ``out_shapes`` name -> (shape, dtype); returns tensors on device."""
        if not self.cuda:
            arrays = {k: v.detach().to("cpu").contiguous().numpy() for k, v in feeds.items()}
            outs = self.session.run(self.outputs, arrays)
            return [torch.from_numpy(o).to(device) for o in outs]
        dev = torch.device(device)
        if dev.type != "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        binding = self.session.io_binding()
        keep = []
        for name, t in feeds.items():
            t = t.detach().to(dev).contiguous()
            keep.append(t)  # alive until the run has read it
            binding.bind_input(name, "cuda", idx, _NP_DTYPES[t.dtype], tuple(t.shape), t.data_ptr())
        outs = []
        for name in self.outputs:
            shape, dtype = out_shapes[name]
            o = torch.empty(shape, dtype=dtype, device=dev)
            binding.bind_output(name, "cuda", idx, _NP_DTYPES[dtype], tuple(shape), o.data_ptr())
            outs.append(o)
        if not self.shared_stream:  # ORT on its own stream: torch's writes must land first
            torch.cuda.current_stream(dev).synchronize()
        self.session.run_with_iobinding(binding)
        if not self.shared_stream:
            binding.synchronize_outputs()
        return [o.to(device) for o in outs]


class OrtDenoiser:
    """An exported model graph called like the model: ``model(x, timesteps, y=None) -> Tensor``.

    Args:
        path: a graph written by :func:`fastdiff.export.to_onnx`.
        providers: ONNX Runtime execution providers (default: CUDA where onnxruntime-gpu sees a GPU,
            else CPU).
    Attributes: ``metadata`` (the export's fastdiff metadata), ``num_classes``, ``y_null`` (the null label
    stored in the graph, used for classifier-free guidance), ``in_channels``,
    ``input_shape``, ``batch`` (None when the batch is dynamic), ``dtype`` (the graph's input dtype). Inputs
    may live on any device and have any float dtype; the output comes back on x's device in x's dtype.
    It is not an ``nn.Module``: engines skip ``.to()``, channels_last and torch.compile for it, and a CUDA
    graph cannot capture it. A fixed-batch graph given another batch raises ValueError before
    running.
    """

    def __init__(self, path, providers: Optional[Sequence] = None):
        self.metadata = graph_metadata(path)
        self.path = os.fspath(path)
        if self.metadata.get("kind", "model") != "model":
            raise ValueError(f"{self.path!r} is a {self.metadata.get('kind')!r} graph; OrtDenoiser takes "
                             "a model graph from fastdiff.export.to_onnx (step graphs go to "
                             "sample_onnxruntime)")
        self.session = _session(self.path, providers)
        self._runner = _Bound(self.session)
        names = [i.name for i in self.session.get_inputs()]
        self.conditional = "y" in names
        self.num_classes = self.metadata.get("num_classes")
        # the null label stored at export: fastdiff.sample and Denoiser read it off the model for guidance
        self.y_null = self.metadata.get("y_null") if self.conditional else None
        self.input_shape = tuple(self.metadata.get("input_shape") or self.session.get_inputs()[0].shape[1:])
        self.in_channels = self.input_shape[0]
        self.batch = self.metadata.get("batch")
        self.dtype = getattr(torch, self.metadata.get("dtype", "float32"))  # the graph's input dtype
        self.num_labels = _label_rows(self.metadata) if self.conditional else None
        self.training = False

    def __repr__(self) -> str:
        return (f"OrtDenoiser({self.path!r}, model={self.metadata.get('model')}, "
                f"providers={self.session.get_providers()})")

    # what code written for nn.Module touches
    def eval(self) -> "OrtDenoiser":
        return self

    def to(self, *args, **kwargs) -> "OrtDenoiser":
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "OrtDenoiser":
        return self

    def parameters(self):
        return iter(())

    def _out_shape(self, x: Tensor) -> tuple:
        shape = self.session.get_outputs()[0].shape
        dims = [x.shape[0]] + [d if isinstance(d, int) else x.shape[i + 1] for i, d in enumerate(shape[1:])]
        return tuple(dims)

    def __call__(self, x: Tensor, timesteps, y: Optional[Tensor] = None, **kwargs) -> Tensor:
        if kwargs:
            raise ValueError(f"OrtDenoiser takes (x, timesteps, y=None); got extra arguments "
                             f"{sorted(kwargs)}")
        if not isinstance(x, Tensor) or x.dim() != len(self.input_shape) + 1:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor (N, {', '.join(map(str, self.input_shape))}), got {got}")
        if tuple(x.shape[1:]) != self.input_shape:
            want = ", ".join(map(str, self.input_shape))
            raise ValueError(f"x must have shape (N, {want}), got {tuple(x.shape)}")
        n = x.shape[0]
        _check_batch(self.metadata, n)
        if n == 0:
            return x.new_empty(self._out_shape(x))
        t = torch.as_tensor(timesteps, device=x.device)
        t = (t.reshape(1).expand(n) if t.numel() == 1 else t).to(torch.float32)
        if tuple(t.shape) != (n,):
            raise ValueError(f"timesteps must be a scalar or have shape (N,) = ({n},), got {tuple(t.shape)}")
        feeds = {"x": x.to(self.dtype), "timesteps": t}  # the engine may hand bf16; the graph has its own
        if self.conditional:
            if y is None:
                raise ValueError("this graph is class-conditional: pass y, (N,) integer labels")
            feeds["y"] = _labels(y, n, x.device, self.metadata)
        elif y is not None:
            raise ValueError("this graph is unconditional: y must be None")
        shapes = {self._runner.outputs[0]: (self._out_shape(x), self.dtype)}
        out = self._runner.run(feeds, shapes, x.device)[0]
        return out.to(x.dtype)


class OrtStep:
    """A step graph (:func:`fastdiff.export.step_to_onnx`) as ``step(x, timestep, c_in, coef, history, noise,
    y=None, guidance_scale=None) -> (x_next, history_next)`` on torch tensors."""

    def __init__(self, path, providers: Optional[Sequence] = None, device=None, stream: Optional[int] = None):
        self.metadata = graph_metadata(path)
        self.path = os.fspath(path)
        if self.metadata.get("kind") != "step":
            raise ValueError(f"{self.path!r} is not a step graph from fastdiff.export.step_to_onnx")
        self.session = _session(self.path, providers, device, stream)
        self._runner = _Bound(self.session)
        self.names = [i.name for i in self.session.get_inputs()]
        self.cuda = self._runner.cuda

    def __call__(self, x, timestep, c_in, coef, history, noise, y=None, guidance_scale=None):
        _check_batch(self.metadata, x.shape[0])
        feeds = {"x": x, "timestep": timestep, "c_in": c_in, "coef": coef, "history": history, "noise": noise}
        if "y" in self.names:
            if y is None:
                raise ValueError("this step graph is class-conditional: pass y, (N,) integer labels")
            feeds["y"] = y
        if "guidance_scale" in self.names:
            feeds["guidance_scale"] = guidance_scale
        shapes = {"x_next": (tuple(x.shape), x.dtype), "history_next": (tuple(history.shape), history.dtype)}
        return self._runner.run(feeds, shapes, x.device)


def initial_state(schedule, sigma_max: float, noise: Tensor, frame: str = "sigma") -> Tensor:
    """The loop's starting state from standard normal ``noise``, as ``fastdiff.sample`` starts:
    ``noise * schedule.initial_scale(sigma_max, frame)`` (``sqrt(1 + sigma_max^2) noise`` in the sigma view of
    a VP schedule, ``sigma_max noise`` for VE, ``noise`` itself in a VP or flow model frame; a flow run from
    sigma = inf needs the flow frame)."""
    return noise * float(schedule.initial_scale(float(sigma_max), frame))


def _schedule_from_metadata(meta: dict):
    """The schedule stored by ``fastdiff.export.onnx._schedule_metadata``, or None."""
    from fastdiff import schedules

    sched = meta.get("schedule")
    if not sched:
        return None
    if sched.get("type") == "VPSchedule":
        return schedules.VPSchedule(alphas_cumprod=np.asarray(sched["alphas_cumprod"], dtype=np.float64))
    if sched.get("type") in ("VPSDESchedule", "VESDESchedule", "FlowSchedule"):
        return getattr(schedules, sched["type"])(**{k: v for k, v in sched.items() if k != "type"})
    return None


class _MetaDenoiser:
    """What the loop needs of a denoiser (x0 coefficients, schedule, sampling sigmas for a shape, default
    guidance) rebuilt from a step graph's metadata."""

    def __init__(self, meta: dict, schedule):
        from fastdiff.denoiser import Denoiser

        self._d = Denoiser(lambda *a, **k: None, schedule, prediction=meta.get("prediction", "eps"),
                           learned_sigma=bool(meta.get("learned_sigma", False)), patch_size=meta.get("patch_size"))
        self.schedule = schedule
        self.y_null = meta.get("y_null") if meta.get("guided") else None  # guidance only in a guided graph
        self.default_guidance_scale = float(meta.get("default_guidance_scale") or 1.0)

    def x0_coefficients(self, sigma):
        return self._d.x0_coefficients(sigma)

    def sigmas(self, steps: int, spacing: Optional[str] = None, shape=None):
        return self._d.sigmas(steps, spacing=spacing, shape=shape)


def _label_rows(meta: dict) -> Optional[int]:
    """How many labels a graph's label table takes (the null label included), from its metadata."""
    if meta.get("num_labels") is not None:
        return int(meta["num_labels"])
    counts = [int(meta["num_classes"])] if meta.get("num_classes") is not None else []
    if meta.get("y_null") is not None:
        counts.append(int(meta["y_null"]) + 1)
    return max(counts) if counts else None


def _labels(y, n: int, device, meta: Optional[dict] = None) -> Optional[Tensor]:
    """``y`` (an int or (N,) integer labels) as an int64 (N,) tensor, checked against the graph's label
    table (an index outside it fails inside ONNX Runtime's Gather, or reads garbage on a GPU)."""
    from fastdiff.models.common import check_labels

    if y is None:
        return None
    if isinstance(y, bool) or isinstance(y, float):
        raise ValueError(f"y must be an int or an integer tensor of shape ({n},), got {y!r}")
    try:
        yt = torch.as_tensor(y, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"y must be an int or an integer tensor of shape ({n},), got {type(y).__name__}") from None
    if yt.dim() == 0 or (yt.dim() == 1 and yt.numel() == 1):  # one label for every sample
        yt = yt.reshape(1).expand(n)
    rows = _label_rows(meta or {})
    null = (meta or {}).get("y_null")
    return check_labels(yt, n, rows if rows is not None else 2 ** 62, "y", null_label=null).contiguous()


_EXPORTS: dict = {}  # (ids, weights' versions, options) -> (weakrefs to denoiser and model, step graph path)
_EXPORT_DIR: Optional[tempfile.TemporaryDirectory] = None


def _weights_key(model) -> tuple:
    """Changes when a parameter or buffer is replaced or written in place (tensor version counters)."""
    tensors = list(model.parameters()) + list(model.buffers()) if hasattr(model, "parameters") else []
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _cached_step_graph(denoiser, sampler, *, guided: bool, y_null, sampler_options, frame,
                       input_shape) -> str:
    """Export the step graph of ``denoiser`` once per process and set of options (a temporary file).

    A cached graph is reused only for the same (still living) denoiser and model objects whose weights
    have not been replaced or written since (tensor version counters) and whose baked-in options match.
    """
    global _EXPORT_DIR
    import weakref

    from fastdiff.export.onnx import step_to_onnx

    options = tuple(sorted((sampler_options or {}).items()))
    key = (id(denoiser), id(denoiser.model), _weights_key(denoiser.model), denoiser.learned_sigma,
           denoiser.clip_x0, sampler, guided, y_null, repr(options), frame, tuple(input_shape))
    hit = _EXPORTS.get(key)
    if hit is not None and hit[0]() is denoiser and hit[1]() is denoiser.model and os.path.exists(hit[2]):
        return hit[2]
    if _EXPORT_DIR is None:
        _EXPORT_DIR = tempfile.TemporaryDirectory(prefix="fastdiff_onnx_")
    path = os.path.join(_EXPORT_DIR.name, f"step_{len(_EXPORTS)}.onnx")
    step_to_onnx(denoiser, sampler, path, guidance=guided, y_null=y_null, sampler_options=sampler_options,
                 frame=frame, input_shape=input_shape)
    _EXPORTS[key] = (weakref.ref(denoiser), weakref.ref(denoiser.model), path)
    return path


_STEP_SESSIONS: dict = {}  # (file, its mtime and size, providers, device) -> (OrtStep, stream or None)
_MAX_STEP_SESSIONS = 4


def _cached_step_session(path, providers, out_device: torch.device):
    """One :class:`OrtStep` (and on CUDA the torch stream it shares) per step-graph file, providers and
    device, so repeated ``sample`` calls skip session creation (graph optimisation: 0.3 to 1 s for the
    36M-parameter DDPM-CIFAR10 U-Net on 2 CPU cores). A rewritten file gets a new session."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        return OrtStep(path, providers), None  # raises the clear error
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size, repr(providers), str(out_device))
    hit = _STEP_SESSIONS.pop(key, None)  # re-inserted below: the dict's order is least recently used first
    if hit is None:
        stream = None
        if out_device.type == "cuda" and torch.cuda.is_available():
            stream = torch.cuda.Stream(out_device)  # nonzero: ORT accepts it as its compute stream
        hit = (OrtStep(path, providers, device=out_device if stream is not None else None,
                       stream=stream.cuda_stream if stream is not None else None), stream)
        while len(_STEP_SESSIONS) >= _MAX_STEP_SESSIONS:
            _STEP_SESSIONS.pop(next(iter(_STEP_SESSIONS)))
    _STEP_SESSIONS[key] = hit
    return hit


def sample_onnxruntime(denoiser_or_path, shape: Sequence[int], sampler: str = "dpmpp_2m", steps: int = 20,
                       guidance_scale: Optional[float] = None, y=None, seeds: Optional[Sequence[int]] = None,
                       device=None, dtype=None, progress: bool = False, *,
                       providers: Optional[Sequence] = None, schedule=None, sigmas=None, timesteps=None,
                       spacing: Optional[str] = None, sampler_options: Optional[dict] = None,
                       frame: Optional[str] = None,
                       y_null: Optional[int] = None,
                       x_T: Optional[Tensor] = None, step_path=None, return_table: bool = False,
                       **kwargs) -> Tensor:
    """Sample through an ONNX step graph: one session run per table row. Returns (N, C, ...) float32 on
    ``device`` (default CPU).

    Args:
        denoiser_or_path: a fastdiff Denoiser (its step graph is exported once per process and set of
            options to a temporary file, or to ``step_path``), or the path of a step graph from
            :func:`fastdiff.export.step_to_onnx`.
        shape: (N, C, ...) of the batch.
        sampler, steps, guidance_scale, y, seeds: as ``fastdiff.sample``; ``seeds`` one per sample (default
            0..N-1); ``y`` (N,) labels or one int. ``guidance_scale != 1`` needs a guided graph; None is the
            denoiser's (or a guided graph's stored) ``default_guidance_scale`` when ``y`` is given, else 1.
        device: where the samples come back; a CUDA device runs the CUDA provider with IO binding (when
            onnxruntime-gpu sees a GPU), on a torch stream that ORT shares.
        dtype: accepted for ``fastdiff.sample``'s signature; the graph computes in float32.
        progress: a tqdm bar over the rows.
        providers: ONNX Runtime providers (default: :func:`default_providers`).
        schedule: the schedule, when a path is given and its metadata holds none (VPSchedule is stored).
        spacing: the sigma spacing; None is the sampler's default, laid out as ``fastdiff.sample`` lays it
            out (:func:`fastdiff.engine.default_spacing`; a dynamically shifted flow schedule takes its shift
            from the token count of ``shape``).
        sigmas, timesteps: explicit sampling sigmas (steps + 1,) and model timesteps, instead of ``spacing``.
        sampler_options: keyword options of the sampler builder (default: those stored in the graph).
        frame: "sigma", "vp" or "flow", the frame of the state (must match the graph's). None: for a
            Denoiser the frame ``fastdiff.sample`` uses (:func:`fastdiff.samplers.state_frame`: the flow
            frame for a flow schedule, else the sigma view); for a path the graph's.
        y_null: the null label for guidance (default: the model's, see
            ``fastdiff.export.onnx.default_y_null``).
        x_T: the starting state (N, C, ...) instead of :func:`initial_state` from the seeds' first draw.
        return_table: return ``(samples, DeviceTable)`` (for callers that compare with the PyTorch loop).
    Keyword arguments of ``fastdiff.sample`` that do not apply here (``batch_size``, ``compile``,
    ``cuda_graph``, ``channels_last``, ``memory_budget``, ``distributed``, ``backend``, ``prediction``,
    ``learned_sigma``, ``runtime``) are accepted and ignored; ``callback`` and ``model_kwargs`` are
    refused when given; any other keyword raises TypeError naming it (with the closest known name).
    """
    from fastdiff.denoiser import Denoiser
    from fastdiff.engine_args import check_guidance, default_guidance
    from fastdiff.export.onnx import step_to_onnx
    from fastdiff.samplers import state_frame

    _check_runtime_kwargs(kwargs)

    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or any(s < 0 for s in shape):
        raise ValueError(f"shape must be (N, C, ...) with non-negative sizes, got {shape}")
    out_device = torch.device(device) if device is not None else torch.device("cpu")
    if guidance_scale is not None:
        guidance_scale = check_guidance(guidance_scale)
    if isinstance(denoiser_or_path, Denoiser):
        denoiser = denoiser_or_path
        if guidance_scale is None:
            guidance_scale = default_guidance(denoiser, y is not None, y_null)
        guided = guidance_scale != 1.0
        frame = state_frame(denoiser.schedule) if frame is None else frame
        if step_path is not None:
            path = step_to_onnx(denoiser, sampler, step_path, guidance=guided, y_null=y_null,
                                sampler_options=sampler_options, frame=frame, input_shape=shape[1:])
        else:
            path = _cached_step_graph(denoiser, sampler, guided=guided, y_null=y_null,
                                      sampler_options=sampler_options, frame=frame, input_shape=shape[1:])
        schedule, coef_source = denoiser.schedule, denoiser
    elif isinstance(denoiser_or_path, (str, os.PathLike)):
        path = os.fspath(denoiser_or_path)
        meta = graph_metadata(path, "denoiser_or_path")
        if meta.get("kind") == "model":
            raise ValueError(f"{path!r} is a model graph: wrap it as Denoiser(OrtDenoiser(path), schedule) "
                             "and use fastdiff.sample, or export a step graph with "
                             "fastdiff.export.step_to_onnx")
        schedule = schedule or _schedule_from_metadata(meta)
        if schedule is None:
            raise ValueError("this step graph stores no schedule: pass schedule=")
        coef_source = _MetaDenoiser(meta, schedule)
        if guidance_scale is None:
            guidance_scale = default_guidance(coef_source, y is not None)
        frame = meta.get("frame", "sigma") if frame is None else frame
    else:
        raise ValueError(f"denoiser_or_path must be a fastdiff Denoiser or a path to a step graph, got "
                         f"{type(denoiser_or_path).__name__}")
    step, stream = _cached_step_session(path, providers, out_device)
    if stream is None:
        return _loop(step, coef_source, schedule, shape, sampler, steps, guidance_scale, y, seeds, progress,
                     torch.device("cpu"), out_device, sigmas, timesteps, spacing, sampler_options, frame, x_T,
                     return_table)
    stream.wait_stream(torch.cuda.current_stream(out_device))
    run_device = out_device if step.cuda else torch.device("cpu")
    with torch.cuda.stream(stream):
        result = _loop(step, coef_source, schedule, shape, sampler, steps, guidance_scale, y, seeds, progress,
                       run_device, out_device, sigmas, timesteps, spacing, sampler_options, frame, x_T,
                       return_table)
    caller = torch.cuda.current_stream(out_device)
    caller.wait_stream(stream)
    samples = result[0] if return_table else result
    samples.record_stream(caller)  # allocated on our stream, read on the caller's
    return result


# fastdiff.sample's keywords that mean nothing to a step graph run by ONNX Runtime
_SAMPLE_ONLY = ("batch_size", "compile", "cuda_graph", "channels_last", "memory_budget", "distributed", "backend",
                "prediction", "learned_sigma", "runtime")


def _check_runtime_kwargs(kwargs: dict) -> None:
    import inspect

    from fastdiff.engine_args import did_you_mean

    for key in ("callback", "model_kwargs"):
        if kwargs.get(key):
            raise ValueError(f"{key} is not supported with the ONNX Runtime runtime (the step graph runs whole "
                             "steps); use runtime='torch'")
    unknown = sorted(k for k in kwargs if k not in _SAMPLE_ONLY + ("callback", "model_kwargs"))
    if unknown:
        known = [p for p in inspect.signature(sample_onnxruntime).parameters if p != "kwargs"]
        known += list(_SAMPLE_ONLY)
        raise TypeError(f"sample_onnxruntime() got an unexpected keyword argument {unknown[0]!r}"
                        f"{did_you_mean(unknown[0], known)}"
                        + (f"; also {unknown[1:]}" if len(unknown) > 1 else ""))


def _loop(step: OrtStep, coef_source, schedule, shape, sampler, steps, guidance_scale, y, seeds, progress,
          run_device, out_device, sigmas, timesteps, spacing, sampler_options, frame, x_T, return_table):
    """The row loop of :func:`sample_onnxruntime`: the same draws, in the same order, as sample_loop."""
    from fastdiff.samplers import build_table, make_generators, randn_per_sample, to_device

    n = shape[0]
    meta = step.metadata
    if meta.get("sampler") != sampler:
        raise ValueError(f"the step graph was exported for sampler {meta.get('sampler')!r}, not {sampler!r}")
    if meta.get("frame", "sigma") != frame:
        raise ValueError(f"the step graph was exported for frame {meta.get('frame')!r}, not {frame!r}")
    if float(guidance_scale) != 1.0 and not meta.get("guided"):
        raise ValueError("guidance_scale != 1 needs a step graph exported with guidance (step_to_onnx(..., "
                         "guidance=True))")
    in_shape = tuple(meta.get("input_shape") or ())
    if in_shape and tuple(shape[1:]) != in_shape:
        raise ValueError(f"shape must be (N, {', '.join(map(str, in_shape))}) for this graph, got {shape}")
    _check_batch(meta, n, what="shape")
    if sigmas is None:  # the layout fastdiff.sample's PyTorch runtime uses
        from fastdiff.engine import _sampling_sigmas

        sigmas, timesteps = _sampling_sigmas(coef_source, sampler, int(steps), spacing, shape)
    options = sampler_options if sampler_options is not None else dict(meta.get("sampler_options") or {})
    table = build_table(sampler, sigmas, schedule=schedule, timesteps=timesteps, **options)
    if table.num_slots != meta.get("num_slots"):
        raise ValueError(f"the table has {table.num_slots} history slots but the graph "
                         f"{meta.get('num_slots')}: pass the sampler_options the graph was exported with")
    if bool(table.learned_range) != bool(meta.get("learned_range")):
        raise ValueError("the table's learned-range variance does not match the graph's: pass the "
                         "sampler_options the graph was exported with")
    dtab = to_device(table, coef_source, run_device, dtype=torch.float32, frame=frame)
    coef = dtab.coef.to(torch.float32).contiguous()
    c_in = dtab.c_in.to(torch.float32).contiguous()
    tsteps = dtab.timestep.to(torch.float32).contiguous()
    seeds = list(range(n)) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"seeds must hold one seed per sample ({n}), got {len(seeds)}")
    gens = make_generators(seeds)
    if x_T is None:
        x = initial_state(schedule, float(table.sigma[0]), randn_per_sample(gens, shape[1:]), frame)
    else:
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
        x = x_T
    x = x.to(run_device, torch.float32).contiguous()
    labels = _labels(y, n, run_device, meta)
    if "y" in step.names and labels is None:
        raise ValueError("this model is class-conditional: pass y")
    if "y" not in step.names and labels is not None:
        raise ValueError("this model is unconditional: y must be None")
    if n > 0:
        w = torch.tensor(float(guidance_scale), dtype=torch.float32, device=run_device)
        history = torch.zeros((table.num_slots, *shape), dtype=torch.float32, device=run_device)
        zeros = torch.zeros(shape, dtype=torch.float32, device=run_device)
        rows = range(table.num_rows)
        if progress:
            from tqdm.auto import tqdm

            rows = tqdm(rows, total=table.num_rows)
        for r in rows:
            noise = zeros
            if table.needs_noise[r]:
                noise = randn_per_sample(gens, shape[1:], device=run_device, dtype=torch.float32)
            x, history = step(x, tsteps[r], c_in[r], coef[r], history, noise, labels, w)
    x = x.to(out_device)
    return (x, dtab) if return_table else x
