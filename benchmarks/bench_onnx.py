"""ONNX Runtime against PyTorch: images/s of whole sampling loops, per zoo model.

For each model, one ``fastdiff.Denoiser`` is sampled with the same sampler, steps, seeds and labels by:

- ``pytorch-eager-fp32``: ``fastdiff.sample`` in float32, eager, NCHW, no CUDA graph (the op ``auto``
  path: ATen's norm kernels on CPU, Triton on GPU);
- ``pytorch-best``: ``fastdiff.sample`` with the engine's policy (CPU: bf16 and channels_last where the CPU
  computes bf16 natively; GPU: bf16 and a CUDA graph); with ``--compile`` also ``pytorch-compiled``;
- ``onnxruntime``: ``fastdiff.sample(..., runtime="onnxruntime")``, the step graph (model + guidance +
  update) in ONNX Runtime, float32; the CPU provider, or on GPU the CUDA provider with IO binding;
- for ``ddpm-cifar10`` also ``diffusers-eager-fp32``: diffusers' ``UNet2DModel`` + ``DDIMScheduler``, the
  baseline of the issue's first measurement.

The variants run interleaved (A B C A B C ...) ``--repeats`` times after one untimed warm-up each (export,
session creation, compilation), and each row reports the median time, so drift of a shared machine falls
on all variants alike. Ratios: ``x_eager_fp32`` (over ``pytorch-eager-fp32``), ``x_best`` (over
``pytorch-best``) and for ddpm-cifar10 ``x_diffusers_fp32``. Random weights: speed does not depend on them.
Every row goes to ``--jsonl`` as it is measured; ``--out DIR`` / ``--save`` write
``bench_onnx-{device}.json``. On a GPU the ONNX Runtime rows need its CUDAExecutionProvider (the
``onnxruntime-gpu`` package): without it they are skipped with that reason (the CPU provider beside GPU
rows would compare nothing), and the diffusers row needs diffusers (else a skip row says so).

    python benchmarks/bench_onnx.py --threads 2                  # CPU, all models
    python benchmarks/bench_onnx.py --models ddpm-cifar10 --steps 50 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_e2e import diffusers_loop, timed  # noqa: E402
from common import RowWriter, add_output_args, have_module, ort_cuda_reason, print_table  # noqa: E402

# model -> (batch, steps): ddpm-cifar10 at the setting, the others short enough for 2 CPU cores
MODELS = {
    "ddpm-cifar10": (8, 50),
    "digits": (32, 20),
    "uvit-cifar10-small": (8, 10),
    "dit-s-2-256": (4, 10),
}


def make_runs(name: str, batch: int, steps: int, device, args, rec: RowWriter) -> dict:
    """variant -> a zero-argument sampling call; every variant samples the same seeds and labels."""
    import fastdiff

    torch.manual_seed(0)
    den = fastdiff.load(name, random_weights=name != "digits")  # presets untrained: speed only
    shape = (batch, *den.sample_shape)
    y = None
    guidance = 1.0
    if den.num_classes:
        y = torch.arange(batch) % den.num_classes
        guidance = den.default_guidance_scale
    common = dict(sampler="ddim", steps=steps, guidance_scale=guidance, y=y, seeds=0, device=device,
                  progress=False, spacing="leading")

    def torch_run(**kw):
        # each variant samples its own copy of the denoiser: fastdiff.sample never changes the model, it keeps
        # one converted copy per model (dtype, layout; with its compiled model and CUDA graphs), built on the
        # untimed warm-up call and reused by the timed calls, as a user's repeated calls do; variants sharing
        # one model would replace each other's copy and rebuild it inside the timed calls
        own = copy.deepcopy(den)
        return lambda: fastdiff.sample(own, shape, **common, **kw)

    runs = {"pytorch-eager-fp32": torch_run(dtype=torch.float32, cuda_graph=False, channels_last=False),
            "pytorch-best": torch_run()}
    if args.compile:
        mode = "max-autotune-no-cudagraphs" if device.type == "cuda" else True
        runs["pytorch-compiled"] = torch_run(compile=mode)
    missing = have_module("diffusers") if name == "ddpm-cifar10" else None
    if missing:
        rec.skip(f"{name} diffusers-eager-fp32", missing, model=name)
    elif name == "ddpm-cifar10":
        from diffusers import DDIMScheduler, UNet2DModel

        from fastdiff.models import PRESETS

        unet = UNet2DModel(**PRESETS["ddpm-cifar10"][1]).eval()
        unet.load_state_dict(den.model.state_dict(), strict=True)
        runs["diffusers-eager-fp32"] = diffusers_loop(unet.to(device), DDIMScheduler, steps, batch, device)
    missing = ort_cuda_reason() if device.type == "cuda" else have_module("onnxruntime")
    if missing:
        rec.skip(f"{name} onnxruntime", missing, model=name)
    else:  # fp32, exported once (in the untimed warm-up)
        runs["onnxruntime"] = lambda: fastdiff.sample(den, shape, **common, runtime="onnxruntime")
    return runs


def bench_model(name: str, batch: int, steps: int, device, args, rec: RowWriter) -> list:
    runs = make_runs(name, batch, steps, device, args, rec)
    for run in runs.values():
        run()  # untimed: export, session creation, compilation
    times = {v: [] for v in runs}
    for _ in range(args.repeats):
        for variant, run in runs.items():
            times[variant].append(timed(run, device))
            rec.partial(model=name, variant=variant, batch=batch, steps=steps, seconds=times[variant][-1])
    rows = []
    for variant, ts in times.items():
        sec = statistics.median(ts)
        rows.append({"model": name, "variant": variant, "batch": batch, "steps": steps, "seconds": round(sec, 4),
                     "seconds_all": [round(t, 4) for t in ts], "images_per_s": batch / sec})
        print(f"  {name:20s} {variant:22s} {batch / sec:8.3f} images/s (median of {len(ts)}: {sec:.2f} s)",
              flush=True)
    base = {r["variant"]: r["images_per_s"] for r in rows}
    for r in rows:
        r["x_eager_fp32"] = r["images_per_s"] / base["pytorch-eager-fp32"]
        r["x_best"] = r["images_per_s"] / base["pytorch-best"]
        if "diffusers-eager-fp32" in base:
            r["x_diffusers_fp32"] = r["images_per_s"] / base["diffusers-eager-fp32"]
        rec.row(**r)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batch", type=int, default=None, help="override every model's batch")
    p.add_argument("--steps", type=int, default=None, help="override every model's steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="add the torch.compile row")
    p.add_argument("--threads", type=int, default=None)
    add_output_args(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    missing = have_module("onnxruntime")
    ort_version = None if missing else __import__("onnxruntime").__version__
    rec = RowWriter("bench_onnx", device, args, meta={"threads": torch.get_num_threads(), "repeats": args.repeats,
                                                      "onnxruntime": ort_version})
    if missing:
        rec.skip("every onnxruntime row", missing)
    else:
        import onnxruntime as ort

        print(f"bench_onnx on {rec.device_record['name']} (torch threads {torch.get_num_threads()}, onnxruntime "
              f"{ort.__version__}, providers {ort.get_available_providers()})", flush=True)
    for name in args.models:
        batch, steps = MODELS[name]
        bench_model(name, args.batch or batch, args.steps or steps, device, args, rec)
    print_table(rec.rows, ["model", "variant", "batch", "steps", "images_per_s", "x_eager_fp32", "x_best",
                           "x_diffusers_fp32"])
    rec.finish()
    return rec.exit_status


if __name__ == "__main__":
    sys.exit(main())
