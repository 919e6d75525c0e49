"""End-to-end sampling throughput: ``fastdiff.sample`` against diffusers' UNet2DModel + scheduler loops.

Model: the DDPM-CIFAR10 U-Net (35.7M parameters, 32x32, random weights: speed does not depend on them),
as fastdiff's ``DDPMUNet`` and, for the diffusers rows, as diffusers' ``UNet2DModel`` holding the same
state dict. Row groups (``--rows``, default all that can run here):

- ``fastdiff``: ``fastdiff`` with the engine's policy (bf16 on GPU and on CPUs with native bf16; on GPU
  the CUDA graph), ``fastdiff-nograph`` (GPU: the same with ``cuda_graph=False``), ``fastdiff-fp32``
  (float32, no graph), ``fastdiff-bf16-channels_last`` (CPU), with ``--compile`` ``fastdiff-compiled``;
- ``reference``: ``fastdiff-reference-fp32``, fastdiff's reference ops, plain eager float32, no graph;
- ``diffusers`` (where diffusers imports; otherwise one skip row says why): ``diffusers-ddim`` /
  ``diffusers-dpmsolver`` (eager float32, diffusers' default), ``diffusers-ddim-bf16-cl`` (bf16,
  channels_last, SDPA: the same-precision baseline a user would write by hand), with ``--compile``
  ``diffusers-ddim-bf16-cl-compiled``;
- ``onnx``: ``fastdiff-onnxruntime``, the step graph in ONNX Runtime (on a GPU only where its
  CUDAExecutionProvider exists; otherwise a skip row says why).

``--compile`` uses torch.compile's default mode (``--full``: max-autotune; fastdiff with its CUDA graph
takes ``max-autotune-no-cudagraphs``). Each row: images/s, ms per sampler step, and on GPU the model
TFLOP/s and MFU; every row goes to ``--jsonl`` as it is measured. On GPU ``--dit`` adds DiT-XL/2 at 256x256
(guidance 4, batch 32) against diffusers' ``DiTTransformer2DModel`` with DDIM, both random weights.

    python benchmarks/bench_e2e.py --batches 8 --steps 10 --threads 2            # CPU
    python benchmarks/bench_e2e.py --batches 8 64 --steps 50 --compile --dit      # GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    RowWriter,
    add_compile_args,
    add_output_args,
    compile_options,
    have_module,
    ort_cuda_reason,
    print_table,
    synchronize,
)

# --tiny (the suite's dry run): the same architecture at a quarter of the width and one block per level
TINY = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1)
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense (no sparsity); the H200 has the same core
ROW_GROUPS = ("fastdiff", "reference", "diffusers", "onnx")


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return H100_BF16_DENSE_TFLOPS if ("H100" in name or "H200" in name) else None


def timed(fn, device, repeats: int = 1) -> float:
    """Seconds of one warm call of ``fn`` (median of ``repeats``)."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------
# DDPM-CIFAR10
# ---------------------------------------------------------------------------------------------


def ddpm_model(device, overrides: dict):
    from fastdiff.models import preset

    torch.manual_seed(0)
    return preset("ddpm-cifar10", **overrides).eval().to(device)


def diffusers_unet(ours, device, dtype=torch.float32, channels_last=False, overrides: dict | None = None):
    """diffusers' UNet2DModel holding ``ours``' weights (SDPA attention is diffusers' default processor)."""
    from diffusers import UNet2DModel

    from fastdiff.models import PRESETS

    _, cfg = PRESETS["ddpm-cifar10"]
    theirs = UNet2DModel(**dict(cfg, **(overrides or {}))).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs = theirs.to(device, dtype)
    return theirs.to(memory_format=torch.channels_last) if channels_last else theirs


def diffusers_loop(unet, scheduler_cls, steps: int, batch: int, device, dtype=torch.float32,
                   channels_last: bool = False):
    sched = scheduler_cls(num_train_timesteps=1000, beta_schedule="linear")
    gen = torch.Generator(device="cpu").manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    @torch.inference_mode()
    def run():
        sched.set_timesteps(steps, device=device)
        x = torch.randn((batch, 3, 32, 32), generator=gen).to(device)
        for t in sched.timesteps:
            eps = unet(x.to(dtype, memory_format=fmt), t).sample
            x = sched.step(eps.float(), t, x).prev_sample
        return x

    return run


def fastdiff_loop(model, steps: int, batch: int, device, **kw):
    import fastdiff
    from fastdiff.schedules import VPSchedule

    den = fastdiff.Denoiser(model, VPSchedule("linear", 1000))

    def run():
        return fastdiff.sample(den, (batch, 3, 32, 32), sampler="ddim", steps=steps, device=device,
                               progress=False, spacing="leading", **kw)

    return run


def ddpm_variants(args, device, ours, batch: int, rec: RowWriter) -> dict:
    """name -> (maker of the sampling call, row fields). Makers run lazily, after the model is reset."""
    steps, gpu = args.steps, device.type == "cuda"
    options = compile_options(args)
    over = TINY if args.tiny else {}
    v = {}
    if "fastdiff" in args.rows:
        v["fastdiff"] = (lambda: fastdiff_loop(ours, steps, batch, device), {"cuda_graph": gpu})
        if gpu:
            v["fastdiff-nograph"] = (lambda: fastdiff_loop(ours, steps, batch, device, cuda_graph=False),
                                     {"cuda_graph": False})
        v["fastdiff-fp32"] = (lambda: fastdiff_loop(ours, steps, batch, device, dtype=torch.float32,
                                                    cuda_graph=False), {"cuda_graph": False, "dtype": "float32"})
        if not gpu:
            v["fastdiff-bf16-channels_last"] = (lambda: fastdiff_loop(
                ours, steps, batch, device, dtype=torch.bfloat16, channels_last=True),
                {"dtype": "bfloat16", "channels_last": True})
        if args.compile:
            if options["backend"] != "inductor":
                mode = {"backend": options["backend"]}
            elif args.full:  # the engine's CUDA graph replays the compiled step: no cudagraphs inside compile
                mode = "max-autotune-no-cudagraphs" if gpu else "max-autotune"
            else:
                mode = True  # torch.compile's default mode
            v["fastdiff-compiled"] = (lambda: fastdiff_loop(ours, steps, batch, device, compile=mode),
                                      {"cuda_graph": gpu, "compile": str(mode)})
    if "reference" in args.rows:
        v["fastdiff-reference-fp32"] = (lambda: fastdiff_loop(ours, steps, batch, device, dtype=torch.float32,
                                                              cuda_graph=False, backend="reference"),
                                        {"cuda_graph": False, "dtype": "float32", "backend": "reference"})
    if "diffusers" in args.rows:
        missing = have_module("diffusers")
        if missing:
            rec.skip(f"diffusers rows (batch {batch})", missing, model="ddpm-cifar10", batch=batch)
        else:
            from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

            fp32 = {"dtype": "float32"}
            v["diffusers-ddim"] = (lambda: diffusers_loop(diffusers_unet(ours, device, overrides=over), DDIMScheduler,
                                                          steps, batch, device), fp32)
            v["diffusers-dpmsolver"] = (lambda: diffusers_loop(diffusers_unet(ours, device, overrides=over),
                                                               DPMSolverMultistepScheduler, steps, batch, device), fp32)
            bf16 = {"dtype": "bfloat16", "channels_last": True}
            v["diffusers-ddim-bf16-cl"] = (lambda: diffusers_loop(
                diffusers_unet(ours, device, torch.bfloat16, True, over), DDIMScheduler, steps, batch, device,
                torch.bfloat16, True), bf16)
            if args.compile:
                v["diffusers-ddim-bf16-cl-compiled"] = (lambda: diffusers_loop(
                    torch.compile(diffusers_unet(ours, device, torch.bfloat16, True, over), **options), DDIMScheduler,
                    steps, batch, device, torch.bfloat16, True), dict(bf16, compile=str(options)))
    if "onnx" in args.rows:
        missing = ort_cuda_reason() if gpu else have_module("onnxruntime")
        if missing:
            rec.skip(f"fastdiff-onnxruntime (batch {batch})", missing, model="ddpm-cifar10", batch=batch)
        else:  # the step graph in ONNX Runtime; its export happens in the untimed warm-up call
            v["fastdiff-onnxruntime"] = (lambda: fastdiff_loop(ours, steps, batch, device, dtype=torch.float32,
                                                               runtime="onnxruntime"), {"dtype": "float32"})
    return v


def bench_ddpm(args, device, rec: RowWriter) -> None:
    ours = ddpm_model(device, TINY if args.tiny else {})
    model_name = "ddpm-cifar10-tiny" if args.tiny else "ddpm-cifar10"
    peak = peak_tflops(device)
    for batch in args.batches:
        flops = ours.flops(batch) if device.type == "cuda" else None
        for name, (make, fields) in ddpm_variants(args, device, ours, batch, rec).items():
            if args.only and name not in args.only:
                continue
            # fastdiff may convert the model it samples: every row starts from float32 NCHW
            ours.float().to(memory_format=torch.contiguous_format)
            try:
                run = make()
                run()  # warm: lazy init, compilation, graph capture, export
                sec = timed(run, device, args.repeats)
            except Exception as e:  # one variant failing is reported; the others still run
                rec.skip(f"{name} (batch {batch})", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                         model=model_name, batch=batch, failed=True)
                continue
            row = dict(model=model_name, variant=name, batch=batch, steps=args.steps, seconds=round(sec, 5),
                       images_per_s=batch / sec, ms_per_step=sec / args.steps * 1e3, **fields)
            if flops:
                row["tflops"] = flops * args.steps / sec / 1e12
                if peak:
                    row["mfu"] = row["tflops"] / peak
            rec.row(**row)
            print(f"  {name:32s} batch {batch:3d}: {batch / sec:8.2f} images/s ({sec:.3f} s, "
                  f"{row['ms_per_step']:.2f} ms/step)", flush=True)


# ---------------------------------------------------------------------------------------------
# DiT-XL/2 (GPU)
# ---------------------------------------------------------------------------------------------


def bench_dit(args, device, rec: RowWriter) -> None:
    import fastdiff
    from fastdiff.models import preset
    from fastdiff.schedules import VPSchedule

    steps, w = args.steps, 4.0
    # DiT-XL/2 at 256 (latents 32x32, 28 blocks, 16 heads of 72); --dit-small: 2 blocks, 2 heads, 8x8 latents
    dims = dict(depth=2, num_heads=2, hidden_size=144, input_size=8) if args.dit_small else \
        dict(depth=28, num_heads=16, hidden_size=1152, input_size=32)
    batch, size = (2 if args.dit_small else 32), dims["input_size"]
    model = preset("dit-xl-2-256", **dims).to(device).eval()
    flops_per_forward = model.flops(2 * batch)  # the guided batch
    den = fastdiff.Denoiser(model, VPSchedule("linear", 1000), learned_sigma=True)
    den.y_null = 1000
    y = torch.arange(batch) % 1000
    options = compile_options(args)

    def ours(**kw):
        return lambda: fastdiff.sample(den, (batch, 4, size, size), sampler="ddim", steps=steps, guidance_scale=w,
                                       y=y, device=device, progress=False, **kw)

    def theirs(compiled: bool):
        from diffusers import DDIMScheduler, DiTTransformer2DModel

        tr = DiTTransformer2DModel(num_attention_heads=dims["num_heads"], attention_head_dim=72, in_channels=4,
                                   out_channels=8, num_layers=dims["depth"], sample_size=size, patch_size=2,
                                   num_embeds_ada_norm=1000)
        tr = tr.to(device, torch.bfloat16).eval()
        fn = torch.compile(tr, **options) if compiled else tr
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        labels = torch.cat([y, torch.full_like(y, 1000)]).to(device)

        @torch.inference_mode()
        def run():
            sched.set_timesteps(steps, device=device)
            x = torch.randn((batch, 4, size, size), device=device)
            for t in sched.timesteps:
                xx = torch.cat([x, x]).to(torch.bfloat16)
                out = fn(xx, timestep=t.expand(2 * batch), class_labels=labels).sample
                eps, _ = out.float().split(4, dim=1)
                c, u = eps.chunk(2)
                x = sched.step(u + w * (c - u), t, x).prev_sample
            return x

        return run

    gpu = device.type == "cuda"
    variants = {"fastdiff": lambda: ours()}
    if gpu:
        variants["fastdiff-nograph"] = lambda: ours(cuda_graph=False)
    if args.compile:
        mode = {"backend": options["backend"]} if options["backend"] != "inductor" else \
            ("max-autotune-no-cudagraphs" if args.full else True)
        variants["fastdiff-compiled"] = lambda: ours(compile=mode)
    missing = have_module("diffusers") if "diffusers" in args.rows else "not asked for (--rows)"
    if missing:
        rec.skip("dit diffusers rows", missing, model="dit")
    else:
        variants["diffusers-ddim-bf16"] = lambda: theirs(False)
        if args.compile:
            variants["diffusers-ddim-bf16-compiled"] = lambda: theirs(True)
    peak = peak_tflops(device)
    model_name = "dit-small" if args.dit_small else "dit-xl-2-256"
    for name, make in variants.items():
        try:
            run = make()
            run()
            sec = timed(run, device, args.repeats)
        except Exception as e:  # reported; the others still run
            rec.skip(f"{model_name} {name}", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                     model=model_name, failed=True)
            continue
        tflops = flops_per_forward * steps / sec / 1e12
        row = dict(model=model_name, variant=name, batch=batch, steps=steps, guidance=w, seconds=round(sec, 5),
                   images_per_s=batch / sec, ms_per_step=sec / steps * 1e3, tflops=tflops,
                   cuda_graph=gpu and name in ("fastdiff", "fastdiff-compiled"))
        if name.startswith("diffusers"):
            row["dtype"] = "bfloat16"
        if peak:
            row["mfu"] = tflops / peak
        rec.row(**row)
        print(f"  {name:32s} batch {batch}: {batch / sec:8.2f} images/s, {tflops:.0f} TFLOP/s", flush=True)


# ---------------------------------------------------------------------------------------------


def add_ratios(rows: list) -> None:
    """x_diffusers_eager / x_diffusers_bf16: each row's images/s over diffusers' fp32 eager DDIM and over the
    same-precision (bf16 channels_last) DDIM, where those rows exist for its model and batch."""
    for r in rows:
        same = [b for b in rows if b["model"] == r["model"] and b["batch"] == r["batch"]]
        for key, variant in (("x_diffusers_eager", "diffusers-ddim"), ("x_diffusers_bf16", "diffusers-ddim-bf16-cl")):
            base = [b for b in same if b["variant"] == variant]
            if base:
                r[key] = r["images_per_s"] / base[0]["images_per_s"]


def chart(rows: list, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, (model, batch) in zip(axes[0], groups, strict=True):
        sel = [r for r in rows if r["model"] == model and r["batch"] == batch]
        names = [r["variant"] for r in sel]
        vals = [r["images_per_s"] for r in sel]
        colors = ["tab:blue" if n.startswith("fastdiff") else "tab:gray" for n in names]
        ax.barh(names, vals, color=colors)
        ax.set_xlabel("images / s")
        ax.set_title(f"{model}, batch {batch}, {sel[0]['steps']} steps")
        ax.invert_yaxis()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--rows", nargs="+", default=list(ROW_GROUPS), choices=ROW_GROUPS,
                   help="row groups to run (default: all)")
    p.add_argument("--full", action="store_true", help="compile with max-autotune")
    p.add_argument("--models", nargs="+", default=["ddpm"], choices=["ddpm", "dit"],
                   help="ddpm: DDPM-CIFAR10 (default); dit: DiT-XL/2 256 (GPU)")
    p.add_argument("--dit", action="store_true", help="add DiT-XL/2 256 (GPU): --models ddpm dit")
    p.add_argument("--dit-small", action="store_true", help="with --dit: a 2-block DiT at 8x8 latents (CPU plumbing)")
    p.add_argument("--tiny", action="store_true", help="DDPM-CIFAR10 at a quarter of the width (CPU plumbing)")
    p.add_argument("--only", nargs="+", default=None, help="run only these variants")
    p.add_argument("--threads", type=int, default=None)
    add_compile_args(p)
    add_output_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.dit and "dit" not in args.models:
        args.models.append("dit")
    if "dit" in args.models and device.type != "cuda" and not args.dit_small:
        raise SystemExit("--dit needs a GPU (or --dit-small)")
    rec = RowWriter("bench_e2e", device, args, meta={"steps": args.steps, "threads": torch.get_num_threads(),
                                                     "note": "CPU numbers at small sizes" if device.type == "cpu"
                                                     else ""})
    print(f"bench_e2e on {rec.device_record['name']} (torch threads {torch.get_num_threads()})", flush=True)
    if "ddpm" in args.models:
        bench_ddpm(args, device, rec)
    if "dit" in args.models:
        bench_dit(args, device, rec)
    add_ratios(rec.rows)
    print_table(rec.rows, ["model", "variant", "batch", "steps", "images_per_s", "ms_per_step", "x_diffusers_eager",
                           "x_diffusers_bf16"] + (["mfu"] if device.type == "cuda" else []))
    path = rec.finish()
    if path is not None and rec.rows:
        chart(rec.rows, path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    return rec.exit_status


if __name__ == "__main__":
    sys.exit(main())
