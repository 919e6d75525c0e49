"""The engine leaves the caller's objects alone and is ready for repeated calls.

- fd.sample / FeatureExtractor / to_onnx leave the model passed in bitwise unchanged (weights, dtype,
  device, strides, train/eval flags, requires_grad); the converted copy is cached, rebuilt after an in-place
  change of the weights, freed by fd.clear_cache() and with the model.
- The CUDA-graph path's caching (one capture per model, bucket, shape and settings) and the memory probe's
  cache, run on the CPU through stand-ins for the CUDA parts; the chunk size keeps bucket(chunk) within the
  budget; per-row noise through the stager equals the per-sample draws bitwise.
- seeds=None / return_seeds, the default spacing of each sampler (against diffusers' schedulers), the thread
  policy of a call.
- On CUDA (skipped without one): graph on and off agree, a second call does not capture again, CPU and
  graph path agree up to dtype rounding.
"""

import functools
import gc
import weakref

import numpy as np
import pytest
import torch
from conftest import rel_l2

import fastdiff
from fastdiff import engine, model_cache, policy, prepack
from fastdiff.denoiser import Denoiser
from fastdiff.features import FeatureExtractor
from fastdiff.models import ADMUNet
from fastdiff.samplers import make_generators, randn_per_sample
from fastdiff.schedules import VPSchedule
from fastdiff.static_step import NoiseStager, batch_bucket, bucket_floor

ROWS = 5  # labels 0..3, null label 4
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def fresh_cache(one_thread):
    fastdiff.clear_cache()
    yield
    fastdiff.clear_cache()


def tiny_model(seed: int = 0) -> ADMUNet:
    torch.manual_seed(seed)
    m = ADMUNet(image_size=8, in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
                attention_resolutions=(2,), channel_mult=(1, 2), num_classes=ROWS, num_head_channels=32,
                use_scale_shift_norm=True, dropout=0.1)
    with torch.no_grad():  # the output conv starts at zero upstream; a random one gives a non-trivial eps
        for p in m.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    return m.eval()


def tiny_denoiser(model=None) -> Denoiser:
    den = Denoiser(model if model is not None else tiny_model(), VPSchedule("linear", 1000))
    den.y_null = ROWS - 1
    return den


def snapshot(model: torch.nn.Module) -> dict:
    """Everything about the model the caller can see: tensors (values, objects, layout) and flags."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {"tensors": {k: (t, t.detach().clone(), t.dtype, t.device, t.stride(), t.requires_grad,
                            t.data_ptr()) for k, t in tensors.items()},
            "training": [(name, m.training) for name, m in model.named_modules()]}


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (obj, value, dtype, device, stride, grad, ptr) in before["tensors"].items():
        now = after["tensors"][name]
        assert now[0] is obj, name  # the same tensor object
        assert (now[2], now[3], now[4], now[5], now[6]) == (dtype, device, stride, grad, ptr), name
        assert torch.equal(now[1], value), name  # bitwise


def count_builds(monkeypatch) -> list:
    builds = []
    real = model_cache._build

    def counting(model, *args):
        builds.append(args)
        return real(model, *args)

    monkeypatch.setattr(model_cache, "_build", counting)
    return builds


# ---------------------------------------------------------------------------------------------
# The caller's model is never changed
# ---------------------------------------------------------------------------------------------

CONVERSIONS = [
    ("bf16", dict(dtype=torch.bfloat16), "train"),
    ("bf16-channels-last", dict(dtype=torch.bfloat16, channels_last=True), "eval"),
    ("fp32-train-mode", dict(dtype=torch.float32), "train"),
    ("fp32-nothing-to-convert", dict(dtype=torch.float32), "eval"),
]


@pytest.mark.parametrize("kwargs, mode", [c[1:] for c in CONVERSIONS], ids=[c[0] for c in CONVERSIONS])
def test_sample_leaves_the_model_bitwise_unchanged(kwargs, mode):
    model = tiny_model().train(mode == "train")
    model.out[2].weight.requires_grad_(False)  # a mixed requires_grad state must survive too
    before = snapshot(model)
    den = tiny_denoiser(model)
    out = fastdiff.sample(den, (2, 1, 8, 8), steps=2, y=[0, 1], seeds=0, progress=False, **kwargs)
    assert torch.isfinite(out).all()
    assert_unchanged(model, before)
    # in train mode the run copy is in eval mode (dropout off): the result equals the eval model's
    ref = fastdiff.sample(tiny_denoiser(tiny_model()), (2, 1, 8, 8), steps=2, y=[0, 1], seeds=0,
                          progress=False, **kwargs)
    assert torch.equal(out, ref)


def test_no_copy_when_nothing_needs_converting(monkeypatch):
    builds = count_builds(monkeypatch)
    den = tiny_denoiser()
    fastdiff.sample(den, (2, 1, 8, 8), steps=1, y=[0, 1], seeds=0, dtype=torch.float32, progress=False)
    assert builds == []
    assert model_cache.run_copy(den.model, "cpu", torch.float32) is den.model


def test_copy_is_reused_rebuilt_after_an_in_place_change_and_freed(monkeypatch):
    builds = count_builds(monkeypatch)
    den = tiny_denoiser()
    kw = dict(steps=2, y=[0, 1], seeds=5, dtype=torch.bfloat16, progress=False)
    first = fastdiff.sample(den, (2, 1, 8, 8), **kw)
    second = fastdiff.sample(den, (2, 1, 8, 8), **kw)
    assert len(builds) == 1 and torch.equal(first, second)  # the second call reused the copy
    copy_ref = weakref.ref(model_cache.run_copy(den.model, "cpu", torch.bfloat16))

    with torch.no_grad():  # the caller changes the weights in place
        for p in den.model.parameters():
            p.mul_(1.5)
    changed = fastdiff.sample(den, (2, 1, 8, 8), **kw)
    assert len(builds) == 2  # rebuilt, never stale
    fresh = tiny_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(1.5)
    assert torch.equal(changed, fastdiff.sample(tiny_denoiser(fresh), (2, 1, 8, 8), **kw))  # (a 3rd copy)
    assert not torch.equal(changed, first)
    gc.collect()
    assert copy_ref() is None  # the stale copy is gone

    with torch.no_grad():  # a swapped-in tensor (p.data = ...) is seen as well
        den.model.out[2].weight.data = den.model.out[2].weight.data * 0
    fastdiff.sample(den, (2, 1, 8, 8), **kw)
    assert len(builds) == 4

    copy_ref = weakref.ref(model_cache.run_copy(den.model, "cpu", torch.bfloat16))
    fastdiff.clear_cache()
    gc.collect()
    assert copy_ref() is None and len(model_cache._ENTRIES) == 0
    fastdiff.sample(den, (2, 1, 8, 8), **kw)
    assert len(builds) == 5


def test_copy_dies_with_the_model():
    model = tiny_model()
    copy_ref = weakref.ref(model_cache.run_copy(model, "cpu", torch.bfloat16))
    assert copy_ref() is not None
    del model
    gc.collect()
    assert copy_ref() is None and len(model_cache._ENTRIES) == 0


def test_eval_copy_shares_the_weights():
    """An eval-only copy costs the module objects, not the weights."""
    model = tiny_model().train()
    run = model_cache.run_copy(model, eval=True)
    assert run is not model and not any(m.training for m in run.modules()) and model.training
    ours = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert {k: v.data_ptr() for k, v in run.state_dict().items()} == ours


def test_feature_extractor_leaves_the_model_unchanged():
    model = tiny_model().train()
    before = snapshot(model)
    fx = FeatureExtractor(model, VPSchedule("linear", 1000), layers=["output_blocks.1"], timesteps=[50, 400],
                          y=1)
    images = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    feats = fx(images)
    assert_unchanged(model, before)
    ref = FeatureExtractor(tiny_model(), VPSchedule("linear", 1000), layers=["output_blocks.1"],
                           timesteps=[50, 400], y=1)(images)  # the eval-mode model gives the same features
    for t in (50, 400):
        assert torch.equal(feats["output_blocks.1"][t], ref["output_blocks.1"][t])


@pytest.mark.parametrize("export", ["to_onnx", "step_to_onnx", "features.to_onnx"])
def test_exports_leave_the_model_unchanged(tmp_path, export):
    pytest.importorskip("onnxscript")
    from fastdiff.export import step_to_onnx, to_onnx

    model = tiny_model().train()
    before = snapshot(model)
    path = tmp_path / "m.onnx"
    if export == "to_onnx":
        to_onnx(model, path, example_batch=2)
    elif export == "step_to_onnx":
        step_to_onnx(tiny_denoiser(model), "euler", path, example_batch=2)
    else:
        FeatureExtractor(model, VPSchedule("linear", 1000), layers=["input_blocks.1"], timesteps=[50],
                         y=1).to_onnx(path)
    assert path.exists()
    assert_unchanged(model, before)


def test_diffusers_unet_passed_to_sample_comes_back_unchanged():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    before = snapshot(unet)
    out = fastdiff.sample(unet, (2, 3, 8, 8), sampler="ddim", steps=2, seeds=0, dtype=torch.bfloat16,
                          progress=False)
    assert torch.isfinite(out).all()
    assert_unchanged(unet, before)
    assert unet.dtype == torch.float32 and unet.training


# ---------------------------------------------------------------------------------------------
# Repeated calls: graphs and probes cached (CUDA parts stood in for on the CPU)
# ---------------------------------------------------------------------------------------------


def test_graph_path_is_captured_once_across_calls(cpu_graphs, monkeypatch):
    den = tiny_denoiser()
    kw = dict(sampler="euler_ancestral", steps=3, guidance_scale=2.0, seeds=7, dtype=torch.float32,
              progress=False, device="cpu")
    y = [0, 1, 2, 3]
    plain = fastdiff.sample(den, (4, 1, 8, 8), y=y, cuda_graph=False, **kw)
    first = fastdiff.sample(den, (4, 1, 8, 8), y=y, cuda_graph=True, **kw)
    second = fastdiff.sample(den, (4, 1, 8, 8), y=[3, 2, 1, 0], cuda_graph=True, **kw)
    assert cpu_graphs.captures == 1  # the second call (new labels) replayed the first call's capture
    assert torch.equal(first, plain)  # bucket 4 = batch 4: the static step gives the loop's bits
    assert torch.equal(second, fastdiff.sample(den, (4, 1, 8, 8), y=[3, 2, 1, 0], cuda_graph=False, **kw))
    # a padded chunk (3 in bucket 4) reuses the same capture
    three = fastdiff.sample(den, (3, 1, 8, 8), y=y[:3], cuda_graph=True, **kw)
    assert cpu_graphs.captures == 1 and rel_l2(three, plain[:3]) < 1e-5
    # what the graph bakes in makes a new capture: the guidance weight, the table
    fastdiff.sample(den, (4, 1, 8, 8), y=y, cuda_graph=True, **(kw | {"guidance_scale": 3.0}))
    assert cpu_graphs.captures == 2
    fastdiff.sample(den, (4, 1, 8, 8), y=y, cuda_graph=True, **(kw | {"steps": 4}))
    assert cpu_graphs.captures == 3
    # an in-place change of the weights drops the model's graphs: captured again, with the new weights
    with torch.no_grad():
        den.model.out[2].weight.mul_(2.0)
    changed = fastdiff.sample(den, (4, 1, 8, 8), y=y, cuda_graph=True, **kw)
    assert cpu_graphs.captures == 4
    assert torch.equal(changed, fastdiff.sample(den, (4, 1, 8, 8), y=y, cuda_graph=False, **kw))
    assert not torch.equal(changed, first)
    fastdiff.clear_cache()
    fastdiff.sample(den, (4, 1, 8, 8), y=y, cuda_graph=True, **kw)
    assert cpu_graphs.captures == 5


def test_graph_cache_is_bounded(cpu_graphs):
    den = tiny_denoiser()
    for w in range(engine.MAX_GRAPHS_PER_MODEL + 2):
        fastdiff.sample(den, (1, 1, 8, 8), steps=1, y=[0], seeds=0, guidance_scale=1.5 + w, dtype=torch.float32,
                        progress=False, device="cpu", cuda_graph=True)
    caches = model_cache.prepare(den.model, "cpu", torch.float32, private=True).caches
    assert len(caches["graphs"]) == engine.MAX_GRAPHS_PER_MODEL


def test_memory_probe_is_cached_and_chunks_fit_their_bucket(monkeypatch, cpu_graphs):
    probes = []

    def fake_capacity(run, raw_model, sample_shape, device, memory_budget, **conditioning):
        probes.append((tuple(sample_shape), memory_budget, conditioning["has_y"], conditioning["guidance"]))
        return 100  # 100 samples fit the budget

    chunks = []
    real_run_graph = engine._run_graph

    def recording_run_graph(cache, key, run, dtab, x, *args, **kwargs):
        chunks.append(x.shape[0])
        return real_run_graph(cache, key, run, dtab, x, *args, **kwargs)

    monkeypatch.setattr(engine, "_probes_memory", lambda device: True)
    monkeypatch.setattr(engine, "_measure_capacity", fake_capacity)
    monkeypatch.setattr(engine, "_run_graph", recording_run_graph)
    den = tiny_denoiser()
    kw = dict(steps=1, seeds=0, dtype=torch.float32, progress=False, device="cpu", cuda_graph=True)
    fastdiff.sample(den, (130, 1, 8, 8), y=0, **kw)
    assert len(probes) == 1
    # the budget holds 100 samples; a chunk of 100 would be padded to bucket 128, so chunks are 64
    assert chunks == [64, 64, 2] and all(batch_bucket(c) <= 100 for c in chunks)
    fastdiff.sample(den, (130, 1, 8, 8), y=0, **kw)
    assert len(probes) == 1  # cached
    fastdiff.sample(den, (130, 1, 8, 8), y=0, memory_budget=1e9, **kw)
    assert len(probes) == 2  # another budget is another probe
    chunks.clear()
    fastdiff.sample(den, (130, 1, 8, 8), y=0, **(kw | {"cuda_graph": False}))  # no bucket without graphs
    assert len(probes) == 2 and chunks == []


def test_bucket_floor_is_the_largest_bucket_within_n():
    for n in range(1, 400):
        f = bucket_floor(n)
        assert f <= n and batch_bucket(f) == f, n
        assert all(batch_bucket(c) <= f for c in range(1, f + 1)), n  # chunks of <= f pad to <= f
        assert batch_bucket(f + 1) > n, n  # and no larger bucket fits n


def test_noise_stager_gives_the_per_sample_draws_bitwise():
    seeds = [3, 1, 4, 1, 5]
    ref_gens, gens = make_generators(seeds), make_generators(seeds)
    stager = NoiseStager(gens, (2, 5, 7), "cpu")
    for _ in range(3):
        assert torch.equal(stager.draw(), randn_per_sample(ref_gens, (2, 5, 7)))
        dst = torch.empty(5, 2, 5, 7)
        stager.draw_into(dst)
        assert torch.equal(dst, randn_per_sample(ref_gens, (2, 5, 7)))
    assert stager.draws == 6


# ---------------------------------------------------------------------------------------------
# Seeds, spacing, threads
# ---------------------------------------------------------------------------------------------


def test_fresh_seeds_are_returned_and_repeat_the_run():
    den = tiny_denoiser()
    kw = dict(sampler="euler_ancestral", steps=2, y=[0, 1, 2], dtype=torch.float32, progress=False)
    out, seeds = fastdiff.sample(den, (3, 1, 8, 8), seeds=None, return_seeds=True, **kw)
    assert len(seeds) == 3 and all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)
    assert torch.equal(out, fastdiff.sample(den, (3, 1, 8, 8), seeds=seeds, **kw))
    other = fastdiff.sample(den, (3, 1, 8, 8), seeds=None, **kw)
    assert not torch.equal(out, other)  # fresh seeds, fresh samples
    torch.manual_seed(11)
    a = fastdiff.sample(den, (3, 1, 8, 8), **kw)
    torch.manual_seed(11)
    assert torch.equal(a, fastdiff.sample(den, (3, 1, 8, 8), **kw))  # repeatable under torch.manual_seed
    _, same = fastdiff.sample(den, (3, 1, 8, 8), seeds=40, return_seeds=True, **kw)
    assert same == [40, 41, 42]


def _fresh_seed_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.manual_seed(rank)  # every rank's global generator differs: rank 0's seeds must win
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out, seeds = fastdiff.sample(tiny_denoiser(), (3, 1, 8, 8), sampler="euler_ancestral", steps=2,
                                     y=[0, 1, 2], dtype=torch.float32, batch_size=2, progress=False,
                                     return_seeds=True)
        torch.save((out, seeds), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_fresh_seeds_are_rank_0s_on_every_rank(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fresh_seed_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    (out0, seeds0), (out1, seeds1) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert seeds0 == seeds1 and torch.equal(out0, out1)
    alone = fastdiff.sample(tiny_denoiser(), (3, 1, 8, 8), sampler="euler_ancestral", steps=2, y=[0, 1, 2],
                            seeds=seeds0, dtype=torch.float32, batch_size=2, progress=False)
    assert torch.equal(out0, alone)


@pytest.mark.parametrize("sampler, scheduler", [("ddim", "DDIMScheduler"), ("ddpm", "DDPMScheduler"),
                                                ("unipc", "UniPCMultistepScheduler")])
@pytest.mark.parametrize("steps", [10, 25])
def test_default_spacing_follows_diffusers(sampler, scheduler, steps):
    diffusers = pytest.importorskip("diffusers")
    sched = getattr(diffusers, scheduler)(num_train_timesteps=1000, beta_schedule="linear")
    sched.set_timesteps(steps)
    schedule = VPSchedule("linear", 1000)
    sigmas, timesteps = engine._sampling_sigmas(Denoiser(torch.nn.Identity(), schedule), sampler, steps, None)
    np.testing.assert_array_equal(np.asarray(timesteps, dtype=np.int64), sched.timesteps.numpy())
    np.testing.assert_allclose(sigmas[:-1], schedule.timestep_to_sigma(sched.timesteps.numpy().astype(float)))
    assert sigmas[-1] == 0


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun", "euler_ancestral", "lms", "dpmpp_3m_sde"])
def test_default_spacing_is_karras_rho_7_elsewhere(sampler):
    from fastdiff.schedules import karras_sigmas

    schedule = VPSchedule("linear", 1000)
    sigmas, _ = engine._sampling_sigmas(Denoiser(torch.nn.Identity(), schedule), sampler, 12, None)
    np.testing.assert_allclose(sigmas, karras_sigmas(12, schedule.sigma_min, schedule.sigma_max, rho=7.0))


def test_call_runs_under_the_thread_policy_and_restores_torch(monkeypatch):
    seen = []
    den = tiny_denoiser()
    den.model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    torch.set_num_threads(1)
    fastdiff.sample(den, (1, 1, 8, 8), steps=1, y=0, seeds=0, dtype=torch.float32, progress=False, threads=2)
    assert set(seen) == {2} and torch.get_num_threads() == 1
    # a busy machine: the policy's one thread (as the CLI), whatever torch was set to
    seen.clear()
    torch.set_num_threads(2)
    monkeypatch.setattr(policy.os, "getloadavg", lambda: (1000.0, 1000.0, 1000.0))
    fastdiff.sample(den, (1, 1, 8, 8), steps=1, y=0, seeds=0, dtype=torch.float32, progress=False)
    assert set(seen) == {1} and torch.get_num_threads() == 2


def test_onnxruntime_takes_its_own_keywords(monkeypatch):
    import importlib

    ort = importlib.import_module("fastdiff.export.ort")
    seen = {}

    @functools.wraps(ort.sample_onnxruntime)  # its signature: what fastdiff.sample checks keywords against
    def fake(den, shape, **kw):
        seen.update(kw)
        return torch.zeros(shape)

    monkeypatch.setattr(ort, "sample_onnxruntime", fake)
    out, seeds = fastdiff.sample(tiny_denoiser(), (2, 1, 8, 8), sampler="ddim", steps=3, y=[0, 1], seeds=None,
                                 runtime="onnxruntime", providers=["CPUExecutionProvider"], frame="sigma",
                                 progress=False, return_seeds=True)
    assert out.shape == (2, 1, 8, 8) and seen["seeds"] == seeds
    # the spacing is left to sample_onnxruntime, which lays out the sampler's default as the torch runtime
    # does (tests/test_export_onnx.py checks the layout)
    assert seen["providers"] == ["CPUExecutionProvider"] and seen["spacing"] is None and seen["sigmas"] is None


# ---------------------------------------------------------------------------------------------
# CUDA (the GPU suite)
# ---------------------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@cuda_only
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_cuda_graph_on_and_off_agree(dtype, tol, sampler):
    from fastdiff.static_step import CudaGraphRunner

    model = tiny_model()
    before = snapshot(model)
    den = tiny_denoiser(model)
    kw = dict(sampler=sampler, steps=4, guidance_scale=2.0, y=[0, 1, 2, 3], seeds=3, dtype=dtype,
              progress=False, device="cuda")
    eager = fastdiff.sample(den, (4, 1, 8, 8), cuda_graph=False, **kw)
    captures = CudaGraphRunner.captures
    graph = fastdiff.sample(den, (4, 1, 8, 8), cuda_graph=True, **kw)
    assert CudaGraphRunner.captures == captures + 1
    again = fastdiff.sample(den, (4, 1, 8, 8), cuda_graph=True, **kw)
    assert CudaGraphRunner.captures == captures + 1  # the second call replays the cached graph
    assert torch.equal(graph, again)
    assert graph.device.type == "cuda" and torch.isfinite(graph).all()
    assert rel_l2(graph, eager) < tol
    padded = fastdiff.sample(den, (3, 1, 8, 8), cuda_graph=True, **(kw | {"y": [0, 1, 2]}))
    assert CudaGraphRunner.captures == captures + 1  # 3 samples run in bucket 4's graph
    assert rel_l2(padded, graph[:3]) < 10 * tol  # another batch size may change a matmul's rounding
    assert_unchanged(model, before)  # still float32, on the CPU


@cuda_only
def test_same_seeds_same_samples_on_cpu_and_through_the_graph():
    den = tiny_denoiser()
    kw = dict(sampler="euler_ancestral", steps=4, guidance_scale=2.0, y=[0, 1, 2, 3], seeds=[5, 6, 7, 8],
              progress=False)
    cpu = fastdiff.sample(den, (4, 1, 8, 8), device="cpu", dtype=torch.float32, **kw)
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 as on the CPU
    try:
        gpu32 = fastdiff.sample(den, (4, 1, 8, 8), device="cuda", dtype=torch.float32, cuda_graph=True, **kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    gpu16 = fastdiff.sample(den, (4, 1, 8, 8), device="cuda", dtype=torch.bfloat16, cuda_graph=True, **kw)
    assert rel_l2(gpu32.cpu(), cpu) < 1e-3
    assert rel_l2(gpu16.cpu(), cpu) < 5e-2


@cuda_only
def test_noise_stager_on_cuda_gives_the_cpu_draws():
    seeds = [9, 8, 7]
    stager = NoiseStager(make_generators(seeds), (4, 16, 16), "cuda")
    ref_gens = make_generators(seeds)
    dst = torch.empty(3, 4, 16, 16, device="cuda")
    for _ in range(5):  # more draws than pinned buffers: each is reused after its copy finished
        got = stager.draw()
        stager.draw_into(dst)
        assert torch.equal(got.cpu(), randn_per_sample(ref_gens, (4, 16, 16)))
        assert torch.equal(dst.cpu(), randn_per_sample(ref_gens, (4, 16, 16)))


@cuda_only
def test_cuda_chunks_fit_the_memory_budget():
    """A budget that holds a few samples: the chunk is a bucket size, so the padded graph batch fits."""
    den = tiny_denoiser()
    prep = model_cache.prepare(den.model, "cuda", torch.bfloat16, private=True)
    run = engine._run_denoiser(den, prep, torch.bfloat16, False, False)
    per = engine._measure_capacity(run, prep.model, (1, 8, 8), torch.device("cuda"), 1e9, has_y=True, y_null=ROWS - 1,
                                   guidance=2.0)
    budget = 1e9 * 5.5 / per  # about 5.5 samples' worth
    out = fastdiff.sample(den, (11, 1, 8, 8), steps=2, guidance_scale=2.0, y=0, seeds=0, device="cuda",
                          memory_budget=budget, progress=False)
    assert out.shape == (11, 1, 8, 8) and torch.isfinite(out).all()
    caches = model_cache.prepare(den.model, "cuda", torch.bfloat16, channels_last=True, private=True).caches
    assert all(key[-1] <= 5 for key in caches.get("graphs", {}))  # buckets of 4 (and 4, 2 + pad), never 8


def test_bf16_cpu_runs_pack_weights_on_the_run_copy_not_the_callers_model():
    den = tiny_denoiser()
    kw = dict(steps=2, y=[0, 1], seeds=3, dtype=torch.bfloat16, progress=False)
    first = fastdiff.sample(den, (2, 1, 8, 8), **kw)
    assert all("forward" not in m.__dict__ for m in den.model.modules())
    run = model_cache.run_copy(den.model, "cpu", torch.bfloat16)
    assert run is not den.model
    convs = [m for m in run.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(prepack.is_packed(m.weight) for m in convs)  # the copy shares the caller's weights
    assert torch.equal(fastdiff.sample(den, (2, 1, 8, 8), **kw), first)
