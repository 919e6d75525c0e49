"""group_norm_modulate and layer_norm_modulate: Triton kernels (interpreter on CPU), the reference path
and the native CPU path (``auto`` off CUDA) against a float64 oracle built from torch.nn.functional,
outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRET, KERNEL_DEVICE, rel_l2

from fastdiff import ops
from fastdiff.kernels import modulated_norm as mn

# Tests that send CPU tensors to backend="triton" run the kernels under the Triton interpreter only (on a GPU
# machine the kernel tests proper run on CUDA tensors through KERNEL_DEVICE).
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU tensors through backend='triton' need "
                                       "TRITON_INTERPRET=1")
TRITON_ON_CPU = pytest.param("triton", marks=needs_interpreter)

# (label, shape, num_groups, layout, mean offset)
GN_CASES = [
    ("unet-7x5", (2, 96, 7, 5), 32, "nchw", 0.0),
    ("single-pixel", (2, 96, 1, 1), 32, "nchw", 0.0),
    ("batch-1", (1, 64, 6, 6), 8, "nchw", 0.0),
    ("1d-spatial", (2, 48, 11), 16, "nchw", 0.0),
    ("3d-spatial", (2, 32, 3, 4, 5), 8, "nchw", 0.0),
    ("channels-last", (2, 96, 7, 5), 32, "channels_last", 0.0),
    ("sliced", (2, 96, 9, 7), 32, "sliced", 0.0),
    ("offset-1e4", (2, 96, 7, 5), 32, "nchw", 1e4),
    ("one-group", (2, 12, 5, 5), 1, "nchw", 0.0),
]
# (label, scale/shift present, activation, pre_shift present)
MODULATIONS = [("plain", False, None, False), ("adagn-silu", True, "silu", False), ("adagn", True, None, False),
               ("gn-silu", False, "silu", False),
               ("pre-silu", False, "silu", True),  # diffusers' ResnetBlock2D "default": SiLU(GN(h + temb))
               ("pre", False, None, True), ("pre-adagn-silu", True, "silu", True)]
PRE_SILU = MODULATIONS[4]


def make_x(shape, layout, offset, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "sliced":  # a spatial slice and a channel stride: not contiguous in any format
        full = torch.randn(shape[0], shape[1] * 2, shape[2] + 2, shape[3], generator=g) + offset
        x = full[:, ::2, 1:-1, :]
    else:
        x = torch.randn(*shape, generator=g) + offset
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    return x.to(device=device, dtype=dtype)


def make_params(n, c, modulate, device, dtype=torch.float32, seed=1, pre=False):
    """(weight, bias, scale, shift, pre_shift); the pre_shift spreads the channels of a group apart (std 2)."""
    g = torch.Generator().manual_seed(seed)
    weight = (1 + 0.5 * torch.randn(c, generator=g)).to(device, dtype)
    bias = (0.5 * torch.randn(c, generator=g)).to(device, dtype)
    scale = (0.5 * torch.randn(n, c, generator=g)).to(device, dtype) if modulate else None
    shift = (0.5 * torch.randn(n, c, generator=g)).to(device, dtype) if modulate else None
    pre_shift = (2 * torch.randn(n, c, generator=g)).to(device, dtype) if pre else None
    return weight, bias, scale, shift, pre_shift


def gn_oracle(x, num_groups, weight, bias, scale, shift, eps, activation, pre_shift=None):
    """float64 oracle: x + pre_shift, torch's group_norm, then the modulation, then the activation."""
    d = lambda t: None if t is None else t.double()
    expand = (slice(None), slice(None)) + (None,) * (x.dim() - 2)
    u = x.double() if pre_shift is None else x.double() + d(pre_shift)[expand]
    out = F.group_norm(u, num_groups, d(weight), d(bias), eps)
    if scale is not None:
        out = out * (1 + d(scale)[expand])
    if shift is not None:
        out = out + d(shift)[expand]
    return F.silu(out) if activation == "silu" else out


def ln_oracle(x, scale, shift, weight, bias, eps):
    d = lambda t: None if t is None else t.double()
    out = F.layer_norm(x.double(), x.shape[-1:], d(weight), d(bias), eps)
    if scale is not None:
        out = out * (1 + d(scale)[:, None])
    if shift is not None:
        out = out + d(shift)[:, None]
    return out


def check_gn(x, num_groups, weight, bias, scale, shift, pre_shift, activation, backend, tol, grad_tol=None):
    inputs = dict(x=x, weight=weight, bias=bias, scale=scale, shift=shift, pre_shift=pre_shift)
    leaves = [t for t in inputs.values() if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    out = ops.group_norm_modulate(x, num_groups, weight, bias, scale, shift, eps=1e-5,
                                  activation=activation, backend=backend, pre_shift=pre_shift)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(ref_leaves)
    rx, rw, rb, rs, rt, rp = [next(it) if t is not None else None for t in inputs.values()]
    ref = gn_oracle(rx, num_groups, rw, rb, rs, rt, 1e-5, activation, rp)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_l2(out, ref) <= tol, f"forward error {rel_l2(out, ref):.2e}"
    if grad_tol is not None:
        grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(x.device, x.dtype)
        got = torch.autograd.grad(out, leaves, grad)
        want = torch.autograd.grad(ref, ref_leaves, grad.double())
        names = [n for n, t in inputs.items() if t is not None]
        for name, leaf, g_got, g_want in zip(names, leaves, got, want, strict=False):
            assert g_got.dtype == leaf.dtype
            assert rel_l2(g_got, g_want) <= grad_tol, f"d{name} error {rel_l2(g_got, g_want):.2e}"
    return out


# Every shape with the full AdaGN + SiLU and with diffusers' pre_shift + SiLU; every modulation variant on
# the first shape.
TRITON_CASES = ([(c, m) for c in GN_CASES for m in (MODULATIONS[1], PRE_SILU)]
                + [(GN_CASES[0], m) for m in MODULATIONS if m not in (MODULATIONS[1], PRE_SILU)])


@pytest.mark.parametrize("case,modulation", TRITON_CASES, ids=[f"{c[0]}-{m[0]}" for c, m in TRITON_CASES])
def test_group_norm_modulate_triton(case, modulation):
    _, shape, num_groups, layout, offset = case
    _, modulate, activation, pre = modulation
    x = make_x(shape, layout, offset, KERNEL_DEVICE)
    params = make_params(shape[0], shape[1], modulate, KERNEL_DEVICE, pre=pre)
    out = check_gn(x, num_groups, *params, activation, "triton", tol=1e-5, grad_tol=1e-5)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


# Few (sample, group) slabs keep the interpreter quick; a 128-element tile makes each slab span chunks.
LARGE_SLAB_CASES = [
    ("nchw-9x7", (2, 16, 9, 7), 4, "nchw", 0.0),
    ("channels-last", (2, 16, 9, 7), 4, "channels_last", 0.0),
    ("offset-1e4", (2, 16, 9, 7), 4, "nchw", 1e4),
    ("3d-spatial", (1, 8, 3, 7, 5), 2, "nchw", 0.0),
]


@pytest.mark.parametrize("pre", [False, True], ids=["adagn", "pre-shift"])
@pytest.mark.parametrize("path", ["loop", "split"])
@pytest.mark.parametrize("case", LARGE_SLAB_CASES, ids=[c[0] for c in LARGE_SLAB_CASES])
def test_group_norm_modulate_large_slabs(case, path, pre, monkeypatch):
    """Slabs larger than one tile: one program looping over its slab, or split statistics (partial
    moments, Chan combine, apply) when there are too few slabs to fill the GPU. The backward takes
    its two-phase path in both."""
    _, shape, num_groups, layout, offset = case
    for name in ("MAX_TILE_FWD", "MAX_TILE_BWD", "LOOP_TILE"):
        monkeypatch.setattr(mn, name, 128)
    monkeypatch.setattr(mn, "MIN_SLABS_PER_SM", 0 if path == "loop" else 10**9)
    calls = {}
    for kernel in ("_gn_forward_kernel", "_gn_partial_moments_kernel"):
        real = getattr(mn, kernel)
        monkeypatch.setattr(mn, kernel, _CountingLaunch(real, calls, kernel))
    x = make_x(shape, layout, offset, KERNEL_DEVICE)
    params = make_params(shape[0], shape[1], True, KERNEL_DEVICE, pre=pre)
    check_gn(x, num_groups, *params, "silu", "triton", tol=1e-5, grad_tol=1e-5)
    assert calls["_gn_forward_kernel"][0]["MODE"] == (1 if path == "loop" else 2)


class _CountingLaunch:
    """Wraps a jitted kernel to record the constexpr flags of each launch."""

    def __init__(self, kernel, calls, name):
        self.kernel, self.calls, self.name = kernel, calls, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.setdefault(self.name, []).append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


# PyTorch paths in low precision: error of the same order as rounding the float64 result. The native
# path modulates its rounded GroupNorm output in x's dtype (two roundings), hence its own bf16 bound.
DTYPE_TOL = [(torch.float32, 1e-6, 1e-6), (torch.float16, 2e-3, 3e-3), (torch.bfloat16, 1.6e-2, 2.4e-2)]


@pytest.mark.parametrize("pre", [False, True], ids=["adagn", "pre-shift"])
@pytest.mark.parametrize("backend", ["reference", "auto"], ids=["reference", "native"])
@pytest.mark.parametrize("dtype,tol,native_tol", DTYPE_TOL, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("case", [c for c in GN_CASES if c[4] == 0.0], ids=lambda c: c[0])
def test_group_norm_modulate_pytorch_paths(case, dtype, tol, native_tol, backend, pre):
    _, shape, num_groups, layout, _ = case
    x = make_x(shape, layout, 0.0, "cpu", dtype)
    weight, bias, scale, shift, pre_shift = make_params(shape[0], shape[1], True, "cpu", dtype, pre=pre)
    tol = tol if backend == "reference" else native_tol
    out = check_gn(x, num_groups, weight.float(), bias.float(), scale, shift, pre_shift, "silu", backend,
                   tol=tol, grad_tol=4 * tol)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("modulation", MODULATIONS, ids=[m[0] for m in MODULATIONS])
def test_group_norm_modulate_native_modulations(modulation):
    _, modulate, activation, pre = modulation
    x = make_x((2, 96, 7, 5), "nchw", 0.0, "cpu")
    check_gn(x, 32, *make_params(2, 96, modulate, "cpu", pre=pre), activation, "auto", tol=1e-6, grad_tol=1e-5)


def test_group_norm_modulate_native_odd_strides():
    """A batch-1 slice of a channels_last tensor (its batch stride is not canonical) and a slice along
    channels: the native path reads them as they are or copies them, never fails."""
    base = torch.randn(1, 4, 4, 64).permute(0, 3, 1, 2)  # channels_last storage
    odd = base.as_strided((1, 64, 4, 4), (64, 1, 256, 64))  # the same elements, batch stride 64
    strided = torch.randn(2, 128, 5, 5)[:, ::2]
    for x in (odd, strided):
        out = ops.group_norm_modulate(x, 32, activation="silu", backend="auto")
        assert rel_l2(out, gn_oracle(x, 32, None, None, None, None, 1e-5, "silu")) <= 1e-6


@pytest.mark.parametrize("pre", [False, True], ids=["adagn", "pre-shift"])
@pytest.mark.parametrize("backend", ["reference", "auto"], ids=["reference", "native"])
def test_group_norm_modulate_large_offset(backend, pre):
    x = make_x((2, 96, 7, 5), "nchw", 1e4, "cpu")
    check_gn(x, 32, *make_params(2, 96, True, "cpu", pre=pre), "silu", backend, tol=1e-5, grad_tol=1e-5)


LN_CASES = [("dit-like", (2, 16, 72)), ("one-token", (3, 1, 40)), ("odd-dim", (2, 9, 33)),
            ("batch-1", (1, 20, 64))]


@pytest.mark.parametrize("affine", [False, True], ids=["no-affine", "affine"])
@pytest.mark.parametrize("case", LN_CASES, ids=[c[0] for c in LN_CASES])
@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
def test_layer_norm_modulate(case, affine, backend):
    _, shape = case
    n, _, d = shape
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) + 100).to(device)
    weight, bias, scale, shift, _ = make_params(n, d, True, device)
    if not affine:
        weight = bias = None
    leaves = [t.requires_grad_(True) for t in (x, scale, shift, weight, bias) if t is not None]
    out = ops.layer_norm_modulate(x, scale=scale, shift=shift, weight=weight, bias=bias, backend=backend)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(ref_leaves)
    rx, rs, rt, *rest = [next(it) if t is not None else None for t in (x, scale, shift, weight, bias)]
    ref = ln_oracle(rx, rs, rt, *rest, 1e-6)
    assert rel_l2(out, ref) <= 1e-5
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device)
    for g_got, g_want in zip(torch.autograd.grad(out, leaves, grad),
                             torch.autograd.grad(ref, ref_leaves, grad.double()), strict=False):
        assert rel_l2(g_got, g_want) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "auto"], ids=["reference", "native"])
def test_layer_norm_modulate_large_offset(backend):
    x = torch.randn(2, 9, 512, generator=torch.Generator().manual_seed(0)) + 1e4
    s, t = torch.randn(2, 512), torch.randn(2, 512)
    out = ops.layer_norm_modulate(x, scale=s, shift=t, backend=backend)
    assert rel_l2(out, ln_oracle(x, s, t, None, None, 1e-6)) <= 1e-6


@needs_interpreter
def test_layer_norm_modulate_non_contiguous():
    base = torch.randn(2, 12, 100)
    x = base[:, ::2, 10:74]  # strided tokens and a feature slice
    s, t = torch.randn(2, 64), torch.randn(2, 64)
    out = ops.layer_norm_modulate(x, scale=s, shift=t, backend="triton")
    assert rel_l2(out, ln_oracle(x, s, t, None, None, 1e-6)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# defined results and clear errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [TRITON_ON_CPU, "reference", "auto"])
def test_empty_batch(backend):
    """An empty batch returns an empty result, and its backward empty (or zero) gradients."""
    x = torch.randn(0, 32, 4, 4, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    s, t, p = (torch.randn(0, 32, requires_grad=True) for _ in range(3))
    out = ops.group_norm_modulate(x, 8, w, None, s, t, backend=backend, activation="silu", pre_shift=p)
    assert out.shape == x.shape
    grads = torch.autograd.grad(out.sum(), (x, w, s, t, p))
    assert [g.shape for g in grads] == [x.shape, w.shape, s.shape, t.shape, p.shape]
    assert not grads[1].any()
    tokens = torch.randn(0, 5, 16, requires_grad=True)
    s, t = (torch.randn(0, 16, requires_grad=True) for _ in range(2))
    y = ops.layer_norm_modulate(tokens, scale=s, shift=t, backend=backend)
    assert y.shape == (0, 5, 16)
    assert [g.shape for g in torch.autograd.grad(y.sum(), (tokens, s, t))] == [tokens.shape, s.shape, t.shape]


# |x| ~ 1e30 and beyond: the float32 squares overflow; the moments are taken scaled (never the finite
# all-zero output of an overflowed variance). (label, magnitude, extra offset of one group)
HUGE = [("1e30", 1e30, 0.0), ("1e36", 1e36, 0.0), ("1e20-offset-1e25", 1e20, 1e25), ("mixed-1e30-and-1", 1e30, None)]


def make_huge(shape, magnitude, offset, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * magnitude
    if offset is None:  # an ordinary sample beside a huge one
        x[0] /= magnitude
    else:
        x[:, : shape[1] // 2] += offset
    return x


@pytest.mark.parametrize("path", ["tile", "loop", "split", "reference", "native"])
@pytest.mark.parametrize("case", HUGE, ids=[h[0] for h in HUGE])
def test_group_norm_modulate_huge_inputs(case, path, monkeypatch):
    _, magnitude, offset = case
    if path in ("loop", "split"):
        for name in ("MAX_TILE_FWD", "MAX_TILE_BWD", "LOOP_TILE"):
            monkeypatch.setattr(mn, name, 64)
        monkeypatch.setattr(mn, "MIN_SLABS_PER_SM", 0 if path == "loop" else 10**9)
    backend = {"reference": "reference", "native": "auto"}.get(path, "triton")
    device = "cpu" if backend != "triton" else KERNEL_DEVICE
    x = make_huge((2, 8, 9, 7), magnitude, offset).to(device)
    out = check_gn(x, 2, *make_params(2, 8, True, device, pre=True), "silu", backend, tol=1e-5, grad_tol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
@pytest.mark.parametrize("case", HUGE, ids=[h[0] for h in HUGE])
def test_layer_norm_modulate_huge_inputs(case, backend):
    _, magnitude, offset = case
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    x = make_huge((2, 6, 40), magnitude, offset).to(device).requires_grad_(True)
    s, t = (torch.randn(2, 40, device=device, requires_grad=True) for _ in range(2))
    out = ops.layer_norm_modulate(x, scale=s, shift=t, backend=backend)
    leaves = [v.detach().double().requires_grad_(True) for v in (x, s, t)]
    ref = ln_oracle(*leaves, None, None, 1e-6)
    assert torch.isfinite(out).all() and rel_l2(out, ref) <= 1e-5
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device)
    for got, want in zip(torch.autograd.grad(out, (x, s, t), grad), torch.autograd.grad(ref, leaves, grad.double()),
                         strict=True):
        assert rel_l2(got, want) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_float64_is_computed_in_float64(backend):
    x = make_x((2, 96, 7, 5), "nchw", 1e4, "cpu", torch.float64)
    # float32 statistics would be off by ~1e-7 at least; the oracle itself (unshifted float64) is good to ~1e-12
    out = check_gn(x, 32, *make_params(2, 96, True, "cpu", torch.float64, pre=True), "silu", backend, tol=1e-10,
                   grad_tol=1e-10)
    assert out.dtype == torch.float64
    tokens = torch.randn(2, 7, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 1e4
    assert rel_l2(ops.layer_norm_modulate(tokens, backend=backend), ln_oracle(tokens, None, None, None, None, 1e-6)) \
        <= 1e-10


def test_float64_on_triton_is_refused(monkeypatch):
    launched = []
    monkeypatch.setattr(mn, "group_norm_modulate_forward", lambda *a, **k: launched.append(a))
    monkeypatch.setattr(mn, "layer_norm_modulate_forward", lambda *a, **k: launched.append(a))
    with pytest.raises(ValueError, match="float64"):
        ops.group_norm_modulate(torch.randn(2, 8, 3, 3, dtype=torch.float64), 2, backend="triton")
    with ops.backend("triton"), pytest.raises(ValueError, match="float64"):
        ops.layer_norm_modulate(torch.randn(2, 3, 8, dtype=torch.float64))
    assert not launched
    with pytest.raises(ValueError, match="float64"):  # the launcher itself refuses too
        mn._check_dtype(torch.empty(1, dtype=torch.float64))


BAD_EPS = [0.0, -1e-5, float("nan"), float("inf"), True, "1e-5", None]


@pytest.mark.parametrize("eps", BAD_EPS, ids=repr)
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        ops.group_norm_modulate(torch.randn(2, 8, 3, 3), 2, eps=eps)
    with pytest.raises(ValueError, match="eps"):
        ops.layer_norm_modulate(torch.randn(2, 3, 8), eps=eps)


def test_int64_offsets_where_a_sample_passes_2_31():
    """The launcher's arithmetic: int64 tile bases once a sample (as (C, S) or (L, D) with its strides)
    spans 2**31 elements, int32 below; a single tile that spans 2**31 is refused."""
    c, s = 256, 4096 * 4096  # C=256 at 4096x4096: 2**32 elements per sample
    assert mn._wide((c, s), (16, 256), (s, 1))  # NCHW
    assert mn._wide((c, s), (16, 256), (1, c))  # channels_last
    # the boundary: 2**31 elements end at offset 2**31 - 1, which int32 still holds
    assert not mn._wide((128, s), (16, 256), (s, 1)) and mn._wide((128, s + 1), (16, 256), (s + 1, 1))
    # any one tensor decides: a dense (256, 2**23) sample ends at 2**31 - 1, a channel-strided view past it
    assert not mn._wide((c, s // 2), (16, 256), (s // 2, 1)) and mn._wide((c, s // 2), (16, 256), (s // 2, 1), (s, 1))
    assert mn._wide((1_048_577, 2048), (16, 2048), (2048, 1))  # LayerNorm (L, D) rows
    with pytest.raises(ValueError, match="tile"):
        mn._wide((32, 2**28), (16, 256), (2**28, 1))  # 16 channels of 2**28 positions in one tile


@pytest.mark.parametrize("path", ["tile", "loop", "split"])
def test_wide_offsets_in_the_kernels(path, monkeypatch):
    """The kernels' WIDE addressing (int64 tile base, int32 inside the tile), forced on small tensors:
    forward and gradients, channels_last with a pre_shift and NCHW, and the LayerNorm kernels."""
    monkeypatch.setattr(mn, "_wide", lambda *args: True)
    if path != "tile":
        for name in ("MAX_TILE_FWD", "MAX_TILE_BWD", "LOOP_TILE"):
            monkeypatch.setattr(mn, name, 64)
        monkeypatch.setattr(mn, "MIN_SLABS_PER_SM", 0 if path == "loop" else 10**9)
    for layout, pre in (("channels_last", True), ("nchw", False)):
        x = make_x((1, 8, 9, 7), layout, 0.0, KERNEL_DEVICE)
        check_gn(x, 2, *make_params(1, 8, True, KERNEL_DEVICE, pre=pre), "silu", "triton", tol=1e-5,
                 grad_tol=1e-5)
    x = torch.randn(2, 9, 33, device=KERNEL_DEVICE, requires_grad=True)
    out = ops.layer_norm_modulate(x, backend="triton")
    ref = ln_oracle(x.detach().double().requires_grad_(True), None, None, None, None, 1e-6)
    assert rel_l2(out, ref) <= 1e-5


@pytest.mark.parametrize("backend", [TRITON_ON_CPU, "reference", "auto"])
def test_nan_stays_in_its_sample(backend):
    x = torch.randn(3, 16, 4, 4)
    x[1, 3, 2, 2] = float("nan")
    out = ops.group_norm_modulate(x, 4, activation="silu", backend=backend)
    assert torch.isnan(out[1, :4]).all()  # the group that holds the NaN
    assert torch.isfinite(out[1, 4:]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    ref = ops.group_norm_modulate(x[[0, 2]], 4, activation="silu", backend="reference")
    assert rel_l2(out[[0, 2]], ref) <= 1e-6


BAD_GN = [
    ("groups-not-dividing", dict(num_groups=5), "num_groups"),
    ("scale-shape", dict(scale=torch.randn(2, 31)), "scale"),
    ("shift-shape", dict(shift=torch.randn(3, 32)), "shift"),
    ("scale-dtype", dict(scale=torch.randn(2, 32, dtype=torch.float64)), "scale"),
    ("scale-device", dict(scale=torch.randn(2, 32, device="meta")), "scale"),
    ("weight-shape", dict(weight=torch.randn(16)), "weight"),
    ("pre-shift-shape", dict(pre_shift=torch.randn(2, 32, 1, 1)), "pre_shift"),
    ("pre-shift-dtype", dict(pre_shift=torch.randn(2, 32).half()), "pre_shift"),
    ("pre-shift-device", dict(pre_shift=torch.randn(2, 32, device="meta")), "pre_shift"),
    ("pre-shift-int", dict(pre_shift=torch.ones(2, 32, dtype=torch.int64)), "pre_shift"),
    ("activation", dict(activation="gelu"), "activation"),
    ("rank", dict(x=torch.randn(2, 32)), "x"),
    ("int-input", dict(x=torch.ones(2, 32, 4, dtype=torch.int32)), "x"),
    ("backend", dict(backend="cuda"), "backend"),
]


@pytest.mark.parametrize("case", BAD_GN, ids=[b[0] for b in BAD_GN])
def test_group_norm_modulate_bad_input(case, monkeypatch):
    _, overrides, word = case
    launched = []
    monkeypatch.setattr(mn, "group_norm_modulate_forward", lambda *a, **k: launched.append(a))
    kwargs = dict(x=torch.randn(2, 32, 4, 4), num_groups=8, backend="triton")
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=word):
        ops.group_norm_modulate(**kwargs)
    assert not launched


def test_layer_norm_modulate_bad_input():
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="scale"):
        ops.layer_norm_modulate(x, scale=torch.randn(2, 15), shift=torch.randn(2, 16))
    with pytest.raises(ValueError, match="shift"):
        ops.layer_norm_modulate(x, scale=torch.randn(2, 16), shift=torch.randn(2, 16).half())
    with pytest.raises(ValueError, match="x"):
        ops.layer_norm_modulate(torch.randn(2, 16), scale=None, shift=None)


# ---------------------------------------------------------------------------------------------
# the op contract: backend switch, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


@needs_interpreter
def test_backend_precedence(monkeypatch):
    calls = []
    real = mn.group_norm_modulate_forward
    monkeypatch.setattr(mn, "group_norm_modulate_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 8, 3, 3)
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    ops.group_norm_modulate(x, 2)
    assert len(calls) == 1  # environment
    with ops.backend("reference"):
        ops.group_norm_modulate(x, 2)
        assert len(calls) == 1  # context beats environment
        ops.group_norm_modulate(x, 2, backend="triton")
        assert len(calls) == 2  # argument beats context
    monkeypatch.setenv("FASTDIFF_BACKEND", "auto")
    ops.group_norm_modulate(x, 2)
    assert len(calls) == 2  # auto on CPU tensors is the reference
    monkeypatch.setenv("FASTDIFF_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        ops.group_norm_modulate(x, 2)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.group_norm_modulate(torch.randn(1, 4, 2, 2), 2, backend="triton")


@pytest.mark.parametrize("backend", ["reference", TRITON_ON_CPU, "auto"])
def test_opcheck(backend):
    x = torch.randn(2, 8, 3, 3)
    s, t, w = torch.randn(2, 8), torch.randn(2, 8), torch.randn(8)
    torch.library.opcheck(torch.ops.fastdiff.group_norm_modulate.default,
                          (x, 4, w, w, s, t, None, 1e-5, "silu", backend))
    torch.library.opcheck(torch.ops.fastdiff.group_norm_modulate.default,
                          (x, 4, w, w, None, None, torch.randn(2, 8), 1e-5, "silu", backend))
    xl = torch.randn(2, 5, 8)
    torch.library.opcheck(torch.ops.fastdiff.layer_norm_modulate.default, (xl, s, t, None, None, 1e-6, backend))


def test_torch_compile_fullgraph():
    from fastdiff.nn import GroupNormModulate, LayerNormModulate

    gn = GroupNormModulate(4, 16, activation="silu")
    ln = LayerNormModulate(16, elementwise_affine=False)

    def f(x, tokens, s, t):
        return gn(x, s, t), ln(tokens, s, t), gn(x, pre_shift=t)

    x, tokens, s, t = torch.randn(2, 16, 5, 5), torch.randn(2, 7, 16), torch.randn(2, 16), torch.randn(2, 16)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, tokens, s, t), f(x, tokens, s, t), strict=False):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------
# the CPU paths: eager (ATen or per-channel sums) and what torch.compile sees (plain aten ops)
# ---------------------------------------------------------------------------------------------

# (label, shape, groups, dtype, layout, path the eager native path must take)
NATIVE_PATHS = [
    ("bf16-cl-8-per-group", (3, 64, 6, 5), 8, torch.bfloat16, "channels_last", "channel_sums"),
    ("fp16-cl-12-per-group", (2, 96, 4, 4), 8, torch.float16, "channels_last", "channel_sums"),
    ("bf16-cl-16-per-group", (2, 64, 6, 5), 4, torch.bfloat16, "channels_last", "aten"),
    ("bf16-cl-32x32", (1, 32, 32, 32), 8, torch.bfloat16, "channels_last", "aten"),
    ("bf16-nchw", (2, 64, 6, 5), 8, torch.bfloat16, "nchw", "aten"),
    ("f32-cl", (2, 64, 6, 5), 8, torch.float32, "channels_last", "aten"),
]


@pytest.mark.parametrize("pre", [False, True], ids=["adagn", "pre-shift"])
@pytest.mark.parametrize("case", NATIVE_PATHS, ids=[c[0] for c in NATIVE_PATHS])
def test_native_path_choice(case, pre, monkeypatch):
    """Each branch of the eager CPU path, with the modulation and pre_shift folded in, against the float64
    oracle at the tolerance of its dtype; a half-precision channels_last input whose groups are not a
    multiple of 16 channels wide and that has fewer than 1024 positions takes the per-channel sums."""
    from fastdiff.ops import norm_cpu

    _, shape, groups, dtype, layout, path = case
    taken = []
    real = norm_cpu._gn_channel_sums
    monkeypatch.setattr(norm_cpu, "_gn_channel_sums", lambda *a: taken.append(1) or real(*a))
    tol = {torch.float32: 1e-6, torch.float16: 3e-3, torch.bfloat16: 2.4e-2}[dtype]
    x = make_x(shape, layout, 0.0, "cpu", dtype)
    weight, bias, scale, shift, pre_shift = make_params(shape[0], shape[1], True, "cpu", dtype, pre=pre)
    out = check_gn(x, groups, weight.float(), bias.float(), scale, shift, pre_shift, "silu", "auto", tol=tol,
                   grad_tol=4 * tol)
    assert bool(taken) == (path == "channel_sums")
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


@pytest.mark.parametrize("case", [("offset-1e3", 1.0, 1e3), ("huge-1e30", 1e30, 0.0), ("nan", 1.0, float("nan"))],
                         ids=lambda c: c[0])
def test_channel_sums_fall_back_to_the_reference(case):
    """Where the per-channel sums cannot be trusted (a group's |mean| / std past 16, squares past float32,
    a NaN) the eager path gives the reference's result: correct, NaN kept to its group."""
    _, magnitude, offset = case
    x = torch.randn(2, 64, 6, 5, generator=torch.Generator().manual_seed(0)) * magnitude
    x[0, :8] += offset  # one group of one sample
    x = x.to(torch.bfloat16, memory_format=torch.channels_last)
    out = ops.group_norm_modulate(x, 8, activation="silu", backend="auto")
    ref = ops.group_norm_modulate(x, 8, activation="silu", backend="reference")
    if offset != offset:  # NaN: only its group is NaN
        assert torch.isnan(out[0, :8]).all() and torch.isfinite(out[0, 8:]).all() and torch.isfinite(out[1]).all()
        out, ref = out[1], ref[1]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("path", ["channel-sums", "aten-nchw-fold", "reference", "triton"])
def test_strided_per_sample_parameters(path):
    """scale/shift/pre_shift as views (a transposed (C, N) tensor, one chunk of an (N, 2C) projection, as
    diffusers' time embedding is split) on every path."""
    dtype = torch.bfloat16 if path == "channel-sums" else torch.float32
    layout = "channels_last" if path == "channel-sums" else "nchw"
    backend = {"channel-sums": "auto", "aten-nchw-fold": "auto"}.get(path, path)
    device = KERNEL_DEVICE if path == "triton" else "cpu"
    x = make_x((2, 64, 6, 5), layout, 0.0, device, dtype)
    g = torch.Generator().manual_seed(3)
    scale = torch.randn(64, 2, generator=g).to(device, dtype).t()
    shift, pre_shift = torch.randn(2, 128, generator=g).to(device, dtype).chunk(2, dim=1)
    out = ops.group_norm_modulate(x, 8, None, None, scale, shift, activation="silu", backend=backend,
                                  pre_shift=pre_shift)
    ref = gn_oracle(x.double(), 8, None, None, scale.double(), shift.double(), 1e-5, "silu", pre_shift.double())
    assert rel_l2(out, ref) <= (2.4e-2 if dtype == torch.bfloat16 else 1e-5)


class _GraphCapture:
    """A torch.compile backend that records the FX graph it gets, then runs it as is."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self) -> str:
        return " ".join(str(node.target) for gm in self.graphs for node in gm.graph.nodes)


@pytest.mark.parametrize("case", [
    ("cl-pre-shift-adagn", (2, 64, 6, 5), 8, "channels_last", 0.0, True),
    ("nchw-offset-1e4", (2, 96, 7, 5), 32, "nchw", 1e4, False),
    ("3d-spatial", (2, 32, 3, 4, 5), 8, "nchw", 0.0, True),
    ("1d-spatial", (2, 48, 11), 16, "nchw", 0.0, False),
], ids=lambda c: c[0])
def test_compiled_on_cpu_sees_plain_aten_ops(case):
    """Under torch.compile on CPU tensors (auto backend) the op is written out in aten ops, so the compiler
    can fuse it: no fastdiff op in the graph; forward and gradients match the float64 oracle."""
    _, shape, groups, layout, offset, pre = case
    capture = _GraphCapture()
    x = make_x(shape, layout, offset, "cpu")
    params = make_params(shape[0], shape[1], True, "cpu", pre=pre)
    inputs = dict(x=x, weight=params[0], bias=params[1], scale=params[2], shift=params[3], pre_shift=params[4])
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items() if v is not None}

    def f(x, weight, bias, scale, shift, pre_shift):
        return ops.group_norm_modulate(x, groups, weight, bias, scale, shift, activation="silu", pre_shift=pre_shift)

    out = torch.compile(f, backend=capture, fullgraph=True)(**inputs)
    assert "fastdiff" not in capture.targets()
    ref_leaves = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    ref = gn_oracle(ref_leaves["x"], groups, ref_leaves["weight"], ref_leaves["bias"], ref_leaves["scale"],
                    ref_leaves["shift"], 1e-5, "silu", ref_leaves.get("pre_shift"))
    assert rel_l2(out, ref) <= 1e-6
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    for name, g_got, g_want in zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad),
                                   torch.autograd.grad(ref, list(ref_leaves.values()), grad.double()), strict=True):
        assert rel_l2(g_got, g_want) <= 1e-5, name


def test_compiled_huge_inputs_and_layer_norm():
    """The compiled form's float64 statistics: |x| ~ 1e30 normalises correctly (no overflow to a finite
    all-bias output); the LayerNorm op is written out too."""
    capture = _GraphCapture()
    x = torch.randn(2, 16, 5, 5, generator=torch.Generator().manual_seed(0)) * 1e30
    tokens = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1)) * 1e30
    s, t = torch.randn(2, 16), torch.randn(2, 16)

    def f(x, tokens, s, t):
        return ops.group_norm_modulate(x, 4, scale=s, shift=t), ops.layer_norm_modulate(tokens, scale=s, shift=t)

    gn_out, ln_out = torch.compile(f, backend=capture, fullgraph=True)(x, tokens, s, t)
    assert "fastdiff" not in capture.targets()
    assert rel_l2(gn_out, gn_oracle(x.double(), 4, None, None, s, t, 1e-5, None)) <= 1e-6
    assert rel_l2(ln_out, ln_oracle(tokens.double(), s, t, None, None, 1e-6)) <= 1e-6


def test_compile_keeps_the_op_off_auto_and_in_export():
    """backend='reference' under torch.compile, and torch.export (the ONNX path), keep the custom op."""
    capture = _GraphCapture()
    x = torch.randn(2, 8, 3, 3)
    torch.compile(lambda x: ops.group_norm_modulate(x, 2, backend="reference"), backend=capture, fullgraph=True)(x)
    assert "fastdiff.group_norm_modulate" in capture.targets()

    class M(torch.nn.Module):
        def forward(self, x):
            return ops.group_norm_modulate(x, 2, activation="silu")

    exported = torch.export.export(M(), (x,))
    assert "fastdiff.group_norm_modulate" in " ".join(str(n.target) for n in exported.graph.nodes)


def test_inductor_compiles_the_cpu_form():
    """One real inductor build of the written-out ops (channels_last bf16 with a pre_shift, and float32
    NCHW AdaGN): results at the oracle's tolerance for the dtype, layout kept."""
    x = make_x((2, 64, 6, 5), "channels_last", 0.0, "cpu", torch.bfloat16)
    _, _, _, _, p = make_params(2, 64, False, "cpu", torch.bfloat16, pre=True)
    y = make_x((2, 32, 5, 4), "nchw", 0.0, "cpu")
    w, b, s, t, _ = make_params(2, 32, True, "cpu")

    def f(x, p, y, w, b, s, t):
        return (ops.group_norm_modulate(x, 8, activation="silu", pre_shift=p),
                ops.group_norm_modulate(y, 8, w, b, s, t, activation="silu"))

    with torch.no_grad():
        out_x, out_y = torch.compile(f, fullgraph=True)(x, p, y, w, b, s, t)
    assert out_x.dtype == torch.bfloat16 and out_x.is_contiguous(memory_format=torch.channels_last)
    assert rel_l2(out_x, gn_oracle(x.double(), 8, None, None, None, None, 1e-5, "silu", p.double())) <= 1.6e-2
    assert rel_l2(out_y, gn_oracle(y.double(), 8, w.double(), b.double(), s.double(), t.double(), 1e-5,
                                   "silu")) <= 1e-6


def test_modules_load_plain_norm_state_dicts():
    """The modules keep nn.GroupNorm / nn.LayerNorm keys and match them without modulation."""
    from fastdiff.nn import GroupNormModulate, LayerNormModulate

    ref_gn, ref_ln = torch.nn.GroupNorm(4, 16), torch.nn.LayerNorm(16)
    for m in (ref_gn, ref_ln):
        torch.nn.init.normal_(m.weight)
        torch.nn.init.normal_(m.bias)
    gn, ln = GroupNormModulate(4, 16), LayerNormModulate(16, eps=1e-5)
    gn.load_state_dict(ref_gn.state_dict(), strict=True)
    ln.load_state_dict(ref_ln.state_dict(), strict=True)
    x, tokens = torch.randn(2, 16, 3, 3), torch.randn(2, 4, 16)
    torch.testing.assert_close(gn(x), ref_gn(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ln(tokens), ref_ln(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lowering", ["instance_norm", "basic", "group_norm"])
def test_pre_shift_onnx_translation(lowering, tmp_path):
    """The ONNX translation of a pre_shift (N, C, H, W and 3-D spatial input, with and without the
    modulation) holds only default-domain ops and matches the float64 oracle in ONNX Runtime."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from fastdiff.export.onnx import check_standard_onnx, translation_table

    class PreShift(torch.nn.Module):
        def forward(self, x, x5, w, b, s, t, p):
            return (ops.group_norm_modulate(x, 4, w, b, activation="silu", pre_shift=p),
                    ops.group_norm_modulate(x5, 2, None, None, s, t, pre_shift=p))

    def inputs(n, seed):
        g = torch.Generator().manual_seed(seed)
        r = lambda *shape: torch.randn(*shape, generator=g)
        return r(n, 8, 5, 3) + 3, r(n, 8, 2, 3, 2), r(8), r(8), r(n, 8), r(n, 8), 4 * r(n, 8)

    opset = 21 if lowering == "group_norm" else 18
    batch = torch.export.Dim("batch", min=1, max=16)
    dyn = ({0: batch}, {0: batch}, None, None, {0: batch}, {0: batch}, {0: batch})
    with torch.no_grad(), ops.backend("reference"):
        program = torch.onnx.export(PreShift(), inputs(2, 0), dynamo=True, opset_version=opset, dynamic_shapes=dyn,
                                    custom_translation_table=translation_table(opset, group_norm=lowering),
                                    verbose=False)
    path = str(tmp_path / "pre_shift.onnx")
    program.save(path)
    check_standard_onnx(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (1, 3):
        args = inputs(n, n)
        outs = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), args, strict=True)})
        x, x5, w, b, s, t, p = (a.double() for a in args)
        refs = (gn_oracle(x, 4, w, b, None, None, 1e-5, "silu", p), gn_oracle(x5, 2, None, None, s, t, 1e-5, None, p))
        for out, ref in zip(outs, refs, strict=True):
            assert rel_l2(torch.from_numpy(out), ref) <= 1e-5


def test_module_pre_shift_matches_diffusers_default_norm():
    """GroupNormModulate(pre_shift=temb) is diffusers' ResnetBlock2D "default" norm2 + SiLU."""
    from fastdiff.nn import GroupNormModulate

    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    gn = GroupNormModulate(4, 16, activation="silu")
    gn.load_state_dict(ref.state_dict())
    h, temb = torch.randn(3, 16, 6, 6), torch.randn(3, 16)
    want = F.silu(ref(h + temb[:, :, None, None]))
    for backend in ("auto", "reference", "triton"):
        with ops.backend(backend):
            assert rel_l2(gn(h, pre_shift=temb), want) <= 1e-6
