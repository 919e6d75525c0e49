"""The checks of ``fastdiff.sample``'s arguments: each bad input gets a ValueError or TypeError that names the
argument and what is allowed, before any work.

Numbers of the wrong value (NaN, out of range, a float where an int is needed) raise ValueError; objects of
the wrong kind (a string for a number, an unknown keyword) raise TypeError.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fastdiff.policy import as_dtype

__all__ = ["SEED_LIMIT", "MAX_GUIDANCE", "RENAMED", "resolve_seeds", "resolve_device", "check_int",
           "check_guidance", "check_memory_budget", "check_sampler_options", "did_you_mean", "check_extra_kwargs",
           "label_count", "is_conditional", "check_labels", "check_y_null", "check_shape", "check_dtype",
           "check_choice", "check_compile", "default_y_null", "default_guidance", "check_conditioning"]

SEED_LIMIT = 2 ** 63  # seeds lie in [0, 2^63): what every torch.Generator takes without wrapping
MAX_GUIDANCE = 1e3    # past this every pixel saturates; such a weight is a mistake, not a setting

# Names other libraries use, and the fastdiff argument that does the job.
RENAMED = {
    "generator": "seeds= (one int per sample, or one int S: sample i gets S + i)",
    "generators": "seeds= (one int per sample, or one int S: sample i gets S + i)",
    "seed": "seeds= (one int S: sample i gets S + i)",
    "num_inference_steps": "steps=",
    "num_steps": "steps=",
    "class_labels": "y=",
    "labels": "y=",
    "eta": "sampler_options={'eta': ...}",
    "num_images_per_prompt": "shape=(N, C, ...)",
    "latents": "seeds= (the starting noise is drawn from the seeds)",
}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, minimum: int = 1, allow_none: bool = False) -> Optional[int]:
    """``value`` as an int >= ``minimum`` (None allowed with ``allow_none``)."""
    if value is None and allow_none:
        return None
    allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
    if _is_int(value):
        if int(value) < minimum:
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
        return int(value)
    if isinstance(value, (numbers.Real, bool, np.bool_)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")


def _real(name: str, value, allowed: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")
    return float(value)


def check_guidance(value) -> float:
    """The classifier-free guidance weight: a finite number in [0, MAX_GUIDANCE]."""
    allowed = f"a finite number in [0, {MAX_GUIDANCE:g}] (1: no guidance)"
    w = _real("guidance_scale", value, allowed)
    if not (math.isfinite(w) and 0.0 <= w <= MAX_GUIDANCE):
        raise ValueError(f"guidance_scale must be {allowed}, got {value!r}")
    return w


def check_memory_budget(value) -> Optional[float]:
    """Bytes: a finite number > 0, or None."""
    if value is None:
        return None
    allowed = "a finite number of bytes > 0, or None"
    b = _real("memory_budget", value, allowed)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"memory_budget must be {allowed}, got {value!r}")
    return b


def resolve_seeds(seeds, n: int) -> list:
    """One int seed per sample, each in [0, 2^63).

    ``seeds`` is a sequence of n ints, one int S (sample i gets S + i), or None: n fresh seeds drawn from
    torch's global generator (as diffusers draws its noise without a generator; ``torch.manual_seed`` makes
    them repeatable, and ``fastdiff.sample(..., return_seeds=True)`` returns them).
    """
    allowed = "one int per sample, one int S (sample i gets S + i) or None, each in [0, 2**63)"
    if seeds is None:
        if n == 0:
            return []
        return torch.randint(0, SEED_LIMIT - 1, (n,), dtype=torch.int64).tolist()
    if _is_int(seeds):
        s = int(seeds)
        if not (0 <= s and s + max(n, 1) - 1 < SEED_LIMIT):
            raise ValueError(f"seeds must be {allowed}: S = {s} gives seeds outside [0, 2**63)")
        return [s + i for i in range(n)]
    if isinstance(seeds, Tensor):
        if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
            raise ValueError(f"seeds must be {allowed}, got a {seeds.dtype} tensor")
        seeds = seeds.reshape(-1).tolist()
    elif isinstance(seeds, np.ndarray):
        seeds = seeds.reshape(-1).tolist()
    if isinstance(seeds, (str, bytes, dict)) or not isinstance(seeds, Sequence) and not hasattr(seeds,
                                                                                              "__iter__"):
        raise TypeError(f"seeds must be {allowed}, got {type(seeds).__name__}")
    seeds = list(seeds)
    if len(seeds) != n:
        raise ValueError(f"seeds must hold one seed per sample ({n}), got {len(seeds)}")
    for s in seeds:
        if not _is_int(s):
            raise ValueError(f"seeds must be integers ({allowed}), got {s!r}")
        if not 0 <= int(s) < SEED_LIMIT:
            raise ValueError(f"seeds must be {allowed}, got {int(s)}")
    return [int(s) for s in seeds]


def resolve_device(device) -> torch.device:
    """A device that exists here: None gives CUDA (the current device) when available, else the CPU."""
    allowed = "'cpu', 'cuda', 'cuda:<index>' (a device that exists here) or None"
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
    if _is_int(device):
        device = torch.device("cuda", int(device)) if int(device) >= 0 else device
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be {allowed}, got {type(device).__name__} {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device must be {allowed}, got {device!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available here (torch.cuda.is_available() is "
                             "False); use device='cpu'")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= index < count:
            raise ValueError(f"device={device!r}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
        return torch.device("cuda", index)
    backend = getattr(torch, dev.type, None) if dev.type != "meta" else None
    if dev.type in ("mps", "xpu") and backend is not None and backend.is_available():
        return dev
    raise ValueError(f"device must be {allowed}, got {device!r} (not available here)")


def check_sampler_options(sampler: str, options) -> dict:
    """``options`` (a dict or None) restricted to the keyword options of the sampler's table builder."""
    from fastdiff.samplers import SAMPLERS

    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"sampler_options must be a dict of the sampler's options or None, got "
                        f"{type(options).__name__}")
    try:
        params = inspect.signature(SAMPLERS[sampler]).parameters
    except (TypeError, ValueError, KeyError):
        return dict(options)
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    allowed = [name for name in params if name not in ("sigmas", "timesteps")]
    bad = sorted(k for k in options if k not in allowed)
    if bad:
        raise ValueError(f"sampler_options: sampler {sampler!r} takes {allowed or 'no options'}, got unknown "
                         f"{bad}")
    return dict(options)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` with the closest of ``choices`` to a mistyped keyword, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_extra_kwargs(runtime: str, kwargs: dict, known: Sequence[str], runtime_only: Sequence[str]) -> None:
    """Keywords ``fastdiff.sample`` did not name: another library's word, a misspelling, or an option of the
    other runtime. ``known``: fastdiff.sample's own names; ``runtime_only``: what this runtime adds."""
    for key in kwargs:
        if key in RENAMED:
            raise TypeError(f"fastdiff.sample() got {key}=: use {RENAMED[key]}")
    bad = sorted(k for k in kwargs if k not in runtime_only)
    if not bad:
        return
    hints = [f"{key!r}" + did_you_mean(key, list(known) + list(runtime_only)) for key in bad]
    extra = (f"; runtime={runtime!r} also takes {sorted(runtime_only)}" if runtime_only else
             "; the keywords of runtime='onnxruntime' (providers, x_T, ...) need that runtime")
    raise TypeError(f"fastdiff.sample() got unexpected keyword argument(s) {', '.join(hints)} for "
                    f"runtime={runtime!r}{extra}")


# ---------------------------------------------------------------------------------------------
# Class labels
# ---------------------------------------------------------------------------------------------

_LABEL_TABLES = ("label_emb", "y_embedder.embedding_table", "class_embedding")


def _attr_path(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _config_classes(model) -> Optional[int]:
    config = getattr(model, "config", None)
    value = config.get("num_class_embeds") if isinstance(config, dict) else None
    return int(value) if _is_int(value) else None


def label_count(denoiser, model, y_null=None) -> Optional[int]:
    """How many labels the model can embed, where known: the rows of its label table (ADM, U-ViT, DiT,
    diffusers U-Nets), else its ``num_classes`` (or the denoiser's), at least ``y_null + 1``."""
    for path in _LABEL_TABLES:
        table = _attr_path(model, path)
        if isinstance(table, nn.Embedding):
            return int(table.num_embeddings)
    counts = [getattr(model, "num_classes", None), getattr(denoiser, "num_classes", None), _config_classes(model)]
    counts = [int(c) for c in counts if _is_int(c) and int(c) > 0]
    if not counts:
        return None
    count = max(counts)
    if _is_int(y_null):
        count = max(count, int(y_null) + 1)
    return count


def is_conditional(denoiser, model) -> Optional[bool]:
    """Whether the model needs class labels: True / False where its attributes say, else None."""
    flag = getattr(model, "conditional", None)
    if isinstance(flag, bool):
        return flag
    for path in _LABEL_TABLES:
        if isinstance(_attr_path(model, path), nn.Embedding):
            return True
    if hasattr(model, "num_classes"):
        n = model.num_classes
        return _is_int(n) and int(n) > 0
    if hasattr(model, "class_embedding"):
        return model.class_embedding is not None
    return None


def check_labels(y, n: int, count: Optional[int]) -> Optional[Tensor]:
    """``y`` (one int or (n,) integer labels, each in [0, count) when count is known) as (n,) int64 on the
    CPU; None stays None."""
    if y is None:
        return None
    allowed = f"one int or ({n},) integer class labels" + (f" in [0, {count})" if count else "")
    if isinstance(y, (bool, np.bool_, str, bytes)):
        raise TypeError(f"y must be {allowed}, got {type(y).__name__} {y!r}")
    try:
        yt = y.detach().cpu() if isinstance(y, Tensor) else torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"y must be {allowed}, got {type(y).__name__}") from None
    if yt.is_floating_point() or yt.is_complex() or yt.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels, got {yt.dtype}")
    if yt.dim() == 0 or (yt.numel() == 1 and n != 1):
        yt = yt.reshape(1).expand(n)
    if tuple(yt.shape) != (n,):
        raise ValueError(f"y must be an int or have shape (N,) = ({n},), got {tuple(yt.shape)}")
    yt = yt.to(torch.int64).contiguous()
    if yt.numel():
        lo, hi = int(yt.min()), int(yt.max())
        if lo < 0 or (count is not None and hi >= count):
            bad = lo if lo < 0 else hi
            raise ValueError(f"y must hold class labels in [0, {count if count is not None else 'num_classes'})"
                             f", got {bad}")
    return yt


def check_y_null(y_null, count: Optional[int]):
    """The null label: None, an int in [0, count) or a tensor (passed on as is)."""
    if y_null is None or isinstance(y_null, Tensor):
        return y_null
    if not _is_int(y_null):
        raise TypeError(f"y_null must be an int label or None, got {type(y_null).__name__} {y_null!r}")
    if int(y_null) < 0 or (count is not None and int(y_null) >= count):
        raise ValueError(f"y_null must be a label in [0, {count if count is not None else 'num_classes'}), got "
                         f"{int(y_null)}")
    return int(y_null)


# ---------------------------------------------------------------------------------------------
# Shape, dtype, switches, conditioning
# ---------------------------------------------------------------------------------------------


def check_shape(shape) -> tuple:
    allowed = "(N, C, ...) of ints with N >= 0 and the other sizes >= 1"
    if isinstance(shape, (Tensor, np.ndarray)):
        shape = tuple(shape.tolist())
    if isinstance(shape, (str, bytes)) or not isinstance(shape, (Sequence, torch.Size)):
        raise TypeError(f"shape must be {allowed}, got {type(shape).__name__} {shape!r}")
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape):
        raise ValueError(f"shape must be {allowed}, got {shape}")
    shape = tuple(int(s) for s in shape)
    if shape[0] < 0 or any(s < 1 for s in shape[1:]):
        raise ValueError(f"shape must be {allowed}, got {shape}")
    return shape


def check_dtype(dtype) -> Optional[torch.dtype]:
    dtype = as_dtype(dtype)
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype (float32, bfloat16, float16, float64), got {dtype}")
    return dtype


def check_choice(name: str, value, allowed: tuple) -> None:
    if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_compile(compile_mode) -> None:
    if isinstance(compile_mode, (bool, str, dict)):
        return
    raise TypeError(f"compile must be True/False, a torch.compile mode string or a dict of torch.compile "
                    f"keyword arguments, got {type(compile_mode).__name__}")


def default_y_null(obj, model):
    for owner in (obj, model):
        value = getattr(owner, "y_null", None)
        if value is not None and not isinstance(value, nn.Module):
            return value
    return None


def default_guidance(denoiser, has_labels: bool, y_null=None) -> float:
    """What ``guidance_scale=None`` means: the denoiser's ``default_guidance_scale`` (what ``fastdiff.load``
    sets from upstream: digits 2, DiT 4, ...) when class labels are given and there is a null label
    (``y_null``, else the denoiser's own), else 1 (no guidance)."""
    null = y_null if y_null is not None else getattr(denoiser, "y_null", None)
    if not has_labels or null is None:
        return 1.0
    return check_guidance(getattr(denoiser, "default_guidance_scale", 1.0))


def check_conditioning(denoiser, y, n: int, y_null, guidance: float, model_kwargs):
    """The labels (n,) int64 on the CPU and the null label, checked against the model's label table."""
    model = denoiser.model
    count = label_count(denoiser, model, y_null if isinstance(y_null, (int, np.integer)) else None)
    labels = check_labels(y, n, count)
    y_null = check_y_null(y_null, count)
    conditional = is_conditional(denoiser, model)
    labels_in_kwargs = bool(model_kwargs) and any(k in model_kwargs for k in ("y", "class_labels", "labels"))
    name = type(model).__name__
    if labels is None and conditional and not labels_in_kwargs and n > 0:
        null = f"; y={y_null} (the null label) gives unconditional samples" if y_null is not None else ""
        raise ValueError(f"y: {name} is class-conditional ({count or 'some'} labels): pass class labels y "
                         f"(one int or (N,)){null}")
    if labels is not None and conditional is False:
        raise ValueError(f"y must be None: {name} is not class-conditional")
    if guidance != 1.0 and labels is None and not labels_in_kwargs:
        raise ValueError(f"guidance_scale={guidance:g} (classifier-free guidance) needs class labels y and the "
                         "null label y_null; use guidance_scale=1 for an unconditional model")
    if guidance != 1.0 and labels is not None and y_null is None:
        raise ValueError("guidance_scale != 1 with class labels needs y_null (the null label), as an argument "
                         "or a y_null attribute of the denoiser")
    return labels, y_null
