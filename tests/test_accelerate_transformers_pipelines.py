"""fastdiff.accelerate on whole tiny transformer pipelines (FluxPipeline, StableDiffusion3Pipeline with SD3 and
SD3.5 transformers, PixArtSigmaPipeline) driven by precomputed prompt embeddings (no text encoders): the same
latents and images as unpatched with the same generator, the flow-matching scheduler swapped for fastdiff's
drop-in where the package has one (else reported and kept), an exact undo."""

import numpy as np
import pytest
import torch
from conftest import DIFFUSERS_WARNINGS, rel_l2
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from test_accelerate import assert_same, snapshot
from test_accelerate_transformers import FLUX, PIXART, SD3, SD35

import fastdiff.compat.diffusers as fdd
from fastdiff.compat.diffusers import accelerate

pytestmark = [*DIFFUSERS_WARNINGS, pytest.mark.usefixtures("one_thread_module")]


def _vae(latent_channels):
    """The one-level AutoencoderKL of diffusers' SD3 / Flux pipeline tests."""
    torch.manual_seed(0)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()


def _transformer(cls, cfg):
    torch.manual_seed(0)
    return cls(**cfg).eval()


def flux_pipeline():
    """Flux-dev-like: guidance-distilled (guidance embedding), no classifier-free guidance."""
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1), text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None,
                        transformer=_transformer(FluxTransformer2DModel, dict(FLUX, guidance_embeds=True)))
    g = torch.Generator().manual_seed(3)
    return pipe, dict(prompt_embeds=torch.randn(1, 12, 32, generator=g),
                      pooled_prompt_embeds=torch.randn(1, 32, generator=g), guidance_scale=3.5,
                      num_inference_steps=3, height=32, width=32)


def sd3_pipeline(cfg=None):
    """SD3 (or SD3.5 with cfg=SD35) with classifier-free guidance: the transformer sees batch 2."""
    cfg = cfg or dict(SD3, num_layers=1)  # diffusers' SD3 pipeline tests: one layer
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(4),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None,
                                    transformer=_transformer(SD3Transformer2DModel, cfg))
    g = torch.Generator().manual_seed(3)
    embeds = {k: torch.randn(1, 12, 32, generator=g) for k in ("prompt_embeds", "negative_prompt_embeds")}
    embeds.update({k: torch.randn(1, 64, generator=g)
                   for k in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")})
    return pipe, dict(**embeds, guidance_scale=5.0, num_inference_steps=3, height=32, width=32)


def pixart_pipeline():
    """PixArt-Sigma with a padded prompt (its attention mask) and classifier-free guidance."""
    torch.manual_seed(0)
    vae = AutoencoderKL().eval()
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=DPMSolverMultistepScheduler(),
                               transformer=_transformer(PixArtTransformer2DModel, PIXART))
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(1, 8)
    mask[:, 6:] = 0
    return pipe, dict(negative_prompt=None, prompt_embeds=torch.randn(1, 8, 8, generator=g), prompt_attention_mask=mask,
                      negative_prompt_embeds=torch.randn(1, 8, 8, generator=g),
                      negative_prompt_attention_mask=torch.ones(1, 8), guidance_scale=4.5, num_inference_steps=3,
                      height=8, width=8, use_resolution_binning=False)


PIPELINES = {"flux": flux_pipeline, "sd3": sd3_pipeline, "sd35": lambda: sd3_pipeline(SD35),
             "pixart-sigma": pixart_pipeline}


def generate(pipe, kw, output_type="latent"):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(generator=torch.Generator().manual_seed(0), output_type=output_type, **kw).images
    return torch.as_tensor(np.asarray(out)) if output_type == "np" else out


def pipeline_state(pipe):
    return {name: snapshot(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


def _check_scheduler(pipe, report, name):
    """Swapped when fastdiff has a drop-in of that class name, else reported and kept."""
    if isinstance(getattr(fdd, name, None), type):
        assert type(pipe.scheduler) is getattr(fdd, name) and report.patched[name] == ["scheduler"]
        assert report.skipped == []
    else:
        assert type(pipe.scheduler).__module__.startswith("diffusers")
        assert report.skipped == [("scheduler", f"no fastdiff drop-in for {name} yet; the pipeline keeps "
                                                "diffusers' scheduler")]


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_gives_the_same_latents_and_undo_restores_it(name):
    pipe, kw = PIPELINES[name]()
    ref = generate(pipe, kw)
    before, scheduler = pipeline_state(pipe), pipe.scheduler
    report = accelerate(pipe, dtype=torch.float32)
    _check_scheduler(pipe, report, type(scheduler).__name__)
    assert any(p.startswith("transformer.") for paths in report.patched.values() for p in paths)
    assert rel_l2(generate(pipe, kw), ref) <= 1e-5
    report.undo()
    assert pipe.scheduler is scheduler
    for comp, snap in pipeline_state(pipe).items():
        assert_same(before[comp], snap)
    assert torch.equal(generate(pipe, kw), ref)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_pipeline_images_through_the_patched_vae(name):
    pipe, kw = PIPELINES[name]()
    ref = generate(pipe, kw, "np")
    report = accelerate(pipe, dtype=torch.float32)
    assert (generate(pipe, kw, "np") - ref).abs().max() <= 1e-5
    report.undo()


def test_scheduler_false_keeps_the_flow_scheduler():
    pipe, kw = flux_pipeline()
    scheduler = pipe.scheduler
    ref = generate(pipe, kw)
    report = accelerate(pipe, dtype=torch.float32, scheduler=False)
    assert pipe.scheduler is scheduler and report.skipped == []
    assert rel_l2(generate(pipe, kw), ref) <= 1e-5
    report.undo()


def test_flux_pipeline_in_bfloat16_is_as_close_as_diffusers_bfloat16():
    pipe, kw = flux_pipeline()
    ref = generate(pipe, kw)
    pipe.to(torch.bfloat16)  # diffusers' bf16 pipeline takes the embeddings in bf16
    theirs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) else v for k, v in kw.items()}
    err_theirs = rel_l2(generate(pipe, theirs).float(), ref)
    pipe.to(torch.float32)
    report = accelerate(pipe, dtype=torch.bfloat16, scheduler=False)
    assert report.converted == {"vae": "float32 -> bfloat16", "transformer": "float32 -> bfloat16"}
    out = generate(pipe, kw)  # float32 embeddings: the entry point casts
    assert out.dtype == torch.float32
    assert rel_l2(out, ref) <= 2 * err_theirs + 1e-3
    report.undo()
