"""Diffusion features: (image x timestep x ensemble) in one batched pass, stopped at the deepest layer.

Diffusion models are representation learners: DDPM-Seg (Baranchuk et al. 2022) reads decoder blocks at
a few timesteps and classifies every pixel of their upsampled concatenation; DIFT (Tang et al. 2023)
reads one decoder block at one timestep, averaged over an ensemble of noise draws, for semantic
correspondence; DDAE (Xiang et al. 2023) linear-probes pooled block activations. Their code runs one
full forward per timestep (and per image). Here every (image, timestep, ensemble member) is a row of
one batch (the zoo's models take a timestep per sample), chunked to a budget, and each forward stops
right after the deepest requested layer: the rest of a U-Net's decoder and its output head, or a
transformer's remaining blocks, never run.

    fx = FeatureExtractor(model, schedule, layers=["output_blocks.4"], timesteps=[101], ensemble=8)
    feats = fx(images)                     # {"output_blocks.4": {101: (N, C, h, w)}}, ensemble-mean
    fx = FeatureExtractor(model, schedule, **RECIPES["ddpm-seg"])   # per-pixel (N, sum C, H, W)
    fx.extract_to("feats/", loader)        # safetensors shards + index.json; load_features("feats/")

Layers are module names, in the forward order of each model:

- ``ADMUNet``: ``input_blocks.i``, ``middle_block``, ``output_blocks.i``, ``out``
  (``ADMClassifier``: its ``input_blocks.i``, ``middle_block``);
- ``DDPMUNet``: ``conv_in``, ``down_blocks.i`` (the block's hidden state, not its skip tuple),
  ``mid_block``, ``up_blocks.i``;
- ``DiT``: ``blocks.i``; ``UViT``: ``in_blocks.i``, ``mid_block``, ``out_blocks.i``. Transformer
  tokens (N, L, D) come back as maps (N, D, h, w), U-ViT's time and label tokens dropped
  (:func:`tokens_to_map`);
- any other module: the names of ``model.named_modules()``, read with forward hooks; the forward is cut
  after the last requested module by an exception raised from its hook (the order is learnt on the
  first call).

A feature equals the output of the named module in a full forward of ``model(x_t, t, y)`` at
``x_t = schedule.add_noise(image, noise, t)``: the walkers below follow each model's ``forward`` line
by line (the tests hold them to a hook loop over full forwards at 1e-5). Built from a Denoiser, the
network is called as the Denoiser calls it, through its ``model_fn``: the latent U-ViT models of
``fastdiff.load`` see ``t + 1`` (:class:`fastdiff.loading.TimestepOffset`), and the walk (or the hooks)
runs on whatever inputs ``model_fn`` hands the network.

Noise is per sample: image ``k`` of a call (or of a stream) draws its noise from a CPU generator
seeded with ``seed + k`` (or ``seeds[k]``), shape (ensemble, C, H, W) shared by all timesteps (as
DDPM-Seg shares one noise across its timesteps), or (timesteps, ensemble, C, H, W) with
``noise_per_timestep=True``; so a feature does not depend on the batch an image is in.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdiff.feature_folder import FeatureFolderError, load_features, merge_index
from fastdiff.io import check_output_path, write_bytes
from fastdiff.model_cache import run_copy
from fastdiff.samplers import make_generators, randn_per_sample

__all__ = ["FeatureExtractor", "RECIPES", "layer_names", "tokens_to_map", "load_features", "merge_index",
           "correspondence", "add_features_arguments", "features_command"]

# Published settings, by name; keyword dicts for FeatureExtractor (keywords given to it win).
RECIPES: dict[str, dict] = {
    # Baranchuk et al. 2022 (ddpm-segmentation): ADM decoder blocks 5, 6, 7, 8, 12 at t = 50, 150, 250,
    # bilinearly upsampled to the image and concatenated (timestep-major, as its collect_features).
    "ddpm-seg": dict(layers=[f"output_blocks.{i}" for i in (5, 6, 7, 8, 12)], timesteps=[50, 150, 250],
                     ensemble=1, upsample_to="input", concat=True),
    # Tang et al. 2023 (DIFT, ADMFeaturizer): output block 4 of the 256x256 unconditional ADM at t = 101,
    # the mean over 8 noise draws.
    "dift-adm": dict(layers=["output_blocks.4"], timesteps=[101], ensemble=8),
    # Xiang et al. 2023 (DDAE): globally average-pooled activations of one block at one small t
    # (t = 11 on its CIFAR-10 DDPM); the block is the caller's choice: pass layers=[...].
    "ddae": dict(timesteps=[11], ensemble=1, pool="avg"),
}

POOLS = (None, "avg")


# ---------------------------------------------------------------------------------------------
# layer names and the walkers (one per model family, each mirroring that model's forward)
# ---------------------------------------------------------------------------------------------


def _kind(model: nn.Module) -> str:
    from fastdiff.models import ADMClassifier, ADMUNet, DDPMUNet, DiT, UViT

    for cls, kind in ((ADMUNet, "adm"), (ADMClassifier, "adm"), (DDPMUNet, "ddpm"), (DiT, "dit"),
                      (UViT, "uvit")):
        if type(model) is cls:  # a subclass may change forward: it gets the hook path
            return kind
    return "hooks"


def layer_names(model: nn.Module) -> list[str]:
    """The readable layers of ``model``, in forward order (any module name for a non-zoo model)."""
    kind = _kind(model)
    if kind == "adm":
        names = [f"input_blocks.{i}" for i in range(len(model.input_blocks))] + ["middle_block"]
        if hasattr(model, "output_blocks"):
            names += [f"output_blocks.{i}" for i in range(len(model.output_blocks))] + ["out"]
        return names
    if kind == "ddpm":
        names = ["conv_in"] + [f"down_blocks.{i}" for i in range(len(model.down_blocks))]
        names += ["mid_block"] if model.mid_block is not None else []
        return names + [f"up_blocks.{i}" for i in range(len(model.up_blocks))]
    if kind == "dit":
        return [f"blocks.{i}" for i in range(len(model.blocks))]
    if kind == "uvit":
        return ([f"in_blocks.{i}" for i in range(len(model.in_blocks))] + ["mid_block"]
                + [f"out_blocks.{i}" for i in range(len(model.out_blocks))])
    return [name for name, _ in model.named_modules() if name]


def tokens_to_map(tokens: Tensor, grid: int, extras: int = 0) -> Tensor:
    """(N, extras + grid*grid, D) transformer tokens -> (N, D, grid, grid), the leading extras dropped."""
    n, _, d = tokens.shape
    return tokens[:, extras:, :].transpose(1, 2).reshape(n, d, grid, grid)


class _Collector:
    """Keeps the wanted layers' outputs; ``take`` says when the deepest one has been reached."""

    def __init__(self, wanted: Sequence[str], last: str, transform: Optional[Callable] = None):
        self.wanted, self.last, self.transform = set(wanted), last, transform
        self.out: dict[str, Tensor] = {}

    def take(self, name: str, h: Tensor) -> bool:
        if name in self.wanted:
            self.out[name] = self.transform(h) if self.transform is not None else h
        return name == self.last


def _walk_adm(model, x: Tensor, t: Tensor, y: Optional[Tensor], keep: _Collector) -> dict:
    from fastdiff.models.adm import timestep_embedding

    t_emb = timestep_embedding(t, model.model_channels)
    emb = model.time_embed(t_emb.to(model.time_embed[0].weight.dtype))      # (N, 4 * model_channels)
    if getattr(model, "num_classes", None) is not None:
        emb = emb + model.label_emb(y)
    hs = []
    h = x.to(model.dtype)
    for i, module in enumerate(model.input_blocks):
        h = module(h, emb)                                                  # (N, C_i, *S_i)
        hs.append(h)
        if keep.take(f"input_blocks.{i}", h):
            return keep.out
    h = model.middle_block(h, emb)                                          # (N, C_mid, *S_mid)
    if keep.take("middle_block", h):
        return keep.out
    for i, module in enumerate(model.output_blocks):
        h = module(torch.cat([h, hs.pop()], dim=1), emb)                    # (N, C_j, *S_j)
        if keep.take(f"output_blocks.{i}", h):
            return keep.out
    keep.take("out", model.out(h.to(x.dtype)))
    return keep.out


def _walk_ddpm(model, x: Tensor, t: Tensor, y: Optional[Tensor], keep: _Collector) -> dict:
    from fastdiff.models.ddpm_unet import get_timestep_embedding

    if model.center_input_sample:
        x = 2 * x - 1.0
    t_emb = get_timestep_embedding(t, model.conv_in.out_channels, model.flip_sin_to_cos, model.freq_shift)
    emb = model.time_embedding(t_emb.to(model.time_embedding.linear_1.weight.dtype))
    if model.class_embedding is not None:
        emb = emb + model.class_embedding(y).to(emb.dtype)
    h = model.conv_in(x)                                                    # (N, C0, H, W)
    if keep.take("conv_in", h):
        return keep.out
    skips = (h,)
    for i, block in enumerate(model.down_blocks):
        h, states = block(h, emb)                                           # (N, C_i, H_i, W_i)
        skips += states
        if keep.take(f"down_blocks.{i}", h):
            return keep.out
    if model.mid_block is not None:
        h = model.mid_block(h, emb)
        if keep.take("mid_block", h):
            return keep.out
    for i, block in enumerate(model.up_blocks):
        k = len(block.resnets)
        h, skips = block(h, skips[-k:], emb), skips[:-k]                    # (N, C_j, H_j, W_j)
        if keep.take(f"up_blocks.{i}", h):
            return keep.out
    return keep.out


def _walk_dit(model, x: Tensor, t: Tensor, y: Tensor, keep: _Collector) -> dict:
    x = model.x_embedder(x) + model.pos_embed                                # (N, T, D)
    c = model.t_embedder(t) + model.y_embedder(y, model.training)          # (N, D)
    for i, block in enumerate(model.blocks):
        x = block(x, c)                                                     # (N, T, D)
        if keep.take(f"blocks.{i}", x):
            return keep.out
    return keep.out


def _walk_uvit(model, x: Tensor, t: Tensor, y: Optional[Tensor], keep: _Collector) -> dict:
    from fastdiff.models.uvit import timestep_embedding

    x = model.patch_embed(x)                                                # (B, L, D)
    time_token = model.time_embed(timestep_embedding(t, model.embed_dim).to(x.dtype))
    x = torch.cat((time_token.unsqueeze(1), x), dim=1)
    if y is not None:
        x = torch.cat((model.label_emb(y).unsqueeze(1), x), dim=1)
    x = x + model.pos_embed                                                 # (B, extras + L, D)
    skips = []
    for i, blk in enumerate(model.in_blocks):
        x = blk(x)
        skips.append(x)
        if keep.take(f"in_blocks.{i}", x):
            return keep.out
    x = model.mid_block(x)
    if keep.take("mid_block", x):
        return keep.out
    for i, blk in enumerate(model.out_blocks):
        x = blk(x, skips.pop())
        if keep.take(f"out_blocks.{i}", x):
            return keep.out
    return keep.out


_WALKERS = {"adm": _walk_adm, "ddpm": _walk_ddpm, "dit": _walk_dit, "uvit": _walk_uvit}


class _StopForward(Exception):
    pass


class _FeaturesReady(Exception):
    """Carries the features out of a Denoiser's ``model_fn`` once the walk has stopped."""

    def __init__(self, features: dict):
        super().__init__()
        self.features = features


class _WalkedNetwork:
    """The network as a Denoiser's ``model_fn`` sees it, for the walkers: ``model_fn(walked, x, t, y)``
    decides what the network is called with (a timestep offset, the labels as ``class_labels``, ...), the
    walk runs on exactly those inputs, stops after the deepest layer and hands the features out, so nothing
    of ``model_fn`` after the network runs. Called as the zoo models are: ``(x, timesteps, y=None)``."""

    def __init__(self, walk: Callable):
        self.walk = walk

    def __call__(self, x: Tensor, timesteps: Tensor, y: Optional[Tensor] = None, *,
                 class_labels: Optional[Tensor] = None, **kwargs):
        if kwargs:
            raise ValueError(f"model_fn passed {sorted(kwargs)} to the model: the feature walkers take "
                             "(x, timesteps, y) only")
        raise _FeaturesReady(self.walk(x, timesteps, y if y is not None else class_labels))


def _callable_name(fn) -> str:
    """A name of ``fn`` that is the same in every process (for a feature run's identity)."""
    if inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
        return f"{fn.__module__}.{fn.__qualname__}"
    return repr(fn) if type(fn).__repr__ is not object.__repr__ else type(fn).__qualname__


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _call_model(model: nn.Module, x: Tensor, t: Tensor, y: Optional[Tensor]):
    return model(x, t, y=y) if y is not None else model(x, t)


# ---------------------------------------------------------------------------------------------
# the extractor
# ---------------------------------------------------------------------------------------------


def _check_int_list(name: str, values, low: int, high: int) -> list[int]:
    if isinstance(values, (int, str)) or values is None:
        values = [values]
    values = list(values)
    if not values:
        raise ValueError(f"{name} must be a non-empty list")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int,)) and not (
                isinstance(v, Tensor) and v.dim() == 0 and not v.is_floating_point()):
            raise ValueError(f"{name} must hold integers, got {v!r}")
        v = int(v)
        if not low <= v <= high:
            raise ValueError(f"{name} must lie in [{low}, {high}], got {v}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} must not repeat a value, got {out}")
    return out


def _parse_bytes(budget) -> Optional[int]:
    if budget is None:
        return None
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if budget <= 0:
            raise ValueError(f"max_memory must be > 0, got {budget}")
        return int(budget)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)i?[bB]?\s*", str(budget))
    if not m:
        raise ValueError(f"max_memory must be bytes or a size like '4GB', got {budget!r}")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"max_memory must be > 0, got {budget!r}")
    return value


class FeatureExtractor:
    """Features of ``model`` at ``layers`` x ``timesteps``, ensemble-averaged, in batched forwards.

    Args:
        model: a zoo model (ADMUNet, ADMClassifier, DDPMUNet, DiT, UViT), any ``nn.Module`` called as
            ``model(x, t)`` / ``model(x, t, y=y)``, or a :class:`fastdiff.Denoiser` (its model, its
            schedule when ``schedule`` is None, its ``y_null`` as the null label: the bundled digits model;
            and its ``model_fn``: the network is called as the Denoiser calls it, e.g. at ``t + 1`` for the
            latent U-ViT models of ``fastdiff.load``).
        schedule: a :class:`fastdiff.schedules.VPSchedule` (``add_noise``, ``num_train_timesteps``); None
            with a Denoiser (``FeatureExtractor(fastdiff.load("digits"), layers=..., timesteps=...)``).
        layers: module names (see :func:`layer_names`); the forward stops after the deepest.
        timesteps: integer timesteps in ``[0, num_train_timesteps - 1]``, no repeats.
        ensemble: noise draws per (image, timestep); features are their mean (DIFT).
        seed: image ``k`` of a call uses seed ``seed + start + k`` (``start`` counts images before it
            in a stream); ``seeds=`` on a call overrides.
        pool: ``None`` (maps) or ``"avg"`` (global average over space / tokens: (N, C), DDAE).
        upsample_to: ``None``, ``"input"`` (the image's size), an int or ``(H, W)``: bilinear
            (align_corners=False) resize of every map (DDPM-Seg).
        concat: one tensor per call, the layers concatenated along channels, timestep-major
            (``for t: for layer:``, DDPM-Seg's order); maps must share a size (use ``upsample_to``).
        noise_per_timestep: draw fresh noise for each timestep (default: one draw shared by all).
        y: conditioning of class-conditional models: ``None`` (the null label where the model has
            one: a Denoiser's ``y_null``, DiT ``num_classes``, U-ViT ``num_classes - 1``, or
            ``model.null_label``), an int for
            every image, or per-call labels ``fx(images, y=labels)``.
        batch_size: rows (image x timestep x ensemble) per forward; default 64, or as many as
            ``max_memory`` allows.
        max_memory: a budget for one forward's activations ("2GB" or bytes), measured on one row.
        dtype: dtype of the returned features (default float32; None keeps the model's).
    """

    def __init__(self, model: nn.Module, schedule=None, layers: Sequence[str] = None,
                 timesteps: Sequence[int] = None,
                 ensemble: int = 1, seed: int = 0, pool: Optional[str] = None,
                 upsample_to: Union[None, str, int, tuple] = None, concat: bool = False,
                 noise_per_timestep: bool = False, y=None, batch_size: Optional[int] = None,
                 max_memory=None, dtype: Optional[torch.dtype] = torch.float32):
        from fastdiff.denoiser import call_model

        self._y_null = None
        # how the network is called: model_fn(network, x_t, t, y) as a Denoiser calls it, or None (directly)
        self.model_fn: Optional[Callable] = None
        if not isinstance(model, nn.Module) and isinstance(getattr(model, "model", None), nn.Module):
            # a fastdiff Denoiser: its model, its schedule, its null label, its model call
            self._y_null = getattr(model, "y_null", None)
            fn = getattr(model, "model_fn", None)
            self.model_fn = None if fn is None or fn is call_model else fn
            schedule = model.schedule if schedule is None else schedule
            model = model.model
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module or a fastdiff Denoiser, got {type(model).__name__}")
        if schedule is None:
            raise ValueError("schedule: pass the model's schedule, or a fastdiff Denoiser (fastdiff.load) alone")
        if not hasattr(schedule, "add_noise") or not hasattr(schedule, "num_train_timesteps"):
            raise ValueError("schedule must be a discrete VP schedule (fastdiff.schedules.VPSchedule)")
        self.model, self.schedule = model, schedule
        self.kind = _kind(model)
        if layers is None or isinstance(layers, str):
            layers = [layers] if isinstance(layers, str) else []
        layers = list(layers)
        if not layers:
            raise ValueError("layers must name at least one layer")
        known = layer_names(model)
        for name in layers:
            if name not in known:
                shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
                raise ValueError(f"layers: unknown layer {name!r} for {type(model).__name__}; known: {shown}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat a name, got {layers}")
        self.layers = layers
        self.timesteps = _check_int_list("timesteps", timesteps if timesteps is not None else [], 0,
                                         schedule.num_train_timesteps - 1)
        if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
            raise ValueError(f"ensemble must be an integer >= 1, got {ensemble!r}")
        self.ensemble = ensemble
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool = pool
        if upsample_to is not None and upsample_to != "input":
            size = (upsample_to, upsample_to) if isinstance(upsample_to, int) else tuple(upsample_to)
            if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                         for s in size):
                raise ValueError(f"upsample_to must be None, 'input', an int or (H, W), got {upsample_to!r}")
            upsample_to = size
        if upsample_to is not None and pool is not None:
            raise ValueError("upsample_to and pool exclude each other (pooling removes the space)")
        self.upsample_to = upsample_to
        self.concat = bool(concat)
        self.noise_per_timestep = bool(noise_per_timestep)
        self.y = y
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.max_memory = _parse_bytes(max_memory)
        self.dtype = dtype
        order = {name: i for i, name in enumerate(known)}
        # Zoo walkers know the order; the hook path learns it on the first forward.
        self._last = max(layers, key=order.__getitem__) if self.kind != "hooks" else None
        self._rows_per_forward: Optional[int] = None
        self.forward_calls = 0  # model forwards run (each a chunk of rows)
        if isinstance(y, (int, str)) or y is None:  # a fixed label is checked now, before any work
            if isinstance(y, str) and y != "null":
                raise ValueError(f"y must be None, 'null', an int or an integer tensor, got {y!r}")
            if y is not None:
                self._labels(None, 1, "cpu")

    # ---- the model's view -------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _param_dtype(self) -> torch.dtype:
        p = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    def null_label(self) -> Optional[int]:
        """The label used when ``y`` is None: None for an unconditional model."""
        from fastdiff.models import ADMClassifier, ADMUNet, DDPMUNet, DiT, UViT

        m = self.model
        if self._y_null is not None:
            return int(self._y_null)
        if getattr(m, "y_null", None) is not None:  # set by fastdiff.models.preset and fastdiff.load
            return int(m.y_null)
        if getattr(m, "null_label", None) is not None:
            return int(m.null_label)
        if isinstance(m, DiT):
            table = m.y_embedder.embedding_table.num_embeddings
            if table > m.num_classes:
                return m.num_classes
            raise ValueError("y: this DiT has no null label (class_dropout_prob=0); pass class labels")
        if isinstance(m, UViT):
            if m.num_classes > 0 and "y_null" in vars(m):  # the preset says none (U-ViT's ImageNet 64 model)
                raise ValueError("y: this UViT is class-conditional and has no null label; pass class labels")
            return m.num_classes - 1 if m.num_classes > 0 else None
        if isinstance(m, ADMUNet) and m.num_classes is not None:
            raise ValueError("y: this ADMUNet is class-conditional and has no null label; pass class labels")
        if isinstance(m, DDPMUNet) and m.class_embedding is not None:
            raise ValueError("y: this DDPMUNet is class-conditional and has no null label; pass class labels")
        if isinstance(m, (ADMUNet, ADMClassifier, DDPMUNet)):
            return None
        return getattr(m, "null_label", None)

    def _labels(self, y, n: int, device) -> Optional[Tensor]:
        from fastdiff.models.common import check_labels, label_table_size

        y = self.y if y is None else y
        if y is None or (isinstance(y, str) and y == "null"):
            null = self.null_label()
            return None if null is None else torch.full((n,), null, dtype=torch.long, device=device)
        rows = label_table_size(self.model)
        if rows is None and self.kind != "hooks":
            raise ValueError(f"y must be None: this {type(self.model).__name__} is unconditional")
        if isinstance(y, int) and not isinstance(y, bool):
            y = torch.full((n,), y, dtype=torch.long)
        if not isinstance(y, Tensor) or y.shape != (n,) or y.is_floating_point() or y.dtype == torch.bool:
            got = (tuple(y.shape), y.dtype) if isinstance(y, Tensor) else repr(y)
            raise ValueError(f"y must be None, 'null', an int or an integer tensor of shape ({n},), "
                             f"got {got}")
        if rows is not None:  # the walkers index the label table directly: check the range here
            y = check_labels(y, n, rows, "y", null_label=self._null_or_none())
        return y.to(device=device, dtype=torch.long)

    def _null_or_none(self) -> Optional[int]:
        try:
            return self.null_label()
        except ValueError:
            return None

    def _map(self, h: Tensor) -> Tensor:
        """A layer's output as the feature map: tokens to (N, D, h, w) for the transformers."""
        if self.kind == "dit":
            return tokens_to_map(h, self.model.input_size // self.model.patch_size)
        if self.kind == "uvit":
            return tokens_to_map(h, self.model.img_size // self.model.patch_size, self.model.extras)
        return _first_tensor(h)

    def _net(self) -> nn.Module:
        """The model in eval mode: yours when it is (always so far), else a cached eval copy that shares
        your weights (fastdiff.model_cache): extraction never changes your model's train/eval flags."""
        return run_copy(self.model, eval=True)

    def forward_features(self, x_t: Tensor, t: Tensor, y: Optional[Tensor] = None) -> dict[str, Tensor]:
        """One forward on noisy inputs (rows), stopped after the deepest layer: {layer: (R, ...)} as maps.

        This is the exportable core: no noise, no averaging, only the model's own ops.
        """
        return self._forward_features(self._net(), x_t, t, y)

    def _forward_features(self, net: nn.Module, x_t: Tensor, t: Tensor, y: Optional[Tensor]) -> dict:
        if self.kind == "hooks":  # model_fn calls the network itself; the hooks stop it
            return self._forward_hooks(net, x_t, t, y)
        if self.model_fn is None:
            return self._walk(net, x_t, t, y)
        try:
            self.model_fn(_WalkedNetwork(lambda x, tt, yy: self._walk(net, x, tt, yy)), x_t, t, y)
        except _FeaturesReady as ready:
            return ready.features
        raise ValueError("model_fn: the Denoiser's model_fn returned without calling the model")

    def _walk(self, net: nn.Module, x_t: Tensor, t: Tensor, y: Optional[Tensor]) -> dict:
        keep = _Collector(self.layers, self._last, self._map)
        return dict(_WALKERS[self.kind](net, x_t, t, y, keep))

    def _forward_hooks(self, net: nn.Module, x_t: Tensor, t: Tensor, y: Optional[Tensor]) -> dict[str, Tensor]:
        modules = dict(net.named_modules())
        out: dict[str, Tensor] = {}
        seen: list[str] = []

        def hook(name):
            def fn(module, inputs, output):
                if name not in out:
                    out[name] = _first_tensor(output)
                    seen.append(name)
                if name == self._last:
                    raise _StopForward
            return fn

        handles = [modules[name].register_forward_hook(hook(name)) for name in self.layers]
        try:
            if self.model_fn is None:
                _call_model(net, x_t, t, y)
            else:
                self.model_fn(net, x_t, t, y)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [name for name in self.layers if name not in out]
        if missing:
            raise ValueError(f"layers: {missing} did not run in the forward of {type(self.model).__name__}")
        if self._last is None:
            self._last = seen[-1]
        return out

    # ---- noise and rows -----------------------------------------------------------------------

    def noise(self, shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
        """The per-sample noise: (N, E, *shape), or (N, T, E, *shape) with noise_per_timestep, float32 CPU."""
        lead = (len(self.timesteps), self.ensemble) if self.noise_per_timestep else (self.ensemble,)
        return randn_per_sample(make_generators(seeds), (*lead, *shape))

    def _noise_rows(self, shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
        noise = self.noise(shape, seeds)
        return noise if self.noise_per_timestep else noise[:, None]   # (N, T or 1, E, *shape)

    def _check_noise(self, noise: Tensor, images: Tensor) -> Tensor:
        n, shape = images.shape[0], tuple(images.shape[1:])
        e, tn = self.ensemble, len(self.timesteps)
        forms = [(n, e, *shape), (n, tn, e, *shape)] + ([(n, *shape)] if e == 1 else [])
        if not isinstance(noise, Tensor) or tuple(noise.shape) not in forms:
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise ValueError(f"noise must have shape {forms[0]} (N, ensemble, C, H, W) or {forms[1]} "
                             f"(N, timesteps, ensemble, C, H, W), got {got}")
        if noise.dim() == images.dim():                      # (N, C, H, W), ensemble 1
            noise = noise[:, None]
        return noise if noise.dim() == images.dim() + 2 else noise[:, None]   # (N, T or 1, E, C, H, W)

    def rows_per_forward(self, images: Tensor) -> int:
        """Rows per forward: ``batch_size``, else what ``max_memory`` allows (one row measured), else 64."""
        if self.batch_size is not None:
            return self.batch_size
        if self.max_memory is None:
            return 64
        if self._rows_per_forward is None:
            self._rows_per_forward = max(1, self.max_memory // self._bytes_per_row(images[:1]))
        return self._rows_per_forward

    @torch.no_grad()
    def _bytes_per_row(self, image: Tensor) -> int:
        """Activation bytes of one row: peak CUDA memory above the start, or on the CPU the bytes of
        every module output up to the deepest layer (an upper bound: eager frees most of them)."""
        dev = self.device
        x = image.to(dev, self._param_dtype())
        t = torch.full((1,), self.timesteps[0], device=dev, dtype=torch.long)
        y = self._labels(None, 1, dev)
        net = self._net()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self._forward_features(net, x, t, y)
            return max(1, torch.cuda.max_memory_allocated(dev) - base)
        total = [0]

        def count(module, inputs, output):
            for o in (output if isinstance(output, (tuple, list)) else (output,)):
                if isinstance(o, Tensor):
                    total[0] += o.numel() * o.element_size()

        handles = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
        try:
            self._forward_features(net, x, t, y)
        finally:
            for h in handles:
                h.remove()
        return max(1, total[0])

    # ---- extraction ---------------------------------------------------------------------------

    def _target_size(self, images: Tensor) -> Optional[tuple]:
        if self.upsample_to == "input":
            return tuple(images.shape[2:])
        return self.upsample_to

    def _finish(self, h: Tensor, size) -> Tensor:
        if size is not None:
            if h.dim() != 4:
                raise ValueError(f"upsample_to needs (N, C, H, W) maps, got a layer of {tuple(h.shape)}")
            h = F.interpolate(h, size=size, mode="bilinear", align_corners=False)
        return h if self.dtype is None else h.to(self.dtype)

    def _pool(self, h: Tensor) -> Tensor:
        return h.flatten(2).mean(dim=2) if self.pool == "avg" and h.dim() > 2 else h

    @torch.no_grad()
    def __call__(self, images: Tensor, *, y=None, noise: Optional[Tensor] = None,
                 seeds: Optional[Sequence[int]] = None, start: int = 0):
        """Features of a batch of images (N, C, H, W) in the model's input range.

        Returns ``{layer: {t: (N, C, h, w)}}`` (``(N, C)`` pooled, ``(N, C, H, W)`` upsampled), or with
        ``concat`` one tensor ``(N, sum C, ...)``. ``noise`` (N, E, C, H, W) or (N, T, E, C, H, W)
        replaces the seeded draws; ``seeds`` (N,) the per-image seeds; ``start`` is the stream offset
        of image 0 (its seed is ``seed + start``).
        """
        return self.extract(images, y=y, noise=noise, seeds=seeds, start=start)

    @torch.no_grad()
    def extract(self, images: Tensor, *, y=None, noise: Optional[Tensor] = None,
                seeds: Optional[Sequence[int]] = None, start: int = 0):
        if not isinstance(images, Tensor) or images.dim() < 3 or not images.is_floating_point():
            got = (tuple(images.shape), images.dtype) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a floating tensor (N, C, H, W), got {got}")
        n = images.shape[0]
        if n == 0:
            return self._empty(images)
        dev, mdtype = self.device, self._param_dtype()
        if noise is not None:
            noise = self._check_noise(noise, images)
        else:
            if seeds is None:
                seeds = range(self.seed + start, self.seed + start + n)
            seeds = list(seeds)
            if len(seeds) != n:
                raise ValueError(f"seeds must hold one seed per image ({n}), got {len(seeds)}")
            noise = self._noise_rows(tuple(images.shape[1:]), seeds)
        labels = self._labels(y, n, dev)
        tn, e = len(self.timesteps), self.ensemble
        rows = n * tn * e                                   # row r = (i * T + ti) * E + e
        step = self.rows_per_forward(images)
        ts = torch.tensor(self.timesteps, dtype=torch.long)
        images = images.to(dev)
        net = self._net()
        acc: dict[str, Tensor] = {}
        for r0 in range(0, rows, step):
            r = torch.arange(r0, min(rows, r0 + step))
            i, ti, ei = r // (tn * e), (r // e) % tn, r % e
            eps = noise[i, ti if noise.shape[1] > 1 else 0, ei]     # (R, C, H, W)
            t = ts[ti].to(dev)
            x_t = self.schedule.add_noise(images[i.to(dev)], eps.to(dev), t).to(mdtype)
            feats = self._forward_features(net, x_t, t, labels[i.to(dev)] if labels is not None else None)
            self.forward_calls += 1
            slot = (i * tn + ti).to(dev)                    # (image, timestep) pair of each row
            for name, h in feats.items():
                h = self._pool(h.float() if h.dtype in (torch.float16, torch.bfloat16) else h)
                if name not in acc:
                    acc[name] = torch.zeros((n * tn, *h.shape[1:]), device=dev, dtype=h.dtype)
                acc[name].index_add_(0, slot, h)
        size = self._target_size(images)
        out = {name: {t: self._finish(acc[name].view(n, tn, *acc[name].shape[1:])[:, k] / e, size)
                      for k, t in enumerate(self.timesteps)} for name in self.layers}
        return self._concat(out) if self.concat else out

    def _concat(self, out: dict) -> Tensor:
        parts = [out[name][t] for t in self.timesteps for name in self.layers]
        shapes = {tuple(p.shape[2:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"concat needs maps of one size, got {sorted(shapes)}; set upsample_to")
        return torch.cat(parts, dim=1)

    def _empty(self, images: Tensor):
        probe = self.extract(torch.zeros((1, *images.shape[1:]), dtype=images.dtype, device=images.device))
        if isinstance(probe, Tensor):
            return probe[:0]
        return {name: {t: v[:0] for t, v in per_t.items()} for name, per_t in probe.items()}

    # ---- streaming -----------------------------------------------------------------------------

    def settings(self) -> dict:
        """What determines the features (the identity of a feature-folder run): the model's class and a
        fingerprint of its weights, the schedule, layers, timesteps, ensemble, seed, pool, upsample,
        concat, noise draws, labels, output dtype, and the Denoiser's model call where it has its own
        (``model_fn``). Rows per forward and the device are left out."""
        y = self.y
        if isinstance(y, Tensor):
            y = hashlib.sha256(y.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]
        try:
            null = self.null_label()
        except ValueError:
            null = None
        abar = torch.as_tensor(self.schedule.alphas_cumprod, dtype=torch.float64).cpu().numpy()
        call = {} if self.model_fn is None else {"model_fn": _callable_name(self.model_fn)}
        return {**call, "model": type(self.model).__name__, "weights": _weights_fingerprint(self.model),
                "schedule": hashlib.sha256(abar.tobytes()).hexdigest()[:16], "layers": self.layers,
                "timesteps": self.timesteps, "ensemble": self.ensemble, "seed": self.seed, "pool": self.pool,
                "concat": self.concat, "upsample_to": self.upsample_to,
                "noise_per_timestep": self.noise_per_timestep, "y": y, "null_label": null,
                "dtype": str(self.dtype).replace("torch.", "")}

    @torch.no_grad()
    def extract_to(self, folder: Union[str, os.PathLike], batches: Iterable, *, rank: Optional[int] = None,
                   world_size: Optional[int] = None, progress: bool = False, overwrite: bool = False,
                   resume: bool = False, run_id: Optional[str] = None) -> Path:
        """Stream features of an iterable of batches into ``folder``: one safetensors shard per batch.

        A batch is a tensor of images or a tuple ``(images, labels)`` (labels are stored, not used to
        condition; use ``y=`` for that). Image ``k`` of the stream has seed ``seed + k`` whatever the
        batching. Under torchrun (``RANK``/``WORLD_SIZE``, or ``rank=``/``world_size=``) batch ``b``
        goes to rank ``b % world_size`` and each rank writes its shards and ``index-rank{r}.json``;
        :func:`merge_index` (run here by rank 0 when ``torch.distributed`` is initialised or the world
        is one process, else by :func:`load_features`) writes ``index.json``, last. Shard keys:
        ``"{layer}/t{t}"`` (or ``"features"`` with concat), ``"index"`` (stream positions), ``"labels"``.

        The folder holds one run (:mod:`fastdiff.feature_folder`): its parent must exist; a folder
        holding another run (an interrupted one included) is refused unless ``overwrite=True`` (the old
        run's files are removed first) or ``resume=True`` (the run is continued: it must have identical
        settings, :meth:`settings`, and world size; finished shards are kept). ``run_id``: the run's name,
        shared by the ranks of one run (default: random; under torch.distributed rank 0's). Every file
        is written under a temporary name and renamed into place.
        """
        from fastdiff.feature_folder import FeatureRun, merge_index

        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
        dist = torch.distributed
        grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        settings = self.settings()
        if grouped:  # rank 0 decides what the folder holds; the others join its run (or fail with it)
            run, decided, error = None, [None, None], None
            if rank == 0:
                try:
                    run = FeatureRun.open(folder, settings, rank=rank, world_size=world_size,
                                          overwrite=overwrite, resume=resume, run_id=run_id)
                    decided = [run.run_id, None]
                except Exception as e:
                    decided, error = [None, f"{type(e).__name__}: {e}"], e
            dist.broadcast_object_list(decided, src=0)
            if error is not None:
                raise error
            if decided[1] is not None:
                raise FeatureFolderError(f"rank 0 could not open {os.fspath(folder)!r}: {decided[1]}")
            if rank != 0:
                run = FeatureRun.open(folder, settings, rank=rank, world_size=world_size, overwrite=False,
                                      resume=resume, run_id=decided[0])
        else:
            run = FeatureRun.open(folder, settings, rank=rank, world_size=world_size, overwrite=overwrite,
                                  resume=resume, run_id=run_id)
        start = 0
        iterator = batches
        if progress:
            from tqdm import tqdm
            iterator = tqdm(batches, desc=f"features rank {rank}")
        for b, batch in enumerate(iterator):
            images, labels = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            n = images.shape[0]
            if b % world_size == rank and n and not run.finished(b, start, n):
                feats = self.extract(images, start=start)
                tensors = ({"features": feats} if isinstance(feats, Tensor) else
                           {f"{name}/t{t}": v for name, per_t in feats.items() for t, v in per_t.items()})
                tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
                tensors["index"] = torch.arange(start, start + n)
                if labels is not None:
                    tensors["labels"] = torch.as_tensor(labels).cpu().contiguous()
                run.write_shard(b, start, n, tensors)
            start += n
        run.finish(start)
        if grouped:
            dist.barrier()
            if rank == 0:
                merge_index(run.folder)
            dist.barrier()
        elif world_size == 1:
            merge_index(run.folder)
        return run.folder

    # ---- export --------------------------------------------------------------------------------

    def as_module(self) -> nn.Module:
        """An ``nn.Module`` ``(x_t, t[, y]) -> tuple of the layers' maps`` (the early-exit forward), for
        ``torch.onnx.export`` / ``fastdiff.export``: noise and averaging stay outside."""
        if self.kind == "hooks":
            raise ValueError("model: export needs a zoo model (ADMUNet, DDPMUNet, DiT, UViT)")
        return _FeatureModule(self)

    def to_onnx(self, path: Union[str, os.PathLike], example_batch: int = 2, dynamic_batch: bool = True,
                opset: int = 18) -> str:
        """Export the whole extraction (noising, the early-exit forward of every row, the ensemble mean,
        pool / upsample / concat) as one standard-ONNX graph, through fastdiff.export's translation table.

        Inputs: ``images`` (N, C, H, W) float32, ``noise`` (N, T or 1, E, C, H, W) float32 (the draws of
        :meth:`noise`, with a timestep axis of 1 unless ``noise_per_timestep``), and ``y`` (N,) int64 for
        a conditional model. Outputs: one per layer named as the layer, (N, T, ...) stacked over the
        timesteps in order, or ``features`` with concat. Rows are not chunked inside the graph.
        """
        from fastdiff import ops
        from fastdiff.export.onnx import check_standard_onnx, translation_table

        if self.kind == "hooks":
            raise ValueError("model: export needs a zoo model (ADMUNet, DDPMUNet, DiT, UViT)")
        if isinstance(example_batch, bool) or not isinstance(example_batch, int) or example_batch < 2:
            raise ValueError(f"example_batch must be an int >= 2 (a batch of 1 would fix the size), "
                             f"got {example_batch!r}")
        path = check_output_path(path, "path")  # before the export's work
        graph = _ExtractionGraph(self).eval()
        shape = tuple(self.model.example_inputs(1)["x"].shape[1:])
        mdtype = self._param_dtype()
        images = torch.randn(example_batch, *shape, dtype=mdtype, device=self.device)
        noise = self._noise_rows(shape, range(example_batch)).to(self.device, mdtype)
        labels = None
        if graph.conditional:
            labels = (torch.zeros(example_batch, dtype=torch.long, device=self.device) if _needs_labels(self)
                      else self._labels(None, example_batch, self.device))
        args = (images, noise) if labels is None else (images, noise, labels)
        names = ["images", "noise"] + (["y"] if labels is not None else [])
        outputs = ["features"] if self.concat else list(self.layers)
        dynamic = None
        if dynamic_batch:
            n = torch.export.Dim("batch", min=2, max=65536)
            dynamic = tuple({0: n} for _ in args)
        with torch.no_grad(), ops.backend("reference"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, args, dynamo=True, opset_version=opset, input_names=names,
                                        output_names=outputs, dynamic_shapes=dynamic,
                                        custom_translation_table=translation_table(opset), optimize=True,
                                        verbose=False, report=False)
        proto = program.model_proto
        entry = proto.metadata_props.add()
        entry.key, entry.value = "fastdiff.features", json.dumps(
            {"layers": self.layers, "timesteps": self.timesteps, "ensemble": self.ensemble,
             "pool": self.pool, "concat": self.concat, "upsample_to": self.upsample_to,
             "noise_per_timestep": self.noise_per_timestep, "model": type(self.model).__name__})
        check_standard_onnx(proto)
        write_bytes(path, proto.SerializeToString(), argument="path")
        return path


class _FeatureModule(nn.Module):
    def __init__(self, fx: FeatureExtractor):
        super().__init__()
        self.model = fx._net()  # the caller's model, or its eval copy (exporting sets eval on this module)
        self._fx = [fx]  # a list: not a submodule, so the state dict is the model's
        self.output_names = list(fx.layers)

    def forward(self, x_t: Tensor, t: Tensor, y: Optional[Tensor] = None):
        feats = self._fx[0]._forward_features(self.model, x_t, t, y)
        return tuple(feats[name] for name in self.output_names)


class _ExtractionGraph(nn.Module):
    """``(images, noise[, y]) -> features``: FeatureExtractor.extract in one traceable forward."""

    def __init__(self, fx: FeatureExtractor):
        super().__init__()
        self.model = fx._net()  # the caller's model, or its eval copy (exporting sets eval on this module)
        self._fx = [fx]
        abar = torch.as_tensor(fx.schedule.alphas_cumprod, dtype=torch.float64)[fx.timesteps]
        dtype = fx._param_dtype()
        self.register_buffer("signal", abar.sqrt().to(dtype), persistent=False)        # (T,)
        self.register_buffer("sigma", (1 - abar).sqrt().to(dtype), persistent=False)   # (T,)
        self.register_buffer("ts", torch.tensor(fx.timesteps, dtype=torch.long), persistent=False)
        self.conditional = fx._labels(None, 1, "cpu") is not None if not _needs_labels(fx) else True

    def forward(self, images: Tensor, noise: Tensor, y: Optional[Tensor] = None):
        fx = self._fx[0]
        n, tn, e = images.shape[0], len(fx.timesteps), fx.ensemble
        shape = images.shape[1:]
        view = (1, tn, 1) + (1,) * len(shape)
        x_t = self.signal.view(view) * images[:, None, None] + self.sigma.view(view) * noise  # (N, T, E, ...)
        rows = x_t.reshape(n * tn * e, *shape)
        t = self.ts.repeat_interleave(e).repeat(n)                                         # (N*T*E,)
        labels = y.repeat_interleave(tn * e) if y is not None else None
        feats = fx._forward_features(self.model, rows, t, labels)
        size = fx._target_size(images)
        out = {}
        for name in fx.layers:
            h = fx._pool(feats[name])
            h = h.reshape(n, tn, e, *h.shape[1:]).mean(dim=2)                             # (N, T, ...)
            if size is not None:
                c, hh, ww = h.shape[2:]
                h = F.interpolate(h.reshape(n * tn, c, hh, ww), size=size, mode="bilinear",
                                  align_corners=False).reshape(n, tn, c, *size)
            out[name] = h
        if fx.concat:
            return torch.cat([out[name][:, k] for k in range(tn) for name in fx.layers], dim=1)
        return tuple(out[name] for name in fx.layers)


@torch.no_grad()
def _weights_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter's and buffer's name, shape, dtype, float64 sum and L2 norm: two checkpoints
    of one architecture differ here (one pass over the weights, no copy)."""
    names, stats = [], []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        names.append(f"{name}:{tuple(t.shape)}:{t.dtype}")
        if t.numel() and t.is_floating_point():
            stats.append(torch.stack([t.sum(dtype=torch.float64).real,
                                      torch.linalg.vector_norm(t, dtype=torch.float64)]).cpu())
        elif t.numel():
            stats.append(torch.stack([t.sum(dtype=torch.float64), t.abs().sum(dtype=torch.float64)]).cpu())
    values = torch.cat(stats).tolist() if stats else []
    blob = "|".join(names) + "|" + ",".join(f"{v:.9e}" for v in values)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _needs_labels(fx: FeatureExtractor) -> bool:
    try:
        fx.null_label()
    except ValueError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# DIFT-style correspondence
# ---------------------------------------------------------------------------------------------


def correspondence(source: Tensor, target: Tensor, points: Optional[Tensor] = None) -> Tensor:
    """For each source position, the target position of highest cosine similarity (DIFT).

    source, target: (C, H, W) feature maps (or (1, C, H, W)), same C, any sizes.
    points: (P, 2) integer (row, col) source positions; default every position.
    Returns (P, 2) long (row, col) in the target (P = H*W in row-major order by default).
    """
    src, tgt = (f[0] if f.dim() == 4 and f.shape[0] == 1 else f for f in (source, target))
    if src.dim() != 3 or tgt.dim() != 3 or src.shape[0] != tgt.shape[0]:
        raise ValueError(f"source and target must be (C, H, W) maps with one C, got {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")
    c, h, w = src.shape
    s = F.normalize(src.reshape(c, -1).double(), dim=0)            # (C, H*W)
    if points is not None:
        points = torch.as_tensor(points, dtype=torch.long)
        inside = (points >= 0).all() and (points[:, 0] < h).all() and (points[:, 1] < w).all() \
            if points.dim() == 2 and points.shape[1] == 2 else False
        if not inside:
            raise ValueError(f"points must be (P, 2) (row, col) inside ({h}, {w})")
        s = s[:, points[:, 0] * w + points[:, 1]]
    tw = tgt.shape[2]
    sim = s.T @ F.normalize(tgt.reshape(c, -1).double(), dim=0)   # (P, Ht*Wt)
    best = sim.argmax(dim=1)
    return torch.stack([best // tw, best % tw], dim=1)


# ---------------------------------------------------------------------------------------------
# command line: fastdiff features
# ---------------------------------------------------------------------------------------------


def add_features_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``fastdiff features`` (for fastdiff/cli.py's subparser)."""
    parser.add_argument("--model", required=True,
                        help="'digits' (bundled), a preset name with --checkpoint, a checkpoint file, a "
                             "diffusers UNet2DModel folder or an .onnx model graph (what fastdiff.load takes)")
    parser.add_argument("--checkpoint", default=None,
                        help="weights (.safetensors / .pt) for a preset (default: none)")
    parser.add_argument("--input", required=True,
                        help="a folder of images (png/jpg, scaled to [-1, 1]) or 'digits' (the held-out "
                             "quarter of scikit-learn's digits)")
    parser.add_argument("--out", required=True, help="output folder for the shards and index.json (its parent "
                        "must exist)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the feature run already in --out (its files are removed first)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out (identical settings), keeping its finished shards")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="published settings (RECIPES); the options below override them (default: none)")
    parser.add_argument("--layers", default=None, help="comma-separated layer names (default: the recipe's)")
    parser.add_argument("--timesteps", default=None,
                        help="comma-separated integer timesteps (default: the recipe's)")
    parser.add_argument("--ensemble", type=int, default=None,
                        help="noise draws averaged per (image, timestep) (default: the recipe's, else 1)")
    parser.add_argument("--seed", type=int, default=0, help="image k uses seed SEED + k")
    parser.add_argument("--pool", choices=["avg"], default=None,
                        help="global average pool of each map (default: none, the maps)")
    parser.add_argument("--upsample", default=None, help="'input', N or HxW (default: no resize)")
    parser.add_argument("--concat", action="store_true", default=None,
                        help="one tensor per image, the layers concatenated along channels (default: off)")
    parser.add_argument("--label", type=int, default=None, help="class label for conditional models "
                        "(default: the null label)")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward (default: 64)")
    parser.add_argument("--images-per-shard", type=int, default=64, help="images per safetensors shard")
    parser.add_argument("--beta-schedule", default=None,
                        help="replace the model's schedule (default: the one fastdiff.load gives)")
    parser.add_argument("--num-train-timesteps", type=int, default=None,
                        help="with --beta-schedule: its number of steps (default 1000)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs")
    return parser


def _read_image_folder(folder: str, size: int, channels: int) -> Tensor:
    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir()
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not paths:
        raise ValueError(f"--input: no images in {folder!r}")
    mode = "L" if channels == 1 else "RGB"
    out = []
    for p in paths:
        img = Image.open(p).convert(mode).resize((size, size), Image.BICUBIC)
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float()
        out.append(t.reshape(size, size, channels).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


def _model_for_cli(args):
    """The Denoiser of --model / --checkpoint (fastdiff.load: the CLI knows nothing a model does not say)."""
    from fastdiff.loading import load

    schedule = None
    if args.beta_schedule is not None or args.num_train_timesteps is not None:
        from fastdiff.schedules import VPSchedule

        schedule = VPSchedule(args.beta_schedule or "linear", num_train_timesteps=args.num_train_timesteps or 1000)
    return load(args.model, checkpoint=args.checkpoint, schedule=schedule)


def _image_geometry(model: nn.Module) -> tuple[int, int]:
    for size_attr, ch_attr in (("image_size", "in_channels"), ("input_size", "in_channels"),
                               ("img_size", "in_chans"), ("sample_size", "in_channels")):
        if getattr(model, size_attr, None) is not None and getattr(model, ch_attr, None) is not None:
            size = getattr(model, size_attr)
            return (size[0] if isinstance(size, (tuple, list)) else size), getattr(model, ch_attr)
    raise ValueError("--model: cannot tell the model's image size and channels")


def _join_torchrun(device: str, timeout_s: float = 600.0) -> bool:
    """Under torchrun (WORLD_SIZE > 1) join its process group, so that rank 0 decides which run the folder
    holds and merges the index; True when this call created the group. Peers that never come end in
    torch's timeout error after ``timeout_s``, not a hang."""
    import datetime

    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    backend = "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def features_command(args) -> int:
    """``fastdiff features``: stream features of a folder of images (or the digits) to --out.

    Under ``torchrun`` the ranks join one process group; rank 0 decides which run the folder holds
    (``--overwrite`` / ``--resume``), each rank extracts every WORLD_SIZE-th shard and writes its own index,
    and rank 0 merges them into ``index.json``.
    """
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out: {args.out!r} exists and is not a folder")
    if not out.resolve().parent.is_dir():
        raise FileNotFoundError(f"--out: the parent folder of {args.out!r} does not exist (create it first)")
    model = _model_for_cli(args)
    net = model.model
    if not isinstance(net, nn.Module):
        raise ValueError(f"--model: features need a PyTorch model; {args.model!r} is not one")
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank, batches split by rank
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    net.to(device).eval()
    size, channels = _image_geometry(net)
    labels = None
    if args.input == "digits":
        from fastdiff.train_digits import load_digits_split

        images, labels = load_digits_split("test", image_size=size)
    else:
        images = _read_image_folder(args.input, size, channels)
    kwargs = dict(RECIPES[args.recipe]) if args.recipe else {}
    if args.layers:
        kwargs["layers"] = [s.strip() for s in args.layers.split(",") if s.strip()]
    if args.timesteps:
        kwargs["timesteps"] = [int(s) for s in args.timesteps.split(",") if s.strip()]
    for key in ("ensemble", "pool", "concat", "batch_size"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if args.upsample:
        up = args.upsample
        kwargs["upsample_to"] = up if up == "input" else (
            tuple(int(v) for v in up.lower().split("x")) if "x" in up.lower() else int(up))
    fx = FeatureExtractor(model, seed=args.seed, y=args.label, **kwargs)
    k = args.images_per_shard
    batches = [(images[i:i + k], labels[i:i + k]) if labels is not None else images[i:i + k]
               for i in range(0, images.shape[0], k)]
    created = _join_torchrun(device)
    try:
        folder = fx.extract_to(args.out, batches, progress=True, overwrite=args.overwrite, resume=args.resume)
    finally:
        if created:
            torch.distributed.destroy_process_group()
    print(f"wrote features of {images.shape[0]} images to {folder} ({math.ceil(images.shape[0] / k)} shards)")
    return 0
