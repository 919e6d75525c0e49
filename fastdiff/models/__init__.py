"""The model zoo: upstream architectures on fastdiff's fused modules, loading upstream checkpoints.

``preset(name)`` builds a model from a plain keyword dict; ``PRESETS`` maps each name to its class
and keywords (the constructors take the upstream keyword names). ``SAMPLING`` maps each name to what a
model needs to be sampled that its weights do not say: the schedule it was trained on, its prediction
type, whether it learns sigma, its classes and null label, its default guidance and, for latent models,
the scale of its latents (:func:`preset_info` resolves them for a configuration; ``fastdiff.load`` uses
them).
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch

from fastdiff.models.adm import PRESETS as _ADM_PRESETS
from fastdiff.models.adm import ADMClassifier, ADMUNet
from fastdiff.models.checkpoint import CheckpointError, CheckpointNotFoundError, load_state_dict, read_state_dict
from fastdiff.models.common import ZooModule
from fastdiff.models.ddpm_unet import PRESETS as _DDPM_PRESETS
from fastdiff.models.ddpm_unet import DDPMUNet
from fastdiff.models.dit import PRESETS as _DIT_PRESETS
from fastdiff.models.dit import DiT
from fastdiff.models.uvit import PRESETS as _UVIT_PRESETS
from fastdiff.models.uvit import UViT

PRESETS: dict[str, tuple[type, dict]] = {**_ADM_PRESETS, **_DDPM_PRESETS, **_DIT_PRESETS, **_UVIT_PRESETS}

__all__ = ["ADMUNet", "ADMClassifier", "DDPMUNet", "DiT", "UViT", "ZooModule", "PRESETS", "SAMPLING", "preset",
           "preset_info", "load", "read_state_dict", "load_state_dict", "fitting_presets", "CheckpointError",
           "CheckpointNotFoundError"]

# ---------------------------------------------------------------------------------------------
# What sampling a preset needs, from the upstream code that trained it
# ---------------------------------------------------------------------------------------------

# Schedules as keyword dicts of fastdiff.schedules classes ("type" names the class).
_LINEAR = {"type": "VPSchedule", "beta_schedule": "linear", "num_train_timesteps": 1000,
           "beta_start": 1e-4, "beta_end": 0.02}
# guided-diffusion's "cosine" (Nichol & Dhariwal 2021, Eq. 17, betas capped at 0.999) is diffusers'
# squaredcos_cap_v2.
_COSINE = {"type": "VPSchedule", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
# Stable Diffusion's betas (U-ViT's stable_diffusion_beta_schedule: linear in sqrt(beta)).
_SCALED_LINEAR = {"type": "VPSchedule", "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                  "beta_start": 0.00085, "beta_end": 0.012}
# U-ViT's pixel models: the continuous VP SDE (beta 0.1 to 20) with the network fed 999 t (its sde.py);
# its DPM-Solver samples down to t = 1e-4.
_VPSDE = {"type": "VPSDESchedule", "beta_min": 0.1, "beta_max": 20.0, "eps": 1e-4, "time_scale": 999.0}

SD_LATENT_SCALE = 0.18215  # Stable Diffusion's KL autoencoder (DiT and U-ViT train on its latents)


def _info(schedule: dict, *, learned_sigma: bool = False, null_label=None, guidance_scale: float = 1.0,
          latent_scale=None, timestep_offset: int = 0, kind: str = "denoiser") -> dict:
    """One preset's sampling facts. ``null_label``: None (no classifier-free guidance), ``"appended"``
    (DiT: the label table has one row past the classes), ``"last"`` (U-ViT: the last label is the null
    one). ``timestep_offset``: the network's timestep minus the schedule's index (U-ViT's latent models
    were trained on timesteps 1..1000 for alphas_cumprod[0..999])."""
    return {"schedule": schedule, "prediction": "eps", "learned_sigma": learned_sigma, "null_label": null_label,
            "guidance_scale": guidance_scale, "latent_scale": latent_scale, "timestep_offset": timestep_offset,
            "kind": kind}


def _sampling_info(name: str, cls: type, kwargs: dict) -> dict:
    if cls is ADMClassifier:
        return _info(_COSINE if kwargs["image_size"] == 64 else _LINEAR, kind="classifier")
    if cls is ADMUNet:  # guided-diffusion README: the 64x64 model uses the cosine schedule, the rest linear
        return _info(_COSINE if kwargs["image_size"] == 64 else _LINEAR, learned_sigma=True)
    if cls is DDPMUNet:
        return _info(_LINEAR)
    if cls is DiT:  # DiT's sample.py: --cfg-scale 4.0
        return _info(_LINEAR, learned_sigma=True, null_label="appended", guidance_scale=4.0,
                     latent_scale=SD_LATENT_SCALE)
    if cls is UViT and kwargs.get("in_chans", 3) == 4:
        # configs/imagenet{256,512}_uvit_*.py: cfg scale 0.4 (256) / 0.7 (512) in the form
        # cond + s (cond - uncond), which is guidance 1 + s here
        return _info(_SCALED_LINEAR, null_label="last", guidance_scale=1.4 if kwargs["img_size"] == 32 else 1.7,
                     latent_scale=SD_LATENT_SCALE, timestep_offset=1)
    if cls is UViT:  # cifar10, celeba64 (unconditional), imagenet64 (1000 classes, no guidance)
        return _info(_VPSDE)
    raise ValueError(f"no sampling facts for preset {name!r}")  # pragma: no cover - every family is above


SAMPLING: dict[str, dict] = {name: _sampling_info(name, cls, kwargs) for name, (cls, kwargs) in PRESETS.items()}


def _classes_and_null(cls: type, config: dict, null_label) -> tuple:
    """(number of real classes or None, null label or None) of a configuration."""
    table = config.get("num_classes")
    if not isinstance(table, int) or table <= 0:
        return None, None
    if null_label == "appended" and config.get("class_dropout_prob", 0.1) > 0:
        return table, table
    if null_label == "last":
        return table - 1, table - 1
    return table, None


def preset_info(name: str, **overrides) -> dict:
    """What sampling the preset ``name`` (with constructor ``overrides``) needs, resolved: ``schedule``
    (a keyword dict with its class in ``"type"``), ``prediction``, ``learned_sigma``, ``num_classes`` (the
    real classes, None when unconditional), ``y_null`` (None: no classifier-free guidance),
    ``guidance_scale`` (the upstream default), ``latent_scale`` (None for pixel models),
    ``timestep_offset``, ``kind`` ("denoiser" or "classifier") and ``sample_shape`` (C, H, W), the latent
    shape for latent models."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    cls, kwargs = PRESETS[name]
    config = {**kwargs, **overrides}
    info = dict(SAMPLING[name])
    info["num_classes"], info["y_null"] = _classes_and_null(cls, config, info.pop("null_label"))
    if cls is DiT:
        info["learned_sigma"] = bool(config.get("learn_sigma", True))
    elif cls is ADMUNet:  # guided-diffusion's learn_sigma doubles out_channels
        info["learned_sigma"] = config.get("out_channels") == 2 * config.get("in_channels", 3)
    if info["y_null"] is None:
        info["guidance_scale"] = 1.0
    info["sample_shape"] = _sample_shape(cls, config)
    return info


# (channels keyword, size keyword) of each family's constructor
_GEOMETRY = {ADMUNet: ("in_channels", "image_size"), ADMClassifier: ("in_channels", "image_size"),
             DDPMUNet: ("in_channels", "sample_size"), DiT: ("in_channels", "input_size"),
             UViT: ("in_chans", "img_size")}


def _sample_shape(cls: type, config: dict) -> tuple:
    """(C, H, W) of one input, from the configuration alone: building even a meta-device model runs
    torch's reference initialisers, whose first call imports torch._dynamo (a second or more)."""
    defaults = inspect.signature(cls.__init__).parameters
    channels, size = (config[k] if k in config else defaults[k].default for k in _GEOMETRY[cls])
    size = size or 32  # DDPMUNet without sample_size: its example_inputs' default
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(channels), int(h), int(w))


def preset(name: str, device=None, dtype=None, **overrides) -> ZooModule:
    """The model of a preset, with keyword overrides: ``preset("dit-xl-2-256", num_classes=10)``.

    ``device="meta"`` builds it without allocating weights (for counting MACs or parameters).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    cls, kwargs = PRESETS[name]
    config = {**kwargs, **overrides}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = cls(**config)
    # the preset's null label travels with the model (fd.sample, FeatureExtractor and the ONNX export
    # read it); None where the released model has none
    model.y_null = _classes_and_null(cls, config, SAMPLING[name]["null_label"])[1]
    return model.to(dtype) if dtype is not None else model


def fitting_presets(state: dict) -> list[str]:
    """The presets whose model takes ``state`` exactly (keys and shapes), built on the meta device (no
    weights allocated; about 2 s for all presets on a CPU)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    out = []
    for name in PRESETS:
        try:
            own = preset(name, device="meta").state_dict()
        except Exception:  # a preset that cannot build on meta is not a candidate
            continue
        if len(own) == len(shapes) and all(shapes.get(k) == tuple(v.shape) for k, v in own.items()):
            out.append(name)
    return out


def load(name: str, checkpoint: str, device="cpu", dtype=None, strict: bool = True, **overrides) -> ZooModule:
    """A preset's model with a released checkpoint loaded, in one call:
    ``load("adm-256-cond", "256x256_diffusion.pt")``, ``load("dit-xl-2-256", "DiT-XL-2-256x256.pt")``,
    ``load("ddpm-cifar10", "ddpm-cifar10-32/")`` (a diffusers folder). Keyword overrides change the
    preset's configuration (for a checkpoint trained with other settings).

    A checkpoint that is missing, empty, truncated, corrupt or made for another architecture raises
    :class:`CheckpointError` (a ValueError) naming the file, with the counts and the first few missing,
    unexpected and mis-shaped keys."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    cls, _ = PRESETS[name]
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise CheckpointError(f"checkpoint must be a file or folder path, got {type(checkpoint).__name__}")
    checkpoint = os.fspath(checkpoint)
    if os.path.isdir(checkpoint):
        if cls is not DDPMUNet:
            raise ValueError(f"checkpoint {checkpoint!r} is a folder; only DDPM presets load diffusers folders")
        model = DDPMUNet.from_pretrained(checkpoint)
    else:
        state = read_state_dict(checkpoint)  # the file is read (and its errors raised) before the model is built
        model = preset(name, **overrides)
        try:
            load_state_dict(model, state, checkpoint, strict=strict)
        except CheckpointError as e:
            fits = [p for p in fitting_presets(state) if p != name]
            hint = f" It fits the preset{'s' * (len(fits) > 1)} {', '.join(fits)}." if fits else ""
            raise CheckpointError(f"{e}{hint}") from None
    return model.to(device=device, dtype=dtype)
