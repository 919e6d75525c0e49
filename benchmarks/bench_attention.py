"""Attention at diffusion shapes: the Triton kernel against every SDPA backend (and xformers where it runs).

    python benchmarks/bench_attention.py [--quick | --full] [--backward] [--dtype bf16 fp16] [--jsonl FILE]

One row per (shape, dtype, implementation): milliseconds, TFLOP/s (forward ``4 * B * H * Sq * Skv * D``;
forward + backward counts 2.5x that, FlashAttention's convention; the padded or split head-dim tile's extra
work is not counted), the floor (those FLOPs over the dense matmul rate measured in the same run) as
``frac_floor``, and the output's error against float32 attention. Implementations: ``fastdiff`` (the
Triton kernel with its default head-dim tiling), ``fastdiff_padded`` (one padded tile, where the default
splits it, e.g. 72 = 64 + 16 against 128), ``fastdiff_op_auto`` (``fastdiff.ops.attention`` with its
``auto`` choice, recorded in ``auto_picks``), ``sdpa_<backend>`` for each SDPA backend forced alone and
``sdpa_default``, ``xformers``. ``benchmarks/report.py`` turns the rows into the ratio to the strongest
alternative.

Shapes: ``--quick`` three shapes in bf16 (the GPU suite's core step: about a dozen kernel compiles);
default: every shape in bf16; ``--full``: every shape in bf16 and fp16. ``--backward`` adds forward +
backward rows (fastdiff's Triton backward against SDPA's). On a machine without a GPU the same code runs
at tiny sizes on the CPU (SDPA, the reference, and the Triton kernel only under TRITON_INTERPRET=1); those
rows are labelled CPU and say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RowWriter,
    add_output_args,
    dtype_name,
    have_module,
    matmul_tflops,
    print_table,
    time_ms,
)

from fastdiff import ops  # noqa: E402
from fastdiff.kernels import attention as kattn  # noqa: E402

# (label, B, H, Sq, Skv, D) at the shapes of the models fastdiff serves.
GPU_SHAPES = [
    ("adm_unet_s256_d64", 16, 8, 256, 256, 64),  # U-Net attention at 16x16, B*H = 16*8
    ("adm_unet_s1024_d64", 16, 8, 1024, 1024, 64),  # 32x32
    ("adm_64x64_s4096_d64", 16, 8, 4096, 4096, 64),  # ADM 64x64 attention at full resolution
    ("dit_xl2_256_b64", 64, 16, 256, 256, 72),  # DiT-XL/2 at 256: 16 heads of 72
    ("dit_xl2_256_b32", 32, 16, 256, 256, 72),
    ("uvit_h2_256", 64, 16, 258, 258, 72),  # U-ViT-H/2: 256 patches + time + class tokens
    ("uvit_l2_256", 64, 16, 258, 258, 64),  # U-ViT-L/2
    ("cross_sq4096_skv77_d64", 16, 8, 4096, 77, 64),  # text cross-attention (CFG-doubled batch)
    ("cross_sq4096_skv77_d80", 16, 8, 4096, 77, 80),
    ("cross_sq4096_skv77_d40", 16, 8, 4096, 77, 40),  # SD 1.x at 64x64 latents
    ("s4096_d128", 8, 16, 4096, 4096, 128),
]
QUICK_GPU = ("adm_unet_s1024_d64", "dit_xl2_256_b64", "s4096_d128")
CPU_SHAPES = [
    ("cpu_self_s64_d64", 1, 2, 64, 64, 64),
    ("cpu_dit_s64_d72", 1, 2, 64, 64, 72),
    ("cpu_cross_sq64_skv7_d40", 1, 2, 64, 7, 40),
]
COLUMNS = ["shape", "dtype", "op", "impl", "ms", "tflops", "frac_floor", "rel_err_vs_fp32"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MATH_SCORES_LIMIT = 8 << 30  # the SDPA math backend materialises the scores: skip it past 8 GiB of them


def _sdpa_backends() -> dict:
    """SDPA with one backend forced each, by name (those this torch has)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if hasattr(SDPBackend, name):
            be = getattr(SDPBackend, name)

            def run(q, k, v, be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v)

            out["sdpa_" + name.split("_")[0].lower()] = run
    return out


def candidates(device: torch.device, d: int, interpret: bool, quick: bool) -> dict:
    """impl -> fn(q, k, v) for every way of computing attention that runs here."""
    cands = {}
    if device.type == "cuda" or interpret:
        scale = d ** -0.5
        cands["fastdiff"] = lambda q, k, v: kattn.attention_forward(q, k, v, scale)[0]
        if kattn.tile_widths(d)[1] > 0 and not quick:  # the split tiling is the default; time the padded one
            cands["fastdiff_padded"] = lambda q, k, v: kattn.attention_forward(q, k, v, scale, split_d=False)[0]
    cands["fastdiff_op_auto"] = lambda q, k, v: ops.attention(q, k, v)
    cands["sdpa_default"] = F.scaled_dot_product_attention
    cands.update(_sdpa_backends())
    if device.type == "cuda" and ops.xformers_usable(device, torch.bfloat16):
        cands["xformers"] = lambda q, k, v: ops.attention(q, k, v, backend="xformers")
    if device.type == "cpu":
        cands["reference"] = lambda q, k, v: ops.attention_reference(q, k, v)
    return cands


def _fwd_bwd(fn, q, k, v, grad):
    def run():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(grad)
    return run


def bench_shape(rec: RowWriter, device, dtype, shape, peak_tflops: float, interpret: bool, args) -> None:
    label, b, h, sq, skv, d = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype) for s in (sq, skv, skv))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flops = 4 * b * h * sq * skv * d
    base = dict(shape=label, B=b, H=h, Sq=sq, Skv=skv, D=d, dtype=dtype_name(dtype))
    cands = candidates(device, d, interpret, args.quick)
    for impl, fn in cands.items():
        if impl == "sdpa_math" and (args.quick or (device.type == "cuda" and 4 * b * h * sq * skv > MATH_SCORES_LIMIT)):
            rec.skip(f"{label} {impl}", "the math backend materialises the scores (skipped in --quick and past "
                                        "8 GiB of scores)", **base)
            continue
        try:
            out = fn(q, k, v)
            if device.type == "cuda":
                torch.cuda.synchronize()
        except (RuntimeError, ValueError) as e:  # e.g. no flash kernel for this head dim / dtype
            rec.skip(f"{label} {impl}", str(e).splitlines()[0][:160], **base, failed=impl.startswith("fastdiff"))
            continue
        err = float((out.float() - ref).norm() / ref.norm())
        ms = time_ms(functools.partial(fn, q, k, v), device)
        floor_ms = flops / (peak_tflops * 1e12) * 1e3
        extra = {"auto_picks": ops.resolve_attention_backend(q)} if impl == "fastdiff_op_auto" else {}
        rec.row(**base, op="attention_fwd", impl=impl, ms=ms, flops=flops, tflops=flops / (ms * 1e-3) / 1e12,
                floor_ms=floor_ms, frac_floor=floor_ms / ms, rel_err_vs_fp32=err, **extra)
    if not args.backward:
        return
    grad = torch.randn_like(q)
    for impl in ("fastdiff", "sdpa_default", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"):
        if impl not in cands:
            continue
        fn = (lambda q, k, v: ops.attention(q, k, v, backend="triton")) if impl == "fastdiff" else cands[impl]
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        run = _fwd_bwd(fn, qq, kk, vv, grad)
        try:
            run()
        except (RuntimeError, ValueError) as e:
            rec.skip(f"{label} {impl} backward", str(e).splitlines()[0][:160], **base,
                     failed=impl.startswith("fastdiff"))
            continue
        ms = time_ms(run, device)
        floor_ms = 2.5 * flops / (peak_tflops * 1e12) * 1e3
        rec.row(**base, op="attention_fwd_bwd", impl=impl, ms=ms, flops=2.5 * flops,
                tflops=2.5 * flops / (ms * 1e-3) / 1e12, floor_ms=floor_ms, frac_floor=floor_ms / ms)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="three shapes, bf16, no padded-tile or math rows")
    p.add_argument("--full", action="store_true", help="bf16 and fp16")
    p.add_argument("--backward", action="store_true", help="add forward + backward rows")
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES),
                   help="default: bf16 on a GPU (bf16 fp16 with --full), fp32 on the CPU")
    add_output_args(p)
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        shapes = [s for s in GPU_SHAPES if not args.quick or s[0] in QUICK_GPU]
        dtypes = args.dtype or (["bf16", "fp16"] if args.full else ["bf16"])
    else:
        shapes = CPU_SHAPES[:1] if args.quick else CPU_SHAPES
        dtypes = args.dtype or ["fp32"]
    rec = RowWriter("attention", device, args,
                    meta={"label": "CPU" if device.type == "cpu" else "GPU", "interpret": interpret,
                          "flops_formula": "4*B*H*Sq*Skv*D (forward), 2.5x that forward + backward"})
    if device.type == "cpu":
        print("CPU run: tiny shapes, numbers label the CPU and say nothing about GPU speed")
        if not interpret:
            rec.skip("fastdiff rows", "no GPU and TRITON_INTERPRET is not set: the Triton kernel cannot run here")
    if device.type == "cuda" and "xformers" not in candidates(device, 64, interpret, True):
        rec.skip("xformers rows", have_module("xformers") or "xformers has no kernel for this GPU / torch")
    for name in dtypes:
        dtype = DTYPES[name]
        peak = rec.floor(f"matmul_tflops_{name}", matmul_tflops(device, dtype), "TFLOP/s", dtype=name)
        print(f"{rec.device_record['name']}  {name}: measured matmul {peak:.3g} TFLOP/s", flush=True)
        for shape in shapes:
            bench_shape(rec, device, dtype, shape, peak, interpret, args)
    print_table(rec.rows, COLUMNS)
    rec.finish()
    return rec.exit_status


if __name__ == "__main__":
    sys.exit(main())
