"""fastdiff.sample: seeds, chunking, the static-buffer step (the CUDA graph's body), dtype policy, errors."""

import numpy as np
import pytest
import torch
from conftest import rel_l2

import fastdiff
from fastdiff import engine, model_cache, policy
from fastdiff.denoiser import Denoiser
from fastdiff.models import ADMUNet
from fastdiff.samplers import build_table, make_generators, randn_per_sample, sample_loop, to_device
from fastdiff.schedules import VPSchedule

NUM_CLASSES = 4  # labels 0..3, null label 4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> ADMUNet:
    torch.manual_seed(seed)
    m = ADMUNet(image_size=8, in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
                attention_resolutions=(2,), channel_mult=(1, 2), num_classes=NUM_CLASSES + 1,
                num_head_channels=32, use_scale_shift_norm=True)
    with torch.no_grad():  # the output conv starts at zero upstream; a random one gives a non-trivial eps
        for p in m.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    return m.eval()


def tiny_denoiser(seed: int = 0) -> Denoiser:
    den = Denoiser(tiny_model(seed), VPSchedule("linear", 1000))
    den.y_null = NUM_CLASSES
    return den


def manual(den, n, sampler, steps, seeds, y, w, options=None):
    """The plain loop written out: per-sample generators, start at sqrt(1 + sigma_max^2) * randn, the
    sampler's default spacing."""
    sig, ts = den.schedule.sigmas(steps, spacing=engine.default_spacing(sampler, den.schedule))
    tab = to_device(build_table(sampler, sig, timesteps=ts, **(options or {})), den, "cpu")
    gens = make_generators(seeds)
    x = randn_per_sample(gens, (1, 8, 8)) * float(np.sqrt(1 + sig[0] ** 2))
    with torch.no_grad():
        return sample_loop(den, x, tab, y=y, y_null=NUM_CLASSES, guidance_scale=w, generators=gens)


SAMPLER_CASES = [
    ("dpmpp_2m", {}),  # multistep, deterministic
    ("euler_ancestral", {}),  # noise every row
    ("heun", {}),  # two rows per step
    ("dpmpp_3m_sde", {}),  # noise + a 2-deep history ring
    ("ddim", {"eta": 0.5}),
]


@pytest.mark.parametrize("sampler,options", SAMPLER_CASES, ids=[c[0] for c in SAMPLER_CASES])
@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["unguided", "cfg3"])
def test_sample_matches_plain_loop_bitwise(sampler, options, guidance):
    den = tiny_denoiser()
    y = torch.tensor([0, 1, 2, 3, 1])
    seeds = [11, 12, 13, 14, 15]
    ref = manual(den, 5, sampler, 4, seeds, y, guidance, options)
    out = fastdiff.sample(den, (5, 1, 8, 8), sampler=sampler, steps=4, guidance_scale=guidance, y=y,
                          seeds=seeds, dtype=torch.float32, progress=False, sampler_options=options)
    assert out.dtype == torch.float32 and out.shape == (5, 1, 8, 8)
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("sampler,options", SAMPLER_CASES, ids=[c[0] for c in SAMPLER_CASES])
@pytest.mark.parametrize("pad_to", [None, 8], ids=["exact", "padded-bucket"])
def test_static_step_equals_plain_loop(sampler, options, pad_to):
    """The CUDA graph's body (static buffers, row index on the device) run eagerly gives the loop's bits,
    also when the batch is padded to a bucket (padding samples do not touch the real ones)."""
    den = tiny_denoiser()
    sig, ts = den.schedule.sigmas(4)
    tab = to_device(build_table(sampler, sig, timesteps=ts, **options), den, "cpu")
    y = torch.tensor([3, 0, 2])
    x0 = randn_per_sample(make_generators([1, 2, 3]), (1, 8, 8)) * 10
    with torch.no_grad():
        ref = sample_loop(den, x0.clone(), tab, y=y, y_null=NUM_CLASSES, guidance_scale=2.5,
                          generators=make_generators([1, 2, 3]))
        out = engine.run_static(den, tab, x0.clone(), y, make_generators([1, 2, 3]), y_null=NUM_CLASSES,
                                guidance_scale=2.5, pad_to=pad_to)
    if pad_to is None:
        assert torch.equal(out, ref)
    else:  # a different batch size may change a matmul's rounding, nothing more
        assert rel_l2(out, ref) < 1e-5


@pytest.mark.parametrize("batch_size", [1, 2, 3, 32], ids=["b1", "b2", "b3-uneven", "b32-whole"])
def test_chunking_and_batch_independence(batch_size):
    den = tiny_denoiser()
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    full = fastdiff.sample(den, (7, 1, 8, 8), sampler="euler_ancestral", steps=3, guidance_scale=2.0, y=y,
                           seeds=100, dtype=torch.float32, progress=False, batch_size=7)
    chunked = fastdiff.sample(den, (7, 1, 8, 8), sampler="euler_ancestral", steps=3, guidance_scale=2.0, y=y,
                              seeds=100, dtype=torch.float32, progress=False, batch_size=batch_size)
    assert rel_l2(chunked, full) < 1e-5
    # sample 4 alone (seed 104, label 0) is sample 4 of the batch
    alone = fastdiff.sample(den, (1, 1, 8, 8), sampler="euler_ancestral", steps=3, guidance_scale=2.0, y=[0],
                            seeds=[104], dtype=torch.float32, progress=False)
    assert rel_l2(alone[0], full[4]) < 1e-5
    # and different seeds give different samples
    assert rel_l2(full[0], full[4]) > 1e-2


def test_seed_forms():
    assert engine.resolve_seeds(7, 3) == [7, 8, 9]
    assert engine.resolve_seeds(torch.tensor([4, 2]), 2) == [4, 2]
    assert engine.resolve_seeds(np.array([5, 6]), 2) == [5, 6]
    assert engine.resolve_seeds(2**63 - 3, 3) == [2**63 - 3, 2**63 - 2, 2**63 - 1]
    # None: fresh seeds from torch's global generator (repeatable under torch.manual_seed), in [0, 2^63)
    torch.manual_seed(123)
    fresh = engine.resolve_seeds(None, 4)
    torch.manual_seed(123)
    assert engine.resolve_seeds(None, 4) == fresh
    assert len(set(fresh)) == 4 and all(0 <= s < 2**63 for s in fresh)
    assert engine.resolve_seeds(None, 4) != fresh
    with pytest.raises(ValueError, match="one seed per sample"):
        engine.resolve_seeds([1, 2], 3)
    with pytest.raises(ValueError, match="integers"):
        engine.resolve_seeds([1.5], 1)
    for bad in ([-1], [2**63]):  # the helper every path draws noise through refuses them too
        with pytest.raises(ValueError, match=r"2\*\*63"):
            make_generators(bad)
    for bad in ([-1], [2**63], 2**63 - 2):
        with pytest.raises(ValueError, match=r"seeds .*2\*\*63"):
            engine.resolve_seeds(bad, 1 if isinstance(bad, list) else 3)


@pytest.mark.parametrize("n,bucket", [(1, 1), (3, 4), (8, 8), (33, 64), (65, 128), (130, 192)])
def test_batch_bucket(n, bucket):
    assert engine.batch_bucket(n) == bucket


def test_dtype_policy():
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    assert engine.cpu_has_native_bf16() == native or "AMX" in torch.backends.cpu.get_cpu_capability()
    assert engine.default_dtype("cpu") == (torch.bfloat16 if engine.cpu_has_native_bf16() else torch.float32)


def test_bf16_close_to_fp32():
    y = torch.tensor([0, 1, 2, 3])
    ref = fastdiff.sample(tiny_denoiser(), (4, 1, 8, 8), steps=4, guidance_scale=2.0, y=y, seeds=0,
                          dtype="float32", progress=False)
    den = tiny_denoiser()
    out = fastdiff.sample(den, (4, 1, 8, 8), steps=4, guidance_scale=2.0, y=y, seeds=0, dtype=torch.bfloat16,
                          progress=False)
    assert out.dtype == torch.float32  # the state stays float32
    assert next(den.model.parameters()).dtype == torch.float32  # the caller's model is left as it was
    run = model_cache.run_copy(den.model, "cpu", torch.bfloat16)  # the model ran as a cached bf16 copy
    assert run is not den.model and next(run.parameters()).dtype == torch.bfloat16
    assert run is model_cache.run_copy(den.model, "cpu", torch.bfloat16)
    assert rel_l2(out, ref) < 5e-2


@pytest.mark.parametrize("min_params, expect_nhwc", [(10_000_000, False), (1, True)],
                         ids=["small-model-nchw", "large-model-nhwc"])
def test_cpu_channels_last_policy(monkeypatch, min_params, expect_nhwc):
    """bf16 on the CPU: NHWC only for conv models of at least CPU_CHANNELS_LAST_MIN_PARAMS parameters."""
    monkeypatch.setattr(policy, "CPU_CHANNELS_LAST_MIN_PARAMS", min_params)
    den = tiny_denoiser()
    fastdiff.sample(den, (2, 1, 8, 8), steps=2, y=0, dtype=torch.bfloat16, device="cpu", progress=False)

    def conv3x3(model):
        return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
                    and m.in_channels > 1)

    assert conv3x3(den.model).weight.is_contiguous()  # the caller's model keeps its layout
    run = model_cache.run_copy(den.model, "cpu", torch.bfloat16, channels_last=expect_nhwc)  # the cached copy
    assert run is model_cache.run_copy(den.model, "cpu", torch.bfloat16, channels_last=expect_nhwc)
    assert conv3x3(run).weight.is_contiguous(memory_format=torch.channels_last) == expect_nhwc
    assert conv3x3(run).weight.is_contiguous() != expect_nhwc


def test_bare_module_and_progress(capsys):
    model = tiny_model()
    out = fastdiff.sample(model, (2, 1, 8, 8), steps=2, y=[1, 2], seeds=3, dtype=torch.float32, progress=True)
    den = Denoiser(tiny_model(), VPSchedule("linear", 1000))
    ref = fastdiff.sample(den, (2, 1, 8, 8), steps=2, y=[1, 2], seeds=3, dtype=torch.float32, progress=False)
    assert torch.equal(out, ref)


def test_compile_option_traces_the_model():
    den = tiny_denoiser()
    ref = fastdiff.sample(den, (2, 1, 8, 8), steps=2, y=[1, 2], seeds=0, dtype=torch.float32, progress=False)
    # the "eager" backend runs dynamo's tracing without inductor's C++ build (seconds, not minutes)
    out = fastdiff.sample(den, (2, 1, 8, 8), steps=2, y=[1, 2], seeds=0, dtype=torch.float32, progress=False,
                          compile={"backend": "eager"})
    assert rel_l2(out, ref) < 1e-6


def test_empty_batch():
    out = fastdiff.sample(tiny_denoiser(), (0, 1, 8, 8), steps=2, y=torch.zeros(0, dtype=torch.long),
                          dtype=torch.float32, progress=False)
    assert out.shape == (0, 1, 8, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="nope"), "sampler must be one of"),
    (dict(shape=(2,)), "shape must be"),
    (dict(seeds=[1]), "one seed per sample"),
    (dict(runtime="tensorrt"), "runtime must be"),
    (dict(cuda_graph=True), "cuda_graph=True needs a CUDA device"),
    (dict(batch_size=0), "batch_size"),
    (dict(y=[0.5, 1.5]), "integer class labels"),
    (dict(y=[1, 2, 3]), "y must be an int or have shape"),
    (dict(dtype="float8"), "dtype must be"),
    (dict(guidance_scale=2.0, y_null=None, denoiser="plain"), "y_null"),
], ids=["sampler", "shape", "seeds", "runtime", "cuda-graph-on-cpu", "batch-size", "float-labels",
        "label-count", "dtype", "guidance-without-null"])
def test_bad_input(kwargs, match):
    kwargs = dict(kwargs)
    den = tiny_denoiser()
    if kwargs.pop("denoiser", None) == "plain":
        den = Denoiser(tiny_model(), VPSchedule("linear", 1000))
    shape = kwargs.pop("shape", (2, 1, 8, 8))
    kwargs.setdefault("y", [0, 1])
    with pytest.raises(ValueError, match=match):
        fastdiff.sample(den, shape, steps=2, progress=False, **kwargs)


def test_onnxruntime_runtime_delegates(monkeypatch):
    """runtime="onnxruntime" hands the resolved call to fastdiff.export.ort.sample_onnxruntime."""
    import importlib

    ort = importlib.import_module("fastdiff.export.ort")

    seen = {}

    def fake(den, shape, **kw):
        seen.update(kw, den=den, shape=shape)
        return torch.zeros(shape)

    monkeypatch.setattr(ort, "sample_onnxruntime", fake)
    den = tiny_denoiser()
    out = fastdiff.sample(den, (3, 1, 8, 8), sampler="euler", steps=5, guidance_scale=2.0, y=1, seeds=9,
                          runtime="onnxruntime", progress=False)
    assert out.shape == (3, 1, 8, 8)
    assert seen["den"] is den and seen["sampler"] == "euler" and seen["steps"] == 5
    assert seen["seeds"] == [9, 10, 11] and seen["y_null"] == NUM_CLASSES and seen["guidance_scale"] == 2.0


def test_graph_path_logic_on_cpu(cpu_graphs):
    """The CUDA-graph driver (_run_graph: one capture per batch bucket, reload of the static buffers after
    capture, noise copied in per row, padded chunks) gives the plain loop's samples."""
    den = tiny_denoiser()
    sig, ts = den.schedule.sigmas(3)
    tab = to_device(build_table("euler_ancestral", sig, timesteps=ts), den, "cpu")
    runners = {}
    outs, refs = [], []
    for seeds, labels in [([1, 2, 3], [0, 1, 2]), ([4, 5, 6], [3, 0, 1]), ([7], [2])]:  # buckets 4, 4, 1
        y = torch.tensor(labels)
        with torch.no_grad():
            x = randn_per_sample(make_generators(seeds), (1, 8, 8)) * 10
            noise = engine.NoiseStager(make_generators(seeds), (1, 8, 8), "cpu")
            outs.append(engine._run_graph(runners, ("key",), den, tab, x.clone(), y, noise, NUM_CLASSES, 2.0,
                                          None, None))
            refs.append(sample_loop(den, x.clone(), tab, y=y, y_null=NUM_CLASSES, guidance_scale=2.0,
                                    generators=make_generators(seeds)))
    assert cpu_graphs.captures == 2 and sorted(runners["graphs"]) == [("key", 1), ("key", 4)]
    for out, ref in zip(outs, refs, strict=True):
        assert out.shape == ref.shape
        assert rel_l2(out, ref) < 1e-5
