"""Train the bundled digits model: a small class-conditional ADM U-Net on scikit-learn's digits.

Reproducible command (2 CPU cores; a fixed seed, a fixed data split, deterministic ops):

    python -m fastdiff.train_digits --steps 2000 --stop-at 1500 --batch-size 64 --cosine --ema 0.998

(about 1 s per step on one core; the shipped weights are this command's EMA weights at step 1500). The
output goes to ``./digits.*`` unless ``--out`` says otherwise; replacing the bundled weights
(``fastdiff/weights/digits``) needs ``--out fastdiff/weights/digits --overwrite-bundled``. Every file is
written under a temporary name and renamed into place, so a failed save keeps the previous one.

Data: ``sklearn.datasets.load_digits`` (1,797 8x8 images, values 0..16) scaled to [-1, 1], bilinearly
upsampled to 16x16; the training split is ``train_test_split(X, y, test_size=0.25, random_state=0)``
(the held-out quarter stays unseen, for the feature-extraction checks).

Model: :class:`fastdiff.models.ADMUNet` (``DIGITS_CONFIG``), epsilon prediction, the linear VP schedule
of DDPM (1000 steps, beta 1e-4 .. 0.02). Classifier-free guidance: the label embedding has
``num_classes = 11`` rows, the digits 0..9 and the null label 10; a label is replaced by the null label
with probability ``--label-dropout`` (0.1) during training (Ho & Salimans 2022). The shipped weights
are the exponential moving average of the parameters.

Speed: the loss runs under bf16 autocast where the CPU computes bf16 natively (AMX / AVX512-BF16), with
PyTorch's own GroupNorm / SDPA in place of fastdiff's reference ops (same parameters, same function;
the reference ops are written for clarity, not for training speed). The weights and the config go to
``OUT.safetensors`` and ``OUT.json``; a checkpoint with the optimizer state goes to ``OUT.ckpt.pt``
every ``--save-every`` steps, and ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import shlex
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from fastdiff.io import atomic_path, atomic_write, check_output_path, write_json

__all__ = ["DIGITS_CONFIG", "DIGITS_SCHEDULE", "NULL_LABEL", "load_digits_split", "build_model", "parse_args",
           "main"]

DIGITS_CONFIG = dict(image_size=16, in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
                     attention_resolutions=(2,), dropout=0.0, channel_mult=(1, 2, 2), num_classes=11,
                     num_heads=1, num_head_channels=32, use_scale_shift_norm=True, resblock_updown=False)
DIGITS_SCHEDULE = dict(beta_schedule="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
NULL_LABEL = 10  # the label embedding's row for "no class" (classifier-free guidance)


def load_digits_split(split: str = "train", image_size: int = 16):
    """``(images (N, 1, S, S) float32 in [-1, 1], labels (N,) int64)`` of the fixed train / test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.data, data.target, test_size=0.25, random_state=0)
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    img = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 * 2.0 - 1.0
    if image_size != 8:
        img = F.interpolate(img, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return img.clamp(-1, 1), torch.tensor(y, dtype=torch.int64)


def build_model(**overrides):
    from fastdiff.models import ADMUNet

    return ADMUNet(**{**DIGITS_CONFIG, **overrides})


@contextlib.contextmanager
def _native_training_ops():
    """Route GroupNormModulate and the attention op through PyTorch's fused CPU ops for training speed,
    restoring fastdiff's own on exit (the process's other models are not changed for good)."""
    from fastdiff import nn as fnn
    from fastdiff.models import adm

    saved = fnn.GroupNormModulate.forward, adm.ops

    def gn_forward(self, x, scale=None, shift=None):
        h = F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
        if scale is not None:
            h = h * (1 + scale[:, :, None, None].to(h.dtype)) + shift[:, :, None, None].to(h.dtype)
        return F.silu(h) if self.activation == "silu" else h

    class _Ops:
        @staticmethod
        def attention(q, k, v, scale=None, **kw):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)

    fnn.GroupNormModulate.forward, adm.ops = gn_forward, _Ops
    try:
        yield
    finally:
        fnn.GroupNormModulate.forward, adm.ops = saved


def train(args) -> None:
    with _native_training_ops() if args.native_ops else contextlib.nullcontext():
        _train(args)


def _train(args) -> None:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    x_all, y_all = load_digits_split("train")
    model = build_model()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    betas = np.linspace(DIGITS_SCHEDULE["beta_start"], DIGITS_SCHEDULE["beta_end"],
                        DIGITS_SCHEDULE["num_train_timesteps"])
    abar = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
    ckpt_path = args.out + ".ckpt.pt"
    start = 0
    gen = torch.Generator().manual_seed(args.seed)
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        start = ck["step"]
        print(f"resumed at step {start}", flush=True)
    from fastdiff.policy import cpu_has_native_bf16

    bf16 = {"auto": cpu_has_native_bf16(), "on": True, "off": False}[args.bf16]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"digits: {x_all.shape[0]} training images, model {n_params / 1e6:.2f}M parameters, bf16={bf16}",
          flush=True)

    def save(step: int, final: bool = False) -> None:
        with atomic_write(ckpt_path, argument="--out") as f:
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "gen": gen.get_state(), "step": step}, f)
        meta = {
            "model": "ADMUNet",
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in DIGITS_CONFIG.items()},
            "schedule": dict(DIGITS_SCHEDULE, kind="VPSchedule"),
            "prediction": "eps",
            "learned_sigma": False,
            "num_classes": 10,
            "null_label": NULL_LABEL,
            "default_guidance": args.default_guidance,
            "data": "sklearn.datasets.load_digits, 8x8 -> [-1, 1] -> bilinear 16x16; "
                    "train_test_split(test_size=0.25, random_state=0), train part",
            "training": {"steps": step, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema,
                         "label_dropout": args.label_dropout, "seed": args.seed, "bf16": bf16,
                         "command": "python -m fastdiff.train_digits " + " ".join(
                             shlex.quote(a) for a in sys.argv[1:])},
        }
        with atomic_path(args.out + ".safetensors", argument="--out") as tmp:
            save_file({k: v.detach().float().contiguous() for k, v in ema.state_dict().items()}, tmp,
                      metadata={"format": "pt"})
        write_json(args.out + ".json", meta, indent=2, argument="--out")
        print(f"saved step {step}{' (final)' if final else ''}", flush=True)

    model.train()
    t0, loss_avg = time.time(), None
    n = x_all.shape[0]
    for step in range(start, args.steps):
        idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        x0, y = x_all[idx], y_all[idx].clone()
        drop = torch.rand(args.batch_size, generator=gen) < args.label_dropout
        y[drop] = NULL_LABEL
        t = torch.randint(0, DIGITS_SCHEDULE["num_train_timesteps"], (args.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        warm = min(1.0, (step + 1) / args.warmup)
        decay = 0.5 * (1 + math.cos(math.pi * step / args.steps)) if args.cosine else 1.0
        for g in opt.param_groups:
            g["lr"] = args.lr * warm * (0.1 + 0.9 * decay)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x_t, t, y)
        loss = F.mse_loss(out.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - d)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if (step + 1) % args.log_every == 0:
            el = time.time() - t0
            print(f"step {step + 1} loss {loss_avg:.4f} ({el / (step + 1 - start):.2f} s/step)", flush=True)
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save(step + 1)
        if args.stop_at and step + 1 >= args.stop_at:
            save(step + 1, final=True)
            return
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            print(f"time budget reached at step {step + 1}", flush=True)
            save(step + 1, final=True)
            return
    save(args.steps, final=True)


def bundled_prefix() -> str:
    """The path prefix of the weights shipped with fastdiff (``.safetensors`` and ``.json`` after it)."""
    from fastdiff.models.digits import DIGITS_WEIGHTS

    return os.path.splitext(DIGITS_WEIGHTS)[0]


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """The options, checked before any work: the output folder exists, and the bundled weights are
    replaced only with ``--overwrite-bundled``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--cosine", action="store_true", help="cosine decay of the learning rate to 0.1x")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (1 was fastest on a shared 2-core machine)")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--native-ops", type=int, default=1, help="train with PyTorch's GroupNorm / SDPA (1) or "
                   "fastdiff's reference ops (0); same parameters either way")
    p.add_argument("--default-guidance", type=float, default=2.0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop and save after this long (0: no limit)")
    p.add_argument("--stop-at", type=int, default=0,
                   help="stop and save at this step (the learning-rate schedule still spans --steps)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", default="digits",
                   help="output path prefix: OUT.safetensors, OUT.json and OUT.ckpt.pt (default: ./digits)")
    p.add_argument("--overwrite-bundled", action="store_true",
                   help="allow --out to be the bundled weights (fastdiff/weights/digits), replacing them")
    args = p.parse_args(argv)
    if os.path.realpath(args.out) == os.path.realpath(bundled_prefix()) and not args.overwrite_bundled:
        p.error(f"--out {args.out!r} is the bundled weights of fastdiff; pass --overwrite-bundled to replace "
                "them, or choose another --out")
    for suffix in (".safetensors", ".json", ".ckpt.pt"):
        try:
            check_output_path(args.out + suffix, "--out")
        except (OSError, ValueError) as e:
            p.error(str(e))
    return args


def main(argv: Optional[list] = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
