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
    """The bundled digits Denoiser (weights at ``path``, default: the packaged digits.safetensors, with
    its JSON metadata beside it). A missing, corrupt or mismatched file raises
    :class:`fastdiff.models.CheckpointError` naming it."""
    from fastdiff.denoiser import Denoiser
    from fastdiff.models.adm import ADMUNet
    from fastdiff.models.checkpoint import CheckpointError, CheckpointNotFoundError, load_state_dict, read_state_dict
    from fastdiff.schedules import VPSchedule

    path = os.fspath(path or DIGITS_WEIGHTS)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint: digits weights not found at {path!r}; train them with "
                                      "`python -m fastdiff.train_digits`")
    try:
        meta = digits_metadata(path)
        cfg = dict(meta["config"])
        cfg["attention_resolutions"] = tuple(cfg["attention_resolutions"])
        cfg["channel_mult"] = tuple(cfg["channel_mult"])
        sched = {k: v for k, v in meta["schedule"].items() if k != "kind"}
        null_label, num_classes = int(meta["null_label"]), int(meta["num_classes"])
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"checkpoint: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint: the metadata next to {path!r} is not readable digits metadata "
                              f"({type(e).__name__}: {e})") from None
    model = ADMUNet(**cfg)
    load_state_dict(model, read_state_dict(path), path, strict=True)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    den = Denoiser(model, VPSchedule(**sched), prediction=meta.get("prediction", "eps"),
                   learned_sigma=bool(meta.get("learned_sigma", False)))
    den.y_null = model.y_null = null_label
    den.num_classes = num_classes
    den.default_guidance_scale = float(meta.get("default_guidance", 1.0))
    den.sample_shape = (cfg["in_channels"], cfg["image_size"], cfg["image_size"])
    den.metadata = meta
    return den
