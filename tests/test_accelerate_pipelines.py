"""fastdiff.accelerate on whole tiny diffusers pipelines: the same images as unpatched with the same generator,
the scheduler swapped for fastdiff's drop-in (or reported when there is none), an exact undo of the pipeline."""

import numpy as np
import pytest
import torch
from accelerate_models import CROSS_DIM, MODELS
from conftest import DIFFUSERS_WARNINGS
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from test_accelerate import assert_same, snapshot

from fastdiff.compat.diffusers import AccelerateError, accelerate

pytestmark = [*DIFFUSERS_WARNINGS, pytest.mark.usefixtures("one_thread_module")]

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)


def ddpm_pipeline():
    pipe = DDPMPipeline(unet=MODELS["unet_2d"]()[0], scheduler=DDPMScheduler(num_train_timesteps=1000))
    return pipe, dict(batch_size=2, num_inference_steps=8, output_type="np")


def sd_pipeline(scheduler):
    pipe = StableDiffusionPipeline(vae=MODELS["vae"]()[0], text_encoder=None, tokenizer=None,
                                   unet=MODELS["unet_sd15"]()[0], scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(3)
    embeds = dict(prompt_embeds=torch.randn(1, 7, CROSS_DIM, generator=g),
                  negative_prompt_embeds=torch.randn(1, 7, CROSS_DIM, generator=g))
    return pipe, dict(**embeds, num_inference_steps=4, guidance_scale=7.5, height=32, width=32, output_type="np")


def sdxl_pipeline():
    pipe = StableDiffusionXLPipeline(vae=MODELS["vae"]()[0], text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=MODELS["unet_sdxl"]()[0],
                                     scheduler=EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading"),
                                     force_zeros_for_empty_prompt=False)
    g = torch.Generator().manual_seed(3)
    embeds = {k: torch.randn(1, 5, CROSS_DIM, generator=g) for k in ("prompt_embeds", "negative_prompt_embeds")}
    embeds.update({k: torch.randn(1, CROSS_DIM, generator=g)
                   for k in ("pooled_prompt_embeds", "negative_pooled_prompt_embeds")})
    return pipe, dict(**embeds, num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="np")


PIPELINES = {
    "ddpm": (ddpm_pipeline, "DDPMScheduler"),
    "sd15-ddim": (lambda: sd_pipeline(DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False)),
                  "DDIMScheduler"),
    "sdxl-euler": (sdxl_pipeline, "EulerDiscreteScheduler"),
}


def images(pipe, kw):
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(0), **kw).images


def pipeline_state(pipe):
    return {name: snapshot(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_gives_the_same_images_and_undo_restores_it(name):
    make, scheduler_name = PIPELINES[name]
    pipe, kw = make()
    ref = images(pipe, kw)
    before, scheduler, config = pipeline_state(pipe), pipe.scheduler, dict(pipe.config)
    report = accelerate(pipe, dtype=torch.float32)
    assert report.patched[scheduler_name] == ["scheduler"]
    assert type(pipe.scheduler).__module__.startswith("fastdiff.compat.diffusers")
    assert type(pipe.scheduler).__name__ == scheduler_name
    assert all(p.startswith(("unet.", "vae.")) or p in ("unet", "scheduler")
               for paths in report.patched.values() for p in paths)
    assert report.skipped == []
    out = images(pipe, kw)
    assert np.abs(out - ref).max() <= 1e-5
    report.undo()
    assert pipe.scheduler is scheduler and dict(pipe.config) == config
    for comp, snap in pipeline_state(pipe).items():
        assert_same(before[comp], snap)
    assert np.array_equal(images(pipe, kw), ref)


def test_pipeline_in_bfloat16_is_as_close_as_diffusers_bfloat16():
    pipe, kw = sd_pipeline(DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False))
    ref = images(pipe, kw)
    pipe.to(torch.bfloat16)
    err_theirs = np.abs(images(pipe, kw) - ref).max()
    pipe.to(torch.float32)
    report = accelerate(pipe, dtype=torch.bfloat16)
    assert report.converted == {"vae": "float32 -> bfloat16", "unet": "float32 -> bfloat16"}
    err = np.abs(images(pipe, kw) - ref).max()
    assert err <= 2 * err_theirs + 0.02
    report.undo()


class MyScheduler(DDIMScheduler):
    """A scheduler class fastdiff has no drop-in for (a user's own, or a diffusers one not covered yet)."""


def test_scheduler_without_a_drop_in_is_reported_and_kept():
    pipe, kw = sd_pipeline(MyScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False))
    ref = images(pipe, kw)
    scheduler = pipe.scheduler
    report = accelerate(pipe, dtype=torch.float32)
    assert pipe.scheduler is scheduler
    assert report.skipped == [("scheduler", "no fastdiff drop-in for MyScheduler yet; the pipeline keeps "
                                            "diffusers' scheduler")]
    assert np.abs(images(pipe, kw) - ref).max() <= 1e-5
    report.undo()
    with pytest.raises(AccelerateError, match="MyScheduler"):
        accelerate(pipe, dtype=torch.float32, strict=True)


@pytest.mark.parametrize("name", ["PNDMScheduler", "EulerAncestralDiscreteScheduler", "UniPCMultistepScheduler"])
def test_scheduler_swap_is_by_class_name(name):
    """Whatever drop-ins the package has: swapped when fastdiff.compat.diffusers has the class, else reported."""
    import diffusers

    import fastdiff.compat.diffusers as fdd

    pipe, kw = sd_pipeline(getattr(diffusers, name)(**SD_BETAS))
    report = accelerate(pipe, dtype=torch.float32)
    if isinstance(getattr(fdd, name, None), type):
        assert type(pipe.scheduler) is getattr(fdd, name) and report.patched[name] == ["scheduler"]
    else:
        assert report.skipped == [("scheduler", f"no fastdiff drop-in for {name} yet; the pipeline keeps "
                                                "diffusers' scheduler")]
    report.undo()


@pytest.mark.parametrize("where", ["set_timesteps", "step"])
def test_scheduler_config_the_drop_in_does_not_take_is_reported(where, monkeypatch):
    """A config the drop-in refuses (at set_timesteps, or at the first step's table) keeps diffusers' scheduler."""
    import fastdiff.compat.diffusers as fdd

    def refuse(self, *args, **kwargs):
        torch.randn(3)  # a stochastic probe must not move the caller's generator
        raise NotImplementedError("this option is not supported")

    monkeypatch.setattr(fdd.DDIMScheduler, where, refuse)
    pipe, _ = sd_pipeline(DDIMScheduler(**SD_BETAS))
    rng = torch.get_rng_state()
    report = accelerate(pipe, dtype=torch.float32)
    assert torch.equal(torch.get_rng_state(), rng)
    assert type(pipe.scheduler).__module__.startswith("diffusers")
    assert report.skipped == [("scheduler", "fastdiff's DDIMScheduler does not take this config: this option is "
                                            "not supported")]
    report.undo()


def test_a_model_of_an_accelerated_pipeline_is_accelerated_already():
    pipe, _ = ddpm_pipeline()
    report = accelerate(pipe, dtype=torch.float32)
    with pytest.raises(ValueError, match="UNet2DModel is accelerated already"):
        accelerate(pipe.unet, dtype=torch.float32)
    report.undo()
    accelerate(pipe.unet, dtype=torch.float32).undo()


def test_scheduler_false_keeps_diffusers_scheduler():
    pipe, _ = ddpm_pipeline()
    scheduler = pipe.scheduler
    report = accelerate(pipe, dtype=torch.float32, scheduler=False)
    assert pipe.scheduler is scheduler and "DDPMScheduler" not in report.patched
    report.undo()
