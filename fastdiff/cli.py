"""The ``fastdiff`` command line: ``sample``, ``export``, ``features``, ``info``.

    fastdiff sample --out samples.png                      # the bundled digits model, on the CPU
    fastdiff sample --model digits --class 3 7 --n 20 --steps 20 --guidance 3 --out g.png --save s.npz
    fastdiff sample --model dit-xl-2-256 --checkpoint DiT-XL-2-256x256.pt --vae sd-vae-ft-ema/ --class 207
    fastdiff sample --model ddpm-cifar10-32/ --out cifar.png     # a diffusers UNet2DModel folder
    torchrun --nproc_per_node=2 -m fastdiff sample --num-samples 64 --batch 16 --out samples.png
    fastdiff info
    fastdiff export --model digits --out digits.onnx [--step dpmpp_2m]

``--model`` is whatever :func:`fastdiff.load` takes, so the command line knows nothing about a model that
the Python API does not. Sample i uses seed ``--seed + i``; without ``--class`` the labels of a
class-conditional model cycle through the classes (i mod K); with ``--class`` they cycle through the given
classes. ``--save`` writes ``samples`` (float32, N x C x H x W: images in [-1, 1], or latents for a latent
model without ``--vae``), ``labels`` (int64, class-conditional models) and ``seeds`` (int64).

Every error is one line on stderr, ``fastdiff: error: ...``, with exit status 2; ``--debug`` (anywhere on
the line) or ``FASTDIFF_DEBUG=1`` prints the traceback as well. Output files are written to a temporary
file in the target folder and renamed into place, so a failed run leaves the previous file intact.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
import warnings
from typing import Callable, Optional

import numpy as np
import torch

from fastdiff.io import atomic_write

__all__ = ["main", "build_parser", "save_grid", "labels_for", "write_atomically"]

MAX_SEED = 2**63  # seeds must lie in [0, 2^63): torch.Generator.manual_seed's range


class UsageError(ValueError):
    """A command-line mistake (argparse's complaints among them): reported in one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Argument types: each rejects a bad value before any work, naming what is allowed
# ---------------------------------------------------------------------------------------------


def _int_at_least(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value >= high):
            span = f">= {low}" if high is None else f"in [{low}, {'2^63' if high == MAX_SEED else high})"
            raise argparse.ArgumentTypeError(f"{value} must be {span}")
        return value

    parse.__name__ = "int"
    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not finite")
    return value


def _on_off(text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not one of 1/0, true/false, yes/no, on/off")


def _device(text: Optional[str]) -> str:
    """The device to run on: ``text``, or CUDA when available; an error if it is not there."""
    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: {text!r} is not a device (cpu, cuda, cuda:K)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device: {text!r} is not available here (no CUDA device)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device: {text!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
    elif dev.type != "cpu":
        raise UsageError(f"--device: {text!r}: fastdiff runs on cpu and cuda devices")
    return str(dev)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _check_output(path: Optional[str], option: str, suffixes: Optional[tuple] = None) -> None:
    """An output path whose folder exists and is writable, and which is not a folder itself."""
    if not path:
        return
    if os.path.isdir(path):
        raise UsageError(f"{option}: {path!r} is a folder; give a file name")
    if suffixes is not None and not path.lower().endswith(suffixes):
        raise UsageError(f"{option}: {path!r} must end in one of {', '.join(suffixes)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: the folder {folder!r} is not writable")


# ---------------------------------------------------------------------------------------------
# Writing files: a temporary name in the target folder, renamed into place when complete
# ---------------------------------------------------------------------------------------------


def write_atomically(path: str, write: Callable) -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` and rename it to ``path`` when it returned
    (:func:`fastdiff.io.atomic_write`): an error (a full disk, an interrupt) leaves the previous ``path`` as it
    was and no partial file."""
    with atomic_write(path) as f:
        write(f)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return x.transpose(0, 2, 3, 1)


def save_grid(images: np.ndarray, path: str, columns: Optional[int] = None, min_tile: int = 64) -> None:
    """A grid image of (N, C, H, W) images in [-1, 1] (1 channel: grey; 3: RGB; other: the first 3 channels,
    each normalised); tiles are enlarged (nearest) to at least ``min_tile`` pixels. The format follows the
    file name's suffix; the file is written atomically (:func:`write_atomically`)."""
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
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise ValueError(f"cannot tell an image format from the name {path!r} (use .png)")
    write_atomically(path, lambda f: img.save(f, format=fmt))


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
        raise TimeoutError(f"torch.distributed: the {os.environ.get('WORLD_SIZE')} processes "
                         f"of WORLD_SIZE did not all join within {wait:g} s (RANK={os.environ.get('RANK')}, "
                         f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT="
                         f"{os.environ.get('MASTER_PORT')}); start every rank (torchrun does) or unset "
                         f"WORLD_SIZE; FASTDIFF_DIST_TIMEOUT sets the wait: {str(e).splitlines()[0]}") from None
    dist.init_process_group(backend="nccl" if use_nccl else "gloo", store=store, rank=rank, world_size=world)
    return True


def labels_for(n: int, num_classes: Optional[int], classes: Optional[list]) -> Optional[np.ndarray]:
    """Sample i gets ``classes[i mod len(classes)]``, or ``i mod num_classes``; None if unconditional."""
    if not num_classes:
        if classes:
            raise UsageError("--class: the model is not class-conditional")
        return None
    pool = classes if classes else list(range(num_classes))
    for k in pool:
        if not 0 <= k < num_classes:
            raise UsageError(f"--class: {k} is out of range (the model has classes 0 to {num_classes - 1})")
    return np.array([pool[i % len(pool)] for i in range(n)], dtype=np.int64)


def _load(args, **kwargs):
    from fastdiff.loading import load

    return load(args.model, checkpoint=args.checkpoint, random_weights=args.random_weights, **kwargs)


def cmd_sample(args) -> int:
    from fastdiff.engine import sample
    from fastdiff.policy import cpu_threads

    device = _device(args.device)  # every check before any work: the device, the outputs, the model
    _check_output(args.out, "--out", IMAGE_SUFFIXES)
    _check_output(args.save, "--save")
    if args.out and args.save and os.path.abspath(args.out) == os.path.abspath(args.save):
        raise UsageError("--out and --save name the same file")
    if args.seed + args.n > MAX_SEED:
        raise UsageError("--seed: samples use seeds --seed to --seed + n - 1, which must stay below 2^63")
    den = _load(args, vae=args.vae)
    if args.runtime == "onnxruntime" and not isinstance(den.model, torch.nn.Module):
        raise UsageError(f"--runtime onnxruntime exports a step graph from a PyTorch model; {args.model!r} "
                         "already runs in ONNX Runtime (use --runtime torch, the default)")
    labels = labels_for(args.n, den.num_classes, args.classes)
    if args.guidance is not None and args.guidance != 1.0 and (labels is None or den.y_null is None):
        raise UsageError("--guidance: this model has no null label for classifier-free guidance "
                         "(leave --guidance out, or give 1)")
    guidance = den.default_guidance_scale if args.guidance is None else args.guidance
    if device == "cpu":
        torch.set_num_threads(cpu_threads(args.threads))
    created = _init_distributed(device)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if dist.is_available() and dist.is_initialized() and device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    try:
        n = args.n
        seeds = [args.seed + i for i in range(n)]
        decode = den.latent and den.vae is not None
        t0 = time.perf_counter()
        out = sample(den, (n, *den.sample_shape), sampler=args.sampler, steps=args.steps,
                     guidance_scale=guidance, y=None if labels is None else torch.from_numpy(labels),
                     seeds=seeds, device=device, dtype=args.dtype, progress=not args.quiet and rank == 0,
                     batch_size=args.batch, compile=args.compile, cuda_graph=args.cuda_graph,
                     runtime=args.runtime, threads=args.threads, decode=decode)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        dt = time.perf_counter() - t0
        if rank != 0:
            return 0
        arr = out.float().cpu().numpy()
        if not den.latent or decode:
            arr = np.clip(arr, -1.0, 1.0)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        what = "latents (no --vae: the grid shows their first 3 channels)" if den.latent and not decode \
            else "samples"
        print(f"{n} {what} in {dt:.2f} s: {n / dt:.2f} images/s ({args.sampler}, {args.steps} steps, "
              f"guidance {guidance:g}, {out.device}, {world} process{'es' if world > 1 else ''})")
        if args.out:
            by_class = labels is not None and not args.classes and n >= den.num_classes
            save_grid(arr, args.out, columns=den.num_classes if by_class else None)
            print(f"wrote {args.out}")
        if args.save:
            payload = {"samples": arr.astype(np.float32), "seeds": np.array(seeds, dtype=np.int64)}
            if labels is not None:
                payload["labels"] = labels
            write_atomically(args.save, lambda f: np.savez(f, **payload))
            print(f"wrote {args.save}")
        return 0
    finally:
        if created:
            dist.destroy_process_group()


def cmd_export(args) -> int:
    _check_output(args.out, "--out", (".onnx",))
    try:
        from fastdiff import export
    except ImportError as e:
        raise ImportError(f"fastdiff export needs the onnx extras (pip install 'fastdiff[onnx]'): {e}") from e
    den = _load(args)
    if not isinstance(den.model, torch.nn.Module):
        raise UsageError(f"--model: {args.model!r} is already an ONNX graph")
    kw = {"input_shape": den.sample_shape}
    if args.step:
        guided = bool(args.guidance) and den.y_null is not None
        path = export.step_to_onnx(den, args.step, args.out, guidance=guided, y_null=den.y_null, **kw)
    else:
        path = export.to_onnx(den, args.out, **kw)
    print(f"wrote {path}")
    return 0


def _version(dist_name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return None


def _working_ort_providers() -> list:
    """The ONNX Runtime providers that run a session here: each is tried on a one-node graph (ORT falls back
    to the CPU silently when a provider cannot start, so being listed is not enough)."""
    import onnxruntime as ort

    gpu_only = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                "MIGraphXExecutionProvider", "NvTensorRTRTXExecutionProvider")
    listed = [p for p in ort.get_available_providers()
              if p != "AzureExecutionProvider" and (torch.cuda.is_available() or p not in gpu_only)]
    try:
        from onnx import TensorProto, helper
    except ImportError:  # no way to build the probe: list CPU, and CUDA only where torch sees a GPU
        return [p for p in listed if p == "CPUExecutionProvider" or torch.cuda.is_available()]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # old enough for any onnxruntime of the last years
    blob = model.SerializeToString()
    working = []
    for provider in listed:
        try:
            with _silenced_fds():  # ORT prints its own failure reports; the probe's answer is the result
                options = ort.SessionOptions()
                options.log_severity_level = 4
                session = ort.InferenceSession(blob, options, providers=[provider])
                if session.get_providers()[0] == provider:
                    session.run(None, {"x": np.ones(1, dtype=np.float32)})
                    working.append(provider)
        except Exception:
            continue
    return working


@contextlib.contextmanager
def _silenced_fds():
    """stdout and stderr to /dev/null at the file-descriptor level (C++ libraries write there directly)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _norm_path(device: torch.device) -> str:
    from fastdiff.ops import current_backend, use_triton

    word = current_backend()
    try:
        triton = use_triton(torch.empty(0, device=device))
    except RuntimeError:  # "triton" on a CPU tensor without TRITON_INTERPRET=1: every call would fail
        return "none: FASTDIFF_BACKEND=triton on the CPU needs TRITON_INTERPRET=1 (set before Triton is imported)"
    if triton:
        return "Triton kernels" + (" (the Triton interpreter, TRITON_INTERPRET=1)" if device.type == "cpu" else "")
    if word == "reference":
        return "reference (plain PyTorch, float32 statistics on shifted data)"
    return "native ATen GroupNorm/LayerNorm + one in-place modulate"


def cmd_info(args) -> int:
    import platform

    import fastdiff
    from fastdiff import ops
    from fastdiff.policy import cpu_has_native_bf16, default_dtype

    print(f"fastdiff {fastdiff.__version__}, python {platform.python_version()}, {platform.platform()}")
    installed = [(pkg, _version(pkg)) for pkg in ("torch", "triton", "numpy", "safetensors", "onnx", "onnxscript",
                                                   "onnxruntime", "onnxruntime-gpu", "xformers", "diffusers",
                                                   "nvidia-ml-py")]
    print("packages: " + ", ".join(f"{p} {v}" for p, v in installed if v))
    cap = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, capability {cap}, native bf16: {cpu_has_native_bf16()}, "
          f"sample dtype: {str(default_dtype('cpu')).replace('torch.', '')}")
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
                  f"{p.multi_processor_count} SMs")
        with contextlib.suppress(Exception):  # nvidia-ml-py missing or no driver access: no line
            import pynvml

            pynvml.nvmlInit()
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                clock = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM)
                power = pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000
                print(f"  nvml {i}: driver {pynvml.nvmlSystemGetDriverVersion()}, max SM clock {clock} MHz, "
                      f"power limit {power:.0f} W")
    else:
        print("cuda: not available")
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    triton_ok = _version("triton") is not None
    where = ["cuda"] if cuda else []
    where += ["cpu"]
    for dev in where:
        print(f"norm ops on {dev} tensors: {_norm_path(torch.device(dev))}")
    attention = ["sdpa", "reference"]
    if triton_ok and (cuda or interp):
        attention.append("triton" + ("" if cuda else " (interpreter)"))
    with contextlib.suppress(Exception):
        if ops.xformers_usable(torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32):
            attention.append("xformers")
    print(f"attention backends that run here: {', '.join(attention)}")
    update = "Triton kernel" if cuda and triton_ok else "reference (plain PyTorch)"
    print(f"sampler update: {update}" + (" on CUDA tensors, reference on CPU tensors" if cuda else ""))
    try:
        providers = _working_ort_providers()
        print(f"onnxruntime providers that run here: {', '.join(providers) or 'none'}")
    except ImportError:
        pass  # not installed: nothing runs here, nothing to list
    print(f"backend switch: FASTDIFF_BACKEND={os.environ.get('FASTDIFF_BACKEND', 'auto')} "
          f"(in force: {ops.current_backend()})")
    return 0


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with its complaints raised as :class:`UsageError` (one line, exit status 2)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (or says it is required)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "default" in text.lower() or not action.option_strings:
            return text
        if action.required:
            return f"{text} (required)"
        default = action.default
        shown = "off" if default is False else "on" if default is True else "%(default)s"
        return f"{text} (default: {shown})"


_MODEL_HELP = ("'digits' (bundled), a preset name (with --checkpoint), a checkpoint file, a diffusers "
               "UNet2DModel or pipeline folder, or an .onnx model graph: what fastdiff.load takes")


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="digits", help=_MODEL_HELP)
    p.add_argument("--checkpoint", default=None,
                   help="the preset's released weights (.pt / .pth / .bin / .safetensors, or a diffusers folder "
                        "for the DDPM presets) (default: none; a preset needs it or --random-weights)")
    p.add_argument("--random-weights", dest="random_weights", action="store_true",
                   help="build a preset untrained: its samples are noise (speed tests)")


def build_parser() -> argparse.ArgumentParser:
    from fastdiff.samplers import SAMPLERS

    fmt = {"formatter_class": _HelpFormatter}
    p = _Parser(prog="fastdiff", description="Fast sampling from diffusion models.", **fmt)
    p.add_argument("--debug", action="store_true", help="print the traceback of an error too (also: "
                   "FASTDIFF_DEBUG=1; --debug works anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True, metavar="{sample,export,features,info}")

    s = sub.add_parser("sample", help="draw samples and write an image grid", **fmt)
    _model_arguments(s)
    s.add_argument("--vae", default=None,
                   help="a diffusers AutoencoderKL folder that decodes a latent model's samples to images "
                        "(default: none; the grid then shows latents)")
    s.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS), help="the sampler")
    s.add_argument("--steps", type=_int_at_least(1), default=20, help="sampling steps")
    s.add_argument("--guidance", type=_finite_float, default=None,
                   help="classifier-free guidance scale (default: the model's: digits 2, DiT 4, U-ViT 1.4 / 1.7; "
                        "1 for models without a null label)")
    s.add_argument("--class", dest="classes", type=_int_at_least(0), nargs="+", default=None,
                   help="class labels to cycle through (default: all classes)")
    s.add_argument("--n", "--num-samples", dest="n", type=_int_at_least(1), default=20,
                   help="number of samples (under torchrun write --num-samples: torchrun's own parser "
                        "reads --n as an abbreviation of its options)")
    s.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=0, help="sample i uses seed SEED + i")
    s.add_argument("--batch", type=_int_at_least(1), default=None,
                   help="chunk size (default: 32 on the CPU; on CUDA what fits the memory)")
    s.add_argument("--device", default=None, help="cpu | cuda | cuda:K (default: cuda if available, else cpu)")
    s.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: bf16 on GPU and on CPUs with native bf16, else float32)")
    s.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="CPU threads (default: torch's, or 1 when the machine is already busy)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the model (the first call compiles: about 2 minutes on a CPU)")
    s.add_argument("--cuda-graph", dest="cuda_graph", type=_on_off, default=None,
                   help="CUDA graph replay, 1/0 (default: on for CUDA)")
    s.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime"),
                   help="onnxruntime exports the step graph on the first call (seconds to minutes), then runs it")
    s.add_argument("--out", default="samples.png", help="grid image (.png, .jpg, ...; '' for none)")
    s.add_argument("--save", default=None, help="write samples, labels and seeds to this .npz (default: none)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("export", help="export the model (or one sampling step) to ONNX", **fmt)
    _model_arguments(e)
    e.add_argument("--out", required=True, help="the .onnx file")
    e.add_argument("--step", default=None, choices=sorted(SAMPLERS),
                   help="export one whole sampling step of this sampler instead of the model (default: the model)")
    e.add_argument("--guidance", type=int, choices=(0, 1), default=1,
                   help="with --step: include classifier-free guidance where the model has a null label (1/0)")
    e.set_defaults(func=cmd_export)

    from fastdiff.features import add_features_arguments, features_command  # features: fastdiff/features.py

    f = sub.add_parser("features", help="diffusion features of images, to shards", **fmt)
    add_features_arguments(f)
    f.set_defaults(func=features_command)

    i = sub.add_parser("info", help="versions, devices, and the kernel paths and providers that run here", **fmt)
    i.set_defaults(func=cmd_info)
    return p


# ---------------------------------------------------------------------------------------------
# main: one line per error
# ---------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, SystemExit):
        text = text.removeprefix("fastdiff: ")
    elif not isinstance(e, (ValueError, OSError, ImportError)):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    text = text or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fastdiff: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Optional[list] = None) -> int:
    """Run one command; returns the exit status (0, 2 on any error, 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FASTDIFF_DEBUG", "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _warn_in_one_line
        try:
            args = build_parser().parse_args(argv)
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            print("fastdiff: interrupted", file=sys.stderr)
            return 130
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):  # --help, or a command's own exit status
                raise
            if debug:
                traceback.print_exc()
            print(f"fastdiff: error: {_one_line(e)}", file=sys.stderr)
            return 2
        except Exception as e:
            if debug:
                traceback.print_exc()
            print(f"fastdiff: error: {_one_line(e)}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
