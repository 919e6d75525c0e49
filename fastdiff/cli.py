"""The ``fastdiff`` command line: ``sample``, ``info``, ``export``.

    fastdiff sample --out samples.png                      # the bundled digits model, on the CPU
    fastdiff sample --model digits --class 3 7 --n 20 --steps 20 --guidance 3 --out g.png --save s.npz
    fastdiff sample --model dit-xl-2-256 --checkpoint DiT-XL-2-256x256.pt --class 207 --out latents.png
    torchrun --nproc_per_node=2 -m fastdiff sample --num-samples 64 --batch 16 --out samples.png
    fastdiff info
    fastdiff export --model digits --out digits.onnx [--step dpmpp_2m]

Sample i uses seed ``--seed + i``; without ``--class`` the labels of a class-conditional model cycle
through the classes (i mod K); with ``--class`` they cycle through the given classes. ``--save`` writes
``samples`` (float32, N x C x H x W, in [-1, 1]), ``labels`` (int64, class-conditional models) and
``seeds`` (int64). Latent models (DiT, latent U-ViT) write latents, decoded when ``--vae`` names a
diffusers AutoencoderKL directory.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

from fastdiff.io import atomic_path, atomic_write, check_output_path

__all__ = ["main", "build_parser", "load_model", "save_grid"]

LATENT_SCALE = 0.18215  # Stable Diffusion's VAE latent scale (DiT, U-ViT latent models)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("ema", "model", "state_dict"):  # common checkpoint wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    return sd


def load_model(name: str = "digits", checkpoint: Optional[str] = None):
    """``(denoiser, info)`` for ``--model`` / ``--checkpoint``; info has ``sample_shape``, ``num_classes``
    (0: unconditional), ``latent`` and ``default_guidance``."""
    from fastdiff.denoiser import Denoiser
    from fastdiff.models import PRESETS, preset
    from fastdiff.schedules import VPSchedule

    if name == "digits":
        from fastdiff.models.digits import load_digits_model

        den = load_digits_model(checkpoint)
        cfg = den.metadata["config"]
        return den, {"sample_shape": (cfg["in_channels"], cfg["image_size"], cfg["image_size"]),
                     "num_classes": den.num_classes, "latent": False,
                     "default_guidance": float(den.metadata.get("default_guidance", 1.0))}
    if name not in PRESETS:
        raise SystemExit(f"fastdiff: unknown model {name!r}; use 'digits' or one of: "
                         f"{', '.join(sorted(PRESETS))}")
    model = preset(name)
    if checkpoint:
        model.load_state_dict(_load_state_dict(checkpoint), strict=True)
    else:
        print(f"fastdiff: no --checkpoint for {name}: random weights (samples will be noise)",
              file=sys.stderr)
    x = model.example_inputs(1)["x"]
    sample_shape = tuple(x.shape[1:])
    out_ch = getattr(model, "out_channels", None)
    in_ch = sample_shape[0]
    learned_sigma = bool(getattr(model, "learn_sigma", False)) or (out_ch is not None and out_ch == 2 * in_ch)
    ncls = getattr(model, "num_classes", None)
    cls_name = type(model).__name__
    y_null, num_classes = None, 0
    if isinstance(ncls, int) and ncls > 0:
        num_classes = ncls
        if cls_name == "DiT" and getattr(model, "class_dropout_prob", 0.1) > 0:
            y_null = ncls
        elif cls_name == "UViT":  # U-ViT's label table ends with the null label
            y_null, num_classes = ncls - 1, ncls - 1
    latent = cls_name == "DiT" or (cls_name == "UViT" and in_ch == 4)
    schedule = VPSchedule("scaled_linear", 1000, 0.00085, 0.012) if cls_name == "UViT" and latent \
        else VPSchedule("linear", 1000)
    den = Denoiser(model, schedule, prediction="eps", learned_sigma=learned_sigma)
    den.y_null = y_null
    return den, {"sample_shape": sample_shape, "num_classes": num_classes, "latent": latent,
                 "default_guidance": 4.0 if y_null is not None else 1.0}


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def save_grid(images: np.ndarray, path: str, columns: Optional[int] = None, min_tile: int = 64) -> None:
    """A grid PNG of (N, C, H, W) images in [-1, 1] (1 channel: grey; 3: RGB; other: the first 3 channels,
    each normalised); tiles are enlarged (nearest) to at least ``min_tile`` pixels."""
    from PIL import Image

    n, c, h, w = images.shape
    if c not in (1, 3):
        x = images[:, :3]
        lo = x.min(axis=(0, 2, 3), keepdims=True)
        hi = x.max(axis=(0, 2, 3), keepdims=True)
        images = (x - lo) / np.maximum(hi - lo, 1e-8) * 2 - 1
        c = images.shape[1]
    cols = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    tiles = to_uint8(images)
    pad = 2
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top: top + h, left: left + w] = tiles[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    scale = max(1, math.ceil(min_tile / max(h, w)))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path, argument="--out") as tmp:  # the previous grid stays whole if this fails
        img.save(tmp, format=image_format(path))


def image_format(path: str) -> str:
    """PIL's format name for the extension of ``path`` (ValueError naming --out for an unknown one)."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"--out: {path!r} has no image extension PIL writes (use .png, .jpg, .webp, ...)")
    return fmt


def check_outputs(args) -> None:
    """--out / --save point into existing folders (and --out has an image extension): checked before the
    model is loaded, so a typo costs nothing."""
    if getattr(args, "out", None):
        check_output_path(args.out, "--out")
        if getattr(args, "func", None) is cmd_sample:
            image_format(args.out)
    if getattr(args, "save", None):
        check_output_path(args.save, "--save")


def _decode_latents(latents: torch.Tensor, vae_path: str, batch: int = 8) -> torch.Tensor:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_path).to(latents.device).eval()
    outs = []
    with torch.no_grad():
        for i in range(0, latents.shape[0], batch):
            outs.append(vae.decode(latents[i: i + batch] / LATENT_SCALE).sample.float().clamp(-1, 1))
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _init_distributed(device: str) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when this call created it.

    The peers must all join within ``FASTDIFF_DIST_TIMEOUT`` seconds (default 60): a rank whose peers never
    come gets an error instead of waiting forever (collectives keep torch's own timeout)."""
    import datetime

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    use_nccl = device.startswith("cuda") and torch.cuda.is_available()
    if use_nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    wait = float(os.environ.get("FASTDIFF_DIST_TIMEOUT", "60"))
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=wait)))
    except (RuntimeError, ValueError) as e:  # DistStoreError / DistNetworkError, or a missing MASTER_ADDR
        raise SystemExit(f"fastdiff: error: torch.distributed: the {os.environ.get('WORLD_SIZE')} processes "
                         f"of WORLD_SIZE did not all join within {wait:g} s (RANK={os.environ.get('RANK')}, "
                         f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT="
                         f"{os.environ.get('MASTER_PORT')}); start every rank (torchrun does) or unset "
                         f"WORLD_SIZE; FASTDIFF_DIST_TIMEOUT sets the wait: {str(e).splitlines()[0]}") from None
    dist.init_process_group(backend="nccl" if use_nccl else "gloo", store=store, rank=rank, world_size=world)
    return True


def labels_for(n: int, num_classes: int, classes: Optional[list]) -> Optional[np.ndarray]:
    """Sample i gets ``classes[i mod len(classes)]``, or ``i mod num_classes``; None if unconditional."""
    if not num_classes:
        if classes:
            raise SystemExit("fastdiff: --class given but the model is not class-conditional")
        return None
    pool = classes if classes else list(range(num_classes))
    for k in pool:
        if not 0 <= k < num_classes:
            raise SystemExit(f"fastdiff: --class {k} is out of range (the model has {num_classes} classes)")
    return np.array([pool[i % len(pool)] for i in range(n)], dtype=np.int64)


def cmd_sample(args) -> int:
    from fastdiff.engine import sample
    from fastdiff.policy import cpu_threads

    check_outputs(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        torch.set_num_threads(cpu_threads(args.threads))
    created = _init_distributed(device)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if dist.is_available() and dist.is_initialized() and device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    try:
        den, info = load_model(args.model, args.checkpoint)
        n = int(args.n)
        if n < 1:
            raise SystemExit("fastdiff: --n must be >= 1")
        labels = labels_for(n, info["num_classes"], args.classes)
        guidance = info["default_guidance"] if args.guidance is None else float(args.guidance)
        if labels is None and guidance != 1.0:
            guidance = 1.0
        seeds = [args.seed + i for i in range(n)]
        t0 = time.perf_counter()
        out = sample(den, (n, *info["sample_shape"]), sampler=args.sampler, steps=args.steps,
                     guidance_scale=guidance, y=None if labels is None else torch.from_numpy(labels),
                     seeds=seeds, device=device, dtype=args.dtype, progress=not args.quiet and rank == 0,
                     batch_size=args.batch, compile=args.compile, cuda_graph=args.cuda_graph,
                     runtime=args.runtime, threads=args.threads)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        dt = time.perf_counter() - t0
        if rank != 0:
            return 0
        images = out
        if info["latent"] and args.vae:
            images = _decode_latents(out, args.vae)
        arr = images.float().clamp(-1, 1).cpu().numpy() if not info["latent"] or args.vae \
            else out.float().cpu().numpy()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        print(f"{n} samples in {dt:.2f} s: {n / dt:.2f} images/s ({args.sampler}, {args.steps} steps, "
              f"guidance {guidance:g}, {out.device}, {world} process{'es' if world > 1 else ''})")
        if args.out:
            by_class = labels is not None and not args.classes and n >= info["num_classes"]
            cols = info["num_classes"] if by_class else None
            save_grid(arr, args.out, columns=cols)
            print(f"wrote {args.out}")
        if args.save:
            payload = {"samples": arr.astype(np.float32), "seeds": np.array(seeds, dtype=np.int64)}
            if labels is not None:
                payload["labels"] = labels
            with atomic_write(args.save, argument="--save") as f:  # a file object: the name is kept as given
                np.savez(f, **payload)
            print(f"wrote {args.save}")
        return 0
    finally:
        if created:
            dist.destroy_process_group()


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return "not installed"


def cmd_info(args) -> int:
    import platform

    import fastdiff
    from fastdiff.policy import cpu_has_native_bf16, default_dtype

    print(f"fastdiff {fastdiff.__version__}  python {platform.python_version()}  {platform.platform()}")
    for pkg in ("torch", "triton", "numpy", "safetensors", "onnx", "onnxruntime-gpu", "onnxruntime",
                "onnxscript", "xformers", "diffusers", "nvidia-ml-py"):
        print(f"  {pkg:16s} {_version(pkg)}")
    cap = ""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, capability {cap}, native bf16: {cpu_has_native_bf16()}, "
          f"sample dtype: {str(default_dtype('cpu')).replace('torch.', '')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
                  f"{p.multi_processor_count} SMs")
        try:
            import pynvml

            pynvml.nvmlInit()
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                clock = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
                power = pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                print(f"  nvml {i}: driver {pynvml.nvmlSystemGetDriverVersion()}, max SM clock {clock} MHz, "
                      f"power limit {power:.0f} W, memory used {mem.used / 2**30:.1f} / "
                      f"{mem.total / 2**30:.1f} GiB")
        except Exception as e:  # nvidia-ml-py missing or no driver access
            print(f"  nvml: unavailable ({type(e).__name__})")
    else:
        print("cuda: not available")
    from fastdiff import ops

    interp = os.environ.get("TRITON_INTERPRET") == "1"
    triton_ok = _version("triton") != "not installed"
    print("kernel backends:")
    print(f"  triton:     {'usable (CUDA)' if triton_ok and torch.cuda.is_available() else ''}"
          f"{'interpreter on CPU tensors (TRITON_INTERPRET=1)' if triton_ok and interp else ''}"
          f"{'installed, no GPU: ops use the reference path' if triton_ok and not interp and not torch.cuda.is_available() else ''}"  # noqa: E501
          f"{'not installed' if not triton_ok else ''}")
    print("  reference:  usable (any device)")
    print(f"  sdpa:       usable ({'cuda, ' if torch.cuda.is_available() else ''}cpu)")
    xf = False
    if torch.cuda.is_available():
        try:
            xf = ops.xformers_usable(torch.device("cuda"), torch.float16)
        except Exception:
            xf = False
    print(f"  xformers:   {'usable' if xf else 'not usable here'}")
    try:
        import onnxruntime as ort

        print(f"  onnxruntime providers: {', '.join(ort.get_available_providers())}")
    except ImportError:
        print("  onnxruntime: not installed")
    print(f"  backend switch: FASTDIFF_BACKEND={os.environ.get('FASTDIFF_BACKEND', 'auto')} "
          f"(current: {ops.current_backend()})")
    return 0


def cmd_export(args) -> int:
    try:
        from fastdiff import export
    except ImportError as e:
        raise SystemExit(f"fastdiff export needs the onnx extras (pip install 'fastdiff[onnx]'): {e}") from e
    check_outputs(args)
    den, info = load_model(args.model, args.checkpoint)
    kw = {"input_shape": info["sample_shape"]}
    if args.step:
        guided = bool(args.guidance) and info["num_classes"] > 0 and getattr(den, "y_null", None) is not None
        path = export.step_to_onnx(den, args.step, args.out, guidance=guided,
                                   y_null=getattr(den, "y_null", None), **kw)
    else:
        path = export.to_onnx(den, args.out, **kw)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fastdiff.samplers import SAMPLERS

    p = argparse.ArgumentParser(prog="fastdiff", description="Fast sampling from diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="draw samples and write an image grid")
    s.add_argument("--model", default="digits", help="'digits' (bundled) or a preset name")
    s.add_argument("--checkpoint", default=None, help="weights (.safetensors / .pt) for the model")
    s.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS))
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's; digits: 2)")
    s.add_argument("--class", dest="classes", type=int, nargs="+", default=None,
                   help="class labels to cycle through (default: all classes)")
    s.add_argument("--n", "--num-samples", dest="n", type=int, default=20,
                   help="number of samples (under torchrun write --num-samples: torchrun's own parser "
                        "reads --n as an abbreviation of its options)")
    s.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED + i")
    s.add_argument("--batch", type=int, default=None, help="chunk size")
    s.add_argument("--device", default=None, help="cpu | cuda | cuda:K (default: cuda if available)")
    s.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: bf16 on GPU and on CPUs with native bf16, else float32)")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's, or 1 when the machine is already busy)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--cuda-graph", dest="cuda_graph", type=lambda v: v.lower() in ("1", "true", "yes"),
                   default=None, help="CUDA graph replay (default: on for CUDA)")
    s.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime"))
    s.add_argument("--vae", default=None, help="diffusers AutoencoderKL directory to decode latents")
    s.add_argument("--out", default="samples.png", help="grid PNG ('' for none)")
    s.add_argument("--save", default=None, help="write samples, labels and seeds to this .npz")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    i = sub.add_parser("info", help="versions, devices and kernel backends")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("export", help="export the model (or one sampling step) to ONNX")
    e.add_argument("--model", default="digits")
    e.add_argument("--checkpoint", default=None)
    e.add_argument("--out", required=True, help="the .onnx file")
    e.add_argument("--step", default=None, choices=sorted(SAMPLERS),
                   help="export one whole sampling step of this sampler instead of the model")
    e.add_argument("--guidance", type=int, default=1,
                   help="with --step: include classifier-free guidance (1/0)")
    e.set_defaults(func=cmd_export)

    from fastdiff.features import add_features_arguments, features_command  # features: fastdiff/features.py
    add_features_arguments(sub.add_parser("features", help="diffusion features of images, to shards"))
    sub.choices["features"].set_defaults(func=features_command)
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
