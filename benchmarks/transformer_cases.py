"""The diffusion-transformer cases of ``bench_diffusers.py``: pipelines built from the released configs (random
weights; speed does not depend on them), driven by precomputed prompt embeddings (no text encoders).

CPU (small enough to copy per row, measured interleaved):

- ``flux-768``: the pinned Flux-like config of the transformer issue: hidden 768 = 12 heads of 64, 4 double + 8
  single blocks, 1024 image tokens (512x512, packed 2x2 latents of a 8x VAE) + 128 text tokens, batch 1,
  guidance-distilled (Flux-dev's guidance embedding), latents out (no decode: the VAE only sets the scale);
- ``flux-tiny``, ``sd3-tiny``, ``sd35-tiny``, ``pixart-tiny``: the test-size models of diffusers' own tests (and
  of tests/test_accelerate_transformers*.py) in their pipelines, latents out.

GPU (one bf16 model, each row applied, measured and removed in turn: Flux-dev is 24 GB of weights):

- ``flux-dev-1024``: the Flux-dev architecture, 1024x1024, 28 steps, guidance 3.5, 512 T5 tokens, VAE decode
  included (the issue's measurement; published on an H100: 6.7 s eager bf16, 4.3-4.5 s torch.compile, 4.06 s
  compile + a hand-made CUDA graph);
- ``pixart-sigma-1024``: PixArt-Sigma-XL-2-1024 with the SDXL VAE, 1024x1024, 20 steps (its DPM-Solver default),
  guidance 4.5, 300 T5 tokens, VAE decode included.

``--tiny`` swaps every config for the test size (a check that each row runs).
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
FLUX_768 = dict(FLUX_DEV, num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=12,
                axes_dims_rope=(16, 24, 24))
FLUX_TINY = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 4, 8))
FLUX_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16, sample_size=1024,
                in_channels=3, out_channels=3, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                shift_factor=0.1159)
# a 4-level VAE with Flux's 16 latent channels at toy widths: the 8x scale of the latents-out CPU case
FLUX_VAE_SCALE_ONLY = dict(FLUX_VAE, block_out_channels=(8, 8, 8, 8), norm_num_groups=8, layers_per_block=1)
TEST_VAE = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                scaling_factor=1.5035)  # diffusers' SD3 / Flux pipeline tests (latent_channels set per model)
SD3_TINY = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
                caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
SD35_TINY = dict(SD3_TINY, num_layers=4, dual_attention_layers=(0,), qk_norm="rms_norm")
PIXART_SIGMA = dict(sample_size=128, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
                    in_channels=4, out_channels=8, cross_attention_dim=1152, caption_channels=4096,
                    attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                    interpolation_scale=2, use_additional_conditions=False)
PIXART_TINY = dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=2, num_attention_heads=2,
                   in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True,
                   activation_fn="gelu-approximate", num_embeds_ada_norm=8, norm_type="ada_norm_single",
                   norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
                   caption_channels=None)
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=1024,
                in_channels=3, out_channels=3, scaling_factor=0.13025)


def build_model(cls, cfg: dict, device, dtype):
    """Random weights initialised on ``device`` directly in ``dtype`` (Flux-dev's 12B parameters: 24 GB in bf16,
    never a float32 copy)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------


def flux_pipeline(cfg: dict, vae_cfg: dict, device, dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    sched = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                 use_dynamic_shifting=True)  # Flux-dev's scheduler config
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**sched),
                        vae=build_model(AutoencoderKL, vae_cfg, device, dtype), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None,
                        transformer=build_model(FluxTransformer2DModel, cfg, device, dtype))


def flux_call(pipe, *, size, text_tokens, steps, device, latents_out, guidance=3.5):
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt_embeds=torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=g),
              pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=g))
    kw = {k: v.to(device, pipe.transformer.dtype) for k, v in kw.items()}  # what the text encoders would give

    def run():
        return pipe(**kw, height=size, width=size, guidance_scale=guidance, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(1), output_type="latent" if latents_out else "np")

    return run


def sd3_pipeline(cfg: dict, device, dtype):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=build_model(AutoencoderKL, dict(TEST_VAE, latent_channels=4), device, dtype),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None,
                                    transformer=build_model(SD3Transformer2DModel, cfg, device, dtype))


def sd3_call(pipe, *, size, steps, device, latents_out):
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(0)
    kw = {k: torch.randn(1, 12, cfg.joint_attention_dim, generator=g)
          for k in ("prompt_embeds", "negative_prompt_embeds")}
    kw.update({k: torch.randn(1, cfg.pooled_projection_dim, generator=g)
               for k in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")})
    kw = {k: v.to(device, pipe.transformer.dtype) for k, v in kw.items()}

    def run():
        return pipe(**kw, height=size, width=size, guidance_scale=5.0, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(1), output_type="latent" if latents_out else "np")

    return run


def pixart_pipeline(cfg: dict, vae_cfg: dict, device, dtype):
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    return PixArtSigmaPipeline(tokenizer=None, text_encoder=None, scheduler=DPMSolverMultistepScheduler(),
                               vae=build_model(AutoencoderKL, vae_cfg, device, dtype),
                               transformer=build_model(PixArtTransformer2DModel, cfg, device, dtype))


def pixart_call(pipe, *, size, text_tokens, steps, device, latents_out):
    dim = pipe.transformer.config.caption_channels or pipe.transformer.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(1, text_tokens)
    mask[:, text_tokens // 3:] = 0  # a short prompt padded to the encoder length, as T5 gives it
    kw = dict(prompt_embeds=torch.randn(1, text_tokens, dim, generator=g).to(device, pipe.transformer.dtype),
              negative_prompt_embeds=torch.randn(1, text_tokens, dim, generator=g).to(device, pipe.transformer.dtype),
              prompt_attention_mask=mask.to(device), negative_prompt_attention_mask=torch.ones(1, text_tokens,
                                                                                            device=device))

    def run():
        return pipe(negative_prompt=None, **kw, height=size, width=size, guidance_scale=4.5,
                    num_inference_steps=steps, use_resolution_binning=False,
                    generator=torch.Generator().manual_seed(1), output_type="latent" if latents_out else "np")

    return run


# ---------------------------------------------------------------------------------------------
# cases: name -> (build(tiny, device, dtype), call(pipe, steps, device, tiny), images per call, kind, steps)
# ---------------------------------------------------------------------------------------------


def _flux_case(cfg, vae_cfg, size, text_tokens, latents_out, steps=None):
    def build(tiny, device, dtype):
        return flux_pipeline(FLUX_TINY if tiny else cfg, dict(TEST_VAE, latent_channels=1) if tiny else vae_cfg,
                             device, dtype)

    def call(pipe, n, device, tiny):
        return flux_call(pipe, size=32 if tiny else size, text_tokens=12 if tiny else text_tokens, steps=n,
                         device=device, latents_out=latents_out)

    return build, call, 1, "transformer", steps


def _sd3_case(cfg):
    return (lambda tiny, device, dtype: sd3_pipeline(cfg, device, dtype),
            lambda pipe, n, device, tiny: sd3_call(pipe, size=32, steps=n, device=device, latents_out=True),
            1, "transformer", None)


def _pixart_case(cfg, vae_cfg, size, text_tokens, latents_out, steps=None):
    def build(tiny, device, dtype):
        return pixart_pipeline(PIXART_TINY if tiny else cfg, dict(TEST_VAE, latent_channels=4) if tiny else vae_cfg,
                               device, dtype)

    def call(pipe, n, device, tiny):
        return pixart_call(pipe, size=8 if tiny else size, text_tokens=8 if tiny else text_tokens, steps=n,
                           device=device, latents_out=latents_out)

    return build, call, 1, "transformer", steps


CPU_TRANSFORMER_CASES = {
    "flux-768": _flux_case(FLUX_768, FLUX_VAE_SCALE_ONLY, 512, 128, latents_out=True),
    "flux-tiny": _flux_case(FLUX_TINY, dict(TEST_VAE, latent_channels=1), 32, 12, latents_out=True),
    "sd3-tiny": _sd3_case(SD3_TINY),
    "sd35-tiny": _sd3_case(SD35_TINY),
    "pixart-tiny": _pixart_case(PIXART_TINY, dict(TEST_VAE, latent_channels=4), 8, 8, latents_out=True),
}
GPU_TRANSFORMER_CASES = {
    "flux-dev-1024": _flux_case(FLUX_DEV, FLUX_VAE, 1024, 512, latents_out=False, steps=28),
    "pixart-sigma-1024": _pixart_case(PIXART_SIGMA, SDXL_VAE, 1024, 300, latents_out=False, steps=20),
}


# ---------------------------------------------------------------------------------------------
# the rows' changes, applied to one pipeline and undone (GPU: no copies of a 24 GB model)
# ---------------------------------------------------------------------------------------------


def compile_blocks(model, **options) -> list:
    """Regional torch.compile as diffusers' ``compile_repeated_blocks``: each repeated block compiled (one
    compiled code per block class); models that declare no ``_repeated_blocks`` (SD3, PixArt in diffusers <= 0.42)
    by their ``transformer_blocks`` lists. Returns the blocks (``_compiled_call_impl = None`` undoes it)."""
    from fastdiff.compat.diffusers.accelerate import _repeated_blocks

    blocks = _repeated_blocks(model)
    for m in blocks:
        m.compile(**options)
    return blocks


def sequential_rows(full: bool, compile_rows: bool) -> list:
    """[(row name, apply(pipe) -> (undo, note))] for the one-model GPU runs."""
    from fastdiff.compat.diffusers import accelerate

    def hand_tuned(pipe):
        pipe.vae.to(memory_format=torch.channels_last)
        return (lambda: pipe.vae.to(memory_format=torch.contiguous_format)), "bf16, SDPA, VAE channels_last"

    def compiled(pipe, regional: bool):
        undo_vae, _ = hand_tuned(pipe)
        if regional:
            blocks = compile_blocks(pipe.transformer)
        else:
            pipe.transformer.compile()
            blocks = [pipe.transformer]

        def undo():
            for m in blocks:
                m._compiled_call_impl = None
            torch._dynamo.reset()
            undo_vae()

        return undo, f"torch.compile {'regional (' + str(len(blocks)) + ' blocks)' if regional else 'full'}"

    def accelerated(pipe, **kw):
        report = accelerate(pipe, **kw)

        def undo():
            report.undo()
            torch._dynamo.reset()

        return undo, report

    rows = [("diffusers-bf16", hand_tuned)]
    if compile_rows:
        rows += [("diffusers-bf16-compile", lambda p: compiled(p, False)),
                 ("diffusers-bf16-compile-regional", lambda p: compiled(p, True))]
    rows.append(("accelerate", accelerated))
    if compile_rows and full:
        rows.append(("accelerate-compile", lambda p: accelerated(p, compile=True)))
    return rows
