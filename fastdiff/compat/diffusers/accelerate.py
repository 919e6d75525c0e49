"""``fastdiff.accelerate(pipe)``: a diffusers pipeline (or a bare diffusers model) accelerated in place, with a
report of what changed and an exact undo.

    import fastdiff
    report = fastdiff.accelerate(pipe)          # pipe: StableDiffusionPipeline, DDPMPipeline, ... or a model
    image = pipe(prompt).images[0]              # diffusers' own loop, now on fastdiff's ops
    print(report)                               # what was patched, what was left alone and why
    report.undo()                               # the pipeline as it was, bitwise

What it does, in order (nothing is changed when ``strict=True`` finds a reason to raise):

1. **dtype and layout** (:mod:`fastdiff.policy`, the engine's policy): every torch component is converted to
   ``dtype`` (default: the policy's choice for the denoiser's device when the model is float32, else the model's
   own dtype) and the convolutional ones to channels_last where the policy says it pays. The original tensors
   of a dtype conversion are kept for :meth:`AccelerateReport.undo` (on the CPU when the model is on CUDA); a
   layout-only change keeps nothing (undo copies the values back into the original strides).
2. **patches** (:mod:`patches_unet`, :mod:`patches_vae`; for diffusion transformers :mod:`patches_transformer`
   (the adaLN norms), :mod:`patches_dit` (DiT, PixArt), :mod:`patches_mmdit` (SD3, SD3.5), :mod:`patches_flux`;
   on the CPU in bf16 :mod:`patches_activations`, GELU as the packed Linear's post-op):
   each module of a patched class whose structure and code match what its patch was checked against gets the
   fused forward; every other one is listed in ``report.skipped`` with the reason.
   On the CPU every plain ``nn.Conv2d`` (bf16 or float32) and ``nn.Linear`` (bf16) also
   runs on oneDNN-packed weights (:mod:`fastdiff.prepack`; listed under ``Conv2d`` / ``Linear``): packed
   once at the first call, repacked when a weight changes through a tracked write. Weights changed in place
   through ``p.data`` (some LoRA merges) are not seen: fuse LoRA weights before ``accelerate``, or ``undo()``
   and accelerate again. Under ``compile`` each packed call is one opaque op inductor fuses around.
3. **scheduler**: the pipeline's scheduler is replaced by the fastdiff drop-in of the same class name built
   ``from_config`` (:mod:`fastdiff.compat.diffusers`), when there is one and it accepts the config.
4. **the denoiser's forward** (``pipe.unet`` / ``pipe.transformer``, or a bare model with a ``timestep``
   argument): on CUDA replayed from CUDA graphs per input-shape bucket (:mod:`cuda_graph`), optionally
   compiled; when step 1 changed a model's dtype, its entry points cast floating inputs to the model's dtype and
   floating outputs back (so a caller's float32 code keeps working with a bf16 model).

Every change is made on the caller's objects by instance (an instance ``forward``, an attention processor, a
parameter's ``.data``, the pipeline's ``scheduler``): module classes, the module tree and ``state_dict`` keys
stay as they were, and ``undo()`` reverses each change in the opposite order.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from fastdiff import prepack
from fastdiff.policy import as_dtype, cpu_threads, default_dtype, module_device, module_dtype, use_channels_last

__all__ = ["accelerate", "AccelerateReport", "AccelerateError"]

COMPILE_CHOICES = (False, True, "full", "regional")
# compile=True compiles repeated blocks alone ("regional": one compiled graph reused by every instance, a short
# warm-up) when they hold at least this share of the denoiser's parameters; else the whole forward ("full").
REGIONAL_MIN_SHARE = 0.8
# Step counts the scheduler drop-in is tried with before it replaces diffusers' (a config it does not support
# raises at construction, set_timesteps or the first step's table).
SCHEDULER_PROBE_STEPS = (4, 20, 50)

_ACTIVE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # accelerated object -> its report


class AccelerateError(ValueError):
    """``strict=True`` found modules that cannot be patched (the message lists them); nothing was changed."""


@dataclass
class AccelerateReport:
    """What :func:`accelerate` changed.

    Attributes:
        patched: ``{class replaced: [module paths]}``; paths are prefixed by the pipeline component
            ("unet.down_blocks.0.resnets.0"); a bare model's own path is "".
        skipped: ``[(module path, reason)]`` for every module a patch was about but left alone, the scheduler
            when it was not swapped, and CUDA-graph captures that failed at run time.
        dtype: the dtype the models run in.
        channels_last: whether the denoiser (or the bare model) runs channels_last.
        converted: ``{component: "float32 -> bfloat16, channels_last"}`` for each component converted.
        memory_kept: bytes of original tensors kept for :meth:`undo` (dtype conversions only).
        cuda_graph: paths whose forward replays CUDA graphs.
        compiled: ``{path: "full" | "regional"}``.
        threads: the CPU thread count set (None: left as it was).
    """

    patched: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    converted: dict = field(default_factory=dict)
    memory_kept: int = 0
    cuda_graph: list = field(default_factory=list)
    compiled: dict = field(default_factory=dict)
    threads: Optional[int] = None
    _undo: list = field(default_factory=list, repr=False)
    _targets: list = field(default_factory=list, repr=False)

    @property
    def undone(self) -> bool:
        return not self._targets

    def undo(self) -> None:
        """Restore the original modules, processors, weights, scheduler and settings (a second call does
        nothing). Call it before moving or converting the pipeline yourself."""
        while self._undo:
            self._undo.pop()()
        while self._targets:
            _ACTIVE.pop(self._targets.pop(), None)

    def __str__(self) -> str:
        lines = [f"fastdiff.accelerate: dtype {str(self.dtype).replace('torch.', '')}, "
                 f"channels_last {self.channels_last}, memory kept for undo {self.memory_kept / 2**20:.1f} MiB"]
        lines += [f"  converted {k or '<model>'}: {v}" for k, v in self.converted.items()]
        lines += [f"  patched {name}: {len(paths)}" for name, paths in self.patched.items()]
        if self.cuda_graph:
            lines.append(f"  CUDA graphs: {', '.join(p or '<model>' for p in self.cuda_graph)}")
        lines += [f"  compiled {p or '<model>'}: {how}" for p, how in self.compiled.items()]
        reasons: dict = {}
        for path, why in self.skipped:
            reasons.setdefault(why, []).append(path or "<model>")
        for why, paths in reasons.items():
            where = paths[0] if len(paths) == 1 else f"{len(paths)} modules ({paths[0]}, ...)"
            lines.append(f"  skipped {where}: {why}")
        return "\n".join(lines)


def _patches(cpu_packed: bool = False) -> tuple:
    """Every patch; with ``cpu_packed`` (a CPU run on packed weights) also the activation patches that fuse
    into the packed Linear."""
    from fastdiff.compat.diffusers.patches_activations import ACTIVATION_PATCHES
    from fastdiff.compat.diffusers.patches_transformer import transformer_patches
    from fastdiff.compat.diffusers.patches_unet import UNET_PATCHES
    from fastdiff.compat.diffusers.patches_vae import VAE_PATCHES

    return UNET_PATCHES + VAE_PATCHES + transformer_patches() + (ACTIVATION_PATCHES if cpu_packed else ())


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_denoiser(model) -> bool:
    import inspect

    return isinstance(model, nn.Module) and "timestep" in inspect.signature(model.forward).parameters


def _components(obj) -> tuple[list, Optional[nn.Module], Optional[str]]:
    """([(name, module)], the denoiser, its name) of a pipeline or a bare model."""
    from diffusers import DiffusionPipeline

    if isinstance(obj, DiffusionPipeline):
        comps = [(name, m) for name, m in obj.components.items() if isinstance(m, nn.Module)]
        for name in ("unet", "transformer"):
            m = getattr(obj, name, None)
            if _is_denoiser(m):
                return comps, m, name
        return comps, None, None
    if isinstance(obj, nn.Module):
        return [("", obj)], (obj if _is_denoiser(obj) else None), ""
    raise ValueError(f"obj must be a diffusers DiffusionPipeline or a torch.nn.Module, got {type(obj).__name__}")


def _check_args(dtype, channels_last, cuda_graph, compile, scheduler, strict, threads) -> Optional[torch.dtype]:
    dtype = as_dtype(dtype)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    for name, value in (("channels_last", channels_last), ("cuda_graph", cuda_graph)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be None, True or False, got {value!r}")
    for name, value in (("scheduler", scheduler), ("strict", strict)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if not (isinstance(compile, bool) or (isinstance(compile, str) and compile in COMPILE_CHOICES)):
        raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {compile!r}")
    if threads is not None:
        cpu_threads(threads)  # raises on a bad value
    return dtype


# ---------------------------------------------------------------------------------------------
# Planning: what each patch would do (no change is made here)
# ---------------------------------------------------------------------------------------------


def _plan_patches(components: list, patches: tuple) -> tuple[list, list]:
    """Each module's applicable patches, and one skip entry per module no patch applies to (the reasons of every
    patch about it). Patches about one class may be alternatives (one per attention processor): a module some
    patch applies to is not reported by the others."""
    plan, skipped, seen = [], [], set()
    for comp_name, comp in components:
        for path, module in comp.named_modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            applies, reasons = [], []
            for patch in patches:
                if not patch.matches(module):
                    continue
                reason = patch.check(module)
                if reason is None:
                    applies.append((patch, module, _join(comp_name, path)))
                else:
                    reasons.append(f"{patch.name}: {reason}")
            plan += applies
            if reasons and not applies:
                skipped.append((_join(comp_name, path), "; ".join(reasons)))
    return plan, skipped


def _plan_scheduler(pipe) -> tuple[Optional[object], Optional[tuple]]:
    """(the fastdiff drop-in built from the pipeline's scheduler config, None) or (None, (path, reason))."""
    import fastdiff.compat.diffusers as fdd

    current = getattr(pipe, "scheduler", None)
    if current is None:
        return None, None
    name = type(current).__name__
    if type(current).__module__.startswith("fastdiff."):
        return None, ("scheduler", f"already fastdiff's {name}")
    cls = getattr(fdd, name, None)
    if not (isinstance(cls, type) and cls.__module__.startswith("fastdiff.") and hasattr(cls, "from_config")):
        return None, ("scheduler", f"no fastdiff drop-in for {name} yet; the pipeline keeps diffusers' scheduler")
    try:
        with torch.random.fork_rng(devices=[]):  # a stochastic probe step must not move the caller's RNG
            for steps in SCHEDULER_PROBE_STEPS:  # options the drop-in does not support raise here
                probe = cls.from_config(current.config)
                probe.set_timesteps(steps)
                sample = torch.zeros(1, 1, 1, 1)
                probe.step(sample, probe.timesteps[0], sample)  # builds the run's table
        return cls.from_config(current.config), None
    except (NotImplementedError, ValueError, TypeError) as e:
        return None, ("scheduler", f"fastdiff's {name} does not take this config: {e}")


# ---------------------------------------------------------------------------------------------
# Applying: each step returns its undo
# ---------------------------------------------------------------------------------------------


def _convert(module: nn.Module, dtype: Optional[torch.dtype], channels_last: bool) -> tuple[Callable, int]:
    """Convert floating parameters and buffers to ``dtype`` and 4-D ones to channels_last, in place (a
    parameter keeps its identity: its ``.data`` is replaced). Returns (undo, bytes kept for the undo).

    A dtype change is lossy, so the original tensor is kept (moved to the CPU when it is on CUDA: GPU memory is
    what the conversion is for); a layout-only change keeps only the strides (undo copies the exact values
    back into them)."""
    restore, kept, done = [], 0, set()
    for m in module.modules():
        for store in (m._parameters, m._buffers):
            for name, t in list(store.items()):
                if t is None or id(t) in done:
                    continue
                done.add(id(t))
                data = t.data if isinstance(t, nn.Parameter) else t
                new = data
                if dtype is not None and data.is_floating_point() and data.dtype != dtype:
                    new = new.to(dtype)
                if channels_last and new.dim() == 4:
                    new = new.contiguous(memory_format=torch.channels_last)
                if new is data:
                    continue
                if new.dtype != data.dtype:
                    original = data.to("cpu") if data.is_cuda else data
                    kept += original.numel() * original.element_size()
                else:
                    original = (tuple(data.shape), data.stride(), data.dtype, data.device)
                restore.append((store, name, t, original))
                if isinstance(t, nn.Parameter):
                    t.data = new
                else:
                    store[name] = new

    def undo():
        for store, name, t, original in reversed(restore):
            current = t.data if isinstance(t, nn.Parameter) else store[name]
            if isinstance(original, tuple):  # layout-only change
                shape, stride, dt, dev = original
                value = torch.empty_strided(shape, stride, dtype=dt, device=dev).copy_(current)
            else:
                value = original.to(current.device) if original.device != current.device else original
            if isinstance(t, nn.Parameter):
                t.data = value
            else:
                store[name] = value

    return undo, kept


def _set_attr(obj, name: str, value) -> Callable[[], None]:
    """Set an instance attribute; the undo restores the previous instance attribute or removes it."""
    had = name in obj.__dict__
    previous = obj.__dict__.get(name)
    obj.__dict__[name] = value

    def undo():
        if had:
            obj.__dict__[name] = previous
        else:
            obj.__dict__.pop(name, None)

    return undo


def _cast_tensor(value, dtype: torch.dtype):
    return value.to(dtype) if isinstance(value, Tensor) and value.is_floating_point() else value


class CastingCall:
    """A model entry point that casts floating tensor inputs to the model's dtype (except the arguments named in
    ``keep``: a timestep's value must not be rounded) and floating outputs back to the dtype of the inputs.
    ``cast_leaf(value, dtype)`` casts one output leaf (default: tensors only; the VAE's also rebuilds its latent
    distribution)."""

    def __init__(self, fn: Callable, dtype: torch.dtype, cast_leaf: Callable = _cast_tensor,
                 keep: tuple = ("timestep",)):
        import functools
        import inspect

        self.fn, self.dtype, self.cast_leaf, self.keep = fn, dtype, cast_leaf, tuple(keep)
        self.signature = inspect.signature(fn)
        functools.update_wrapper(self, fn)
        self.__signature__ = self.signature

    def __call__(self, *args, **kwargs):
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return self.fn(*args, **kwargs)
        arguments = {k: v for k, v in bound.arguments.items() if k not in self.keep}
        floats = [t for t in pytree.tree_leaves(arguments) if isinstance(t, Tensor) and t.is_floating_point()]
        if all(t.dtype == self.dtype for t in floats):
            return self.fn(*args, **kwargs)
        in_dtype = floats[0].dtype
        bound.arguments.update(pytree.tree_map(lambda v: _cast_tensor(v, self.dtype), arguments))
        out = self.fn(*bound.args, **bound.kwargs)
        return pytree.tree_map(lambda v: self.cast_leaf(v, in_dtype), out)


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The instances of the model's repeated-block classes: diffusers' ``_repeated_blocks`` list where the model
    declares one, else the classes of the modules in its top-level ``*transformer_blocks`` lists (SD3, PixArt
    and DiT declare none in diffusers <= 0.42)."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    if not names:
        names = {type(m).__name__ for name, blocks in model.named_children()
                 if name.endswith("transformer_blocks") and isinstance(blocks, nn.ModuleList) for m in blocks}
    return [m for m in model.modules() if type(m).__name__ in names]


def _compile_scope(model: nn.Module, compile) -> Optional[str]:
    """"full" | "regional" | None for ``compile``; True picks regional when the model's repeated blocks
    (:func:`_repeated_blocks`) hold most of its parameters."""
    if compile is False:
        return None
    if compile in ("full", "regional"):
        return compile
    total = sum(p.numel() for p in model.parameters()) or 1
    in_blocks = sum(p.numel() for m in _repeated_blocks(model) for p in m.parameters())
    return "regional" if in_blocks / total >= REGIONAL_MIN_SHARE else "full"


def _compile_regional(model: nn.Module, options: dict) -> tuple[Callable, int]:
    """``module.compile()`` on every repeated block of the model (:func:`_repeated_blocks`): instances of one
    class share the compiled code. Returns (undo, number compiled)."""
    blocks = [m for m in _repeated_blocks(model) if m._compiled_call_impl is None]
    for m in blocks:
        m.compile(dynamic=False, **options)

    def undo():
        for m in blocks:
            m._compiled_call_impl = None

    return undo, len(blocks)


def _install_entry(report: AccelerateReport, path: str, model: nn.Module, *, cast: Optional[torch.dtype],
                   graph: bool, compile_scope: Optional[str], compile_options: dict) -> None:
    """The denoiser's forward: compiled (full) -> replayed from CUDA graphs -> with inputs cast."""
    from fastdiff.compat.diffusers.cuda_graph import CudaGraphForward

    fn = model.forward
    if compile_scope == "full":
        fn = torch.compile(fn, dynamic=False, **compile_options)
        report.compiled[path] = "full"
    elif compile_scope == "regional":
        undo, count = _compile_regional(model, compile_options)
        report._undo.append(undo)
        report.compiled[path] = f"regional ({count} blocks)"
    if graph:
        fn = graphs = CudaGraphForward(fn, name=path or type(model).__name__)
        graphs.failures = report.skipped
        report.cuda_graph.append(path)
        report._undo.append(graphs.clear)  # frees the graphs' memory when undone
    if cast is not None:  # position ids (Flux's img_ids / txt_ids) stay exact, as the timestep
        fn = CastingCall(fn, cast, keep=("timestep", "img_ids", "txt_ids"))
    if fn is not model.forward:
        report._undo.append(_set_attr(model, "forward", fn))


def accelerate(obj, *, dtype=None, channels_last: Optional[bool] = None, cuda_graph: Optional[bool] = None,
               compile=False, scheduler: bool = True, strict: bool = False, threads: Optional[int] = None,
               compile_options: Optional[dict] = None) -> AccelerateReport:
    """Accelerate a diffusers pipeline or model in place; returns the :class:`AccelerateReport` (``undo()``).

    Args:
        obj: a ``DiffusionPipeline`` (every torch component is handled; the denoiser is ``unet`` or
            ``transformer``) or a bare diffusers model (``UNet2DModel``, ``UNet2DConditionModel``,
            ``AutoencoderKL``, ``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
            ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ...).
        dtype: the dtype to run in; None: the policy's (:func:`fastdiff.policy.default_dtype`: bf16 on CUDA and
            on CPUs with native bf16, else float32) for a float32 model, or the model's own low precision.
        channels_last: None: where :func:`fastdiff.policy.use_channels_last` says it pays (convolutional
            components); True / False: every convolutional component / none.
        cuda_graph: replay the denoiser's forward from CUDA graphs per input-shape bucket; None: on for CUDA.
        compile: False; True (regional where repeated blocks hold most parameters, else full); "full" (the
            denoiser's whole forward under ``torch.compile``); "regional" (each repeated block).
        scheduler: replace the pipeline's scheduler by fastdiff's drop-in of the same class name.
        strict: raise :class:`AccelerateError` (changing nothing) if anything would be skipped.
        threads: set torch's CPU thread count (through :func:`fastdiff.policy.cpu_threads`); None leaves it.
        compile_options: keyword arguments for ``torch.compile`` (e.g. ``{"mode": "max-autotune-no-cudagraphs"}``).

    Raises ValueError for bad arguments or an object accelerated already (undo its report first), ImportError
    without diffusers.
    """
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("fastdiff.accelerate needs diffusers: pip install 'fastdiff[diffusers]'") from e
    dtype = _check_args(dtype, channels_last, cuda_graph, compile, scheduler, strict, threads)
    if compile_options is not None and not isinstance(compile_options, dict):
        raise ValueError(f"compile_options must be a dict of torch.compile arguments or None, got {compile_options!r}")
    compile_options = dict(compile_options or {})
    components, denoiser, denoiser_name = _components(obj)
    for target in [obj] + [m for _, m in components]:
        if target in _ACTIVE:
            raise ValueError(f"{type(target).__name__} is accelerated already: call that report's undo() first")
    main = denoiser if denoiser is not None else (components[0][1] if components else None)
    device = module_device(main) or torch.device("cpu")
    if dtype is None:
        own = module_dtype(main)
        dtype = default_dtype(device) if own in (None, torch.float32) else own
    use_graph = device.type == "cuda" and denoiser is not None if cuda_graph is None else cuda_graph
    if use_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {device}")
    if use_graph and denoiser is None:
        raise ValueError("cuda_graph=True needs a denoiser (a model whose forward takes `timestep`)")
    if use_graph and compile_options.get("mode") == "reduce-overhead":
        if cuda_graph:
            raise ValueError("compile mode 'reduce-overhead' records its own CUDA graphs: use cuda_graph=False")
        use_graph = False

    pack = device.type == "cpu" and prepack.available() and bool(prepack.packed_types(dtype))
    plan, skipped = _plan_patches(components, _patches(pack and nn.Linear in prepack.packed_types(dtype)))
    if pack:  # the conv / linear modules whose weights will not be packed, and why
        skipped += [(_join(name, path), why) for name, comp in components for path, why in prepack.plan(comp, dtype)[1]]
    new_scheduler = None
    if scheduler and isinstance(obj, diffusers.DiffusionPipeline):
        new_scheduler, why = _plan_scheduler(obj)
        if why:
            skipped.append(why)
    if strict and skipped:
        raise AccelerateError("fastdiff.accelerate(strict=True): cannot accelerate\n"
                              + "\n".join(f"  {p or '<model>'}: {r}" for p, r in skipped))

    report = AccelerateReport(skipped=skipped, dtype=dtype)
    try:
        _apply(report, obj, components, denoiser, denoiser_name, plan, new_scheduler, device, dtype,
               channels_last, use_graph, compile, compile_options, threads, pack)
    except BaseException:
        report.undo()
        raise
    for target in [obj] + [m for _, m in components]:  # the pipeline and each of its models
        if target not in _ACTIVE:
            _ACTIVE[target] = report
            report._targets.append(target)
    return report


def _apply(report, obj, components, denoiser, denoiser_name, plan, new_scheduler, device, dtype, channels_last,
           use_graph, compile, compile_options, threads, pack) -> None:
    from diffusers import AutoencoderKL

    from fastdiff.compat.diffusers.patches_vae import VAE_METHODS, cast_vae_output

    changed_dtype = {}
    for name, comp in components:
        before = module_dtype(comp)
        cl = channels_last if channels_last is not None else use_channels_last(comp, device, dtype)
        cl = bool(cl) and any(isinstance(m, nn.Conv2d) for m in comp.modules())
        undo, kept = _convert(comp, dtype, cl)
        report._undo.append(undo)
        report.memory_kept += kept
        if comp is denoiser or len(components) == 1:
            report.channels_last = cl
        if before is not None and before != dtype or cl:
            report.converted[name] = ", ".join(
                ([f"{str(before).replace('torch.', '')} -> {str(dtype).replace('torch.', '')}"]
                 if before != dtype else []) + (["channels_last"] if cl else []))
        changed_dtype[name] = before is not None and before != dtype
    for patch, module, path in plan:
        report._undo.append(patch.apply(module))
        report.patched.setdefault(patch.name, []).append(path)
    if pack:
        for name, comp in components:
            undo, done, _ = prepack.install(comp, dtype)
            report._undo.append(undo)
            for path in done:
                report.patched.setdefault(type(comp.get_submodule(path)).__name__, []).append(_join(name, path))
    if new_scheduler is not None:
        original = obj.scheduler
        obj.scheduler = new_scheduler

        def undo_scheduler():
            obj.scheduler = original

        report._undo.append(undo_scheduler)
        report.patched.setdefault(type(original).__name__, []).append("scheduler")
    for name, comp in components:
        cast = dtype if changed_dtype.get(name) else None
        if comp is denoiser:
            _install_entry(report, denoiser_name, comp, cast=cast, graph=use_graph,
                           compile_scope=_compile_scope(comp, compile), compile_options=compile_options)
        elif cast is not None and isinstance(comp, AutoencoderKL):
            for method in VAE_METHODS:
                wrapped = CastingCall(getattr(comp, method), cast, cast_vae_output)
                report._undo.append(_set_attr(comp, method, wrapped))
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(cpu_threads(threads))
        report.threads = torch.get_num_threads()
        report._undo.append(lambda: torch.set_num_threads(previous))
