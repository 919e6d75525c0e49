"""The bundled digits model: a 1.2M-parameter class-conditional ADM U-Net on scikit-learn's digits (16x16,
one channel, values in [-1, 1]), trained by ``python -m fastdiff.train_digits`` (the command and its
settings are stored in ``weights/digits.json``).

``load_digits_model()`` returns a :class:`fastdiff.Denoiser` (eps prediction, linear VP schedule of 1000
steps) with the attributes ``y_null`` (10, the label embedding row trained as "no class" for
classifier-free guidance; the model carries it too), ``num_classes`` (10), ``default_guidance_scale``
(2), ``sample_shape`` ((1, 16, 16)) and ``metadata`` (the JSON). ``fastdiff.load("digits")`` is the same.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

__all__ = ["DIGITS_WEIGHTS", "load_digits_model", "digits_metadata"]

DIGITS_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "weights", "digits.safetensors")


def digits_metadata(path: Optional[str] = None) -> dict:
    path = path or DIGITS_WEIGHTS
    meta_path = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"no metadata {meta_path!r} next to the weights {path!r}")
    with open(meta_path) as f:
        return json.load(f)


def load_digits_model(path: Optional[str] = None, device="cpu", dtype: torch.dtype = torch.float32):
    """The bundled digits Denoiser (weights at ``path``, default: the packaged digits.safetensors)."""
    from safetensors.torch import load_file

    from fastdiff.denoiser import Denoiser
    from fastdiff.models.adm import ADMUNet
    from fastdiff.schedules import VPSchedule

    path = path or DIGITS_WEIGHTS
    if not os.path.exists(path):
        raise FileNotFoundError(f"digits weights not found at {path!r}; train them with "
                                "`python -m fastdiff.train_digits`")
    meta = digits_metadata(path)
    cfg = dict(meta["config"])
    cfg["attention_resolutions"] = tuple(cfg["attention_resolutions"])
    cfg["channel_mult"] = tuple(cfg["channel_mult"])
    model = ADMUNet(**cfg)
    model.load_state_dict(load_file(path), strict=True)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    sched = {k: v for k, v in meta["schedule"].items() if k != "kind"}
    den = Denoiser(model, VPSchedule(**sched), prediction=meta.get("prediction", "eps"),
                   learned_sigma=bool(meta.get("learned_sigma", False)))
    den.y_null = model.y_null = int(meta["null_label"])
    den.num_classes = int(meta["num_classes"])
    den.default_guidance_scale = float(meta.get("default_guidance", 1.0))
    den.sample_shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    den.metadata = meta
    return den
