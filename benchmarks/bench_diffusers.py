"""``fastdiff.accelerate`` against hand-tuned diffusers: whole pipelines, same architecture, same precision.

Random weights (speed does not depend on them), built from the released configs. Each case runs these rows,
interleaved (A B C ... A B C ...) ``--repeats`` times after one timed warm-up call each; a row reports the
median seconds per call, images/s, ms per denoising step (call time / steps: the scheduler and any decode
included), the warm-up call's seconds (compilation, CUDA-graph capture, autotuning) and, on the CPU, the share
of profiled time outside convolutions and matrix products (attention included with the matrix products): the
part fusion can shorten (under torch.compile, inductor's generated kernels count as outside: they are the fused
elementwise and norm work).

- ``diffusers-fp32`` (CPU): the pipeline as built, float32, diffusers' defaults;
- ``diffusers-bf16``: hand-tuned diffusers: ``pipe.to(torch.bfloat16)``, the U-Net and VAE channels_last,
  SDPA attention (diffusers' default processor);
- ``diffusers-bf16-compile``: that, with the denoiser (the VAE's decoder in the decode case) under
  ``torch.compile`` (default mode); ``--full`` adds ``diffusers-bf16-max-autotune`` on a GPU;
- ``diffusers-bf16-compile-regional`` (transformers): each repeated block compiled instead (diffusers'
  ``compile_repeated_blocks``: one compiled code per block class, a short warm-up);
- ``accelerate``: ``fastdiff.accelerate(pipe)`` with its defaults (the policy's dtype: bf16 on this kind of CPU
  and on GPUs, so the row starts from the bf16 pipeline, which is what the conversion gives; channels_last
  where the policy says; the fastdiff scheduler where there is a drop-in; CUDA graphs on a GPU);
- ``accelerate-compile``: ``fastdiff.accelerate(pipe, compile=True)`` (CPU; on a GPU with ``--full``);
- in the DDPM case also ``fd.sample`` and ``fd.sample-compile``: the zoo's DDPM-CIFAR10 U-Net (same weights)
  sampled by ``fastdiff.sample`` with 20 DDIM steps.

Diffusion-transformer cases (``transformer_cases.py``): CPU ``flux-768`` (the pinned Flux-like config: hidden 768,
4 double + 8 single blocks, 1024 image + 128 text tokens, batch 1) and the test-size ``flux-tiny``, ``sd3-tiny``,
``sd35-tiny``, ``pixart-tiny``, interleaved as above; GPU ``flux-dev-1024`` (28 steps, VAE decode included) and
``pixart-sigma-1024`` (20 steps), where one bf16 model (24 GB for Flux-dev) gets each row's change in turn, is
measured (warm-up, then ``--repeats`` calls) and restored, rows in the order eager, compile, compile-regional,
accelerate (CUDA graphs, no compile), accelerate-compile (``--full``).

Cases. CPU: ``sd15-256`` (SD-1.5 U-Net and VAE in a StableDiffusionPipeline, 256x256, batch 1, guidance 7.5,
its default PNDM scheduler, prompt embeddings given: no text encoder) and ``ddpm-cifar10`` (DDPM-CIFAR10
``UNet2DModel`` in a DDIMPipeline, batch 8). GPU: ``sd15-512`` (batch 1, guidance 7.5), ``sd15-512-b8``,
``sdxl-1024`` (batch 1, guidance 5) with latents out (no decode), and ``vae-decode-1024`` (AutoencoderKL
decode of a 128x128 latent). Ratios per case: ``x_bf16`` (over diffusers-bf16), ``x_bf16_compile``,
``x_fp32`` (CPU). The gain of ``accelerate`` over ``diffusers-fp32`` splits into ``x_bf16`` (fastdiff's part)
and diffusers-bf16 over fp32 (the precision's part).

    python benchmarks/bench_diffusers.py --threads 2 --save               # CPU: the issue's measurement
    python benchmarks/bench_diffusers.py --tiny --repeats 1               # seconds: proves every row runs
    python benchmarks/bench_diffusers.py --device cuda --save [--full]    # GPU
    python benchmarks/bench_diffusers.py --cases flux-768 --threads 2 --save          # CPU: the pinned Flux config
    python benchmarks/bench_diffusers.py --device cuda --cases flux-dev-1024 --save  # GPU: Flux-dev 1024, 28 steps

``--save`` writes ``benchmarks/results/bench_diffusers-{device}.json`` (or under ``--out``) and a PNG chart
next to it; without it nothing is written. ``--jsonl FILE`` (the GPU suite sets it) appends each case's rows
as soon as the case is measured. Without diffusers the script writes one skip row saying so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    RESULTS_DIR,
    RESULTS_ENV,
    RowWriter,
    device_info,
    device_label,
    have_module,
    print_table,
    synchronize,
)
from transformer_cases import (  # noqa: E402
    CPU_TRANSFORMER_CASES,
    GPU_TRANSFORMER_CASES,
    compile_blocks,
    sequential_rows,
)

# ---------------------------------------------------------------------------------------------
# Models from the released configs (tiny: the same block types at toy widths, for --tiny)
# ---------------------------------------------------------------------------------------------

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
                 in_channels=4, out_channels=4, sample_size=64)
SDXL_UNET = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, in_channels=4, out_channels=4, sample_size=128)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
              in_channels=3, out_channels=3)
TINY_UNET = dict(block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8, layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), in_channels=4, out_channels=4, sample_size=8)
TINY_SDXL = dict(TINY_UNET, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32)
TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, sample_size=16,
                in_channels=3, out_channels=3)


def _build(cls, cfg: dict, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs (SDXL's 2.6B parameters are slow to init on a CPU)
        model = cls(**cfg)
    return model.to(dtype).eval()


def _sd_pipeline(unet_cfg, vae_cfg, xl: bool, device, dtype):
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    unet, vae = _build(UNet2DConditionModel, unet_cfg, device, dtype), _build(AutoencoderKL, vae_cfg, device, dtype)
    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    if xl:  # SDXL's released scheduler: Euler, leading spacing
        return StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, force_zeros_for_empty_prompt=False,
                                         scheduler=EulerDiscreteScheduler(**betas, timestep_spacing="leading"))
    return StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False,
                                   scheduler=PNDMScheduler(**betas, skip_prk_steps=True))  # SD-1.5's default


def _sd_call(pipe, *, size, batch, guidance, steps, xl: bool, latents_out: bool, device):
    dim = pipe.unet.config.cross_attention_dim
    g = torch.Generator(device="cpu").manual_seed(0)
    kw = {"prompt_embeds": torch.randn(1, 77, dim, generator=g),
          "negative_prompt_embeds": torch.randn(1, 77, dim, generator=g)}
    if xl:
        pooled = pipe.unet.config.projection_class_embeddings_input_dim - 6 * pipe.unet.config.addition_time_embed_dim
        kw.update(pooled_prompt_embeds=torch.randn(1, pooled, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=g))
    kw = {k: v.to(device) for k, v in kw.items()}

    def run():
        return pipe(**kw, num_images_per_prompt=batch, height=size, width=size, guidance_scale=guidance,
                    num_inference_steps=steps, generator=torch.Generator(device="cpu").manual_seed(1),
                    output_type="latent" if latents_out else "np")

    return run


def _ddpm_config(tiny: bool) -> dict:
    from fastdiff.models import PRESETS

    cfg = dict(PRESETS["ddpm-cifar10"][1])
    if tiny:
        cfg.update(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    return cfg


def _ddpm_pipeline(tiny: bool, device, dtype):
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    return DDIMPipeline(unet=_build(UNet2DModel, _ddpm_config(tiny), device, dtype),
                        scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear"))


def _vae_model(tiny: bool, device, dtype):
    from diffusers import AutoencoderKL

    return _build(AutoencoderKL, TINY_VAE if tiny else SD_VAE, device, dtype)


# ---------------------------------------------------------------------------------------------
# Cases: name -> (build(tiny, device, dtype) -> obj, call(obj, steps, device, tiny) -> run, images per call, kind,
# steps: None for --steps)
# ---------------------------------------------------------------------------------------------


def _sd_case(size, tiny_size, batch, guidance, xl, latents_out):
    def build(tiny, device, dtype):
        unet = (TINY_SDXL if xl else TINY_UNET) if tiny else (SDXL_UNET if xl else SD15_UNET)
        return _sd_pipeline(unet, TINY_VAE if tiny else SD_VAE, xl, device, dtype)

    def call(pipe, steps, device, tiny):
        return _sd_call(pipe, size=tiny_size if tiny else size, batch=batch, guidance=guidance, steps=steps, xl=xl,
                        latents_out=latents_out, device=device)

    return build, call, batch, "pipeline", None


def _ddpm_case(batch):
    def call(pipe, steps, device, tiny):
        return lambda: pipe(batch_size=batch, num_inference_steps=steps, output_type="pt",  # "np" fails for bf16
                            generator=torch.Generator(device="cpu").manual_seed(1))

    return lambda tiny, device, dtype: _ddpm_pipeline(tiny, device, dtype), call, batch, "pipeline", None


def _vae_case(size):
    def call(vae, steps, device, tiny):
        lat = size // 8 if not tiny else 8
        z = torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(0)).to(device, vae.dtype)
        return lambda: vae.decode(z).sample

    return _vae_model, call, 1, "vae", 1


CPU_CASES = {"sd15-256": _sd_case(256, 64, 1, 7.5, xl=False, latents_out=False),
             "ddpm-cifar10": _ddpm_case(8), **CPU_TRANSFORMER_CASES}
GPU_CASES = {"sd15-512": _sd_case(512, 64, 1, 7.5, xl=False, latents_out=True),
             "sd15-512-b8": _sd_case(512, 64, 8, 7.5, xl=False, latents_out=True),
             "sdxl-1024": _sd_case(1024, 64, 1, 5.0, xl=True, latents_out=True),
             "vae-decode-1024": _vae_case(1024), **GPU_TRANSFORMER_CASES}


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------


def _hand_tuned(obj, kind):
    """diffusers as a user tunes it: bf16 (already), channels_last convolutions, SDPA (the default)."""
    obj = copy.deepcopy(obj)
    convs = [obj] if kind == "vae" else [m for m in (getattr(obj, "unet", None), getattr(obj, "vae", None))
                                         if m is not None]
    for m in convs:
        m.to(memory_format=torch.channels_last)
    return obj


def _compiled(obj, kind, mode, regional=False):
    obj = _hand_tuned(obj, kind)
    target = obj.decoder if kind == "vae" else getattr(obj, "unet", None) or obj.transformer
    if regional:
        compile_blocks(target)
    else:
        target.compile(**({"mode": mode} if mode else {}))
    return obj


def make_rows(case: str, args, device, base_fp32, base_bf16) -> dict:
    """row name -> (object, note); each row owns its copy of the models (accelerate changes them in place)."""
    from fastdiff.compat.diffusers import accelerate

    kind = (CPU_CASES | GPU_CASES)[case][3]
    rows = {}
    if base_fp32 is not None:
        rows["diffusers-fp32"] = (base_fp32, "as built")
    rows["diffusers-bf16"] = (_hand_tuned(base_bf16, kind), "bf16, channels_last, SDPA")
    if not args.no_compile:
        rows["diffusers-bf16-compile"] = (_compiled(base_bf16, kind, None), "torch.compile default mode")
        if kind == "transformer":
            rows["diffusers-bf16-compile-regional"] = (_compiled(base_bf16, kind, None, regional=True),
                                                       "torch.compile of each repeated block")
        if args.full and device.type == "cuda":
            rows["diffusers-bf16-max-autotune"] = (_compiled(base_bf16, kind, "max-autotune"), "max-autotune")
    obj = copy.deepcopy(base_bf16)
    rows["accelerate"] = (obj, accelerate(obj))
    if not args.no_compile and kind != "vae" and (device.type == "cpu" or args.full):
        obj = copy.deepcopy(base_bf16)
        rows["accelerate-compile"] = (obj, accelerate(obj, compile=True))
    return rows


def fd_sample_rows(pipe, steps: int, batch: int, device, args) -> dict:
    """fastdiff.sample on the zoo's DDPM-CIFAR10 U-Net holding the pipeline's weights."""
    import fastdiff
    from fastdiff.models import DDPMUNet
    from fastdiff.schedules import VPSchedule

    cfg = _ddpm_config(args.tiny)
    model = DDPMUNet(**cfg)
    model.load_state_dict(pipe.unet.state_dict(), strict=True)
    den = fastdiff.Denoiser(model.to(device).eval(), VPSchedule("linear", 1000))
    shape = (batch, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])

    same = {}
    if "threads" in inspect.signature(fastdiff.sample).parameters:  # every row on the same thread count
        same["threads"] = torch.get_num_threads()

    def runner(**kw):
        return lambda: fastdiff.sample(den, shape, sampler="ddim", steps=steps, device=device, progress=False,
                                       spacing="leading", **same, **kw)

    rows = {"fd.sample": runner()}
    if not args.no_compile:
        rows["fd.sample-compile"] = runner(compile=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

MATRIX_WORDS = ("conv", "mm", "matmul", "linear", "bmm", "gemm", "scaled_dot_product", "attention", "flash")


def outside_matrix_share(run) -> float:
    """Share of profiled CPU self time in ops that are neither convolutions nor matrix products (one call)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    total = other = 0.0
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total
        total += t
        if not any(w in ev.key.lower() for w in MATRIX_WORDS):
            other += t
    return other / total if total else float("nan")


def timed(run, device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - t0


def bench_case(case: str, args, device) -> list[dict]:
    build, call, batch, kind, case_steps = (CPU_CASES | GPU_CASES)[case]
    if device.type == "cuda" and kind == "transformer":
        return bench_case_sequential(case, args, device)
    steps = case_steps or args.steps or 20
    print(f"{case}: building models", flush=True)
    base_fp32 = build(args.tiny, device, torch.float32) if device.type == "cpu" else None
    base_bf16 = copy.deepcopy(base_fp32).to(torch.bfloat16) if base_fp32 is not None else \
        build(args.tiny, device, torch.bfloat16)
    rows = make_rows(case, args, device, base_fp32, base_bf16)
    runs = {name: call(obj, steps, device, args.tiny) for name, (obj, _) in rows.items()}
    notes = {name: (str(note) if isinstance(note, str) else _report_note(note)) for name, (_, note) in rows.items()}
    if case == "ddpm-cifar10":
        for name, run in fd_sample_rows(base_fp32 or base_bf16, steps, batch, device, args).items():
            runs[name], notes[name] = run, "fastdiff.sample, DDIM, the engine's policy"
    for obj, _ in rows.values():
        if kind in ("pipeline", "transformer"):
            obj.set_progress_bar_config(disable=True)
    warm = {}
    with torch.inference_mode():
        for name, run in runs.items():  # the first call: compilation, graph capture, lazy init
            warm[name] = timed(run, device)
            print(f"  {name:28s} warm-up {warm[name]:8.2f} s", flush=True)
        times = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(timed(run, device))
        share = {}
        if device.type == "cpu" and not args.no_profile:
            share = {name: outside_matrix_share(run) for name, run in runs.items()}
    out = [_row(case, name, batch, steps, times[name], warm[name], notes[name], share.get(name)) for name in runs]
    add_ratios(out)
    return out


def _row(case, name, batch, steps, times, warm, note, share=None) -> dict:
    sec = statistics.median(times)
    row = {"case": case, "variant": name, "batch": batch, "steps": steps, "seconds": sec,
           "images_per_s": batch / sec, "ms_per_step": 1e3 * sec / steps, "warmup_s": warm, "note": note}
    if share is not None:
        row["outside_matrix_share"] = share
    print(f"  {name:32s} {sec:8.3f} s  {batch / sec:7.3f} images/s  {row['ms_per_step']:8.1f} ms/step", flush=True)
    return row


def bench_case_sequential(case: str, args, device) -> list[dict]:
    """A transformer pipeline on a GPU: one bf16 pipeline, each row's change applied, measured (the warm-up call
    timed on its own: compilation, CUDA-graph capture, autotuning) and undone before the next row."""
    build, call, batch, kind, case_steps = GPU_CASES[case]
    steps = case_steps or args.steps or 20
    print(f"{case}: building the bf16 pipeline on {device}", flush=True)
    pipe = build(args.tiny, device, torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    run = call(pipe, steps, device, args.tiny)
    out = []
    for name, apply in sequential_rows(args.full, not args.no_compile):
        undo, note = apply(pipe)
        try:
            with torch.inference_mode():
                warm = timed(run, device)
                print(f"  {name:32s} warm-up {warm:8.2f} s", flush=True)
                times = [timed(run, device) for _ in range(args.repeats)]
        finally:
            undo()
        out.append(_row(case, name, batch, steps, times, warm, note if isinstance(note, str) else _report_note(note)))
    add_ratios(out)
    return out


def _report_note(report) -> str:
    patched = sum(len(v) for v in report.patched.values())
    skipped = "; ".join(f"{p}: {r}" for p, r in report.skipped[:3])
    return (f"accelerate: {str(report.dtype).replace('torch.', '')}, channels_last {report.channels_last}, "
            f"{patched} patched, compiled {report.compiled or 'no'}, CUDA graphs {report.cuda_graph or 'no'}"
            + (f"; skipped {len(report.skipped)} ({skipped})" if report.skipped else ""))


def add_ratios(rows: list[dict]) -> None:
    by = {r["variant"]: r["images_per_s"] for r in rows}
    for r in rows:
        for key, base in (("x_fp32", "diffusers-fp32"), ("x_bf16", "diffusers-bf16"),
                          ("x_bf16_compile", "diffusers-bf16-compile"),
                          ("x_bf16_compile_regional", "diffusers-bf16-compile-regional")):
            if base in by:
                r[key] = r["images_per_s"] / by[base]


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(6 * len(cases), 4.5), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        sel = [r for r in rows if r["case"] == case]
        names = [r["variant"] for r in sel]
        colors = ["tab:blue" if n.startswith(("accelerate", "fd.")) else "tab:gray" for n in names]
        ax.barh(names, [r["images_per_s"] for r in sel], color=colors)
        ax.set_xlabel("images / s")
        ax.set_title(f"{case}, batch {sel[0]['batch']}, {sel[0]['steps']} steps")
        ax.invert_yaxis()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def save(rows: list[dict], args, device) -> tuple[Path, Path]:
    out = Path(args.out) if args.out else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_diffusers-{device_label(device)}{'-tiny' if args.tiny else ''}.json"
    payload = {"benchmark": "bench_diffusers", "device": device_info(device),
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": rows}
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=str)))
    png = path.with_suffix(".png")
    chart(rows, png)
    return path, png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", nargs="+", default=None, help=f"CPU: {list(CPU_CASES)}; GPU: {list(GPU_CASES)}")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps (default 20; flux-dev-1024: 28, pixart-sigma-1024: 20)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--full", action="store_true", help="GPU: add max-autotune and accelerate-compile rows")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--no-profile", action="store_true", help="CPU: skip the profiled call per row")
    p.add_argument("--tiny", action="store_true", help="toy widths and sizes (a check that every row runs)")
    p.add_argument("--save", action="store_true", help="write the JSON and PNG chart")
    p.add_argument("--out", default=None, help="results folder for --save (default benchmarks/results)")
    p.add_argument("--jsonl", default=os.environ.get(RESULTS_ENV) or None,
                   help="append each case's rows to this JSON-lines file as measured (default: $FASTDIFF_RESULTS)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rec = RowWriter("bench_diffusers", device if device.type != "cuda" or torch.cuda.is_available() else "cpu",
                    jsonl=args.jsonl)
    missing = have_module("diffusers")
    if missing:  # the GPU image without the carried wheels: say so, fail nothing
        rec.skip("every bench_diffusers row", missing)
        rec.finish()
        print("bench_diffusers needs diffusers (pip install 'fastdiff[diffusers]'); nothing measured")
        return 0
    import diffusers

    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    known = GPU_CASES if device.type == "cuda" else CPU_CASES
    cases = args.cases or list(known)
    bad = [c for c in cases if c not in CPU_CASES | GPU_CASES]
    if bad:
        raise SystemExit(f"--cases: unknown {bad}; CPU: {list(CPU_CASES)}, GPU: {list(GPU_CASES)}")
    if (args.steps is not None and args.steps < 1) or args.repeats < 1:
        raise SystemExit("--steps and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" on every .to()
    print(f"bench_diffusers on {device_label(device)} (torch threads {torch.get_num_threads()})", flush=True)
    rows = []
    for case in cases:
        case_rows = bench_case(case, args, device)
        for r in case_rows:
            rec.row(**r)
        rows += case_rows
    rec.finish()
    cols = ["case", "variant", "images_per_s", "ms_per_step", "warmup_s", "x_bf16", "x_bf16_compile",
            "x_bf16_compile_regional"]
    cols += ["x_fp32", "outside_matrix_share"] if device.type == "cpu" else []
    print_table(rows, cols)
    if args.save:
        path, png = save(rows, args, device)
        print(f"wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
