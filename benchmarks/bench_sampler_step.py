"""Fused sampler update (fastdiff.ops.sampler_step) against the unfused PyTorch chain and diffusers' step.

    python benchmarks/bench_sampler_step.py [--quick | --full] [--compile] [--jsonl FILE] [--out DIR | --save]

For each case (sampler row form x dtype x shape) it times one update, one row per implementation:

- ``fastdiff``: the Triton kernel (GPU, or the CPU under TRITON_INTERPRET=1; else the op's reference path,
  labelled so in ``path``);
- ``eager`` / ``compiled``: the same update as a plain PyTorch chain (guidance combine, x0, the linear
  combination, the history copy) in eager mode and, with ``--compile``, under ``torch.compile``: one
  static graph per (case, shape, dtype), dynamo's recompile limit raised so that none falls back to eager
  (each row says how many graphs its warm-up built, ``graphs_built``; a row whose warm-up built none is
  marked ``compiled_fell_back``);
- ``diffusers``: the guidance combine plus ``DPMSolverMultistepScheduler.step`` (the 2M and 3M-SDE rows,
  float32, where diffusers imports; otherwise a skip row says why).

Bytes are the fewest the update must move (each input read once, x_next and one history slot written
once); the floor is those bytes over the copy bandwidth measured in the same run (``frac_floor``). On the
CPU the sizes are tiny and the numbers measure per-step host overhead (labelled CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    RowWriter,
    add_compile_args,
    add_output_args,
    compile_options,
    copy_bandwidth_gbs,
    dtype_name,
    dynamo_graph_count,
    have_module,
    print_table,
    raise_recompile_limit,
    time_ms,
)

from fastdiff import ops  # noqa: E402
from fastdiff import samplers as S  # noqa: E402
from fastdiff.denoiser import Denoiser  # noqa: E402
from fastdiff.schedules import FlowSchedule, VPSchedule  # noqa: E402

# name -> (sampler, guided, noise[, schedule]); the row is taken from the middle of a 20-step table; "flow": a
# flow-matching schedule (SD3's shift 3) with a velocity model, the state in the flow frame
CASES = {
    "euler": ("euler", False, False),
    "dpmpp_2m_cfg": ("dpmpp_2m", True, False),
    "dpmpp_3m_sde_cfg": ("dpmpp_3m_sde", True, True),
    "flow_euler": ("euler", False, False, "flow"),
    "flow_dpmpp_2m_cfg": ("dpmpp_2m", True, False, "flow"),
}
GPU_SHAPES = {"latent_1x4x64x64": (1, 4, 64, 64), "latent_64x4x64x64": (64, 4, 64, 64),
              "latent_8x4x128x128": (8, 4, 128, 128), "pixel_16x3x256x256": (16, 3, 256, 256)}
CPU_SHAPES = {"latent_1x4x8x8": (1, 4, 8, 8), "latent_4x4x32x32": (4, 4, 32, 32)}


def make_case(case: str, shape, dtype, device):
    sampler, guided, noisy, *kind = CASES[case]
    if kind == ["flow"]:
        sch = FlowSchedule(shift=3.0)
        sigmas, ts = sch.sigmas(20)
        den, frame = Denoiser(lambda x, t, y=None: x, sch, prediction="flow"), "flow"
    else:
        sch = VPSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
        sigmas, ts = sch.sigmas(20, "karras")
        den, frame = Denoiser(lambda x, t, y=None: x, sch), "sigma"
    table = S.build_table(sampler, sigmas, schedule=sch, timesteps=ts)
    dev = S.to_device(table, den, device, dtype, frame=frame)
    r = table.num_rows // 2
    n = shape[0]
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda: torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    inp = dict(x=rnd(), cond=rnd(), uncond=rnd() if guided else None, noise=rnd() if noisy else None,
               hist=torch.randn((table.num_slots, *shape), generator=g, device=device),
               rows=dev.row_ids[r].expand(n), coef=dev.coef, row=r, table=table,
               guidance=7.5 if guided else 1.0)
    # scalars of this row, as an unfused implementation holds them on the host
    c = dev.coef[r].tolist()
    inp["scalars"] = dict(p=c[S.COL_P], q=c[S.COL_Q], a=c[S.COL_A], b0=c[S.COL_B0], c=c[S.COL_C],
                          b=c[S.COL_SLOTS:], write=int(c[S.COL_WRITE]))
    return inp


def moved_bytes(inp) -> int:
    el = inp["x"].numel()
    xs = inp["x"].element_size()
    reads = 2 + (inp["uncond"] is not None) + (inp["noise"] is not None)
    hist_reads = sum(1 for b in inp["scalars"]["b"] if b != 0)
    return el * (xs * (reads + 1) + 4 * (hist_reads + 1))  # + x_next (x dtype) and one history slot (fp32)


def fused_fn(inp, backend):
    return lambda: ops.sampler_step(inp["x"], inp["cond"], inp["hist"], inp["coef"], inp["rows"],
                                    uncond=inp["uncond"], guidance_scale=inp["guidance"], noise=inp["noise"],
                                    backend=backend)


def unfused_chain(x, cond, uncond, noise, hist, w: float, p: float, q: float, a: float, b0: float, c: float,
                  b: list, write: int):
    """The update as separate PyTorch ops with host scalars (what a scheduler's step does)."""
    m = cond.float() if uncond is None else uncond.float() + w * (cond.float() - uncond.float())
    x0 = p * x.float() + q * m
    out = a * x.float() + b0 * x0
    for s, bs in enumerate(b):
        if bs != 0:
            out = out + bs * hist[s]
    if noise is not None:
        out = out + c * noise.float()
    if write >= 0:
        hist[write].copy_(x0)
    return out.to(x.dtype)


def chain_fn(inp, fn):
    s = inp["scalars"]
    return lambda: fn(inp["x"], inp["cond"], inp["uncond"], inp["noise"], inp["hist"], inp["guidance"],
                      s["p"], s["q"], s["a"], s["b0"], s["c"], s["b"], s["write"])


def diffusers_fn(inp, dtype, device):
    """guidance combine + DPMSolverMultistepScheduler.step at a second-order step, or None."""
    if have_module("diffusers") is not None:
        return None
    import diffusers

    sampler = CASES[inp["case"]][0]
    if sampler not in ("dpmpp_2m", "dpmpp_3m_sde"):
        return None
    warnings.filterwarnings("ignore")
    kw = {"algorithm_type": "sde-dpmsolver++"} if sampler == "dpmpp_3m_sde" else {}
    if CASES[inp["case"]][3:] == ("flow",):
        kw = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
    else:
        kw.update(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True)
    sched = diffusers.DPMSolverMultistepScheduler(**kw)
    sched.set_timesteps(20, device=device)
    x, cond, unc = inp["x"], inp["cond"], inp["uncond"]
    for t in sched.timesteps[:3]:  # fill the multistep history
        sched.step(cond, t, x)
    t_mid = sched.timesteps[10]

    def step():
        sched._step_index, sched.lower_order_nums = 10, 2
        m = unc + inp["guidance"] * (cond - unc) if unc is not None else cond
        return sched.step(m, t_mid, x, variance_noise=inp["noise"]).prev_sample

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, bf16")
    parser.add_argument("--full", action="store_true", help="float32, bf16 and fp16; compile mode max-autotune")
    add_compile_args(parser)
    add_output_args(parser)
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    label = "GPU" if gpu else "CPU"
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    if gpu:
        dtypes = [torch.float32, torch.bfloat16, torch.float16] if args.full else [torch.float32, torch.bfloat16]
    else:
        dtypes = [torch.float32]
    if args.quick:
        shapes = dict(list(shapes.items())[:2] if gpu else list(shapes.items())[:1])
        dtypes = [torch.bfloat16] if gpu else dtypes
    fused_backend = "triton" if (gpu or interpret) else "reference"
    rec = RowWriter("bench_sampler_step", device, args,
                    meta={"label": label, "fused_path": fused_backend,
                          "note": "CPU numbers are per-step host overhead at tiny sizes, not bandwidth"
                          if not gpu else "fastdiff = Triton kernel"})
    copy_gbs = rec.floor("copy_gbs", copy_bandwidth_gbs(device), "GB/s")
    print(f"device: {rec.device_record.get('name')}  copy bandwidth {copy_gbs:.1f} GB/s  ({label})", flush=True)
    if args.compile:
        raise_recompile_limit()
    options = compile_options(args)
    missing_diffusers = have_module("diffusers")
    if missing_diffusers:
        rec.skip("diffusers rows", missing_diffusers)
    for case in CASES:
        for sname, shape in shapes.items():
            for dtype in dtypes:
                inp = make_case(case, shape, dtype, device)
                inp["case"] = case
                nbytes = moved_bytes(inp)
                floor_ms = nbytes / (copy_gbs * 1e9) * 1e3
                base = dict(op="sampler_step", case=case, shape=sname, dtype=dtype_name(dtype), device_kind=label)
                variants = {"fastdiff": fused_fn(inp, fused_backend), "eager": chain_fn(inp, unfused_chain)}
                if args.compile:  # a fresh wrapper per case: one static graph each
                    variants["compiled"] = chain_fn(inp, torch.compile(unfused_chain, dynamic=False, **options))
                diff = diffusers_fn(inp, dtype, device)
                if diff is not None and dtype == torch.float32:
                    variants["diffusers"] = diff
                for impl, fn in variants.items():
                    before = dynamo_graph_count() if impl == "compiled" else 0
                    fn()  # warm (and compile)
                    extra = {}
                    if impl == "compiled":
                        built = dynamo_graph_count() - before
                        extra = {"graphs_built": built, "compiled_fell_back": built == 0}
                    elif impl == "fastdiff":
                        extra = {"path": fused_backend}
                    ms = time_ms(fn, device, rep=30 if args.quick else 100)
                    rec.row(**base, impl=impl, ms=ms, bytes=nbytes, gbs=nbytes / (ms * 1e-3) / 1e9,
                            floor_ms=floor_ms, frac_floor=floor_ms / ms, **extra)
    if args.compile:
        rec.meta_update(compiled_graphs_total=dynamo_graph_count(), compile_options=options)
        print(f"torch.compile built {dynamo_graph_count()} graphs in all", flush=True)
    print_table(rec.rows, ["case", "shape", "dtype", "impl", "ms", "gbs", "frac_floor", "graphs_built"])
    rec.finish()
    return rec.exit_status


if __name__ == "__main__":
    sys.exit(main())
