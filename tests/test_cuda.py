"""On a CUDA GPU: fd.sample end to end with and without the CUDA graph, the ops' ``auto`` routing on CUDA
tensors, attention with a bias in low precision, and the int64 offsets on real device memory.

Skipped without a GPU (and under the Triton interpreter): on the CPU the kernels are covered by the
interpreter tests, whose CUDA halves (fp16 and bf16 on CUDA tensors) are the dtype-parametrized tests of
test_attention.py, test_sampler_step.py, test_modulated_norm.py and test_lowprecision.py.
"""

import os

import pytest
import torch
from conftest import rel_l2

import fastdiff as fd
from fastdiff import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")


@pytest.fixture(scope="module")
def digits():
    from fastdiff.models.digits import load_digits_model

    return load_digits_model()


@pytest.fixture
def graph_replays(monkeypatch):
    """Counts CUDA graph replays, whoever captured the graph."""
    replays = []
    original = torch.cuda.CUDAGraph.replay

    def replay(self, *args, **kwargs):
        replays.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", replay)
    return replays


# bf16 (the engine's default on CUDA) and float32. The graph runs at the batch's bucket size and cuDNN's
# convolutions take TF32 by default, so the two paths agree to rounding, not bitwise; the tolerance still
# separates that from a wrong row, a stale buffer or a missing noise copy (each an O(1) difference).
GRAPH_TOL = {torch.float32: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])  # deterministic, and noise on every row
@pytest.mark.parametrize("dtype", list(GRAPH_TOL), ids=lambda d: str(d).replace("torch.", ""))
def test_sample_with_and_without_cuda_graph(digits, dtype, sampler, graph_replays):
    n, steps = 6, 8
    kw = dict(sampler=sampler, steps=steps, guidance_scale=2.0, y=torch.arange(n) % 10, seeds=list(range(n)),
              dtype=dtype, device="cuda", progress=False)
    eager = fd.sample(digits, (n, 1, 16, 16), cuda_graph=False, **kw)
    assert not graph_replays
    graph = fd.sample(digits, (n, 1, 16, 16), cuda_graph=True, **kw)
    assert len(graph_replays) >= steps  # every row replayed from the graph
    for x in (eager, graph):
        assert x.shape == (n, 1, 16, 16) and x.device.type == "cuda" and x.dtype == torch.float32
        assert torch.isfinite(x).all()
    assert rel_l2(graph, eager) <= GRAPH_TOL[dtype]
    # a sample does not depend on the batch it is drawn in: the first two alone give the same images
    alone = fd.sample(digits, (2, 1, 16, 16), cuda_graph=True, **dict(kw, y=kw["y"][:2], seeds=[0, 1]))
    assert rel_l2(alone, graph[:2]) <= GRAPH_TOL[dtype]


def test_sample_default_policy_on_cuda(digits):
    """dtype=None, cuda_graph=None: bf16 and the graph on CUDA; a finite, image-range result."""
    x = fd.sample(digits, (4, 1, 16, 16), sampler="dpmpp_2m", steps=10, y=[1, 2, 3, 4], progress=False)
    assert x.device.type == "cuda" and torch.isfinite(x).all()
    assert x.abs().max() < 10


def test_ops_auto_route_cuda_tensors_to_triton(monkeypatch):
    from fastdiff.kernels import modulated_norm as mn

    calls = []
    real = mn.group_norm_modulate_forward
    monkeypatch.setattr(mn, "group_norm_modulate_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16)
    out = ops.group_norm_modulate(x, 32, activation="silu")
    assert calls and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    q = torch.randn(2, 4, 50, 72, device="cuda", dtype=torch.bfloat16)
    assert ops.resolve_attention_backend(q) == "triton"  # D = 72: the split tile
    assert ops.resolve_attention_backend(q[..., :64].contiguous()) == "sdpa"  # a power of two, no bias
    assert ops.resolve_attention_backend(q.float()) == "sdpa"  # float32 stays on SDPA


def _naive(q, k, v, bias):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias.to(q.dtype)
    return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mask", ["full", "key_padding"])
def test_attention_bias_low_precision(dtype, mask):
    """The Triton kernel with an additive bias and a key-padding mask, output and q/k/v gradients, by the
    2x rule against the same computation in PyTorch in that dtype."""
    b, h, sq, skv, d = 2, 4, 130, 77, 72
    g = torch.Generator().manual_seed(21)
    q64, k64, v64 = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for s in (sq, skv, skv))
    if mask == "full":
        bias64 = torch.randn(b, h, sq, skv, generator=g, dtype=torch.float64)
        bias = bias64.to("cuda", dtype)
    else:
        keep = torch.ones(b, 1, 1, skv, dtype=torch.bool)
        keep[0, ..., 40:] = False
        bias64 = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
        bias = keep.cuda()
    low = [t.to("cuda", dtype).requires_grad_(True) for t in (q64, k64, v64)]
    grad = torch.randn(b, h, sq, d, generator=g).to("cuda", dtype)
    out = ops.attention(*low, bias=bias, backend="triton")
    grads = torch.autograd.grad(out, low, grad)
    ref_in = [t.detach().double().requires_grad_(True) for t in low]
    ref = _naive(*ref_in, bias64.cuda())
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    same_in = [t.detach().clone().requires_grad_(True) for t in low]
    same = _naive(*same_in, bias64.cuda().to(dtype))
    same_grads = torch.autograd.grad(same, same_in, grad)
    for name, got, bar, want in [("out", out, same, ref)] + list(zip(("dq", "dk", "dv"), grads, same_grads,
                                                                     ref_grads, strict=True)):
        err, torch_err = rel_l2(got.detach(), want.detach()), rel_l2(bar.detach(), want.detach())
        assert err <= 2 * torch_err + 1e-6, f"{name}: kernel {err:.2e} vs torch {torch_err:.2e}"


def test_attention_dead_rows_are_zero_on_cuda():
    q, k, v = (torch.randn(1, 2, 9, 40, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool, device="cuda")
    mask[0, 0, 3] = False  # query 3 sees no key
    for t in (q, k, v):
        t.requires_grad_(True)
    out = ops.attention(q, k, v, bias=mask, backend="triton")
    assert out[0, :, 3].abs().max() == 0 and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.isfinite(gr).all() for gr in grads)


def _free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30


@pytest.mark.skipif(torch.cuda.is_available() and _free_gib() < 12, reason="needs 12 GiB of free GPU memory")
def test_attention_bias_offsets_past_int32_on_cuda():
    """A bias whose query-row stride is 2^30 over 8 GiB of device memory: row 2 sits 2^31 elements in. The
    int32 kernel would read the row of +30s at the storage's start; the launcher picks int64 offsets."""
    from fastdiff.kernels import attention as kattn

    b, h, sq, skv, d, row = 1, 2, 3, 5, 64, 2**30
    storage = torch.empty(2**31 + (sq - 1) * row + skv, dtype=torch.bfloat16, device="cuda")
    base = 2**31
    storage[:skv] = 30.0
    g = torch.Generator().manual_seed(13)
    for m in range(sq):
        storage[base + m * row: base + m * row + skv] = torch.randn(skv, generator=g).to(torch.bfloat16).cuda()
    bias = storage.as_strided((1, 1, sq, skv), (0, 0, row, 1), storage_offset=base)
    assert kattn.needs_int64_offsets(bias)
    q, k, v = (torch.randn(b, h, s, d, generator=g).to("cuda", torch.bfloat16) for s in (sq, skv, skv))
    out = ops.attention(q, k, v, bias=bias, backend="triton")
    dense = bias.float().clone().double()
    ref = _naive(q.double(), k.double(), v.double(), dense)
    same = _naive(q, k, v, dense.to(torch.bfloat16))
    assert rel_l2(out, ref) <= 2 * rel_l2(same, ref) + 1e-6
    del storage
    torch.cuda.empty_cache()


@pytest.mark.skipif(torch.cuda.is_available() and _free_gib() < 12, reason="needs 12 GiB of free GPU memory")
def test_sampler_history_slot_offsets_past_int32_on_cuda():
    """Slot 2 of a history ring with N * M = 2^30 sits 2^31 elements in (the interpreter test's twin, on
    device memory)."""
    from fastdiff.kernels.sampler_step import BLOCK, NUM_FIXED_COLUMNS, _sampler_step_kernel

    slot_stride, num_slots, m = 2**30, 3, BLOCK
    storage = torch.empty(2**31 + num_slots * slot_stride + m, dtype=torch.float16, device="cuda")
    base = 2**31
    storage[:m] = -1.0
    want = torch.arange(m, dtype=torch.float16, device="cuda") / m
    storage[base + 2 * slot_stride: base + 2 * slot_stride + m] = want
    table = torch.zeros(1, NUM_FIXED_COLUMNS + num_slots, dtype=torch.float64, device="cuda")
    table[0, 10] = -1
    table[0, NUM_FIXED_COLUMNS + 2] = 1.0
    x = torch.zeros(1, m, device="cuda")
    out = torch.empty_like(x)
    rows = torch.zeros(1, dtype=torch.int32, device="cuda")
    _sampler_step_kernel[(1, 1)](
        x, x, x, x, x, storage[base:], table, rows, table, out,
        m, 1, slot_stride,
        m, m, m, m, m, 0, 0,
        1.0,
        NCOL=NUM_FIXED_COLUMNS + num_slots, NUM_SLOTS=num_slots, HAS_UNCOND=False, LEARNED_VAR=False,
        HAS_NOISE=False, CLIP=False, BLOCK=BLOCK)
    torch.cuda.synchronize()
    assert torch.equal(out[0], want.float())
    del storage
    torch.cuda.empty_cache()
