"""fastdiff.sample with tensor model keyword arguments (a transformer's prompt embeddings), and the default
guidance scale.

- The static step (the CUDA graph's body) takes batch-dim model_kwargs through static buffers, padded like x,
  and gives the plain loop's bits; the other keyword arguments are constants of the step.
- The graph path (CUDA parts stood in for on the CPU): prompts of the same shape replay one capture, a new
  shape or a new value of a shared tensor captures again (compared by content, not by repr), and every
  result equals the eager loop's.
- The memory probe calls the model as the run does: with the model_kwargs, cut to the probe's samples and
  doubled under guidance.
- guidance_scale=None: the Denoiser's default_guidance_scale with labels and a null label, else 1.
- On CUDA (skipped without one): graph on and off agree with prompt embeddings, new prompts replay.
"""

import pytest
import torch
from conftest import rel_l2
from torch import nn

import fastdiff
from fastdiff import engine
from fastdiff.denoiser import Denoiser
from fastdiff.samplers import build_table, make_generators, randn_per_sample, sample_loop, to_device
from fastdiff.schedules import FlowSchedule
from fastdiff.static_step import StaticStep, run_static

CUDA = torch.cuda.is_available()
NULL = 4  # PromptNet's label table: 0..3 and the null label 4
CONTEXT = (5, 6)  # prompt embeddings per sample: (tokens, width)
SHARED = (8, 300)  # a tensor shared by every sample, past repr's 1000-element summary


@pytest.fixture(autouse=True)
def fresh_cache(one_thread):
    fastdiff.clear_cache()
    yield
    fastdiff.clear_cache()


class PromptNet(nn.Module):
    """A tiny text-conditioned velocity model: per-sample prompt embeddings ``context`` (N, L, D) are
    required (as a transformer's ``encoder_hidden_states``), ``shared`` (8, K) is the same for every sample,
    class labels are optional."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Conv2d(2, 8, 3, padding=1)
        self.ctx = nn.Linear(CONTEXT[1], 8)
        self.temb = nn.Linear(1, 8)
        self.label = nn.Embedding(NULL + 1, 8)
        self.out = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x, t, y=None, *, context=None, shared=None):
        if context is None:
            raise TypeError("PromptNet.forward() needs context= (the prompt embeddings)")
        h = self.inp(x)                                                                  # (N, 8, H, W)
        cond = self.ctx(context).mean(1) + self.temb(t[:, None].to(x.dtype) / 1000)      # (N, 8)
        if y is not None:
            cond = cond + self.label(y)
        if shared is not None:
            cond = cond + shared.mean(1)[None]
        return self.out(torch.tanh(h + cond[:, :, None, None]))


def prompt_denoiser(schedule=None) -> Denoiser:
    den = Denoiser(PromptNet(), schedule or FlowSchedule(shift=3.0), prediction="flow")
    den.y_null = NULL
    return den


def prompts(n: int, seed: int = 0, tokens: int = CONTEXT[0]) -> torch.Tensor:
    return torch.randn(n, tokens, CONTEXT[1], generator=torch.Generator().manual_seed(seed))


def shared(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHARED, generator=torch.Generator().manual_seed(100 + seed))


# ---------------------------------------------------------------------------------------------
# The static step with batch-dim model_kwargs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "lcm"])  # a history ring; noise on every row
@pytest.mark.parametrize("guidance", [1.0, 2.5], ids=["unguided", "cfg"])
@pytest.mark.parametrize("pad_to", [None, 4], ids=["exact", "padded-bucket"])
def test_static_step_takes_prompt_kwargs_and_gives_the_loop_bits(sampler, guidance, pad_to):
    den = prompt_denoiser()
    sig, ts = den.sigmas(3, shape=(3, 2, 8, 8))
    tab = to_device(build_table(sampler, sig, schedule=den.schedule, timesteps=ts), den, "cpu", frame="flow")
    seeds, y = [1, 2, 3], torch.tensor([0, 3, 1])
    x0 = randn_per_sample(make_generators(seeds), (2, 8, 8))  # flow frame: the start is the unit noise
    kwargs = dict(context=prompts(3), shared=shared())
    before = {k: v.clone() for k, v in kwargs.items()}
    with torch.no_grad():
        ref = sample_loop(den, x0.clone(), tab, y=y, y_null=NULL, guidance_scale=guidance, model_kwargs=kwargs,
                          generators=make_generators(seeds), frame="flow")
        out = run_static(den, tab, x0.clone(), y, make_generators(seeds), y_null=NULL, guidance_scale=guidance,
                         model_kwargs=kwargs, pad_to=pad_to)
    assert torch.isfinite(out).all() and rel_l2(out, x0) > 1e-2
    if pad_to is None:
        assert torch.equal(out, ref)
    else:  # a different batch size may change a matmul's rounding, nothing more
        assert rel_l2(out, ref) < 1e-5
    for k, v in kwargs.items():  # the caller's tensors are read, never written
        assert torch.equal(v, before[k])


def test_static_step_buffers_and_constants():
    den = prompt_denoiser()
    sig, ts = den.sigmas(2)
    tab = to_device(build_table("euler", sig, schedule=den.schedule, timesteps=ts), den, "cpu", frame="flow")
    ctx, sh = prompts(3), shared()
    static = StaticStep(den, tab, 4, (2, 8, 8), "cpu", model_kwargs=dict(context=ctx, shared=sh),
                        batch_keys={"context"})
    assert static.kwargs_buffers["context"].shape == (4, *CONTEXT)
    assert static.model_kwargs["context"] is static.kwargs_buffers["context"]
    # the constant is the step's own copy: what a captured graph reads is never the caller's memory
    assert torch.equal(static.model_kwargs["shared"], sh) and static.model_kwargs["shared"].data_ptr() != sh.data_ptr()
    x = torch.randn(3, 2, 8, 8)
    static.load(x, None, dict(context=ctx, shared=sh))
    assert torch.equal(static.kwargs_buffers["context"][:3], ctx)
    assert torch.equal(static.kwargs_buffers["context"][3], ctx[0])  # padded like x: copies of sample 0
    with pytest.raises(ValueError, match="context"):  # another prompt length needs another step
        static.load(x, None, dict(context=prompts(3, tokens=7), shared=sh))
    with pytest.raises(ValueError, match="keys"):
        static.load(x, None, dict(context=ctx))


# ---------------------------------------------------------------------------------------------
# The graph path: one capture per shape, constants by content
# ---------------------------------------------------------------------------------------------


def test_graph_path_replays_new_prompts_and_keys_on_shapes_and_shared_values(cpu_graphs):
    den = prompt_denoiser()
    base = dict(sampler="dpmpp_2m", steps=3, seeds=[1, 2, 3, 4], dtype=torch.float32, progress=False,
                device="cpu")

    def run(graph, context, shared_tensor, n=4, **extra):
        kw = base | {"seeds": base["seeds"][:n]} | extra
        return fastdiff.sample(den, (n, 2, 8, 8), cuda_graph=graph,
                               model_kwargs=dict(context=context, shared=shared_tensor), **kw)

    ctx_a, ctx_b, sh = prompts(4, 1), prompts(4, 2), shared()
    first = run(True, ctx_a, sh)
    assert cpu_graphs.captures == 1
    assert torch.equal(first, run(False, ctx_a, sh))  # bucket 4 = batch 4: the static step's bits
    second = run(True, ctx_b, sh)  # new prompts of the same shape: the same graph, the new prompts' samples
    assert cpu_graphs.captures == 1
    assert torch.equal(second, run(False, ctx_b, sh)) and not torch.equal(second, first)
    assert torch.equal(run(True, ctx_a, sh.clone()), first)  # the same shared values in a new tensor
    assert cpu_graphs.captures == 1
    three = run(True, ctx_a[:3], sh, n=3)  # a padded chunk (3 in bucket 4) reuses the capture
    assert cpu_graphs.captures == 1 and rel_l2(three, first[:3]) < 1e-5

    # the shared tensor changed in one element that repr elides: the graph bakes the old values in, so
    # this is another graph (keying on repr(v) would replay the stale one)
    changed = sh.clone()
    changed[4, 150] += 50.0
    assert repr(changed) == repr(sh)
    out = run(True, ctx_a, changed)
    assert cpu_graphs.captures == 2
    assert torch.equal(out, run(False, ctx_a, changed)) and not torch.equal(out, first)
    run(True, prompts(4, 1, tokens=7), sh)  # another prompt length: another capture
    assert cpu_graphs.captures == 3
    guided = run(True, ctx_a, sh, y=[0, 1, 2, 3], guidance_scale=2.0)  # doubled prompts in the graph
    assert cpu_graphs.captures == 4
    assert torch.equal(guided, run(False, ctx_a, sh, y=[0, 1, 2, 3], guidance_scale=2.0))


def test_graph_path_chunks_the_prompts(cpu_graphs):
    """Five samples in chunks of 2: each chunk gets its own prompts (buckets 2, 2 and 1)."""
    den = prompt_denoiser()
    kw = dict(sampler="euler", steps=2, seeds=[5, 6, 7, 8, 9], dtype=torch.float32, progress=False, device="cpu",
              batch_size=2, model_kwargs=dict(context=prompts(5, 3), shared=shared()))
    graph = fastdiff.sample(den, (5, 2, 8, 8), cuda_graph=True, **kw)
    assert cpu_graphs.captures == 2  # buckets 2 and 1
    assert torch.equal(graph, fastdiff.sample(den, (5, 2, 8, 8), cuda_graph=False, **kw))
    alone = fastdiff.sample(den, (1, 2, 8, 8), **(kw | {"seeds": [9], "batch_size": None,
                                                        "model_kwargs": dict(context=prompts(5, 3)[4:],
                                                                             shared=shared())}))
    assert rel_l2(alone[0], graph[4]) < 1e-5  # sample 4's prompt went with sample 4


def test_float_prompts_run_in_the_model_dtype():
    """float32 prompt embeddings with a bf16 run are cast as x is (a bf16 Linear refuses float32 input);
    the caller's tensors stay float32."""
    den = prompt_denoiser()
    ctx = prompts(2)
    out = fastdiff.sample(den, (2, 2, 8, 8), sampler="euler", steps=2, seeds=[1, 2], dtype=torch.bfloat16,
                          progress=False, model_kwargs=dict(context=ctx))
    ref = fastdiff.sample(den, (2, 2, 8, 8), sampler="euler", steps=2, seeds=[1, 2], dtype=torch.float32,
                          progress=False, model_kwargs=dict(context=ctx))
    assert ctx.dtype == torch.float32 and rel_l2(out, ref) < 5e-2


# ---------------------------------------------------------------------------------------------
# The memory probe calls the model with its keyword arguments
# ---------------------------------------------------------------------------------------------

BYTES_PER_ROW = 10_000


@pytest.fixture
def fake_cuda_memory(monkeypatch):
    """torch.cuda's memory queries on the CPU: every forward allocates BYTES_PER_ROW per batch row at its
    peak. Returns the list of (rows, context rows, shared shape) of every forward."""
    state = {"peak": 0}
    calls = []
    monkeypatch.setattr(engine, "_probes_memory", lambda device: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 ** 9, 2 * 10 ** 9))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: state.update(peak=0))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])

    def record(module, args, kwargs):
        rows = args[0].shape[0]
        state["peak"] = max(state["peak"], BYTES_PER_ROW * rows)
        calls.append((rows, kwargs["context"].shape[0], tuple(kwargs["shared"].shape)))

    return calls, record


@pytest.mark.parametrize("guidance", [1.0, 2.0], ids=["unguided", "cfg"])
def test_memory_probe_calls_the_model_with_its_kwargs(fake_cuda_memory, guidance):
    calls, record = fake_cuda_memory
    den = prompt_denoiser()
    den.model.register_forward_pre_hook(record, with_kwargs=True)
    rows_per_sample = 2 if guidance != 1.0 else 1
    state = 4 * 2 * 8 * 8 * 8  # the engine's allowance for x, history, noise and outputs per sample
    budget = 3 * (BYTES_PER_ROW * rows_per_sample + state) + 1  # room for 3 samples
    kw = dict(sampler="euler", steps=1, seeds=0, dtype=torch.float32, progress=False, device="cpu",
              cuda_graph=False, guidance_scale=guidance, y=[0, 1, 2, 3, 0, 1],
              model_kwargs=dict(context=prompts(6), shared=shared()))
    out = fastdiff.sample(den, (6, 2, 8, 8), memory_budget=budget, **kw)
    probe = engine.PROBE_BATCH * rows_per_sample
    assert calls[0] == (probe, probe, SHARED)  # the probe: the prompts cut to its samples (and doubled)
    assert calls[1:] == [(3 * rows_per_sample, 3 * rows_per_sample, SHARED)] * 2  # two chunks of 3
    assert torch.equal(out, fastdiff.sample(den, (6, 2, 8, 8), batch_size=3, **kw))


# ---------------------------------------------------------------------------------------------
# guidance_scale=None
# ---------------------------------------------------------------------------------------------


def test_guidance_none_is_the_denoisers_default_with_labels():
    den = fastdiff.load("digits")
    assert den.y_null is not None and den.default_guidance_scale == 2.0
    kw = dict(sampler="euler", steps=2, seeds=3, dtype=torch.float32, progress=False)
    y = [1, 7]
    default = fastdiff.sample(den, (2, *den.sample_shape), y=y, **kw)
    assert torch.equal(default, fastdiff.sample(den, (2, *den.sample_shape), y=y, guidance_scale=2.0, **kw))
    explicit = fastdiff.sample(den, (2, *den.sample_shape), y=y, guidance_scale=1.0, **kw)  # a number wins
    assert not torch.equal(default, explicit)


@pytest.mark.parametrize("case", ["no-labels", "no-null-label", "hand-built"])
def test_guidance_none_is_one_otherwise(case):
    den = prompt_denoiser()
    den.default_guidance_scale = 3.0
    y = [0, 1]
    if case == "no-labels":
        y = None
    elif case == "no-null-label":
        den.y_null = None  # guidance 3 would be refused: None must mean 1
    else:
        den.default_guidance_scale = Denoiser.default_guidance_scale  # a hand-built Denoiser: 1
    kw = dict(sampler="euler", steps=2, seeds=3, dtype=torch.float32, progress=False,
              model_kwargs=dict(context=prompts(2)))
    out = fastdiff.sample(den, (2, 2, 8, 8), y=y, **kw)
    assert torch.equal(out, fastdiff.sample(den, (2, 2, 8, 8), y=y, guidance_scale=1.0, **kw))


# ---------------------------------------------------------------------------------------------
# CUDA (the GPU suite)
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_cuda_graph_with_prompt_embeddings(dtype, tol):
    from fastdiff.static_step import CudaGraphRunner

    den = prompt_denoiser()
    sh = shared()
    kw = dict(sampler="dpmpp_2m", steps=4, seeds=[1, 2, 3, 4], dtype=dtype, progress=False, device="cuda")
    ctx_a, ctx_b = prompts(4, 1), prompts(4, 2)
    eager = fastdiff.sample(den, (4, 2, 8, 8), cuda_graph=False, model_kwargs=dict(context=ctx_a, shared=sh), **kw)
    captures = CudaGraphRunner.captures
    graph = fastdiff.sample(den, (4, 2, 8, 8), cuda_graph=True, model_kwargs=dict(context=ctx_a, shared=sh), **kw)
    assert CudaGraphRunner.captures == captures + 1
    assert graph.device.type == "cuda" and torch.isfinite(graph).all() and rel_l2(graph, eager) < tol
    other = fastdiff.sample(den, (4, 2, 8, 8), cuda_graph=True, model_kwargs=dict(context=ctx_b, shared=sh), **kw)
    assert CudaGraphRunner.captures == captures + 1  # new prompts: replayed, not captured
    other_eager = fastdiff.sample(den, (4, 2, 8, 8), cuda_graph=False, model_kwargs=dict(context=ctx_b, shared=sh),
                                  **kw)
    assert rel_l2(other, other_eager) < tol and rel_l2(other, graph) > 5 * rel_l2(other, other_eager)
    guided = fastdiff.sample(den, (4, 2, 8, 8), cuda_graph=True, y=[0, 1, 2, 3], guidance_scale=2.0,
                             model_kwargs=dict(context=ctx_a.cuda(), shared=sh.cuda()), **kw)
    guided_eager = fastdiff.sample(den, (4, 2, 8, 8), cuda_graph=False, y=[0, 1, 2, 3], guidance_scale=2.0,
                                   model_kwargs=dict(context=ctx_a, shared=sh), **kw)
    assert rel_l2(guided, guided_eager) < tol


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_memory_probe_with_prompt_embeddings():
    """batch_size=None on CUDA probes the model with its prompt embeddings (it needs them)."""
    den = prompt_denoiser()
    out = fastdiff.sample(den, (5, 2, 8, 8), sampler="euler", steps=2, seeds=0, device="cuda", progress=False,
                          model_kwargs=dict(context=prompts(5), shared=shared()))
    assert out.shape == (5, 2, 8, 8) and torch.isfinite(out).all()
