"""The model zoo: upstream architectures on fastdiff's fused modules, loading upstream checkpoints.

``preset(name)`` builds a model from a plain keyword dict; ``PRESETS`` maps each name to its class
and keywords (the constructors take the upstream keyword names).
"""

from __future__ import annotations

import contextlib
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

__all__ = ["ADMUNet", "ADMClassifier", "DDPMUNet", "DiT", "UViT", "ZooModule", "PRESETS", "preset", "load",
           "read_state_dict", "load_state_dict", "fitting_presets", "CheckpointError", "CheckpointNotFoundError"]


def preset(name: str, device=None, dtype=None, **overrides) -> ZooModule:
    """The model of a preset, with keyword overrides: ``preset("dit-xl-2-256", num_classes=10)``.

    ``device="meta"`` builds it without allocating weights (for counting MACs or parameters).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    cls, kwargs = PRESETS[name]
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = cls(**{**kwargs, **overrides})
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
