"""Schedules: named betas, the sigma view, spacings, timestep maps (diffusers, k-diffusion as references)."""

import math
import warnings

import numpy as np
import pytest
import torch

from fastdiff.schedules import (
    VESDESchedule,
    VPSchedule,
    VPSDESchedule,
    alphas_cumprod_to_sigmas,
    betas_for_schedule,
    exponential_sigmas,
    karras_sigmas,
    sigmas_to_alphas_cumprod,
    spaced_timesteps,
)

diffusers = pytest.importorskip("diffusers")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_named_betas_match_diffusers(name):
    # diffusers builds them in float32: agreement to float32 precision.
    ref = diffusers.DDPMScheduler(beta_schedule=name, beta_start=0.00085 if name == "scaled_linear" else 1e-4,
                                  beta_end=0.012 if name == "scaled_linear" else 0.02)
    sch = VPSchedule(name, beta_start=ref.config.beta_start, beta_end=ref.config.beta_end)
    np.testing.assert_allclose(sch.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=2e-6, atol=1e-9)
    assert sch.num_train_timesteps == 1000


def test_explicit_betas_and_alphas_cumprod_agree():
    betas = betas_for_schedule("linear", 50)
    a = VPSchedule(betas=betas)
    b = VPSchedule(alphas_cumprod=np.cumprod(1 - betas))
    np.testing.assert_allclose(a.train_sigmas, b.train_sigmas, rtol=1e-12)
    np.testing.assert_allclose(b.betas, betas, rtol=1e-9)


def test_sigma_view_roundtrip():
    abar = VPSchedule().alphas_cumprod
    s = alphas_cumprod_to_sigmas(abar)
    np.testing.assert_allclose(sigmas_to_alphas_cumprod(s), abar, rtol=1e-13)
    np.testing.assert_allclose(s, np.sqrt((1 - abar) / abar), rtol=1e-15)


@pytest.mark.parametrize("kind", ["discrete", "vp_sde", "ve_sde", "ve_sde_t"])
def test_timestep_sigma_maps_invert_on_host_and_device(kind):
    sch = {"discrete": VPSchedule(), "vp_sde": VPSDESchedule(time_scale=999.0),
           "ve_sde": VESDESchedule(0.01, 50.0), "ve_sde_t": VESDESchedule(0.01, 50.0, timestep="t")}[kind]
    sig = np.geomspace(sch.sigma_max * 0.999, sch.sigma_min * 1.001, 37)
    t = sch.sigma_to_timestep(sig)
    np.testing.assert_allclose(sch.timestep_to_sigma(t), sig, rtol=1e-10)
    # the tensor path (used inside the loop) gives the same numbers without leaving the device
    tt = sch.sigma_to_timestep(torch.tensor(sig))
    assert isinstance(tt, torch.Tensor) and tt.dtype == torch.float64
    np.testing.assert_allclose(tt.numpy(), t, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sch.timestep_to_sigma(tt).numpy(), sig, rtol=1e-10)
    scale = sch.model_input_scale(torch.tensor(sig)).numpy()
    expect = 1 / np.sqrt(1 + sig ** 2) if kind in ("discrete", "vp_sde") else np.ones_like(sig)
    np.testing.assert_allclose(scale, expect, rtol=1e-14)


def test_discrete_timestep_exact_at_integers_and_matches_diffusers_sigma_to_t():
    sch = VPSchedule()
    ts = np.array([0, 1, 17, 500, 999])
    np.testing.assert_allclose(sch.timestep_to_sigma(ts), sch.train_sigmas[ts], rtol=1e-14)
    ref = diffusers.EulerDiscreteScheduler()
    sig = np.array([0.05, 1.3, 7.0, 14.0])
    log_sigmas = np.log(alphas_cumprod_to_sigmas(ref.alphas_cumprod.numpy()))
    expect = ref._sigma_to_t(sig, log_sigmas)
    got = VPSchedule(alphas_cumprod=ref.alphas_cumprod).sigma_to_timestep(sig)
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-4)


def test_vp_sde_matches_k_diffusion_get_sigmas_vp_formula():
    sch = VPSDESchedule(beta_min=0.1, beta_max=20.0, eps=1e-3)
    sig, _ = sch.sigmas(10, "uniform")
    t = np.linspace(1, 1e-3, 10)
    expect = np.sqrt(np.exp(19.9 * t ** 2 / 2 + 0.1 * t) - 1)
    np.testing.assert_allclose(sig[:-1], expect, rtol=1e-12)
    assert sig[-1] == 0


def test_ve_sde_is_geometric():
    sch = VESDESchedule(0.01, 100.0, timestep="t")
    assert sch.timestep_to_sigma(0.5) == pytest.approx(1.0)
    sig, t = sch.sigmas(5, "uniform")
    np.testing.assert_allclose(sig[:-1], np.geomspace(100.0, 0.01, 5), rtol=1e-12)
    np.testing.assert_allclose(t, np.linspace(1, 0, 5), atol=1e-12)


def test_karras_matches_fixture_sigmas(kd):
    meta, tensors = kd
    stored = tensors["sigmas"].double().numpy()
    assert "get_sigmas_karras(n=12" in meta["sigmas"]
    ours = karras_sigmas(12, 0.02, 80.0, 7.0)
    assert ours[-1] == 0 and len(ours) == 13
    # the fixture was built with a float32 ramp: agreement to float32 precision, not bit for bit
    np.testing.assert_allclose(ours, stored, rtol=1e-4)
    assert ours[0] == pytest.approx(80.0, rel=1e-14) and ours[-2] == pytest.approx(0.02, rel=1e-14)


def test_exponential_sigmas_uniform_in_log():
    s = exponential_sigmas(6, 0.1, 10.0)
    np.testing.assert_allclose(np.diff(np.log(s[:-1])), -math.log(100) / 5, rtol=1e-12)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [7, 10, 50])
def test_spaced_timesteps_match_diffusers(spacing, steps):
    ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ddim.set_timesteps(steps)
    got = spaced_timesteps(1000, steps, spacing, steps_offset=ddim.config.steps_offset)
    np.testing.assert_array_equal(got, ddim.timesteps.numpy())
    multi = diffusers.UniPCMultistepScheduler(timestep_spacing=spacing)
    multi.set_timesteps(steps)
    got = spaced_timesteps(1000, steps, spacing, multistep=True)
    np.testing.assert_array_equal(got, multi.timesteps.numpy())


@pytest.mark.parametrize("spacing", ["karras", "exponential"])
def test_schedule_sigmas_match_diffusers(spacing):
    kw = {"use_karras_sigmas": True} if spacing == "karras" else {"use_exponential_sigmas": True}
    ref = diffusers.DPMSolverMultistepScheduler(**kw)
    ref.set_timesteps(12)
    sch = VPSchedule(alphas_cumprod=ref.alphas_cumprod)
    sig, t = sch.sigmas(12, spacing)
    np.testing.assert_allclose(sig, ref.sigmas.double().numpy(), rtol=2e-6)
    # diffusers rounds Karras timesteps and truncates exponential ones (its int64 cast)
    expect_t = ref.timesteps.double().numpy()
    np.testing.assert_array_equal(np.round(t) if spacing == "karras" else np.floor(t + 1e-9), expect_t)


def test_leading_spacing_sigmas_are_train_sigmas():
    sch = VPSchedule()
    sig, t = sch.sigmas(10, "leading", steps_offset=1, final="sigma_min")
    np.testing.assert_array_equal(t, np.arange(0, 10)[::-1] * 100 + 1)
    np.testing.assert_allclose(sig[:-1], sch.train_sigmas[t.astype(int)], rtol=1e-13)
    assert sig[-1] == sch.sigma_min


@pytest.mark.parametrize("bad", [
    lambda: VPSchedule("cubic"),
    lambda: VPSchedule(alphas_cumprod=[0.5, 0.9]),
    lambda: VPSchedule(betas=[0.1, 1.5]),
    lambda: karras_sigmas(0, 0.1, 10),
    lambda: karras_sigmas(5, 0.0, 10),
    lambda: VPSchedule().sigmas(10, "quadratic"),
    lambda: VPSchedule().timestep_to_sigma(1000.5),
    lambda: VPSchedule().sigma_to_timestep(-1.0),
    lambda: VPSDESchedule().sigmas(4, "leading"),
    lambda: spaced_timesteps(1000, 5, "middle"),
    lambda: VPSDESchedule(beta_min=5, beta_max=1),
    lambda: VESDESchedule(10, 1),
])
def test_bad_input_raises_value_error(bad):
    with pytest.raises(ValueError):
        bad()


def test_add_noise_matches_diffusers():
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sch = VPSchedule(alphas_cumprod=ref.alphas_cumprod)
    x0, noise = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    np.testing.assert_allclose(sch.add_noise(x0, noise, t).numpy(), ref.add_noise(x0, noise, t).numpy(),
                               rtol=1e-6, atol=1e-7)


def test_zero_terminal_snr_and_exp_betas_match_diffusers():
    from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as ref_rescale

    from fastdiff.schedules import rescale_zero_terminal_snr

    betas = betas_for_schedule("scaled_linear", 1000, 0.00085, 0.012)
    ours = rescale_zero_terminal_snr(betas)
    ref = ref_rescale(torch.tensor(betas)).double().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-13)
    assert ours[-1] == 1.0 and np.all((ours[:-1] > 0) & (ours[:-1] < 1))
    np.testing.assert_allclose(betas_for_schedule("exp", 1000),
                               betas_for_alpha_bar(1000, alpha_transform_type="exp").double().numpy(), rtol=2e-6)


@pytest.mark.parametrize("steps", [5, 30])
def test_beta_sigmas_match_diffusers(steps):
    from fastdiff.schedules import beta_sigmas

    ref = diffusers.EulerDiscreteScheduler(use_beta_sigmas=True)
    ours = beta_sigmas(steps, 0.03, 14.6, append_zero=False)
    np.testing.assert_allclose(ours, ref._convert_to_beta(torch.tensor([14.6, 0.03], dtype=torch.float64), steps),
                               rtol=1e-12)
    sch = VPSchedule()
    sig, _ = sch.sigmas(steps, "beta")
    assert sig[0] == pytest.approx(sch.sigma_max) and sig[-2] == pytest.approx(sch.sigma_min) and sig[-1] == 0


def test_frames_and_start_scales():
    from fastdiff.schedules import FlowSchedule, frame_scale

    s = np.array([0.0, 0.5, 3.0])
    np.testing.assert_allclose(frame_scale(s, "vp"), 1 / np.sqrt(1 + s * s))
    np.testing.assert_allclose(frame_scale(s, "flow"), 1 / (1 + s))
    np.testing.assert_allclose(frame_scale(torch.tensor(s), "flow").numpy(), 1 / (1 + s))
    vp = VPSchedule()
    assert vp.initial_scale(3.0) == pytest.approx(np.sqrt(10.0)) and vp.initial_scale(3.0, "vp") == 1
    assert VESDESchedule().initial_scale(3.0) == 3.0
    flow = FlowSchedule()
    assert flow.initial_scale(np.inf, "flow") == 1.0 and flow.initial_scale(3.0) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="inf"):
        flow.initial_scale(np.inf)
    with pytest.raises(ValueError, match="frame"):
        frame_scale(s, "ve")


@pytest.mark.parametrize("kwargs, word", [
    (dict(beta_start=0.1, beta_end=2.0), "beta_start"),                   # betas past 1
    (dict(beta_start=-0.01, beta_end=0.02), "beta_start"),                # and below 0
    (dict(betas=[0.1, 1.2]), "betas"),
    (dict(num_train_timesteps=1), "num_train_timesteps"),                 # too few training steps
    (dict(num_train_timesteps=0), "num_train_timesteps"),
])
def test_bad_schedules_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        VPSchedule(**kwargs)
