"""Shared measuring tools for the benchmark scripts: the device record, timing, the floors.

Every benchmark reports against the floor measured in the same run (copy bandwidth for
memory-bound kernels, matmul rate for compute-bound ones) and against the strongest alternative.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DRY_RUN_ENV = "FASTDIFF_DRY_RUN"  # set by gpu_suite.sh --dry-run: a CPU timing is then one call


def device_info(device: torch.device | str) -> dict:
    """Name, clocks, power and memory of the device (nvidia-ml-py where present), plus versions."""
    device = torch.device(device)
    info = {
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            info.update(
                nvml_name=pynvml.nvmlDeviceGetName(h),
                sm_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                max_sm_clock_mhz=pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                mem_clock_mhz=pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                power_w=pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
                power_limit_w=pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
                driver=pynvml.nvmlSystemGetDriverVersion(),
            )
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            info.update(mem_total_mib=mem.total // 2**20, mem_used_mib=mem.used // 2**20,
                        temperature_c=pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
        except Exception as e:  # nvidia-ml-py is an optional extra
            info["nvml"] = f"unavailable: {e}"
    else:
        info.update(name=f"CPU: {platform.processor() or platform.machine()}", cores=os.cpu_count(),
                    torch_threads=torch.get_num_threads())
    return info


def device_label(device: torch.device | str) -> str:
    """A short file-name-safe label for the device: 'cpu' or e.g. 'NVIDIA-H100-80GB-HBM3'."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).replace(" ", "-")


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device | str = "cuda", warmup: int = 10,
            rep: int = 50, min_time_s: float = 0.0) -> float:
    """Median milliseconds of ``fn()``, warm: CUDA events on a GPU, perf_counter on the CPU.

    On CUDA it defers to ``triton.testing.do_bench`` (which also flushes L2 between calls).
    """
    device = torch.device(device)
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    if os.environ.get(DRY_RUN_ENV) == "1":  # the suite's dry run: plumbing, not timing (callers warm up)
        warmup, rep, min_time_s = 0, 1, 0.0
    for _ in range(warmup):
        fn()
    times = []
    start_all = time.perf_counter()
    while len(times) < rep or time.perf_counter() - start_all < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * rep:
            break
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device | str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), in GB/s.

    The floor of every memory-bound kernel: its fewest bytes moved over this rate.
    """
    device = torch.device(device)
    if device.type != "cuda":
        nbytes = min(nbytes, 64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, n: int = 8192) -> float:
    """Measured dense matmul rate in TFLOP/s: the floor of compute-bound kernels."""
    device = torch.device(device)
    if device.type != "cuda":
        n = min(n, 512)
        dtype = torch.float32 if dtype == torch.float16 else dtype
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


RESULTS_ENV = "FASTDIFF_RESULTS"  # the suite points this at OUT_DIR/results.jsonl
STEP_ENV = "FASTDIFF_SUITE_STEP"  # ... and names the step each row belongs to


def write_json_atomic(path: str | os.PathLike, payload) -> Path:
    """Write ``payload`` as JSON to a temporary file beside ``path`` and rename it into place: a reader
    (or a killed run) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def add_output_args(parser) -> None:
    """The output flags every benchmark takes: rows to a JSON-lines file as measured, JSON files on request."""
    parser.add_argument("--jsonl", default=os.environ.get(RESULTS_ENV) or None,
                        help="append every measured row to this JSON-lines file as it is measured "
                             f"(default: ${RESULTS_ENV}, which the GPU suite sets)")
    parser.add_argument("--out", default=None,
                        help="also write {benchmark}-{device}.json into this folder at the end (default: none)")
    parser.add_argument("--save", action="store_true",
                        help="write that JSON into benchmarks/results/, the committed results (never by default)")


class RowWriter:
    """The one way a benchmark records what it measures.

    Every row goes, the moment it is measured, to the JSON-lines file ``--jsonl`` (one ``os.write`` of one
    line, so a step killed at its time limit keeps every row it finished); the first line of each run is
    the device record (``kind: "device"``), the floors measured in the run are ``kind: "floor"`` lines,
    and what could not run is a ``kind: "skip"`` line with its reason. Each line carries the benchmark,
    a run id and the suite step (``$FASTDIFF_SUITE_STEP``). :meth:`finish` writes the whole run as one
    JSON file where ``--out`` / ``--save`` ask for it (written to a temporary name, then renamed).
    ``benchmarks/report.py`` turns the JSON-lines file into the committed JSON files and README tables.
    """

    def __init__(self, bench: str, device: torch.device | str, args=None, *, jsonl: str | None = None,
                 meta: dict | None = None):
        self.bench = bench
        self.device = torch.device(device)
        self.run_id = f"{bench}-{os.getpid()}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        self.step = os.environ.get(STEP_ENV) or None
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.failures = 0  # skip rows marked failed=True: the benchmark then exits non-zero
        self.floors: dict = {}
        self.meta = dict(meta or {})
        path = jsonl if jsonl is not None else getattr(args, "jsonl", None)
        out = getattr(args, "out", None)
        self.out_dir = RESULTS_DIR if getattr(args, "save", False) else (Path(out) if out else None)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
        self.device_record = device_info(self.device)
        self._emit({"kind": "device", **self.device_record})

    def _emit(self, record: dict) -> dict:
        line = {"bench": self.bench, "run": self.run_id, "step": self.step, **record}
        if self._fd is not None:
            os.write(self._fd, (json.dumps(line, default=_jsonable) + "\n").encode())
        return line

    def row(self, **fields) -> dict:
        """Record one measurement (written out at once); returns it."""
        self.rows.append(fields)
        self._emit({"kind": "row", **fields})
        return fields

    def partial(self, **fields) -> None:
        """Record one timing of a row still being measured (e.g. one of several interleaved repeats whose
        median becomes the row): a killed step keeps these ``kind: "partial"`` lines."""
        self._emit({"kind": "partial", **fields})

    def floor(self, name: str, value: float, unit: str, **fields) -> float:
        """Record a ceiling measured in this run (copy bandwidth, matmul rate): the floors' denominators."""
        self.floors[name] = {"value": value, "unit": unit, **fields}
        self._emit({"kind": "floor", "name": name, "value": value, "unit": unit, **fields})
        return value

    def skip(self, what: str, reason: str, **fields) -> None:
        """Record something that was not measured here, and why; ``failed=True`` where it crashed (a
        failure, not a missing extra: :attr:`exit_status` is then 1)."""
        self.failures += bool(fields.get("failed"))
        self.skipped.append({"what": what, "reason": reason, **fields})
        self._emit({"kind": "skip", "what": what, "reason": reason, **fields})
        print(f"  skipped {what}: {reason}", flush=True)

    @property
    def exit_status(self) -> int:
        return 1 if self.failures else 0

    def meta_update(self, **fields) -> None:
        self.meta.update(fields)
        self._emit({"kind": "meta", **fields})

    def finish(self, **meta) -> Path | None:
        """Close the JSON-lines file; write ``{bench}-{device}.json`` where asked. Returns its path or None."""
        self.meta.update(meta)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.out_dir is None:
            return None
        payload = {"benchmark": self.bench, "device": self.device_record, **self.meta, "floors": self.floors,
                   "results": self.rows, "skipped": self.skipped}
        path = write_json_atomic(self.out_dir / f"{self.bench}-{device_label(self.device)}.json", payload)
        print(f"wrote {path}")
        return path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)


def have_module(name: str) -> str | None:
    """None when ``import name`` works here, else the reason it does not (for a skip row). Imports rather
    than asks ``importlib.util.find_spec``, so an import blocker or a broken install counts as absent."""
    try:
        importlib.import_module(name)
    except Exception as e:  # ImportError, or whatever a half-installed package raises
        return f"{name} is not importable here ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None


def ort_cuda_reason() -> str | None:
    """None when ONNX Runtime has its CUDA provider here, else why its GPU rows are skipped."""
    missing = have_module("onnxruntime")
    if missing:
        return missing
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider here (providers: "
                f"{', '.join(ort.get_available_providers())}); the CPU provider beside GPU rows would compare "
                "nothing")
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def add_compile_args(parser) -> None:
    """--compile adds the torch.compile baselines; their mode is torch.compile's default unless --full."""
    parser.add_argument("--compile", action="store_true", help="add the torch.compile baseline rows")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode (default: torch's default; 'max-autotune' with --full)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend ('eager' in the suite's dry run: the plumbing, not the speed)")


def compile_options(args) -> dict:
    mode = args.compile_mode or ("max-autotune" if getattr(args, "full", False) else None)
    options = {"backend": args.compile_backend}
    if mode and args.compile_backend == "inductor":
        options["mode"] = mode
    return options


def raise_recompile_limit(limit: int = 256) -> None:
    """Let dynamo compile one graph per shape and dtype a benchmark times (its default limit is 8 per
    function, after which it runs the function eagerly without saying so in the numbers)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def dynamo_graph_count() -> int:
    """Graphs dynamo has built in this process (torch._dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def print_table(records: list[dict], columns: list[str]) -> None:
    """Plain fixed-width table of the chosen columns (floats to 3 significant digits)."""
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    rows = [[fmt(r.get(c, "")) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=False)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)))
