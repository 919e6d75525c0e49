"""Benchmark of the fused conditioning norms against PyTorch eager and torch.compile.

    python benchmarks/bench_modulated_norm.py [--out DIR] [--quick]

AdaGN (GroupNorm -> * (1 + scale) + shift -> SiLU) and diffusers' ResnetBlock2D "default" norm
(SiLU(GroupNorm(x + temb)), the op's pre_shift) at U-Net shapes, and DiT's LayerNorm-modulate, forward
only. Reports, per shape: GB/s of each implementation over the fewest bytes the op must move (read x
once, write out once), that rate as a fraction of the device's copy bandwidth measured in the same run,
and the fused kernel's speed-up over each alternative.

On a CPU, "fused" is fastdiff's op on its ``auto`` path (ATen's GroupNorm, or per-channel sums where
ATen's channels_last kernel is slow) and "fused_compile" the op under torch.compile (written out in aten
ops for inductor), against PyTorch eager and torch.compile of the same math, in bf16 where the CPU has
native bf16 (the engine's CPU dtype) and float32, at the DDPM-CIFAR10 U-Net's shapes; the Triton kernel
runs there only under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import copy_bandwidth_gbs, device_label, print_table, save_results, time_ms  # noqa: E402

from fastdiff import ops  # noqa: E402

GPU_GN_SHAPES = [  # (N, C, H, W); 32 groups
    (8, 128, 64, 64), (16, 256, 32, 32), (32, 512, 32, 32), (32, 512, 16, 16), (64, 1024, 8, 8),
    (16, 128, 64, 64), (32, 256, 64, 64),
]
GPU_LN_SHAPES = [(64, 256, 1152), (32, 1024, 1152), (64, 256, 768)]  # (N, L, D)
CPU_GN_SHAPES = [(8, 256, 16, 16), (8, 128, 32, 32), (8, 512, 8, 8)]  # DDPM-CIFAR10 U-Net, batch 8
CPU_LN_SHAPES = [(2, 64, 96)]


def adagn_eager(x, g, w, b, s, t):
    return F.silu(F.group_norm(x, g, w, b, 1e-5) * (1 + s[:, :, None, None]) + t[:, :, None, None])


def gn_pre_silu_eager(x, g, w, b, p):
    return F.silu(F.group_norm(x + p[:, :, None, None], g, w, b, 1e-5))


def fastdiff_adagn(x, g, w, b, s, t):
    return ops.group_norm_modulate(x, g, w, b, s, t, activation="silu")


def fastdiff_pre_silu(x, g, w, b, p):
    return ops.group_norm_modulate(x, g, w, b, activation="silu", pre_shift=p)


def ln_modulate_eager(x, s, t):
    return F.layer_norm(x, x.shape[-1:], None, None, 1e-6) * (1 + s[:, None]) + t[:, None]


def bench_one(label, fns, nbytes, device, copy_gbs):
    """Times each implementation; returns one record with GB/s, fraction of copy bandwidth, ratios."""
    rec = {"shape": label, "bytes": nbytes}
    times = {}
    for name, fn in fns.items():
        try:
            times[name] = time_ms(fn, device)
        except Exception as e:  # an alternative that cannot run here is reported, not fatal
            rec[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    for name, ms in times.items():
        rec[f"{name}_ms"] = ms
        rec[f"{name}_gbs"] = nbytes / (ms * 1e-3) / 1e9
        rec[f"{name}_of_copy_bw"] = rec[f"{name}_gbs"] / copy_gbs
    if "fused" in times:
        for name, ms in times.items():
            if name != "fused":
                rec[f"speedup_vs_{name}"] = ms / times["fused"]
    if "fused_compile" in times and "compile" in times:
        rec["compiled_speedup_vs_compile"] = times["compile"] / times["fused_compile"]
    return rec


def _compiled(fn):
    """torch.compile for one shape: every (shape, dtype, layout) compiles its own graph, and the limit on
    graphs per function is raised so that none of the rows silently falls back to eager."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(fn, dynamic=False)


def _with_backend(backend, fn, *args):
    with ops.backend(backend):
        return fn(*args)


def run(device, quick: bool):
    gpu = device.type == "cuda"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device {device_label(device)}: copy bandwidth {copy_gbs:.0f} GB/s")
    if gpu:
        dtypes = [torch.bfloat16, torch.float16]
    else:
        from fastdiff.policy import cpu_has_native_bf16

        dtypes = ([torch.bfloat16] if cpu_has_native_bf16() else []) + [torch.float32]
    gn_shapes = GPU_GN_SHAPES if gpu else CPU_GN_SHAPES
    ln_shapes = GPU_LN_SHAPES if gpu else CPU_LN_SHAPES
    if quick:  # the target shape (N=32, C=512, 32x32) on a GPU
        gn_shapes, ln_shapes, dtypes = ([gn_shapes[2]] if gpu else gn_shapes[:1]), ln_shapes[:1], dtypes[:1]
    fused_backend = "triton" if (gpu or interpret) else None
    records = []
    for dtype in dtypes:
        for n, c, h, w in gn_shapes:
            for layout in ("nchw", "channels_last"):
                x = torch.randn(n, c, h, w, device=device, dtype=dtype)
                if layout == "channels_last":
                    x = x.to(memory_format=torch.channels_last)
                wt, bs = torch.randn(c, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype)
                s, t = torch.randn(n, c, device=device, dtype=dtype), torch.randn(n, c, device=device, dtype=dtype)
                nbytes = 2 * x.numel() * x.element_size()
                # (label, PyTorch's math, fastdiff's op, arguments after x and the group count)
                forms = [("adagn-silu", adagn_eager, fastdiff_adagn, (wt, bs, s, t)),
                         ("gn-pre-silu", gn_pre_silu_eager, fastdiff_pre_silu, (wt, bs, t))]
                for label, eager, ours, rest in forms:
                    args = (x, 32, *rest)
                    fns = {"eager": partial(eager, *args), "compile": partial(_compiled(eager), *args)}
                    if fused_backend:
                        fns["fused"] = partial(_with_backend, fused_backend, ours, *args)
                    else:
                        fns["fused"] = partial(ours, *args)
                        fns["fused_compile"] = partial(_compiled(ours), *args)
                    rec = bench_one(f"{label} N{n} C{c} {h}x{w}", fns, nbytes, device, copy_gbs)
                    rec.update(op="group_norm_modulate", dtype=str(dtype).replace("torch.", ""), layout=layout)
                    records.append(rec)
        for n, l, d in ln_shapes:
            x = torch.randn(n, l, d, device=device, dtype=dtype)
            s, t = torch.randn(n, d, device=device, dtype=dtype), torch.randn(n, d, device=device, dtype=dtype)
            fns = {"eager": partial(ln_modulate_eager, x, s, t),
                   "compile": partial(_compiled(ln_modulate_eager), x, s, t)}
            if fused_backend:
                fns["fused"] = partial(ops.layer_norm_modulate, x, scale=s, shift=t, backend=fused_backend)
            rec = bench_one(f"ln-modulate N{n} L{l} D{d}", fns, 2 * x.numel() * x.element_size(), device,
                            copy_gbs)
            rec.update(op="layer_norm_modulate", dtype=str(dtype).replace("torch.", ""), layout="nld")
            records.append(rec)
    return records, copy_gbs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="one shape per op, one dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    records, copy_gbs = run(device, args.quick)
    print_table(records, ["op", "shape", "dtype", "layout", "fused_gbs", "fused_of_copy_bw", "speedup_vs_eager",
                          "speedup_vs_compile", "compiled_speedup_vs_compile", "eager_gbs", "compile_gbs"])
    path = save_results("modulated_norm", records, args.out, device,
                        extra={"copy_bandwidth_gbs": copy_gbs,
                               "note": "CPU numbers: interpreter/eager on a CPU, not a GPU result"
                               if device.type != "cuda" else "",
                               "target": "AdaGN+SiLU N32 C512 32x32 bf16: >= 0.85 of copy bandwidth, "
                                         ">= 1.4x compile, >= 3x eager"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
