"""The execution policy shared by the engine, ``fastdiff.accelerate`` and the CLI: which dtype a model
runs in, whether a convolutional model runs channels_last, and how many CPU threads to use.

It sits below ``engine.py`` and ``compat/`` so both read one policy without an upward import.

- **dtype** (:func:`default_dtype`): bfloat16 on CUDA (float16 where the GPU has no bf16), bfloat16 on a
  CPU that computes it natively (AMX-BF16 / AVX512-BF16), float32 otherwise.
- **channels_last** (:func:`use_channels_last`): on CUDA for every convolutional model; on the CPU only for
  bf16 conv models of at least :data:`CPU_CHANNELS_LAST_MIN_PARAMS` parameters, because NHWC speeds up
  oneDNN's bf16 convolutions but slows ATen's bf16 GroupNorm (up to 25x for (64, 64, 16, 16), 32
  groups). Measured on 2 AVX512-BF16 cores (AMD EPYC), bf16, whole sampling loops: the 35.7M-parameter
  DDPM-CIFAR10 U-Net runs 1.2x faster in NHWC, the 1.2M-parameter digits U-Net 2.5x slower.
- **threads** (:func:`cpu_threads`): the requested count, else torch's default, or 1 when the machine is
  already busy (1-minute load average >= cores): OpenMP regions wait for every thread, and a descheduled
  thread stalls each one. The CLI sets it for the process; ``fastdiff.sample`` on the CPU applies it for
  the call (:func:`cpu_threads_for_call`) and gives torch its own setting back.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Union

import torch
from torch import nn

__all__ = [
    "CPU_CHANNELS_LAST_MIN_PARAMS",
    "DTYPES",
    "as_dtype",
    "cpu_has_native_bf16",
    "cpu_threads",
    "cpu_threads_for_call",
    "default_dtype",
    "module_device",
    "module_dtype",
    "use_channels_last",
]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64,
          "fp64": torch.float64}
CPU_CHANNELS_LAST_MIN_PARAMS = 10_000_000


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 matmuls natively (AMX-BF16 or AVX512-BF16)."""
    cap = ""
    with contextlib.suppress(Exception):
        cap = torch.backends.cpu.get_cpu_capability()
    if "AMX" in cap.upper():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """bf16 on CUDA (fp16 without bf16 support), bf16 on a native-bf16 CPU, else float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def as_dtype(dtype, name: str = "dtype") -> Optional[torch.dtype]:
    """A torch dtype from a dtype or one of the names in :data:`DTYPES` (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"{name} must be a torch dtype or one of {sorted(DTYPES)}, got {dtype!r}")


def module_dtype(model) -> Optional[torch.dtype]:
    """The dtype of a module's first floating-point parameter (None for a non-module or none)."""
    if not isinstance(model, nn.Module):
        return None
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def module_device(model) -> Optional[torch.device]:
    """The device of a module's first parameter (None for a non-module or a module without parameters)."""
    if not isinstance(model, nn.Module):
        return None
    for p in model.parameters():
        return p.device
    return None


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters()) if isinstance(model, nn.Module) else 0


def _has_conv(model) -> bool:
    return isinstance(model, nn.Module) and any(isinstance(m, nn.Conv2d) for m in model.modules())


def use_channels_last(model, device: Union[str, torch.device], dtype: torch.dtype, ndim: int = 4) -> bool:
    """Whether ``model`` should run channels_last on ``device`` in ``dtype`` for ``ndim``-D inputs."""
    device = torch.device(device)
    if ndim != 4 or not _has_conv(model):
        return False
    if device.type == "cuda":
        return True
    return (device.type == "cpu" and dtype == torch.bfloat16
            and _num_params(model) >= CPU_CHANNELS_LAST_MIN_PARAMS)


def cpu_threads(requested: Optional[int] = None) -> int:
    """The intra-op thread count for CPU work: ``requested``, else torch's default, or 1 when the machine
    is already busy."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads must be an int >= 1 or None, got {requested!r}")
        return requested
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        busy = False
    return 1 if busy else torch.get_num_threads()


@contextlib.contextmanager
def cpu_threads_for_call(requested: Optional[int] = None) -> Iterator[int]:
    """Run a block with :func:`cpu_threads` intra-op threads and give torch its own setting back after."""
    want = cpu_threads(requested)
    old = torch.get_num_threads()
    if want != old:
        torch.set_num_threads(want)
    try:
        yield want
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)
