"""Drop-in APIs: fastdiff.compat.k_diffusion against the k-diffusion fixture; fastdiff.compat.diffusers
against diffusers' schedulers (the oracle) and inside diffusers pipelines."""

import inspect
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import rel_l2
from test_samplers import mixture_denoiser

from fastdiff import ops
from fastdiff.compat import diffusers as FD
from fastdiff.compat import k_diffusion as K

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


pytestmark = pytest.mark.usefixtures("one_thread_module")


KD_DETERMINISTIC = ["euler", "heun", "dpm_2", "lms", "dpmpp_2m"]
KD_STOCHASTIC = ["euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"]


# ---------------------------------------------------------------------------------------------
# k-diffusion
# ---------------------------------------------------------------------------------------------



class StoredNoise:
    """k-diffusion's noise_sampler(sigma, sigma_next) whose k-th call returns noise[k]; records its calls."""

    def __init__(self, noise):
        self.noise, self.calls = noise, []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.noise[len(self.calls) - 1]


@pytest.mark.parametrize("name", KD_DETERMINISTIC + KD_STOCHASTIC)
def test_k_diffusion_matches_the_fixture(kd, name):
    meta, t = kd
    sigmas = t["sigmas"].double()
    kw = {}
    if name in KD_STOCHASTIC:
        kw["noise_sampler"] = ns = StoredNoise(t["noise"].double())
    seen = []
    out = getattr(K, f"sample_{name}")(mixture_denoiser(meta), t["x_T"].double(), sigmas,
                                       callback=seen.append, **kw)
    assert out.dtype == torch.float64
    assert (out - t[f"out.{name}"]).abs().max().item() <= 1e-8
    steps = sigmas.shape[0] - 1
    assert [d["i"] for d in seen] == list(range(steps))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert float(seen[3]["sigma"]) == float(sigmas[3]) == float(seen[3]["sigma_hat"])
    if name in KD_STOCHASTIC:  # once per step into sigma > 0, with (sigmas[i], sigmas[i + 1])
        assert ns.calls == [(float(sigmas[i]), float(sigmas[i + 1])) for i in range(steps - 1)]


def test_k_diffusion_passes_extra_args_and_calls_the_model_at_its_sigmas(kd):
    meta, t = kd
    D = mixture_denoiser(meta)
    calls = []

    def model(x, sigma, scale=None):
        calls.append(float(sigma[0]))
        assert sigma.shape == (x.shape[0],)
        return D(x, sigma) * scale

    sigmas = t["sigmas"].double()
    out = K.sample_heun(model, t["x_T"].double(), sigmas, extra_args={"scale": 1.0})
    assert (out - t["out.heun"]).abs().max().item() <= 1e-8
    expected = []
    for i in range(sigmas.shape[0] - 1):  # Heun: sigma_i, then sigma_{i+1} unless it is 0
        expected += [float(sigmas[i])] + ([float(sigmas[i + 1])] if sigmas[i + 1] > 0 else [])
    assert calls == expected


def kd_churn_reference(model, x, sigmas, s_churn, s_tmin, s_tmax, s_noise, second_order):
    """k-diffusion's sample_euler / sample_heun loop with churn (Karras et al. 2022, Algorithm 2)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + torch.randn_like(x) * s_noise * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        d = (x - model(x, sigma_hat * s_in)) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        if not second_order or sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - model(x2, sigmas[i + 1] * s_in)) / sigmas[i + 1]
            x = x + (d + d2) / 2 * dt
    return x


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_k_diffusion_churn_matches_algorithm_2(kd, name):
    meta, t = kd
    D, sigmas, x = mixture_denoiser(meta), t["sigmas"].double(), t["x_T"].double()
    churn = dict(s_churn=4.0, s_tmin=0.1, s_tmax=30.0, s_noise=1.003)  # some steps churn, some do not
    torch.manual_seed(5)
    ref = kd_churn_reference(D, x, sigmas, second_order=name == "heun", **churn)
    torch.manual_seed(5)
    seen = []
    out = getattr(K, f"sample_{name}")(D, x, sigmas, callback=seen.append, **churn)
    assert rel_l2(out, ref) <= 1e-12
    assert not torch.equal(out, t[f"out.{name}"])
    assert float(seen[0]["sigma_hat"]) == float(seen[0]["sigma"])  # sigma_0 = 80 > s_tmax: no churn
    assert float(seen[5]["sigma_hat"]) > float(seen[5]["sigma"])


def test_k_diffusion_sde_default_noise_is_seeded_randn(kd):
    meta, t = kd
    D, sigmas, x = mixture_denoiser(meta), t["sigmas"].double(), t["x_T"].double()
    torch.manual_seed(1)
    a = K.sample_dpmpp_2m_sde(D, x, sigmas)
    torch.manual_seed(1)
    b = K.sample_dpmpp_2m_sde(D, x, sigmas)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert not torch.equal(a, t["out.dpmpp_2m_sde"])


@pytest.mark.parametrize("name", ["lms", "dpmpp_3m_sde"])
def test_k_diffusion_float32_through_the_kernel(kd, name):
    meta, t = kd
    kw = {"noise_sampler": StoredNoise(t["noise"].float())} if name in KD_STOCHASTIC else {}
    with ops.backend("triton"):
        sampler = getattr(K, f"sample_{name}")
        out = sampler(mixture_denoiser(meta), t["x_T"].float(), t["sigmas"].float(), **kw)
    assert out.dtype == torch.float32
    assert rel_l2(out, t[f"out.{name}"]) <= 1e-5


# ---------------------------------------------------------------------------------------------
# diffusers: every scheduler against diffusers' own, driven by the same smooth model
# ---------------------------------------------------------------------------------------------

SHAPE = (2, 3, 4, 4)
PT = {"eps": "epsilon", "v": "v_prediction", "flow": "flow_prediction"}
THRESH = {"thresholding": True, "sample_max_value": 1.5}

SCHEDULER_CASES = [
    ("DDPMScheduler", {}),
    ("DDPMScheduler", {"timestep_spacing": "trailing", "variance_type": "fixed_large"}),
    ("DDPMScheduler", dict(THRESH)),
    ("DDPMScheduler", {"variance_type": "learned_range", "clip_sample": False}),
    ("DDIMScheduler", {}),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False}),
    ("DDIMScheduler", dict(THRESH)),
    ("DDIMScheduler", {"_eta": 1.0, "set_alpha_to_one": False, "steps_offset": 1}),
    ("DDIMScheduler", {"_eta": 0.5, "_use_clipped_model_output": True, "timestep_spacing": "linspace"}),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "leading"}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("HeunDiscreteScheduler", {"timestep_spacing": "leading"}),
    ("HeunDiscreteScheduler", {"timestep_spacing": "trailing", "clip_sample": True}),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    ("LMSDiscreteScheduler", {"timestep_spacing": "leading"}),
    ("LMSDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "leading"}),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing", "solver_type": "heun"}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, **THRESH}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("UniPCMultistepScheduler", {"timestep_spacing": "leading"}),
    ("UniPCMultistepScheduler", {"timestep_spacing": "trailing", **THRESH}),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True, "solver_order": 3}),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    # the options diffusers' own tests exercise
    ("DDPMScheduler", {"variance_type": "fixed_small_log"}),
    ("DDIMScheduler", {"set_alpha_to_one": False, "timestep_spacing": "linspace"}),  # a terminal no-op step
    ("EulerDiscreteScheduler", {"_s_churn": 4.0, "_s_tmin": 0.1, "_s_tmax": 30.0, "_s_noise": 1.003}),
    ("EulerDiscreteScheduler", {"use_beta_sigmas": True, "final_sigmas_type": "sigma_min"}),
    ("EulerDiscreteScheduler", {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "interpolation_type": "log_linear"}),
    ("HeunDiscreteScheduler", {"beta_schedule": "exp"}),
    ("HeunDiscreteScheduler", {"use_beta_sigmas": True}),
    ("LMSDiscreteScheduler", {"use_exponential_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min",
                                     "solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min",
                                     "solver_type": "heun"}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_lu_lambdas": True}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min",
                                     "lower_order_final": False}),
    ("DPMSolverMultistepScheduler", {"use_beta_sigmas": True, "euler_at_final": True}),
    ("UniPCMultistepScheduler", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"predict_x0": False, "solver_order": 3, "solver_type": "bh1",
                                 "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}),
    # the new drop-ins
    ("PNDMScheduler", {}),
    ("PNDMScheduler", {"skip_prk_steps": True}),
    ("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": True, "steps_offset": 1}),
    ("DPMSolverSinglestepScheduler", {}),
    ("DPMSolverSinglestepScheduler", {"solver_order": 3, "final_sigmas_type": "sigma_min"}),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver", "solver_type": "heun", "solver_order": 3,
                                      "final_sigmas_type": "sigma_min"}),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    ("KDPM2DiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True, "timestep_spacing": "leading"}),
    ("KDPM2AncestralDiscreteScheduler", {}),
    ("KDPM2AncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("DEISMultistepScheduler", {}),
    ("DEISMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    ("DEISMultistepScheduler", {"thresholding": True, "sample_max_value": 1.2, "timestep_spacing": "trailing"}),
    ("LCMScheduler", {}),
    ("LCMScheduler", {"clip_sample": True, "timestep_scaling": 5.0}),
    ("TCDScheduler", {}),
    ("TCDScheduler", {"_eta": 0.0, "beta_schedule": "linear"}),
    ("EDMEulerScheduler", {}),
    ("EDMEulerScheduler", {"sigma_schedule": "exponential", "_s_churn": 4.0, "_s_tmin": 0.1, "_s_tmax": 30.0}),
    ("EDMDPMSolverMultistepScheduler", {}),
    ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    ("EDMDPMSolverMultistepScheduler", {"solver_order": 3, "thresholding": True, "sample_max_value": 1.5}),
]


def smooth_model(x, t):
    tt = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1, *[1] * (x.dim() - 1))
    return (torch.tanh(0.7 * x) * (0.5 + tt / 2000) + 0.05 * x).to(x.dtype)


def learned_range_model(x, t):
    return torch.cat([smooth_model(x, t), torch.tanh(0.3 * x + 0.1)], 1)


def run_scheduler(sched, steps, model=smooth_model, seed=0, generator_seed=3, per_sample_t=False, set_kw=None,
                  **step_kw):
    """A pipeline's loop: init noise, scale_model_input, model, step (seeded generator if taken)."""
    sched.set_timesteps(steps, **(set_kw or {}))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * getattr(sched, "init_noise_sigma", 1.0)
    kw = dict(step_kw)
    if "generator" in inspect.signature(sched.step).parameters:
        kw["generator"] = torch.Generator().manual_seed(generator_seed)
    for t in sched.timesteps:
        m = model(sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x, t)
        tt = t.reshape(1).expand(SHAPE[0]) if per_sample_t else t
        x = sched.step(m, tt, x, **kw).prev_sample
    return x


def make_pair(name, cfg, pred):
    import diffusers

    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if pred is not None:
        cfg["prediction_type"] = PT[pred]
    ref = getattr(diffusers, name)(**cfg)
    return ref, getattr(FD, name).from_config(ref.config)


@pytest.mark.parametrize("steps", [8, 20])
@pytest.mark.parametrize("pred", ["eps", "v"])
@pytest.mark.parametrize("name, cfg", SCHEDULER_CASES,
                         ids=[f"{n[:-9]}-{'-'.join(f'{k}={v}' for k, v in c.items()) or 'default'}"
                              for n, c in SCHEDULER_CASES])
def test_scheduler_matches_diffusers(name, cfg, pred, steps):
    ref, ours = make_pair(name, cfg, pred)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    assert type(ours).__name__ == name and public(ours.config) == public(ref.config)
    kw = {k[1:]: v for k, v in cfg.items() if k.startswith("_")}  # step keywords
    model = learned_range_model if cfg.get("variance_type") == "learned_range" else smooth_model
    a = run_scheduler(ref, steps, model, **kw)
    b = run_scheduler(ours, steps, model, **kw)
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-7)
    assert ours.order == ref.order
    assert b.dtype == a.dtype == torch.float32
    assert rel_l2(b, a) <= 1e-5


@pytest.mark.parametrize("name, cfg", [("EulerAncestralDiscreteScheduler", {}),
                                       ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
                                       ("UniPCMultistepScheduler", {"solver_order": 3})])
def test_scheduler_through_the_kernel_matches_diffusers(name, cfg):
    ref, ours = make_pair(name, cfg, "eps")
    a = run_scheduler(ref, 6)
    with ops.backend("triton"):
        b = run_scheduler(ours, 6)
    assert rel_l2(b, a) <= 1e-5


def test_every_step_is_one_fused_update(monkeypatch):
    calls = []
    real = ops.sampler_step
    monkeypatch.setattr(ops, "sampler_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name in ("DDIMScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler"):
        calls.clear()
        sched = getattr(FD, name)()
        run_scheduler(sched, 5)
        assert len(calls) == len(sched.timesteps)


def test_state_is_reset_by_set_timesteps():
    # diffusers#8711: a multistep scheduler reused for a second batch must not carry the first one's outputs.
    _, ours = make_pair("DPMSolverMultistepScheduler", {}, "eps")
    run_scheduler(ours, 8, seed=1)
    again = run_scheduler(ours, 8, seed=2)
    fresh = run_scheduler(make_pair("DPMSolverMultistepScheduler", {}, "eps")[1], 8, seed=2)
    assert torch.equal(again, fresh)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                                  "LMSDiscreteScheduler", "UniPCMultistepScheduler"])
def test_per_sample_timestep_tensor_in_lockstep_equals_the_scalar_run(name):
    _, ours = make_pair(name, {}, "eps")
    a = run_scheduler(ours, 7)
    b = run_scheduler(ours, 7, per_sample_t=True)
    assert rel_l2(b, a) <= 1e-7


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_per_sample_timesteps_take_their_own_rows(name):
    # diffusers#1784: one step, a different timestep per sample; the oracle steps each sample alone.
    ref, ours = make_pair(name, {"clip_sample": False} if name == "DDIMScheduler" else {}, "v")
    ours.set_timesteps(10)
    idx = [2, 7]
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = ours.timesteps[idx]
    m = smooth_model(x, t)
    out = ours.step(m, t, x)
    for n, i in enumerate(idx):
        ref.set_timesteps(10)
        if hasattr(type(ref), "set_begin_index"):  # diffusers' DDIM finds the row from the timestep
            ref.set_begin_index(i)
        r = ref.step(m[n:n + 1], ref.timesteps[i], x[n:n + 1])
        assert rel_l2(out.prev_sample[n:n + 1], r.prev_sample) <= 1e-6
        assert rel_l2(out.pred_original_sample[n:n + 1], r.pred_original_sample) <= 1e-6


def test_outputs_tuples_add_noise_and_begin_index_match_diffusers():
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "HeunDiscreteScheduler",
                 "LMSDiscreteScheduler", "UniPCMultistepScheduler"):
        ref, ours = make_pair(name, {}, "eps")
        for s in (ref, ours):
            s.set_timesteps(10)
        t = ref.timesteps[[1, 4]]
        assert rel_l2(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) <= 1e-6
        # img2img: start at timesteps[4]
        for s in (ref, ours):
            s.set_begin_index(4)
        xs = []
        for s in (ref, ours):
            x = s.add_noise(x0, noise, s.timesteps[4:5])
            for tt in s.timesteps[4:]:
                x = s.step(smooth_model(s.scale_model_input(x, tt), tt), tt, x).prev_sample
            xs.append(x)
        assert rel_l2(xs[1], xs[0]) <= 1e-5, name
    ref, ours = make_pair("DDPMScheduler", {}, "eps")
    t = torch.tensor([10, 500, 999])
    x3 = torch.randn(3, 2, 5)
    assert rel_l2(ours.add_noise(x3, x3.flip(0), t), ref.add_noise(x3, x3.flip(0), t)) <= 1e-6
    ddim, dpm = FD.DDIMScheduler(), FD.DPMSolverMultistepScheduler()
    for s in (ddim, dpm):
        s.set_timesteps(4)
    x = torch.randn(SHAPE)
    out = ddim.step(smooth_model(x, ddim.timesteps[0]), ddim.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == SHAPE
    out = dpm.step(smooth_model(x, dpm.timesteps[0]), dpm.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert dpm.step_index == 1 and FD.DDIMScheduler().config.num_train_timesteps == 1000


@pytest.mark.parametrize("name, kw", [
    ("EulerDiscreteScheduler", {"sigmas": [14.6, 6.0, 2.5, 1.1, 0.4, 0.1, 0.0]}),
    ("EulerDiscreteScheduler", {"timesteps": [999, 700, 420, 200, 50]}),
    ("DDPMScheduler", {"timesteps": [999, 700, 420, 200, 50, 0]}),
    ("DPMSolverMultistepScheduler", {"timesteps": [999, 800, 600, 420, 300, 200, 100, 10]}),
    ("HeunDiscreteScheduler", {"timesteps": [999, 700, 420, 200, 50]}),
])
def test_custom_timesteps_and_sigmas_match_diffusers(name, kw):
    ref, ours = make_pair(name, {}, "eps")
    out = []
    for s in (ref, ours):
        s.set_timesteps(**kw)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
        g = torch.Generator().manual_seed(2)
        extra = {"generator": g} if "generator" in inspect.signature(s.step).parameters else {}
        first_order = []
        for t in s.timesteps:
            first_order.append(getattr(s, "state_in_first_order", None))
            x = s.step(smooth_model(s.scale_model_input(x, t), t), t, x, **extra).prev_sample
        out.append((x, first_order))
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert out[0][1] == out[1][1]
    assert rel_l2(out[1][0], out[0][0]) <= 1e-5


# ---------------------------------------------------------------------------------------------
# diffusers pipelines with fastdiff's schedulers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    return unet.eval()


@pytest.mark.parametrize("pipeline, scheduler, call_kw", [
    ("DDIMPipeline", "DDIMScheduler", {"eta": 0.0}),
    ("DDIMPipeline", "DDIMScheduler", {"eta": 1.0}),
    ("DDPMPipeline", "DDPMScheduler", {}),
])
def test_diffusers_pipeline_runs_with_fastdiff_scheduler(tiny_unet, pipeline, scheduler, call_kw):
    import diffusers

    pipe = getattr(diffusers, pipeline)(unet=tiny_unet, scheduler=getattr(diffusers, scheduler)())
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5,
                    output_type="np", **call_kw).images

    with torch.no_grad():
        ref = draw()
        pipe.scheduler = getattr(FD, scheduler).from_config(pipe.scheduler.config)
        assert isinstance(pipe.scheduler, getattr(FD, scheduler))
        out = draw()
    assert out.shape == ref.shape == (2, 8, 8, 3)
    assert np.abs(out - ref).max() <= 1e-5
    assert np.abs(ref).max() > 0


def test_imports_and_runs_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import torch\n"
        "import fastdiff.compat.diffusers as F\n"
        "assert not F.HAVE_DIFFUSERS\n"
        "s = F.DPMSolverMultistepScheduler.from_config({'_class_name': 'X', "
        "'prediction_type': 'v_prediction', 'unknown_key': 1})\n"
        "assert s.config.prediction_type == 'v_prediction' and s.config.num_train_timesteps == 1000\n"
        "s.set_timesteps(6)\n"
        "x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))\n"
        "for t in s.timesteps:\n"
        "    x = s.step(torch.tanh(0.7 * x) * (0.5 + float(t) / 2000) + 0.05 * x, t, x).prev_sample\n"
        "print(repr(x.double().flatten().tolist()))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.tensor(eval(res.stdout.strip().splitlines()[-1]), dtype=torch.float64)
    ref, _ = make_pair("DPMSolverMultistepScheduler", {}, "v")
    assert rel_l2(got, run_scheduler(ref, 6).double().flatten()) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_bad_input_raises():
    ddim = FD.DDIMScheduler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(x, 999, x)
    ddim.set_timesteps(5)
    with pytest.raises(ValueError, match="one timestep per sample"):
        ddim.step(x, ddim.timesteps[:3], x)
    with pytest.raises(ValueError, match="model_output"):
        ddim.step(x[:1], ddim.timesteps[0], x)
    heun = FD.HeunDiscreteScheduler()
    heun.set_timesteps(4)
    with pytest.raises(ValueError, match="one timestep per call"):
        heun.step(x, heun.timesteps[:2], x)
    euler = FD.EulerDiscreteScheduler()
    euler.set_timesteps(4)
    with pytest.raises(ValueError, match="integer"):
        euler.step(x, 3, x)
    with pytest.raises(ValueError, match="timesteps"):
        euler.step(x, torch.tensor([euler.timesteps[0], 3.5]), x)
    # options that are not a table row say why
    for make, word in ((lambda: FD.DDPMScheduler(variance_type="learned"), "square root"),
                       (lambda: FD.UniPCMultistepScheduler(solver_p=FD.DDIMScheduler()), "predictor")):
        with pytest.raises(NotImplementedError, match=word):
            make()
    flow = FD.FlowMatchEulerDiscreteScheduler()
    flow.set_timesteps(4)
    with pytest.raises(NotImplementedError, match="per token"):
        flow.step(x, flow.timesteps[0], x, per_token_timesteps=torch.ones(2, 16))
    # eps prediction has no x0 at abar = 0: a clear error where diffusers returns NaN
    zsnr = FD.DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    zsnr.set_timesteps(4)
    with pytest.raises(ValueError, match="non-finite"):
        zsnr.step(x, zsnr.timesteps[0], x)
    # issue 12: more inference steps than training steps, named
    for cls in (FD.DDIMScheduler, FD.DDPMScheduler, FD.DPMSolverMultistepScheduler, FD.UniPCMultistepScheduler,
                FD.DEISMultistepScheduler, FD.DPMSolverSinglestepScheduler, FD.PNDMScheduler):
        with pytest.raises(ValueError, match="num_inference_steps"):
            cls(num_train_timesteps=10).set_timesteps(11)
    with pytest.raises(ValueError, match="x must be a tensor"):
        K.sample_euler(lambda x, s: x, [1.0], torch.tensor([1.0, 0.0]))


# ---------------------------------------------------------------------------------------------
# k-diffusion's other samplers, against their loops (k-diffusion 0.1.1), float64
# ---------------------------------------------------------------------------------------------


def kd_ancestral(s, sn, eta):
    if not eta:
        return sn, 0.0
    up = min(sn, eta * (sn ** 2 * (s ** 2 - sn ** 2) / s ** 2) ** 0.5)
    return (sn ** 2 - up ** 2) ** 0.5, up


def kd_dpm_2_ancestral_reference(model, x, sigmas, noise, eta=1.0, s_noise=1.0):
    s_in, k = x.new_ones([x.shape[0]]), 0
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - model(x, s * s_in)) / s
        sd, su = kd_ancestral(s, sn, eta)
        if sd == 0:
            x = x + d * (sd - s)
            continue
        mid = float(np.exp(np.log(s) + 0.5 * (np.log(sd) - np.log(s))))
        x2 = x + d * (mid - s)
        d2 = (x2 - model(x2, mid * s_in)) / mid
        x = x + d2 * (sd - s) + noise[k] * s_noise * su
        k += 1
    return x


def kd_dpm_fast_reference(model, x, sigma_min, sigma_max, n, noise, eta=0.0, s_noise=1.0):
    """k-diffusion's DPMSolver.dpm_solver_fast in t = -log sigma (float64 from the float32 grid)."""
    s_in = x.new_ones([x.shape[0]])
    sig = lambda t: float(np.exp(-t))
    eps = lambda x_, t: (x_ - model(x_, sig(t) * s_in)) / sig(t)
    m = n // 3 + 1
    # k-diffusion's grid is float32 (linspace in t, then exp); the steps in between are float64 here
    grid = (-torch.linspace(-float(np.log(sigma_max)), -float(np.log(sigma_min)), m + 1)).exp().double()
    ts = (-grid.log()).tolist()
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        su = 0.0
        if eta:
            sd, _ = kd_ancestral(sig(t), sig(t_next), eta)
            t_next_ = min(ts[-1], -float(np.log(sd)))
            su = (sig(t_next) ** 2 - sig(t_next_) ** 2) ** 0.5
            t_next = t_next_
        h = t_next - t
        e0 = eps(x, t)
        if order == 1:
            x = x - sig(t_next) * np.expm1(h) * e0
        elif order == 2:
            s1 = t + h / 2
            u1 = x - sig(s1) * np.expm1(h / 2) * e0
            e1 = eps(u1, s1)
            x = x - sig(t_next) * np.expm1(h) * e0 - sig(t_next) / (2 * 0.5) * np.expm1(h) * (e1 - e0)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = t + r1 * h, t + r2 * h
            u1 = x - sig(s1) * np.expm1(r1 * h) * e0
            e1 = eps(u1, s1)
            c2 = sig(s2) * (r2 / r1) * (np.expm1(r2 * h) / (r2 * h) - 1)
            u2 = x - sig(s2) * np.expm1(r2 * h) * e0 - c2 * (e1 - e0)
            e2 = eps(u2, s2)
            x = x - sig(t_next) * np.expm1(h) * e0 - sig(t_next) / r2 * (np.expm1(h) / h - 1) * (e2 - e0)
        x = x + su * s_noise * noise[i]
    return x


def kd_dpmpp_sde_reference(model, x, sigmas, noise, eta=1.0, s_noise=1.0, r=0.5):
    s_in, k = x.new_ones([x.shape[0]]), 0
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        den = model(x, s * s_in)
        if sn == 0:
            x = den
            continue
        t, tn = -np.log(s), -np.log(sn)
        h = tn - t
        sd, su = kd_ancestral(s, float(np.exp(-(t + h * r))), eta)
        x2 = (sd / s) * x - np.expm1(t + np.log(sd)) * den + noise[k] * s_noise * su
        den2 = model(x2, float(np.exp(-(t + h * r))) * s_in)
        sd, su = kd_ancestral(s, sn, eta)
        fac = 1 / (2 * r)
        x = (sd / s) * x - np.expm1(t + np.log(sd)) * ((1 - fac) * den + fac * den2) + noise[k + 1] * s_noise * su
        k += 2
    return x


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_k_diffusion_dpm_2_ancestral_and_dpmpp_sde(kd, eta):
    meta, t = kd
    D, sigmas, x = mixture_denoiser(meta), t["sigmas"].double(), t["x_T"].double()
    noise = torch.randn((2 * len(sigmas), *x.shape), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ns = StoredNoise(noise)
    out = K.sample_dpm_2_ancestral(D, x, sigmas, eta=eta, s_noise=1.01, noise_sampler=ns)
    assert rel_l2(out, kd_dpm_2_ancestral_reference(D, x, sigmas, noise, eta, 1.01)) <= 1e-12
    assert len(ns.calls) == len(sigmas) - 2  # once per step, not into sigma 0
    for r in (0.5, 0.3):
        ns = StoredNoise(noise)
        out = K.sample_dpmpp_sde(D, x, sigmas, eta=eta, noise_sampler=ns, r=r)
        assert rel_l2(out, kd_dpmpp_sde_reference(D, x, sigmas, noise, eta, r=r)) <= 1e-12
        assert len(ns.calls) == 2 * (len(sigmas) - 2)  # twice per step into sigma > 0


@pytest.mark.parametrize("n, eta", [(10, 0.0), (9, 0.0), (8, 0.0), (7, 0.5)])
def test_k_diffusion_dpm_fast(kd, n, eta):
    meta, t = kd
    D, x = mixture_denoiser(meta), t["x_T"].double()
    noise = torch.randn((n, *x.shape), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    seen = []
    out = K.sample_dpm_fast(D, x, 0.05, 80.0, n, eta=eta, noise_sampler=StoredNoise(noise), callback=seen.append)
    ref = kd_dpm_fast_reference(D, x, 0.05, 80.0, n, noise, eta)
    assert rel_l2(out, ref) <= 1e-10
    assert {"t", "t_up", "sigma", "sigma_hat", "x", "denoised", "i"} <= set(seen[0])


# ---------------------------------------------------------------------------------------------
# diffusers behaviours the drop-ins follow
# ---------------------------------------------------------------------------------------------

ZSNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "LCMScheduler", "TCDScheduler",
                                  "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_zero_terminal_snr_matches_diffusers(name):
    # DDPM, DDIM, LCM and TCD keep abar = 0 (their first row starts at sigma = inf, in alpha form); the others
    # clamp it to 2^-24 as diffusers does
    ref, ours = make_pair(name, ZSNR, "v")
    a, b = run_scheduler(ref, 6), run_scheduler(ours, 6)
    assert torch.isfinite(b).all() and rel_l2(b, a) <= 1e-5


def test_second_outputs_match_diffusers():
    for name, key in (("LCMScheduler", "denoised"), ("TCDScheduler", "pred_noised_sample"),
                      ("KDPM2DiscreteScheduler", "pred_original_sample"),
                      ("EDMEulerScheduler", "pred_original_sample"), ("DDIMScheduler", "pred_original_sample")):
        ref, ours = make_pair(name, {}, "v" if name != "EDMEulerScheduler" else "eps")
        outs = []
        for s in (ref, ours):
            s.set_timesteps(6)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * float(s.init_noise_sigma)
            t = s.timesteps[0]
            takes_generator = "generator" in inspect.signature(s.step).parameters
            kw = {"generator": torch.Generator().manual_seed(1)} if takes_generator else {}
            o = s.step(smooth_model(s.scale_model_input(x, t), t), t, x, **kw)
            outs.append(getattr(o, key))
        assert rel_l2(outs[1], outs[0]) <= 1e-6, name


def test_stored_first_stage_state_and_arbitrary_timesteps_follow_diffusers():
    # Heun / KDPM2: diffusers builds a step's end on the state stored at its first stage, not on the sample
    # passed to the second (pipelines that rescale or inpaint between the two calls rely on it)
    for name in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
        ref, ours = make_pair(name, {}, None if name.startswith("Flow") else "eps")
        outs = []
        for s in (ref, ours):
            s.set_timesteps(4)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
            for k, t in enumerate(s.timesteps):
                x = s.step(smooth_model(x, t), t, x * (0.5 if k % 2 else 1.0)).prev_sample
            outs.append(x)
        assert rel_l2(outs[1], outs[0]) <= 1e-5, name
    # DDIM at a timestep outside its schedule, and Euler before set_timesteps
    for name, t in (("DDIMScheduler", 1), ("DDIMScheduler", 37), ("EulerDiscreteScheduler", None)):
        ref, ours = make_pair(name, {"clip_sample": False} if name == "DDIMScheduler" else {}, "eps")
        outs = []
        for s in (ref, ours):
            if name == "DDIMScheduler":
                s.set_timesteps(10)
            tt = torch.tensor(t) if t is not None else s.timesteps[3]
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
            outs.append(s.step(smooth_model(x, tt), tt, x).prev_sample)
        assert rel_l2(outs[1], outs[0]) <= 1e-6, name


def test_pndm_history_is_diffusers_ets():
    # diffusers' tests assign past outputs to `ets` and step PRK then PLMS from them
    ref, ours = make_pair("PNDMScheduler", {}, "eps")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    res = 0.1 * x
    outs = []
    for s in (ref, ours):
        s.set_timesteps(10)
        s.ets = [res + 0.2, res + 0.15, res + 0.1, res + 0.05]
        a = s.step_prk(res, 1, x).prev_sample
        b = s.step_plms(res, 1, x).prev_sample
        outs.append((a, b, len(s.ets)))
    assert rel_l2(outs[1][0], outs[0][0]) <= 1e-6 and rel_l2(outs[1][1], outs[0][1]) <= 1e-6


@pytest.mark.parametrize("spacing", ["use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"])
def test_singlestep_spacings_take_the_ends_a_switched_config_carries(spacing):
    """A pipeline switching from UniPC keeps UniPC's sigma_min / sigma_max in the config (not parameters of the
    singlestep solver); diffusers' singlestep spacings read them, and so must the drop-in."""
    import diffusers

    cfg = diffusers.UniPCMultistepScheduler(sigma_min=0.3, sigma_max=5.0, **{spacing: True}).config
    ref = diffusers.DPMSolverSinglestepScheduler.from_config(cfg)
    ours = FD.DPMSolverSinglestepScheduler.from_config(cfg)
    a, b = run_scheduler(ref, 8), run_scheduler(ours, 8)
    assert float(ours.sigmas[0]) == pytest.approx(5.0)
    assert torch.equal(ref.timesteps, ours.timesteps) and torch.equal(ref.sigmas, ours.sigmas)
    assert rel_l2(b, a) <= 1e-5


def test_compatibles_and_config_switches_follow_diffusers():
    import diffusers

    for name in FD.__all__:
        cls = getattr(FD, name)
        if not name.endswith("Scheduler"):
            continue
        ours = {c.__name__ for c in cls().compatibles}
        theirs = {c.__name__ for c in getattr(diffusers, name)().compatibles}
        assert ours == theirs, name
        assert all(c.__module__.startswith("fastdiff") for c in cls().compatibles if hasattr(FD, c.__name__))
    # a pipeline switching schedulers passes options through diffusers' remapping
    chain = ["DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
             "DPMSolverMultistepScheduler", "DDIMScheduler"]
    ref = ours = None
    for name in chain:
        ref = getattr(diffusers, name)() if ref is None else getattr(diffusers, name).from_config(ref.config)
        ours = getattr(FD, name)() if ours is None else getattr(FD, name).from_config(ours.config)
        public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
        assert public(ours.config) == public(ref.config), name


@pytest.mark.parametrize("name", ["PNDMScheduler", "DDIMScheduler", "LCMScheduler", "TCDScheduler",
                                  "DPMSolverSinglestepScheduler"])
def test_step_before_set_timesteps_is_a_clear_error(name):
    """Schedulers whose rows need the inference schedule say so (diffusers' PNDM ends in a TypeError)."""
    scheduler = getattr(FD, name)()
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 10, x)
