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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors: two intra-op threads only contend (a 5-step tiny-UNet pipeline took seconds instead of
    # 0.1 s on the shared 2-core CI machine).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
PT = {"eps": "epsilon", "v": "v_prediction"}
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
]


def smooth_model(x, t):
    tt = torch.as_tensor(t, dtype=torch.float64, device=x.device).reshape(-1, *[1] * (x.dim() - 1))
    return (torch.tanh(0.7 * x) * (0.5 + tt / 2000) + 0.05 * x).to(x.dtype)


def learned_range_model(x, t):
    return torch.cat([smooth_model(x, t), torch.tanh(0.3 * x + 0.1)], 1)


def run_scheduler(sched, steps, model=smooth_model, seed=0, generator_seed=3, per_sample_t=False, **step_kw):
    """A pipeline's loop: init noise, scale_model_input, model, step (seeded generator if taken)."""
    sched.set_timesteps(steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * sched.init_noise_sigma
    kw = dict(step_kw)
    if "generator" in inspect.signature(sched.step).parameters:
        kw["generator"] = torch.Generator().manual_seed(generator_seed)
    for t in sched.timesteps:
        m = model(sched.scale_model_input(x, t), t)
        tt = t.reshape(1).expand(SHAPE[0]) if per_sample_t else t
        x = sched.step(m, tt, x, **kw).prev_sample
    return x


def make_pair(name, cfg, pred):
    import diffusers

    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    ref = getattr(diffusers, name)(prediction_type=PT[pred], **cfg)
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
    with pytest.raises(ValueError, match="timesteps"):
        ddim.step(x, torch.tensor([ddim.timesteps[0], 3]), x)
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
    with pytest.raises(NotImplementedError, match="s_churn"):
        euler.step(x, euler.timesteps[0], x, s_churn=1.0)
    for make in (lambda: FD.DPMSolverMultistepScheduler(algorithm_type="dpmsolver"),
                 lambda: FD.DDPMScheduler(variance_type="learned"),
                 lambda: FD.UniPCMultistepScheduler(predict_x0=False),
                 lambda: FD.DDIMScheduler(rescale_betas_zero_snr=True)):
        with pytest.raises(NotImplementedError):
            make()
    with pytest.raises(ValueError, match="x must be a tensor"):
        K.sample_euler(lambda x, s: x, [1.0], torch.tensor([1.0, 0.0]))
