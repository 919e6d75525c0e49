"""``fastdiff.load``: a ready :class:`fastdiff.Denoiser` from a name, a checkpoint, a diffusers folder or an
ONNX graph, for Python and the command line alike.

    den = fd.load("digits")                                          # the bundled model
    den = fd.load("dit-xl-2-256", checkpoint="DiT-XL-2-256x256.pt", vae="sd-vae-ft-ema/")
    den = fd.load("ddpm-cifar10-32/")                                # a diffusers UNet2DModel or pipeline folder
    den = fd.load("model.onnx")                                      # a graph from fastdiff.export.to_onnx
    x = fd.sample(den, (8, *den.sample_shape), y=torch.arange(8),
                  decode=True)                                       # images (guided at den.default_guidance_scale)

The returned Denoiser carries, besides its model, schedule, prediction and learned sigma: ``num_classes``
(the real classes; None for an unconditional model), ``y_null`` (the null label of classifier-free
guidance, None where the model has none), ``default_guidance_scale`` (the upstream default; 1 without a
null label), ``sample_shape`` (C, H, W of one sample: the latent shape for a latent model), ``latent``,
``latent_scale`` and ``vae`` (:meth:`fastdiff.Denoiser.decode`), and ``source`` (what was loaded).

Every problem with a path (missing, empty, truncated, corrupt, another architecture) is one error that
names the file: FileNotFoundError for a path that does not exist, ValueError for the rest.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from typing import Optional, Union

import torch
from torch import nn

from fastdiff.denoiser import Denoiser, call_model

__all__ = ["load", "schedule_from_config", "CHECKPOINT_SUFFIXES", "TimestepOffset"]

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_SCHEDULE_TYPES = ("VPSchedule", "VPSDESchedule", "VESDESchedule")
_PathLike = Union[str, os.PathLike]


def load(source: _PathLike, checkpoint: Optional[_PathLike] = None, *, vae=None, device="cpu",
         dtype: Optional[torch.dtype] = None, schedule=None, prediction: Optional[str] = None,
         random_weights: bool = False, overrides: Optional[dict] = None, providers=None) -> Denoiser:
    """A ready :class:`fastdiff.Denoiser` (see the module docstring for what it carries).

    Args:
        source: one of
            - ``"digits"``: the bundled digits model (``checkpoint=`` another ``.safetensors`` written by
              ``python -m fastdiff.train_digits``, its ``.json`` beside it);
            - a preset name (``fastdiff.models.PRESETS``) with ``checkpoint=`` its released weights (a
              ``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors`` file, or a diffusers folder for the DDPM
              presets). A preset without a checkpoint is an error unless ``random_weights=True``
              (an untrained model: speed tests);
            - a checkpoint file alone: the preset whose parameter names and shapes it matches;
            - a diffusers folder: a ``UNet2DModel`` (``config.json`` + weights) or a pipeline with
              ``unet/``; the schedule, prediction type, learned variance and clipping come from its
              ``scheduler/scheduler_config.json`` (or a ``scheduler_config.json`` beside the weights);
            - an ``.onnx`` model graph from :func:`fastdiff.export.to_onnx`, run by ONNX Runtime
              (:class:`fastdiff.export.ort.OrtDenoiser`) with the schedule and labels stored in the graph.
        checkpoint: weights for ``"digits"`` or a preset.
        vae: a diffusers ``AutoencoderKL`` (used as given, never modified), or its folder (a pipeline folder
            with ``vae/`` works too; needs diffusers), so ``fastdiff.sample(..., decode=True)`` returns
            images. Only for latent models (DiT, latent U-ViT, a UNet2DModel trained on latents).
        device, dtype: where the PyTorch weights are loaded (default CPU, as stored). ``fastdiff.sample``
            picks its own run device and dtype.
        schedule, prediction: replace the schedule / prediction type the source gives.
        random_weights: build a preset untrained instead of loading ``checkpoint``.
        overrides: keyword overrides of a preset's constructor arguments (a checkpoint trained with other
            settings).
        providers: ONNX Runtime execution providers for an ``.onnx`` source.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"source must be 'digits', a preset name or a path, got {type(source).__name__}")
    if not isinstance(random_weights, bool):
        raise ValueError(f"random_weights must be True or False, got {random_weights!r}")
    if overrides is not None and not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a dict of preset keyword arguments, got {type(overrides).__name__}")
    if prediction is not None:
        from fastdiff.denoiser import _ALIASES, PREDICTIONS

        if _ALIASES.get(prediction, prediction) not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS} or None, got {prediction!r}")
    device = _device(device)
    from fastdiff.policy import as_dtype

    dtype = as_dtype(dtype)
    if isinstance(vae, (str, os.PathLike)) and not os.path.exists(vae):  # before any model is built
        raise FileNotFoundError(f"vae folder {os.fspath(vae)!r} does not exist")
    name = os.fspath(source)
    if providers is not None and not (name.lower().endswith(".onnx") and os.path.isfile(name)):
        raise ValueError("providers= is for .onnx sources")
    opts = dict(vae=vae, device=device, dtype=dtype, schedule=schedule, prediction=prediction)
    from fastdiff.models import PRESETS

    if name == "digits":
        if random_weights or overrides:
            raise ValueError("random_weights and overrides are for presets; 'digits' is one trained model")
        return _load_digits(checkpoint, **opts)
    if name in PRESETS:
        return _load_preset(name, checkpoint, random_weights, overrides or {}, **opts)
    extra = [k for k, v in (("checkpoint", checkpoint), ("overrides", overrides)) if v is not None]
    extra += ["random_weights"] if random_weights else []
    if extra:
        raise ValueError(f"{', '.join(extra)}: only with 'digits' or a preset name; {name!r} is neither")
    if os.path.isdir(name):
        return _load_diffusers_folder(name, **opts)
    if os.path.exists(name):
        if name.lower().endswith(".onnx"):
            return _load_onnx(name, providers=providers, **opts)
        if name.lower().endswith(CHECKPOINT_SUFFIXES):
            return _load_checkpoint_alone(name, **opts)
        raise ValueError(f"{name!r} is not a source fastdiff.load reads: an .onnx graph, a checkpoint "
                         f"({', '.join(CHECKPOINT_SUFFIXES)}) or a diffusers folder")
    if os.sep in name or "/" in name or name.lower().endswith((".onnx", *CHECKPOINT_SUFFIXES)):
        raise FileNotFoundError(f"{name!r} does not exist")
    close = difflib.get_close_matches(name, ["digits", *PRESETS], n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}: not 'digits', a preset name, or an existing file or folder"
                     f"{hint} (presets: fastdiff.models.PRESETS, {len(PRESETS)} names)")


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------


def _load_digits(checkpoint, *, vae, device, dtype, schedule, prediction) -> Denoiser:
    from fastdiff.models.digits import DIGITS_WEIGHTS, load_digits_model

    path = DIGITS_WEIGHTS if checkpoint is None else _check_file(checkpoint, "checkpoint")
    if vae is not None:
        raise ValueError("vae: the digits model works in pixel space; it takes no VAE")
    den = _reading(path, "checkpoint", lambda: load_digits_model(path, device=device,
                                                                  dtype=dtype or torch.float32))
    return _finish(den, source="digits" if checkpoint is None else os.fspath(checkpoint), schedule=schedule,
                   prediction=prediction, num_classes=den.num_classes, y_null=den.y_null,
                   guidance_scale=float(den.metadata.get("default_guidance", 1.0)),
                   sample_shape=_sample_shape(den.model), latent_scale=None, vae=None)


def _load_preset(name: str, checkpoint, random_weights: bool, overrides: dict, *, vae, device, dtype,
                 schedule, prediction) -> Denoiser:
    from fastdiff import models

    info = models.preset_info(name, **overrides)
    if info["kind"] != "denoiser":
        raise ValueError(f"{name!r} is a noisy-image classifier, not a denoiser: build it with "
                         f"fastdiff.models.load({name!r}, checkpoint) and guide with "
                         "fastdiff.denoiser.classifier_cond_fn")
    if checkpoint is not None and random_weights:
        raise ValueError("checkpoint and random_weights=True exclude each other")
    if checkpoint is None and not random_weights:
        raise ValueError(f"{name!r} needs its released weights: checkpoint= (command line: --checkpoint); "
                         "random_weights=True (--random-weights) builds it untrained, for speed tests (its "
                         "samples are noise)")
    if checkpoint is None:
        model = models.preset(name, **overrides)
    else:
        path = _check_path(checkpoint, "checkpoint")
        model = _reading(path, "checkpoint", lambda: models.load(name, path, **overrides), f" as {name}")
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    den = Denoiser(model, schedule_from_config(info["schedule"]), prediction=info["prediction"],
                   learned_sigma=info["learned_sigma"],
                   model_fn=TimestepOffset(info["timestep_offset"]) if info["timestep_offset"] else None)
    return _finish(den, source=name if checkpoint is None else os.fspath(checkpoint), schedule=schedule,
                   prediction=prediction, num_classes=info["num_classes"], y_null=info["y_null"],
                   guidance_scale=info["guidance_scale"], sample_shape=info["sample_shape"],
                   latent_scale=info["latent_scale"], vae=vae, device=device, preset=name)


def _load_checkpoint_alone(path: str, **opts) -> Denoiser:
    """A checkpoint file without a name: the preset whose parameter names and shapes it holds."""
    from fastdiff import models

    path = _check_file(path, "checkpoint")
    if os.path.isfile(os.path.splitext(path)[0] + ".json"):  # train_digits' output: weights + metadata
        return _load_digits(path, **opts)
    state = _reading(path, "checkpoint", lambda: models.read_state_dict(path))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    found, first_keys = [], {}
    for name, (cls, kwargs) in models.PRESETS.items():
        if models.SAMPLING[name]["kind"] != "denoiser" or first_keys.get(cls, next(iter(shapes), None)) not in shapes:
            continue  # a family whose first parameter the checkpoint lacks: none of its presets can match
        with torch.device("meta"):  # names and shapes without allocating
            ref = cls(**kwargs).state_dict()
        first_keys.setdefault(cls, next(iter(ref), None))
        if len(ref) == len(shapes) and all(shapes.get(k) == tuple(v.shape) for k, v in ref.items()):
            found.append(name)
    if not found:
        raise ValueError(f"checkpoint {path!r} ({len(state)} tensors) matches no preset's parameter names and "
                         "shapes: pass the preset, fastdiff.load(name, checkpoint=path, overrides={...}) for "
                         "a checkpoint trained with other settings")
    same = all(models.PRESETS[n] == models.PRESETS[found[0]] and models.SAMPLING[n] == models.SAMPLING[found[0]]
               for n in found)
    if not same:
        raise ValueError(f"checkpoint {path!r} fits the presets {found}: pass one as the name, "
                         f"fastdiff.load({found[0]!r}, checkpoint=...)")
    return _load_preset(found[0], path, False, {}, **opts)


def _load_diffusers_folder(folder: str, *, vae, device, dtype, schedule, prediction) -> Denoiser:
    from fastdiff.models import DDPMUNet

    unet_dir = _unet_folder(folder)
    config = _read_json(os.path.join(unet_dir, "config.json"))
    cls_name = config.get("_class_name", "UNet2DModel")
    if cls_name.startswith("Autoencoder") or cls_name == "VQModel":
        raise ValueError(f"folder {unet_dir!r} holds a {cls_name} (a VAE): pass it as vae= with the model")
    if cls_name != "UNet2DModel":
        raise ValueError(f"folder {unet_dir!r} holds a {cls_name}; fastdiff.load reads UNet2DModel folders (for "
                         "a diffusers pipeline with another denoiser use fastdiff.accelerate(pipe))")
    try:
        with torch.device("meta"):
            DDPMUNet._from_config(dict(config))
        supported = True
    except (ValueError, TypeError):
        supported = False
    if supported:
        weights = [os.path.join(unet_dir, f"diffusion_pytorch_model{e}") for e in (".safetensors", ".bin")]
        shown = next((w for w in weights if os.path.isfile(w)), unet_dir)  # name the file that failed
        _check_path(shown, "weights")
        model = _reading(shown, "weights", lambda: DDPMUNet.from_pretrained(unet_dir))
    else:  # a UNet2DModel configuration the zoo's DDPMUNet does not build: diffusers' own class runs it
        model = _diffusers_unet(unet_dir)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    sched_path = _scheduler_config_path(folder, unet_dir)
    facts = _scheduler_facts(sched_path) if sched_path else _default_scheduler_facts(folder)
    in_ch = config.get("in_channels", 3)
    out_ch = config.get("out_channels", in_ch)
    if facts["learned_sigma"] and out_ch != 2 * in_ch:
        raise ValueError(f"{sched_path}: variance_type {facts['variance_type']!r} needs a model with twice the "
                         f"input channels out, but {unet_dir}/config.json has {in_ch} in, {out_ch} out")
    size = config.get("sample_size") or 32
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    num_classes = config.get("num_class_embeds")
    den = Denoiser(model, facts["schedule"], prediction=facts["prediction"], learned_sigma=facts["learned_sigma"],
                   clip_x0=facts["clip_x0"], dynamic_threshold=facts["dynamic_threshold"],
                   sample_max_value=facts["sample_max_value"],
                   model_fn=_class_labels_call if num_classes else None)
    return _finish(den, source=folder, schedule=schedule, prediction=prediction, num_classes=num_classes,
                   y_null=None, guidance_scale=1.0, sample_shape=(in_ch, *size), latent_scale=None, vae=vae,
                   device=device)


def _load_onnx(path: str, *, vae, device, dtype, schedule, prediction, providers) -> Denoiser:
    path = _check_file(path, "ONNX graph")
    try:
        import onnxruntime  # noqa: F401

        from fastdiff.export.onnx import read_metadata
        from fastdiff.export.ort import OrtDenoiser, _schedule_from_metadata
    except ImportError as e:
        raise ImportError(f"loading {path!r} needs onnx and onnxruntime (pip install 'fastdiff[onnx]'): {e}") from e
    meta = _reading(path, "ONNX graph", lambda: read_metadata(path))
    if meta.get("kind") == "step":
        raise ValueError(f"{path!r} is a step graph (one whole sampling step): sample it with "
                         f"fastdiff.sample({path!r}, shape, runtime='onnxruntime'); fastdiff.load takes model "
                         "graphs (fastdiff.export.to_onnx)")
    sched = schedule or _schedule_from_metadata(meta)
    if sched is None:
        raise ValueError(f"ONNX graph {path!r} stores no schedule (it was exported from a bare model, or by an "
                         "older fastdiff): pass schedule=")
    model = _reading(path, "ONNX graph", lambda: OrtDenoiser(path, providers=providers))
    learned = meta.get("learned_sigma")
    if learned is None:  # a bare model's export: twice the channels out means a learned variance
        out = model.session.get_outputs()[0].shape
        learned = len(out) > 1 and out[1] == 2 * model.in_channels
    offset = int(meta.get("timestep_offset") or 0)
    den = Denoiser(model, sched, prediction=meta.get("prediction", "eps"), learned_sigma=bool(learned),
                   model_fn=TimestepOffset(offset) if offset else None)
    y_null = meta.get("y_null") if model.conditional else None
    classes = meta.get("classes")
    if classes is None and model.conditional:
        classes = model.num_classes - 1 if y_null is not None and y_null == model.num_classes - 1 \
            else model.num_classes
    guidance = meta.get("default_guidance_scale")
    return _finish(den, source=path, schedule=None, prediction=prediction, num_classes=classes, y_null=y_null,
                   guidance_scale=float(guidance) if guidance is not None and y_null is not None else 1.0,
                   sample_shape=tuple(model.input_shape), latent_scale=meta.get("latent_scale"), vae=vae,
                   device=device)


# ---------------------------------------------------------------------------------------------
# the finished denoiser
# ---------------------------------------------------------------------------------------------


class TimestepOffset:
    """A Denoiser ``model_fn`` that feeds the network ``t + offset``: U-ViT's latent models were trained
    on timesteps 1..1000 for ``alphas_cumprod[0..999]`` (its ``train_ldm_discrete.py``)."""

    def __init__(self, timestep_offset: int):
        self.timestep_offset = int(timestep_offset)

    def __call__(self, model, x, t, y=None, **kwargs):
        return call_model(model, x, t + self.timestep_offset, y, **kwargs)

    def __repr__(self) -> str:
        return f"TimestepOffset({self.timestep_offset})"


def _class_labels_call(model, x, t, y=None, **kwargs):
    """diffusers' UNet2DModel takes its labels as ``class_labels``."""
    return call_model(model, x, t, None, **({"class_labels": y} if y is not None else {}), **kwargs)


def _finish(den: Denoiser, *, source: str, schedule, prediction, num_classes, y_null, guidance_scale: float,
            sample_shape, latent_scale, vae, device=None, preset: Optional[str] = None) -> Denoiser:
    if schedule is not None or prediction is not None:  # the caller's word over the source's
        den = Denoiser(den.model, schedule or den.schedule, prediction=prediction or den.prediction,
                       learned_sigma=den.learned_sigma, clip_x0=den.clip_x0,
                       dynamic_threshold=den.dynamic_threshold, sample_max_value=den.sample_max_value,
                       model_fn=den.model_fn)
    den.num_classes = int(num_classes) if num_classes else None
    den.y_null = None if y_null is None else int(y_null)
    den.default_guidance_scale = float(guidance_scale) if den.y_null is not None else 1.0
    den.sample_shape = tuple(int(s) for s in sample_shape)
    den.latent_scale = None if latent_scale is None else float(latent_scale)
    if vae is not None and den.latent_scale is None and preset is not None:
        raise ValueError(f"vae: {preset!r} works in pixel space; it takes no VAE")
    den.vae = _load_vae(vae, device) if vae is not None else None
    den.latent = den.latent_scale is not None or den.vae is not None
    den.source = source
    if isinstance(den.model, nn.Module):
        den.model.y_null = den.y_null  # so FeatureExtractor(den.model, den.schedule) and exports find it
    return den


def _load_vae(vae, device):
    if isinstance(vae, nn.Module):
        if not callable(getattr(vae, "decode", None)):
            raise ValueError(f"vae must be a diffusers AutoencoderKL (a module with decode()), or its folder; "
                             f"got a {type(vae).__name__}")
        return vae
    if not isinstance(vae, (str, os.PathLike)):
        raise ValueError(f"vae must be a diffusers AutoencoderKL or its folder, got {type(vae).__name__}")
    path = os.fspath(vae)
    if not os.path.exists(path):
        raise FileNotFoundError(f"vae folder {path!r} does not exist")
    folder = path
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
            os.path.join(path, "vae", "config.json")):
        folder = os.path.join(path, "vae")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"vae {path!r} is not a diffusers AutoencoderKL folder (config.json + weights)")
    cls_name = _read_json(os.path.join(folder, "config.json")).get("_class_name", "AutoencoderKL")
    if not cls_name.startswith("Autoencoder"):
        raise ValueError(f"vae {folder!r} holds a {cls_name}, not an AutoencoderKL")
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"vae={path!r} needs diffusers to build the AutoencoderKL (pip install diffusers): "
                          f"{e}") from e
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"vae {folder!r} holds a {cls_name}, which this diffusers does not have")
    model = _reading(folder, "vae folder", lambda: cls.from_pretrained(folder))
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------


def schedule_from_config(config: dict):
    """A schedule from ``{"type": "VPSchedule" | "VPSDESchedule" | "VESDESchedule", **its keyword
    arguments}`` (the form of ``fastdiff.models.SAMPLING`` and of the ONNX metadata)."""
    from fastdiff import schedules

    kind = config.get("type")
    if kind not in _SCHEDULE_TYPES:
        raise ValueError(f"schedule type must be one of {_SCHEDULE_TYPES}, got {kind!r}")
    return getattr(schedules, kind)(**{k: v for k, v in config.items() if k != "type"})


def _scheduler_config_path(folder: str, unet_dir: str) -> Optional[str]:
    for candidate in (os.path.join(folder, "scheduler", "scheduler_config.json"),
                      os.path.join(unet_dir, "scheduler_config.json"),
                      os.path.join(folder, "scheduler_config.json")):
        if os.path.isfile(candidate):
            return candidate
    return None


def _default_scheduler_facts(folder: str) -> dict:
    import warnings

    from fastdiff.schedules import VPSchedule

    warnings.warn(f"{folder!r} has no scheduler config (scheduler/scheduler_config.json): using DDPM's linear "
                  "schedule of 1000 steps with eps prediction; pass schedule= if the model was trained otherwise",
                  stacklevel=3)
    return dict(schedule=VPSchedule("linear", 1000), prediction="eps", learned_sigma=False,
                variance_type="fixed_small", clip_x0=None, dynamic_threshold=None, sample_max_value=1.0)


def _scheduler_facts(path: str) -> dict:
    """Schedule, prediction, learned variance and x0 clipping from a diffusers scheduler config."""
    from fastdiff.schedules import BETA_SCHEDULES, VPSchedule

    cfg = _read_json(path)
    if "beta_schedule" not in cfg and cfg.get("trained_betas") is None:
        raise ValueError(f"{path}: a {cfg.get('_class_name', 'scheduler')} without betas; fastdiff.load reads "
                         "beta-schedule (DDPM / DDIM / PNDM / Euler / DPM-Solver ...) configs")
    steps = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        sched = _reading(path, "scheduler config", lambda: VPSchedule(betas=cfg["trained_betas"]))
    else:
        name = cfg.get("beta_schedule", "linear")
        if name not in BETA_SCHEDULES:
            raise ValueError(f"{path}: beta_schedule {name!r} is not one of {BETA_SCHEDULES}")
        sched = _reading(path, "scheduler config", lambda: VPSchedule(
            name, steps, float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))))
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError(f"{path}: rescale_betas_zero_snr is not supported")
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"{path}: prediction_type {pred!r} is not one of epsilon, v_prediction, sample")
    variance = cfg.get("variance_type") or "fixed_small"
    thresholding = bool(cfg.get("thresholding", False))
    return dict(schedule=sched, prediction=pred, learned_sigma=variance in ("learned", "learned_range"),
                variance_type=variance,
                clip_x0=float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample") and not thresholding
                else None,
                dynamic_threshold=float(cfg.get("dynamic_thresholding_ratio", 0.995)) if thresholding else None,
                sample_max_value=float(cfg.get("sample_max_value", 1.0)) if thresholding else 1.0)


# ---------------------------------------------------------------------------------------------
# paths and errors
# ---------------------------------------------------------------------------------------------


def _device(device) -> torch.device:
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def _check_path(path, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path!r} is empty (0 bytes)")
    return path


def _check_file(path, what: str) -> str:
    path = _check_path(path, what)
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} is not a file")
    return path


def _read_json(path: str) -> dict:
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path!r} is empty (0 bytes)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} holds no JSON object")
    return data


def _unet_folder(folder: str) -> str:
    for candidate in (folder, os.path.join(folder, "unet")):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        parts = [k for k, v in _read_json(index).items() if not k.startswith("_") and isinstance(v, list)]
        raise ValueError(f"pipeline folder {folder!r} has no unet/ (its parts: {', '.join(parts)}); fastdiff.load "
                         "reads pipelines whose denoiser is a UNet2DModel (use fastdiff.accelerate(pipe) for others)")
    raise ValueError(f"folder {folder!r} is not a diffusers model folder (no config.json) nor a pipeline "
                     "folder (no unet/config.json)")


def _diffusers_unet(folder: str):
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise ValueError(f"{folder}/config.json asks for a UNet2DModel that fastdiff's DDPMUNet does not build, "
                         f"and diffusers (which would) is not installed: {e}") from e
    return _reading(folder, "folder", lambda: UNet2DModel.from_pretrained(folder))


def _sample_shape(model) -> tuple:
    return tuple(model.example_inputs(1)["x"].shape[1:])


def _reading(path, what: str, fn, context: str = ""):
    """``fn()``, with any failure turned into one ValueError that names ``path`` (a message that already
    names it passes through)."""
    try:
        return fn()
    except FileNotFoundError:
        raise
    except Exception as e:
        text = str(e)
        shown = os.fspath(path)
        if isinstance(e, ValueError) and (shown in text or os.path.basename(shown) in text):
            raise
        raise ValueError(f"{what} {shown!r} could not be read{context}: {_summary(e)}") from e


def _summary(e: Exception) -> str:
    """One line for an exception: key counts for torch's load_state_dict report, else its first line."""
    text = str(e)
    if "Error(s) in loading state_dict" in text:
        parts = []
        for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*?)\.\s*$"),
                               ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$")):
            m = re.search(pattern, text, re.M)
            if m:
                keys = re.findall(r'"([^"]+)"', m.group(1))
                parts.append(f"{len(keys)} {label} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        shaped = re.findall(r"size mismatch for ([^:]+):", text)
        if shaped:
            parts.append(f"{len(shaped)} mis-shaped ({', '.join(shaped[:3])}{', ...' if len(shaped) > 3 else ''})")
        return "it holds another architecture's weights: " + "; ".join(parts) if parts else text.splitlines()[0]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line if len(line) <= 300 else line[:297] + "..."
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
