"""Benchmark of the fused conditioning norms against PyTorch eager and torch.compile.

    python benchmarks/bench_modulated_norm.py [--quick | --full] [--compile] [--jsonl FILE] [--out DIR | --save]

AdaGN (GroupNorm -> * (1 + scale) + shift -> SiLU) and diffusers' ResnetBlock2D "default" norm
(SiLU(GroupNorm(x + temb)), the op's ``pre_shift``) at U-Net shapes, and DiT's LayerNorm-modulate, forward
only. One row per (form, shape, dtype, layout, implementation): milliseconds, GB/s over the fewest bytes the
op must move (read x once, write out once), and that time's floor (those bytes over the copy bandwidth
measured in the same run) as ``frac_floor``. Implementations: ``fastdiff`` (the Triton kernel on a GPU),
``eager`` (the unfused PyTorch chain) and, with ``--compile``, ``compiled`` (that chain under
``torch.compile``, one static graph per shape; default mode, ``max-autotune`` with ``--full``).
``benchmarks/report.py`` turns the rows into the ratio to the strongest alternative.

``--quick``: the issue's target shape (N=32, C=512, 32x32) and one LayerNorm shape, bf16. Default: every
shape in bf16. ``--full``: every shape in bf16 and fp16. On a CPU, ``fastdiff`` is the op's ``auto`` path
(ATen's GroupNorm, or per-channel sums where ATen's channels_last kernel is slow) and, with ``--compile``,
``fastdiff_compiled`` the op under torch.compile (written out in aten ops for inductor), at the DDPM-CIFAR10
U-Net's shapes in bf16 (where the CPU has native bf16) and float32; under TRITON_INTERPRET=1 the Triton
kernel runs instead, at tiny shapes. The rows are labelled CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    RowWriter,
    add_compile_args,
    add_output_args,
    compile_options,
    copy_bandwidth_gbs,
    dtype_name,
    dynamo_graph_count,
    print_table,
    raise_recompile_limit,
    time_ms,
)

from fastdiff import ops  # noqa: E402

GPU_GN_SHAPES = [  # (N, C, H, W, groups)
    (8, 128, 64, 64, 32), (16, 256, 32, 32, 32), (32, 512, 32, 32, 32), (32, 512, 16, 16, 32),
    (64, 1024, 8, 8, 32), (16, 128, 64, 64, 32), (32, 256, 64, 64, 32),
]
GPU_LN_SHAPES = [(64, 256, 1152), (32, 1024, 1152), (64, 256, 768)]  # (N, L, D)
QUICK_GN, QUICK_LN = (32, 512, 32, 32, 32), (64, 256, 1152)
CPU_GN_SHAPES = [(8, 256, 16, 16, 32), (8, 128, 32, 32, 32), (8, 512, 8, 8, 32)]  # DDPM-CIFAR10, batch 8
CPU_LN_SHAPES = [(2, 64, 96)]
INTERPRET_GN_SHAPES = [(2, 32, 8, 8, 8)]  # the interpreter runs one Python-level program per (sample, group)
INTERPRET_LN_SHAPES = [(2, 16, 96)]


def adagn_eager(x, g, w, b, s, t):
    return F.silu(F.group_norm(x, g, w, b, 1e-5) * (1 + s[:, :, None, None]) + t[:, :, None, None])


def gn_pre_silu_eager(x, g, w, b, p):
    return F.silu(F.group_norm(x + p[:, :, None, None], g, w, b, 1e-5))


def fastdiff_adagn(x, g, w, b, s, t, backend=None):
    return ops.group_norm_modulate(x, g, w, b, s, t, activation="silu", backend=backend)


def fastdiff_pre_silu(x, g, w, b, p, backend=None):
    return ops.group_norm_modulate(x, g, w, b, activation="silu", backend=backend, pre_shift=p)


def ln_modulate_eager(x, s, t):
    return F.layer_norm(x, x.shape[-1:], None, None, 1e-6) * (1 + s[:, None]) + t[:, None]


def measure(rec: RowWriter, fns: dict, base: dict, nbytes: int, device, copy_gbs: float) -> None:
    """Time each implementation and write one row each (a failing alternative is a skip row, not fatal)."""
    floor_ms = nbytes / (copy_gbs * 1e9) * 1e3
    for impl, make in fns.items():
        try:
            compiling = impl.endswith("compiled")
            graphs = dynamo_graph_count() if compiling else None
            fn = make()
            fn()  # warm: compilation happens here
            extra = {"graphs_built": dynamo_graph_count() - graphs} if compiling else {}
            ms = time_ms(fn, device)
        except Exception as e:  # e.g. a compile failure: reported, the others still run
            rec.skip(f"{base['op']} {base['shape']} {impl}", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
                     failed=True)
            continue
        rec.row(**base, impl=impl, ms=ms, bytes=nbytes, gbs=nbytes / (ms * 1e-3) / 1e9, floor_ms=floor_ms,
                frac_floor=floor_ms / ms, **extra)


def run(device: torch.device, args, rec: RowWriter) -> None:
    gpu = device.type == "cuda"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    copy_gbs = rec.floor("copy_gbs", copy_bandwidth_gbs(device), "GB/s")
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    if gpu:
        dtypes = [torch.bfloat16, torch.float16] if args.full else [torch.bfloat16]
        gn_shapes, ln_shapes = (([QUICK_GN], [QUICK_LN]) if args.quick else (GPU_GN_SHAPES, GPU_LN_SHAPES))
    elif interpret:
        dtypes, gn_shapes, ln_shapes = [torch.float32], INTERPRET_GN_SHAPES, INTERPRET_LN_SHAPES
    else:
        from fastdiff.policy import cpu_has_native_bf16

        dtypes = ([torch.bfloat16] if cpu_has_native_bf16() else []) + [torch.float32]
        gn_shapes, ln_shapes = CPU_GN_SHAPES, CPU_LN_SHAPES
        if args.quick:
            gn_shapes, ln_shapes, dtypes = gn_shapes[:1], ln_shapes[:1], dtypes[:1]
    # the Triton kernel on a GPU or under the interpreter; on a plain CPU the op's own auto path
    fused = "triton" if (gpu or interpret) else "auto"
    if args.compile:
        raise_recompile_limit()
    options = compile_options(args)

    def compiled(fn, *a):  # one static graph per shape: a fresh wrapper per case, recompile limit raised
        return partial(torch.compile(fn, dynamic=False, **options), *a)

    for dtype in dtypes:
        for n, c, h, w, groups in gn_shapes:
            for layout in ("nchw", "channels_last"):
                x = torch.randn(n, c, h, w, device=device, dtype=dtype)
                if layout == "channels_last":
                    x = x.to(memory_format=torch.channels_last)
                wt, bs = torch.randn(c, device=device, dtype=dtype), torch.randn(c, device=device, dtype=dtype)
                s, t = torch.randn(n, c, device=device, dtype=dtype), torch.randn(n, c, device=device, dtype=dtype)
                # (form, PyTorch's math, fastdiff's op, arguments after x and the group count)
                forms = [("adagn-silu", adagn_eager, fastdiff_adagn, (wt, bs, s, t)),
                         ("gn-pre-silu", gn_pre_silu_eager, fastdiff_pre_silu, (wt, bs, t))]
                if args.quick and gpu:  # the quick GPU step compiles one kernel variant per layout
                    forms = forms[:1]
                for form, eager, ours, rest in forms:
                    a = (x, groups, *rest)
                    fns = {"eager": lambda e=eager, a=a: partial(e, *a),
                           "fastdiff": lambda o=ours, a=a: partial(o, *a, backend=fused)}
                    if args.compile:
                        fns["compiled"] = lambda e=eager, a=a: compiled(e, *a)
                        if fused == "auto":  # the op as inductor sees it on the CPU (written out in aten ops)
                            fns["fastdiff_compiled"] = lambda o=ours, a=a: compiled(o, *a)
                    base = dict(op="group_norm_modulate", form=form, shape=f"N{n} C{c} {h}x{w} G{groups} silu",
                                dtype=dtype_name(dtype), layout=layout)
                    measure(rec, fns, base, 2 * x.numel() * x.element_size(), device, copy_gbs)
        for n, l, d in ln_shapes:
            x = torch.randn(n, l, d, device=device, dtype=dtype)
            s, t = torch.randn(n, d, device=device, dtype=dtype), torch.randn(n, d, device=device, dtype=dtype)
            fns = {"eager": lambda x=x, s=s, t=t: partial(ln_modulate_eager, x, s, t),
                   "fastdiff": lambda x=x, s=s, t=t: partial(ops.layer_norm_modulate, x, scale=s, shift=t,
                                                             backend=fused)}
            if args.compile:
                fns["compiled"] = lambda x=x, s=s, t=t: compiled(ln_modulate_eager, x, s, t)
            base = dict(op="layer_norm_modulate", shape=f"N{n} L{l} D{d}", dtype=dtype_name(dtype), layout="nld")
            measure(rec, fns, base, 2 * x.numel() * x.element_size(), device, copy_gbs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the target shape and one LayerNorm shape, bf16")
    parser.add_argument("--full", action="store_true", help="bf16 and fp16; compile mode max-autotune")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_compile_args(parser)
    add_output_args(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rec = RowWriter("modulated_norm", device, args,
                    meta={"label": "GPU" if device.type == "cuda" else "CPU",
                          "note": "" if device.type == "cuda" else "CPU numbers (the op's CPU path, or the "
                                                                   "interpreter), not a GPU result",
                          "target": "AdaGN+SiLU N32 C512 32x32 bf16: >= 0.85 of copy bandwidth, >= 1.4x compile, "
                                    ">= 3x eager"})
    run(device, args, rec)
    print_table(rec.rows, ["op", "form", "shape", "dtype", "layout", "impl", "ms", "gbs", "frac_floor"])
    rec.finish()
    return rec.exit_status


if __name__ == "__main__":
    sys.exit(main())
