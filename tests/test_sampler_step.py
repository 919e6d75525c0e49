"""The fused sampler update (Triton; the interpreter on CPU) against its float64 reference."""

import pytest
import torch
from conftest import INTERPRET, KERNEL_DEVICE, rel_l2

from fastdiff import ops
from fastdiff.kernels.sampler_step import build_configs

SHAPES = {
    "latent": (2, 4, 8, 8),
    "odd": (3, 3, 5, 7),  # 105 elements per sample: one partial block
    "one_sample": (1, 2, 33),
    "over_block": (2, 1, 1100),  # two blocks per sample, the second partial
}
FLAGS = {
    "plain": dict(),
    "cfg": dict(uncond=True, guidance_scale=4.5),
    "noise_clip": dict(noise=True, clip=True),
    "all": dict(uncond=True, guidance_scale=2.0, noise=True, clip=True, variance=True),
}
TOL = {torch.float32: None, torch.float16: "2x"}


def make_inputs(shape, num_slots=2, num_rows=5, seed=0, device=KERNEL_DEVICE, **flags):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    n = shape[0]
    table = rnd(num_rows, 11 + num_slots)
    table[:, 8], table[:, 9] = -4.0, -1.0  # learned-range log-variance bounds
    table[:, 10] = torch.tensor([i % (num_slots + 1) - 1 for i in range(num_rows)], dtype=torch.float64)
    table[1, 11] = 0.0  # a zero history coefficient: that slot is skipped by the kernel
    inp = dict(x=rnd(*shape), model_out=rnd(*shape), history=rnd(num_slots, *shape), table=table,
               rows=torch.arange(n, dtype=torch.int32) % num_rows)
    if flags.get("uncond"):
        inp["uncond"] = rnd(*shape)
        inp["guidance_scale"] = flags["guidance_scale"]
    if flags.get("noise"):
        inp["noise"] = rnd(*shape)
    if flags.get("variance"):
        inp["variance"] = torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1
    if flags.get("clip"):
        inp["clip"] = torch.stack([torch.rand(n, generator=g, dtype=torch.float64) + 0.5,
                                   torch.rand(n, generator=g, dtype=torch.float64) + 0.5], 1)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def cast(inp, dtype):
    keep = ("table", "rows")
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and k not in keep else v) for k, v in inp.items()}


def call(inp, backend):
    inp = dict(inp)
    hist = inp.pop("history").clone()
    args = [inp.pop(k) for k in ("x", "model_out")]
    table, rows = inp.pop("table"), inp.pop("rows")
    out = ops.sampler_step(*args, hist, table, rows, backend=backend, **inp)
    return out, hist


@pytest.mark.parametrize("flags", list(FLAGS), ids=list(FLAGS))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "fp16"])
def test_kernel_matches_float64_reference(shape, flags, dtype):
    inp = make_inputs(shape, **FLAGS[flags])
    low = cast(inp, dtype)
    ref_out, ref_hist = call(cast(low, torch.float64), "reference")
    out, hist = call(low, "triton")
    assert out.dtype == dtype and hist.dtype == dtype
    if TOL[dtype] is None:
        assert rel_l2(out, ref_out) <= 1e-5
        assert rel_l2(hist, ref_hist) <= 1e-5
    else:  # same-dtype PyTorch computation sets the bar (FlashAttention's rule)
        torch_out, torch_hist = call(low, "reference")
        assert rel_l2(out, ref_out) <= 2 * rel_l2(torch_out, ref_out) + 1e-6
        assert rel_l2(hist, ref_hist) <= 2 * rel_l2(torch_hist, ref_hist) + 1e-6


def test_history_slots_written_only_where_the_row_says():
    inp = make_inputs((3, 2, 9), num_slots=2, num_rows=3)
    inp["table"][:, 10] = torch.tensor([0.0, -1.0, 1.0])
    inp["rows"] = torch.tensor([0, 1, 2], dtype=torch.int32, device=KERNEL_DEVICE)
    before = inp["history"].clone()
    out, hist = call(cast(inp, torch.float32), "triton")
    ref_out, ref_hist = call(inp, "reference")
    assert torch.equal(hist[1, 0], before[1, 0].float()) and torch.equal(hist[:, 1], before[:, 1].float())
    assert torch.equal(hist[0, 2], before[0, 2].float())
    assert not torch.equal(hist[0, 0], before[0, 0].float())
    assert not torch.equal(hist[1, 2], before[1, 2].float())
    assert rel_l2(hist, ref_hist) <= 1e-5 and rel_l2(out, ref_out) <= 1e-5


def test_per_sample_rows_equal_separate_calls():
    inp = cast(make_inputs((4, 3, 11), **FLAGS["all"]), torch.float32)
    inp["rows"] = torch.tensor([4, 0, 2, 2], dtype=torch.int32, device=KERNEL_DEVICE)
    out, hist = call(inp, "triton")
    for n in range(4):
        one = {k: (v[n:n + 1] if isinstance(v, torch.Tensor) and k not in ("table", "history") else v)
               for k, v in inp.items()}
        one["history"] = inp["history"][:, n:n + 1].contiguous()
        o, h = call(one, "triton")
        assert torch.equal(o[0], out[n]) and torch.equal(h[:, 0], hist[:, n])


def test_shared_row_by_expand_and_batch_strided_views():
    # rows as an expanded scalar (stride 0), model output as halves of one doubled-batch tensor
    n, shape = 3, (3, 4, 5)
    inp = cast(make_inputs((n, *shape), **FLAGS["cfg"]), torch.float32)
    doubled = torch.randn(2 * n, 2 * shape[0], *shape[1:], device=KERNEL_DEVICE)
    inp["model_out"], inp["uncond"] = doubled[:n, :shape[0]], doubled[n:, :shape[0]]
    inp["variance"] = doubled[:n, shape[0]:].tanh()
    inp["rows"] = torch.arange(5, dtype=torch.int32, device=KERNEL_DEVICE)[3].expand(n)
    out, hist = call(inp, "triton")
    ref = {k: (v.contiguous().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in inp.items()}
    ref["rows"] = torch.full((n,), 3, dtype=torch.int32, device=KERNEL_DEVICE)
    ref_out, ref_hist = call(ref, "reference")
    assert rel_l2(out, ref_out) <= 1e-5 and rel_l2(hist, ref_hist) <= 1e-5


def test_channels_last_state():
    inp = cast(make_inputs((2, 4, 6, 5), **FLAGS["noise_clip"]), torch.float32)
    inp["x"] = inp["x"].contiguous(memory_format=torch.channels_last)
    out, hist = call(inp, "triton")
    ref_out, ref_hist = call(cast(inp, torch.float64), "reference")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_l2(out, ref_out) <= 1e-5 and rel_l2(hist, ref_hist) <= 1e-5


def test_nan_in_one_sample_stays_there_and_empty_batch():
    inp = cast(make_inputs((3, 2, 7), **FLAGS["cfg"]), torch.float32)
    inp["model_out"][1, 0, 3] = float("nan")
    for backend in ("triton", "reference"):
        out, hist = call(inp, backend)
        assert torch.isnan(out[1]).any()
        assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    empty = cast(make_inputs((1, 2, 7)), torch.float32)
    empty = {k: (v[:0] if k in ("x", "model_out", "rows") else v) for k, v in empty.items()}
    empty["history"] = empty["history"][:, :0]
    out, _ = call(empty, "triton")
    assert out.shape == (0, 2, 7)


def test_opcheck_reference():
    inp = make_inputs((2, 3, 4), **FLAGS["all"])
    args = (inp["x"], inp["model_out"], inp["history"].clone(), inp["table"], inp["rows"], inp["uncond"],
            2.0, inp["variance"], inp["noise"], inp["clip"], "reference")
    torch.library.opcheck(torch.ops.fastdiff.sampler_step.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def _bad(**change):
    inp = cast(make_inputs((2, 3, 4), **FLAGS["cfg"]), torch.float32)
    inp.update(change)
    return inp


@pytest.mark.parametrize("change, word", [
    (dict(model_out=torch.zeros(2, 3, 5)), "model_out"),
    (dict(uncond=torch.zeros(3, 3, 4)), "uncond"),
    (dict(history=torch.zeros(3, 2, 3, 4)), "history"),
    (dict(table=torch.zeros(5, 11, dtype=torch.float64)), "table"),
    (dict(table=torch.zeros(5, 13, dtype=torch.int64)), "table"),
    (dict(rows=torch.zeros(3, dtype=torch.int32)), "rows"),
    (dict(rows=torch.zeros(2)), "rows"),
    (dict(clip=torch.zeros(2, 3)), "clip"),
    (dict(x=torch.zeros(2, 3, 4, dtype=torch.int32)), "x"),
    (dict(noise=[1.0]), "noise"),
])
def test_bad_input_names_the_argument(change, word):
    with pytest.raises(ValueError, match=word):
        call(_bad(**change), "reference")


def test_build_configs_form():
    configs = build_configs()
    assert len(configs) >= 8
    for c in configs:
        assert set(c) == {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}
        assert set(c["constexprs"]) <= {k for k, v in c["signature"].items() if v == "constexpr"}
        assert c["constexprs"]["NCOL"] == 11 + c["constexprs"]["NUM_SLOTS"]


@pytest.mark.skipif(not INTERPRET, reason="calls the kernel directly on CPU tensors (Triton interpreter)")
def test_history_slot_offsets_are_int64():
    """Slot s of the history ring is ``s * N * M`` elements in: with N * M = 2^30 (an i32 argument) slot 2
    sits 2^31 in, which int32 arithmetic wraps to -2^31. One program reads slot 2 of a history whose
    storage is 8 GiB of address space (only the few pages read are ever touched); the wrapped address
    would land on a block of -1s at the start of the same storage."""
    from fastdiff.kernels.sampler_step import BLOCK, NUM_FIXED_COLUMNS, _sampler_step_kernel

    slot_stride, num_slots, m = 2**30, 3, BLOCK
    storage = torch.empty(2**31 + num_slots * slot_stride + m, dtype=torch.float16)  # lazily mapped
    base = 2**31  # the history starts here; a wrapped slot-2 offset reads storage[0:m]
    storage[:m] = -1.0
    want = torch.arange(m, dtype=torch.float16) / m
    storage[base + 2 * slot_stride: base + 2 * slot_stride + m] = want
    storage[base: base + m] = 5.0  # slot 0 (coefficient 0: never read)
    history = storage[base:]
    table = torch.zeros(1, NUM_FIXED_COLUMNS + num_slots, dtype=torch.float64)
    table[0, 10] = -1  # write no slot
    table[0, NUM_FIXED_COLUMNS + 2] = 1.0  # x_next = history[2]
    x = torch.zeros(1, m)
    out = torch.empty_like(x)
    rows = torch.zeros(1, dtype=torch.int32)
    _sampler_step_kernel[(1, 1)](
        x, x, x, x, x, history, table, rows, table, out,
        m, 1, slot_stride,
        m, m, m, m, m, 0, 0,
        1.0,
        NCOL=NUM_FIXED_COLUMNS + num_slots, NUM_SLOTS=num_slots, HAS_UNCOND=False, LEARNED_VAR=False,
        HAS_NOISE=False, CLIP=False, BLOCK=BLOCK)
    assert torch.equal(out[0], want.float())


def test_launcher_refuses_what_the_grid_cannot_hold(monkeypatch):
    from fastdiff.kernels import sampler_step as ks

    monkeypatch.setattr(ks, "_MAX_GRID_Y", 2)
    inp = cast(make_inputs((3, 2, 5)), torch.float32)
    with pytest.raises(ValueError, match="at most 2 samples"):
        call(inp, "triton")
