"""FeatureExtractor against the per-timestep loop, at the DIFT-ADM and DDPM-Seg settings.

The model is the ADM of DIFT's ADMFeaturizer (``adm-256-uncond``: guided-diffusion's 256x256
unconditional U-Net); random weights, since only time is measured. On a GPU it runs at full size; on the
CPU the same architecture is scaled down (``--image-size``, ``--model-channels``; defaults 32 and 32)
and the numbers are labelled CPU.

Per setting, images per second of:

- ``hook_loop``: the way ddpm-segmentation (``for t in steps``) and the issue's reference do it: per
  image (both upstream scripts feed one image at a time), per timestep one full forward of the ensemble
  batch with forward hooks on the blocks, ensemble mean (DIFT), bilinear upsample + concat (DDPM-Seg);
- ``per_image_early_exit``: DIFT's own ADMFeaturizer, which already stops at its block but still runs
  one image (8 noise draws) per forward;
- ``extractor``: :class:`fastdiff.FeatureExtractor`, every (image x timestep x ensemble) row in batched
  forwards of ``--rows`` rows, stopped after the deepest block.

    python benchmarks/bench_features.py                       # CPU, small
    python benchmarks/bench_features.py --device cuda --image-size 256 --model-channels 256
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RowWriter, add_output_args, print_table  # noqa: E402

from fastdiff.features import RECIPES, FeatureExtractor  # noqa: E402
from fastdiff.models import preset  # noqa: E402
from fastdiff.schedules import VPSchedule  # noqa: E402


def hook_loop(model, schedule, images, layers, timesteps, ensemble, upsample: bool):
    """Reference loop: per image, per timestep, one full forward of the ensemble with hooks."""
    modules = dict(model.named_modules())
    seen = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n in layers]
    out = []
    try:
        for img in images:
            per_image = []
            for t in timesteps:
                x = img[None].expand(ensemble, *img.shape)
                tt = torch.full((ensemble,), t, dtype=torch.long, device=img.device)
                x_t = schedule.add_noise(x, torch.randn_like(x), tt)
                model(x_t, tt)
                for n in layers:
                    f = seen[n].float().mean(0, keepdim=True)
                    per_image.append(F.interpolate(f, size=img.shape[1:], mode="bilinear") if upsample else f)
            out.append(torch.cat(per_image, 1) if upsample else per_image)
    finally:
        for h in handles:
            h.remove()
    return out


def per_image_early_exit(fx, images):
    """DIFT's ADMFeaturizer: one image (its ensemble) per forward, stopped at the block."""
    return [fx(img[None], start=k) for k, img in enumerate(images)]


def run(device: str, image_size: int, model_channels: int, num_images: int, rows: int, dtype: torch.dtype,
        min_time_s: float) -> list[dict]:
    model = preset("adm-256-uncond", image_size=image_size, model_channels=model_channels)
    model = model.to(device=device, dtype=dtype).eval()
    schedule = VPSchedule("linear")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(num_images, 3, image_size, image_size, generator=g).to(device, dtype)
    records = []
    for name, upsample in (("dift-adm", False), ("ddpm-seg", True)):
        recipe = RECIPES[name]
        fx = FeatureExtractor(model, schedule, batch_size=rows, **recipe)
        methods = {
            "hook_loop": functools.partial(hook_loop, model, schedule, images, recipe["layers"],
                                           recipe["timesteps"], recipe["ensemble"], upsample),
            "per_image_early_exit": functools.partial(per_image_early_exit, fx, images),
            "extractor": functools.partial(fx, images),
        }
        times = {}
        for method, fn in methods.items():
            with torch.no_grad():
                fn()  # warm
                if device == "cuda":
                    torch.cuda.synchronize()
                reps, start = 0, time.perf_counter()
                while True:
                    fn()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    reps += 1
                    if time.perf_counter() - start >= min_time_s and reps >= 2:
                        break
                times[method] = (time.perf_counter() - start) / reps
        for method, sec in times.items():
            records.append(dict(setting=name, method=method, images=num_images, rows_per_forward=rows,
                                image_size=image_size, model_channels=model_channels,
                                layers=recipe["layers"], timesteps=recipe["timesteps"],
                                ensemble=recipe["ensemble"], seconds=sec, images_per_s=num_images / sec,
                                speedup_vs_hook_loop=times["hook_loop"] / sec,
                                device_label="CPU" if device == "cpu" else "GPU"))
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--image-size", type=int, default=None, help="default 32 on CPU, 256 on GPU")
    p.add_argument("--model-channels", type=int, default=None, help="default 32 on CPU, 256 on GPU")
    p.add_argument("--images", type=int, default=None, help="images per call (default 4 CPU, 32 GPU)")
    p.add_argument("--rows", type=int, default=None, help="rows per forward (default 32 CPU, 64 GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per method")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default on CPU: 1; a shared 2-core runner pays thread wake-ups "
                        "on every op of these small forwards)")
    add_output_args(p)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if args.threads or not gpu:
        torch.set_num_threads(args.threads or 1)
    image_size = args.image_size or (256 if gpu else 32)
    channels = args.model_channels or (256 if gpu else 32)
    images = args.images or (32 if gpu else 4)
    rows = args.rows or (64 if gpu else 32)
    records = run(args.device, image_size, channels, images, rows, getattr(torch, args.dtype), args.min_time)
    print_table(records, ["setting", "method", "images_per_s", "speedup_vs_hook_loop", "seconds"])
    rec = RowWriter("bench_features", args.device, args,
                    meta={"model": "adm-256-uncond (random weights)", "dtype": args.dtype,
                          "threads": torch.get_num_threads(),
                          "note": "CPU numbers at reduced size" if not gpu else "full size"})
    for r in records:
        rec.row(**r)
    rec.finish()


if __name__ == "__main__":
    main()
