"""Preflight: one kernel of each family on the device, in low precision, against its reference; in seconds.

    python benchmarks/preflight.py --out OUT_DIR/preflight.json [--jsonl OUT_DIR/results.jsonl]

The first thing the GPU suite runs. Before any kernel is launched it writes ``--out`` with the device
record (nvidia-ml-py: name, clocks, power, memory, driver) and the versions, so that a run that dies in
its first minute still says what it ran on; the file is rewritten (temporary name, then rename) after
each check. Checks, each on fresh random inputs against a float64 reference by relative L2 error, passing
when the kernel's error is at most twice that of the same computation in PyTorch in the same dtype
(DESIGN.md's rule; bf16 on a GPU, fp16 under the Triton interpreter on the CPU, which has no faithful bf16):

- ``group_norm_modulate`` (AdaGN + SiLU, channels_last) and ``layer_norm_modulate`` (DiT's modulate);
- ``attention`` forward and backward (head dim 72: the split tile; lengths that are no multiple of the
  block), at the first autotune configuration of its table, so that no autotuning runs here;
- ``sampler_step`` (a guided, noisy DPM-Solver++ row with a history slot);
- ``qk_norm_rope`` (Flux's layout: (B, H, S, D) views of (B, S, H, D) q and k, weights and rope tables).

On the CPU (the suite's dry run) the shapes shrink to what the interpreter runs in seconds.

Exit status 0 when every check passes, 1 otherwise (each check runs even when an earlier one failed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RowWriter, device_info, dtype_name, write_json_atomic  # noqa: E402


def rel_l2(out, ref) -> float:
    out, ref = out.double(), ref.double()
    den = ref.norm()
    return float((out - ref).norm() / den) if den > 0 else float((out - ref).norm())


def check_group_norm(device, dtype, gen, small) -> dict:
    from fastdiff import ops

    n, c, h, w, groups = (2, 32, 8, 8, 8) if small else (4, 256, 16, 16, 32)
    f64 = dict(generator=gen, dtype=torch.float64)
    x64 = torch.randn(n, c, h, w, **f64) * 2 + 0.5
    w64, b64 = 1 + 0.3 * torch.randn(c, **f64), torch.randn(c, **f64)
    s64, t64 = 0.5 * torch.randn(n, c, **f64), torch.randn(n, c, **f64)

    def chain(x, wt, bs, s, t):
        return F.silu(F.group_norm(x, groups, wt, bs, 1e-5) * (1 + s[:, :, None, None]) + t[:, :, None, None])

    ref = chain(x64, w64, b64, s64, t64)
    low = [v.to(device, dtype) for v in (x64, w64, b64, s64, t64)]
    low[0] = low[0].to(memory_format=torch.channels_last)
    out = ops.group_norm_modulate(low[0], groups, *low[1:], activation="silu", backend="triton")
    return {"out": (rel_l2(out, ref), rel_l2(chain(*low), ref))}


def check_layer_norm(device, dtype, gen, small) -> dict:
    from fastdiff import ops

    n, length, d = (2, 16, 96) if small else (4, 256, 1152)
    f64 = dict(generator=gen, dtype=torch.float64)
    x64 = torch.randn(n, length, d, **f64) + 3
    s64, t64 = 0.5 * torch.randn(n, d, **f64), torch.randn(n, d, **f64)

    def chain(x, s, t):
        return F.layer_norm(x, (d,), eps=1e-6) * (1 + s[:, None]) + t[:, None]

    ref = chain(x64, s64, t64)
    x, s, t = (v.to(device, dtype) for v in (x64, s64, t64))
    out = ops.layer_norm_modulate(x, scale=s, shift=t, backend="triton")
    return {"out": (rel_l2(out, ref), rel_l2(chain(x, s, t), ref))}


def check_attention(device, dtype, gen, small) -> dict:
    from fastdiff.kernels import attention as kattn

    b, h, sq, skv, d = (1, 1, 40, 37, 72) if small else (2, 4, 300, 333, 72)
    scale = d ** -0.5
    q64, k64, v64, g64 = (torch.randn(b, h, s, d, generator=gen, dtype=torch.float64)
                          for s in (sq, skv, skv, sq))
    q, k, v, g = (t.to(device, dtype) for t in (q64, k64, v64, g64))
    config = None
    if device.type == "cuda":  # the first autotune entry of this GPU's table: no autotuning in the preflight
        d0, d1 = kattn.tile_widths(d)
        config = kattn._fwd_configs(kattn._arch(q.device), d0 + d1, False)[0]
    out, lse = kattn.attention_forward(q, k, v, scale, config=config)
    dq, dk, dv = kattn.attention_backward(g, q, k, v, out, lse, scale)

    def naive(q, k, v):  # the same computation in PyTorch, every op in the inputs' dtype
        return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v

    ref_in = [t.to(device).requires_grad_(True) for t in (q64, k64, v64)]
    ref = naive(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, g64.to(device))
    ref = ref.detach()
    low_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    low = naive(*low_in)
    low_grads = torch.autograd.grad(low, low_in, g)
    low = low.detach()
    result = {"out": (rel_l2(out, ref), rel_l2(low, ref))}
    for name, kern, torch_g, ref_g in zip(("dq", "dk", "dv"), (dq, dk, dv), low_grads, ref_grads, strict=True):
        result[name] = (rel_l2(kern, ref_g), rel_l2(torch_g, ref_g))
    return result


def check_sampler_step(device, dtype, gen, small) -> dict:
    from fastdiff import ops
    from fastdiff import samplers as S
    from fastdiff.denoiser import Denoiser
    from fastdiff.schedules import VPSchedule

    shape = (2, 4, 8, 8) if small else (4, 4, 32, 32)
    sch = VPSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    sigmas, ts = sch.sigmas(20, "karras")
    table = S.build_table("dpmpp_3m_sde", sigmas, timesteps=ts)
    dev = S.to_device(table, Denoiser(lambda x, t, y=None: x, sch), device, torch.float32)
    r = table.num_rows // 2
    x64, c64, u64, z64 = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    hist64 = torch.randn((table.num_slots, *shape), generator=gen, dtype=torch.float64)
    rows = dev.row_ids[r].expand(shape[0])

    def call(x, c, u, z, hist, backend):
        hist = hist.clone()
        out = ops.sampler_step(x, c, hist, dev.coef, rows, uncond=u, guidance_scale=5.0, noise=z, backend=backend)
        return out, hist

    ref_out, ref_hist = call(*(t.to(device) for t in (x64, c64, u64, z64, hist64)), "reference")
    low = [t.to(device, dtype) for t in (x64, c64, u64, z64)] + [hist64.to(device, torch.float32)]
    out, hist = call(*low, "triton")
    torch_out, torch_hist = call(*low, "reference")  # float32 math, rounded to dtype: the stricter bar
    return {"out": (rel_l2(out, ref_out), rel_l2(torch_out, ref_out)),
            "history": (rel_l2(hist, ref_hist), rel_l2(torch_hist, ref_hist))}


def check_qk_norm_rope(device, dtype, gen, small) -> dict:
    from fastdiff import ops

    b, h, s, d = (1, 2, 16, 64) if small else (2, 12, 1152, 64)
    q64, k64 = (torch.randn(b, s, h, d, generator=gen, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    qw64, kw64 = (1 + 0.5 * torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(2))
    theta = torch.randn(s, d, generator=gen, dtype=torch.float64) * 3
    cos, sin = theta.cos().float().to(device), theta.sin().float().to(device)  # diffusers passes float32 tables

    def call(q, k, qw, kw, backend):
        return ops.qk_norm_rope(q, k, qw, kw, cos, sin, backend=backend)

    ref_q, ref_k = call(*(t.to(device) for t in (q64, k64, qw64, kw64)), "reference")
    low = [t.to(device, dtype) for t in (q64, k64, qw64, kw64)]  # (B, H, S, D) views of (B, S, H, D), as Flux's
    q, k = call(*low, "triton")
    torch_q, torch_k = call(*low, "reference")  # float32 math, rounded once to dtype: the stricter bar
    return {"q": (rel_l2(q, ref_q), rel_l2(torch_q, ref_q)), "k": (rel_l2(k, ref_k), rel_l2(torch_k, ref_k))}


CHECKS = {
    "group_norm_modulate": check_group_norm,
    "layer_norm_modulate": check_layer_norm,
    "attention_fwd_bwd": check_attention,
    "sampler_step": check_sampler_step,
    "qk_norm_rope": check_qk_norm_rope,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the preflight JSON (rewritten after every check)")
    p.add_argument("--jsonl", default=os.environ.get("FASTDIFF_RESULTS") or None,
                   help="also append one row per check to this JSON-lines file")
    p.add_argument("--only", nargs="+", default=None, choices=list(CHECKS))
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float16
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    report = {"status": "running", "device": device_info(device), "dtype": dtype_name(dtype),
              "cuda": torch.version.cuda, "interpret": interpret,
              "rule": "kernel rel L2 error vs float64 <= 2 x the same-dtype PyTorch error", "checks": []}
    write_json_atomic(args.out, report)  # before any kernel runs
    print(f"preflight on {report['device'].get('name')} ({dtype_name(dtype)}): wrote {args.out}", flush=True)
    rec = RowWriter("preflight", device, jsonl=args.jsonl)
    if not gpu and not interpret:
        report.update(status="failed", error="no GPU and TRITON_INTERPRET is not set: no Triton kernel can run")
        write_json_atomic(args.out, report)
        print(report["error"])
        return 1
    failed = 0
    for name, check in CHECKS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        entry = {"check": name, "dtype": dtype_name(dtype)}
        try:
            gen = torch.Generator().manual_seed(len(report["checks"]))
            errors = check(device, dtype, gen, small=not gpu)
            if gpu:
                torch.cuda.synchronize()
            entry["errors"] = {k: {"kernel": ke, "torch": te, "ratio": ke / te if te > 0 else None}
                               for k, (ke, te) in errors.items()}
            entry["ok"] = all(ke <= 2 * te + 1e-6 and ke == ke for ke, te in errors.values())
        except Exception as e:  # a crash is a failed check; the next one still runs
            entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000],
                         traceback=traceback.format_exc()[-4000:])
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        failed += not entry["ok"]
        report["checks"].append(entry)
        write_json_atomic(args.out, report)
        rec.row(**{k: v for k, v in entry.items() if k != "traceback"})
        worst = max((e["ratio"] or 0 for e in entry.get("errors", {}).values()), default=float("nan"))
        print(f"  {name:22s} {'ok' if entry['ok'] else 'FAILED':6s} worst kernel/torch error ratio {worst:.3g} "
              f"({entry['seconds']:.1f} s){'  ' + entry['error'][:200] if 'error' in entry else ''}", flush=True)
    report["status"] = "ok" if failed == 0 else "failed"
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    write_json_atomic(args.out, report)
    rec.finish()
    print(f"preflight {report['status']} in {report['seconds']} s")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
