"""fastdiff.ops.attention and its Triton kernel against a float64 reference: outputs, gradients, every
CPU backend, strides, bias / masks, bad input, torch.compile, opcheck, and the nn modules built on it.

The kernel tests run where the kernel runs: under the Triton interpreter on CPU tensors (float32 at rel L2
1e-4, and float16), or on CUDA tensors in float16 and bfloat16 (the kernel takes no float32 there) by
FlashAttention's rule: the kernel's error against float64 is at most twice that of the same computation in
PyTorch in the same dtype. Tests of the other backends run on CPU tensors everywhere."""

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRET, KERNEL_DEVICE, rel_l2

from fastdiff import nn as fnn
from fastdiff import ops
from fastdiff.kernels import attention as kattn

# (label, (B, H, Sq, Skv, D)): every D in {16, 40, 64, 72, 80, 128} and every length in
# {1, 7, 77, 128, 333} appears, as query and as key length, with B*H up to 16.
SHAPES = [
    ("d16_sq1_skv7", (1, 2, 1, 7, 16)),
    ("d40_cross_sq77_skv333", (2, 1, 77, 333, 40)),
    ("d64_self_128_bh8", (2, 4, 128, 128, 64)),
    ("d72_dit_sq333_skv77", (1, 3, 333, 77, 72)),
    ("d80_sq7_skv128", (2, 2, 7, 128, 80)),
    ("d128_sq77_skv1", (1, 2, 77, 1, 128)),
    ("d72_bh16_sq128_skv7", (4, 4, 128, 7, 72)),
    ("d40_sq1_skv77", (1, 1, 1, 77, 40)),
    ("d128_sq333_skv128", (1, 1, 333, 128, 128)),
    ("d16_sq7_skv1", (3, 1, 7, 1, 16)),
]
# dtype -> tolerance: float32 against float64 at rel L2 1e-4 (DESIGN.md); float16 / bfloat16 at twice the
# error of the same computation in PyTorch in that dtype (FlashAttention's rule), given as None.
DTYPES = {torch.float32: 1e-4, torch.float16: None, torch.bfloat16: None}
# The dtypes the kernel runs in here: the interpreter (CPU) takes float32 and float16, a GPU float16 and bfloat16.
KERNEL_DTYPES = [torch.float32, torch.float16] if KERNEL_DEVICE == "cpu" else [torch.float16, torch.bfloat16]


def _qkv(shape, dtype=torch.float32, device=KERNEL_DEVICE, seed=0):
    b, h, sq, skv, d = shape
    g = torch.Generator().manual_seed(seed)
    mk = lambda s: torch.randn(*s, generator=g, dtype=torch.float64)
    q, k, v = mk((b, h, sq, d)), mk((b, h, skv, d)), mk((b, h, skv, d))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _ref(q, k, v, bias=None, scale=None):
    """float64 reference."""
    return ops.attention_reference(q.double(), k.double(), v.double(), scale,
                                   None if bias is None else bias.double())


def _same_dtype(q, k, v, bias=None, scale=None):
    """The same computation in PyTorch with every op in the inputs' dtype (FlashAttention's baseline)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    return torch.softmax(s, dim=-1) @ v


def _tol(dtype, q, k, v, ref, bias=None, scale=None) -> float:
    """The error the kernel may have on these inputs: 1e-4 in float32, else twice the same-dtype error."""
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    return 2 * rel_l2(_same_dtype(q, k, v, bias, scale), ref) + 1e-6


def _grad_tols(dtype, q, k, v, grad, ref_grads, bias=None) -> list:
    """Per-input tolerance of dq, dk, dv: 1e-4 in float32, else twice the same-dtype autograd error."""
    if DTYPES[dtype] is not None:
        return [DTYPES[dtype]] * 3
    low = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    low_grads = torch.autograd.grad(_same_dtype(*low, bias), low, grad)
    # Where the true gradient is exactly zero (dq with one key: the softmax is constant) rel_l2 is an absolute
    # norm, and the kernel's rounding (delta = rowsum(dout * out) against dout . v) is not zero: 1e-4 there.
    return [2 * rel_l2(g, rg) + 1e-6 if rg.norm() > 0 else max(1e-4, 2 * rel_l2(g, rg))
            for g, rg in zip(low_grads, ref_grads, strict=True)]


# Interpreter: float32 on every shape, float16 on the small ones (the large ones add runtime, not coverage).
# GPU: float16 and bfloat16 on every shape.
FORWARD_CASES = [pytest.param(shape, dtype, id=f"{label}-{str(dtype).split('.')[-1]}")
                 for dtype in KERNEL_DTYPES for label, shape in SHAPES
                 if dtype == KERNEL_DTYPES[0] or KERNEL_DEVICE != "cpu"
                 or shape[0] * shape[1] * shape[2] * shape[3] <= 40_000]


@pytest.mark.parametrize("shape, dtype", FORWARD_CASES)
def test_kernel_forward(shape, dtype):
    q, k, v = _qkv(shape, dtype)
    out, lse = kattn.attention_forward(q, k, v, shape[-1] ** -0.5)
    ref = _ref(q, k, v)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_l2(out, ref) <= _tol(dtype, q, k, v, ref)
    # the kept log-sum-exp (log2 units) is the one of the scaled scores
    s = (q.double() @ k.double().transpose(-1, -2)) * shape[-1] ** -0.5
    assert rel_l2(lse, torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))) <= 1e-5


@pytest.mark.parametrize("dtype", KERNEL_DTYPES[:1] if KERNEL_DEVICE == "cpu" else KERNEL_DTYPES,
                         ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("split_d", [True, False], ids=["split", "padded"])
@pytest.mark.parametrize("d", [40, 72, 80, 96])
def test_kernel_head_dim_tilings(d, split_d, dtype):
    """Both ways of covering a non-power-of-two head dim: two pieces (64+16...) or one padded tile."""
    d0, d1 = kattn.tile_widths(d, split_d)
    assert d0 + d1 >= d and (d1 > 0) == split_d
    q, k, v = _qkv((1, 2, 77, 130, d), dtype)
    out, _ = kattn.attention_forward(q, k, v, d ** -0.5, split_d=split_d)
    ref = _ref(q, k, v)
    assert rel_l2(out, ref) <= _tol(dtype, q, k, v, ref)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES[:1], ids=lambda t: str(t).split(".")[-1])
def test_kernel_launches_in_batch_slices(monkeypatch, dtype):
    """Past the grid's 65535 limit on batch*heads the launchers go slice by slice (limit lowered here)."""
    monkeypatch.setattr(kattn, "_MAX_GRID_Y", 4)
    q, k, v = (t.requires_grad_(True) for t in _qkv((5, 2, 9, 11, 16), dtype))
    bias = torch.randn(5, 1, 1, 11).to(KERNEL_DEVICE, dtype)
    out = ops.attention(q, k, v, backend="triton", bias=bias)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = ops.attention_reference(*ref_in, bias=bias.double())
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    assert rel_l2(out.detach(), ref.detach()) <= _tol(dtype, q, k, v, ref.detach(), bias)
    tols = _grad_tols(dtype, q, k, v, grad, ref_grads, bias)
    for g, rg, tol in zip(grads, ref_grads, tols, strict=True):
        assert rel_l2(g, rg) <= tol


def test_tile_widths_default():
    assert kattn.tile_widths(72) == (64, 16)
    assert kattn.tile_widths(80) == (64, 16)
    assert kattn.tile_widths(96) == (64, 32)
    assert kattn.tile_widths(40) == (32, 16)
    assert kattn.tile_widths(64) == (64, 0)
    assert kattn.tile_widths(112) == (128, 0)  # 64+64 is no narrower than the padded tile
    assert kattn.tile_widths(8) == (16, 0)


BACKWARD_SHAPES = [SHAPES[i] for i in (0, 1, 3, 4, 5)]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES[:1] if KERNEL_DEVICE == "cpu" else KERNEL_DTYPES,
                         ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("shape", [s[1] for s in BACKWARD_SHAPES], ids=[s[0] for s in BACKWARD_SHAPES])
def test_kernel_backward(shape, dtype):
    """The Triton backward (through the op) against float64 autograd of the reference."""
    q, k, v = (t.requires_grad_(True) for t in _qkv(shape, dtype))
    out = ops.attention(q, k, v, backend="triton")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = ops.attention_reference(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    assert rel_l2(out.detach(), ref.detach()) <= _tol(dtype, q, k, v, ref.detach())
    tols = _grad_tols(dtype, q, k, v, grad, ref_grads)
    for g, rg, tol in zip(grads, ref_grads, tols, strict=True):
        assert rel_l2(g, rg) <= tol


def _fused_qkv_views(b, s, h, d, seed=0, dtype=torch.float32):
    """q, k, v as timm's Attention makes them: permuted views of one (B, S, 3, H, D) projection."""
    qkv = torch.randn(b, s, 3, h, d, generator=torch.Generator().manual_seed(seed)).to(KERNEL_DEVICE, dtype)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES[:1] if KERNEL_DEVICE == "cpu" else KERNEL_DTYPES,
                         ids=lambda t: str(t).split(".")[-1])
def test_kernel_strided_inputs(dtype):
    """Views of a fused qkv projection, a transposed (stride-D != 1) key and a sliced value: read in
    place through their strides."""
    q, k, v = _fused_qkv_views(2, 77, 3, 72, dtype=dtype)
    assert not q.is_contiguous() and q.stride()[-1] == 1
    out, _ = kattn.attention_forward(q, k, v, 72 ** -0.5)
    ref = _ref(q, k, v)
    assert rel_l2(out, ref) <= _tol(dtype, q, k, v, ref)
    mk = lambda *s: torch.randn(*s).to(KERNEL_DEVICE, dtype)
    kt = mk(2, 3, 40, 50).transpose(-1, -2)  # (B, H, Skv=50, D=40), stride_d = 50
    vs = mk(2, 3, 50, 96)[..., 10:50]  # row stride 96
    qs = mk(3, 2, 33, 40).transpose(0, 1)  # batch and head strides swapped
    out, _ = kattn.attention_forward(qs, kt, vs, 0.3)
    ref = _ref(qs, kt, vs, scale=0.3)
    assert rel_l2(out, ref) <= _tol(dtype, qs, kt, vs, ref, scale=0.3)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES[:1] if KERNEL_DEVICE == "cpu" else KERNEL_DTYPES,
                         ids=lambda t: str(t).split(".")[-1])
def test_strided_inputs_gradients(dtype):
    """Gradients through the op on fused-qkv views, Triton backward against the reference."""
    qkv = torch.randn(2, 77, 3, 2, 40, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE, dtype)
    qkv.requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    qkv64 = qkv.detach().double().requires_grad_(True)
    q64, k64, v64 = qkv64.permute(2, 0, 3, 1, 4).unbind(0)
    qkv_low = qkv.detach().clone().requires_grad_(True)
    losses = {"square": lambda o: o.float().square().sum(),
              "sum": lambda o: o.float().sum()}  # .sum() hands the backward a stride-0 (expanded) gradient
    for name, loss in losses.items():
        (g,) = torch.autograd.grad(loss(ops.attention(q, k, v, backend="triton")), qkv)
        (g64,) = torch.autograd.grad(loss(ops.attention_reference(q64, k64, v64)), qkv64)
        tol = DTYPES[dtype]
        if tol is None:  # the same loss through the same-dtype PyTorch chain
            (g_low,) = torch.autograd.grad(loss(_same_dtype(*qkv_low.permute(2, 0, 3, 1, 4).unbind(0))), qkv_low)
            tol = 2 * rel_l2(g_low, g64) + 1e-6
        assert rel_l2(g, g64) <= tol, name


CPU_BACKENDS = ["reference", "sdpa", "triton", "auto", "xformers"]


def _skip_unusable(backend):
    if backend == "xformers" and not ops.xformers_usable(torch.device("cpu"), torch.float32):
        pytest.skip("xformers is not installed or has no kernel for this device (optional backend)")
    if backend == "triton" and not INTERPRET:
        pytest.skip("the Triton kernel on CPU tensors needs TRITON_INTERPRET=1 (its CUDA cases: the "
                    "dtype-parametrized kernel tests, tests/test_lowprecision.py and tests/test_cuda.py)")


def _bias_cases(b, h, sq, skv):
    """Additive float biases and masks of the shapes models use, with some fully masked rows."""
    g = torch.Generator().manual_seed(5)
    full = torch.randn(b, h, sq, skv, generator=g)
    pad = torch.ones(b, skv, dtype=torch.bool)
    pad[0, skv // 2:] = False  # key padding in sample 0
    rowmask = torch.ones(b, 1, sq, skv, dtype=torch.bool)
    rowmask[-1, 0, 1, :] = False  # query row 1 of the last sample sees no key
    neg = torch.randn(1, h, 1, skv, generator=g)
    neg[..., 0] = float("-inf")
    return {"full": full, "key_padding_bool": pad[:, None, None, :], "dead_row_bool": rowmask,
            "per_head_key": neg}


@pytest.mark.parametrize("bias_case", [None, "full", "key_padding_bool", "dead_row_bool", "per_head_key"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_agree(backend, bias_case):
    """Every backend on CPU tensors: output and q/k/v (and bias) gradients against float64."""
    _skip_unusable(backend)
    if backend == "xformers" and bias_case is not None:
        pytest.skip("the xformers backend takes no bias")
    shape = (2, 3, 13, 21, 40)
    q, k, v = (t.requires_grad_(True) for t in _qkv(shape, seed=7, device="cpu"))
    bias = None if bias_case is None else _bias_cases(*shape[:4])[bias_case]
    bias_grad = bias is not None and bias.is_floating_point()
    if bias_grad:
        bias.requires_grad_(True)
    out = ops.attention(q, k, v, backend=backend, bias=bias)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
    inputs = (q, k, v, bias) if bias_grad else (q, k, v)
    grads = torch.autograd.grad(out, inputs, grad)

    ref_in = [t.detach().double().requires_grad_(True) for t in inputs]
    ref_bias = ref_in[3] if bias_grad else bias
    if ref_bias is not None and ref_bias.dtype == torch.bool:
        ref_bias = torch.zeros(ref_bias.shape, dtype=torch.float64).masked_fill(~ref_bias, float("-inf"))
    ref = ops.attention_reference(*ref_in[:3], bias=ref_bias)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    out, ref = out.detach(), ref.detach()
    assert not torch.isnan(out).any()
    assert rel_l2(out, ref) <= 1e-4
    for g, rg in zip(grads, ref_grads, strict=True):
        assert not torch.isnan(g).any()
        assert rel_l2(g, rg) <= 1e-4
    if bias_case == "dead_row_bool":  # a query that sees no key gives zeros
        assert out[-1, :, 1].abs().max() == 0


def _device_dtype(backend):
    """Where a backend's test runs: the Triton kernel on KERNEL_DEVICE in its first dtype, the others on
    CPU tensors in float32."""
    return (KERNEL_DEVICE, KERNEL_DTYPES[0]) if backend == "triton" else ("cpu", torch.float32)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_nan_stays_in_its_sample(backend):
    device, dtype = _device_dtype(backend)
    q, k, v = _qkv((3, 2, 9, 11, 16), dtype, device)
    k[1, 0, 4, 3] = float("nan")
    out = ops.attention(q, k, v, backend=backend)
    assert torch.isnan(out[1, 0]).all()
    keep = [0, 2]
    ref = _ref(q[keep], k[keep], v[keep])
    assert rel_l2(out[keep], ref) <= _tol(dtype, q[keep], k[keep], v[keep], ref)
    assert not torch.isnan(out[1, 1]).any()


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_empty_inputs(backend):
    device, dtype = _device_dtype(backend)
    q, k, v = _qkv((0, 2, 5, 7, 16), dtype, device)
    assert ops.attention(q, k, v, backend=backend).shape == (0, 2, 5, 16)
    q, k, v = (t.requires_grad_(True) for t in _qkv((2, 2, 5, 0, 16), dtype, device))  # no keys: zeros
    out = ops.attention(q, k, v, backend=backend)
    assert out.shape == (2, 2, 5, 16) and out.abs().max() == 0
    out.sum().backward()
    assert q.grad.abs().max() == 0


def test_switch_and_argument():
    """The backend argument wins over the switch; the switch's words reach the op."""
    q, k, v = _qkv((1, 1, 4, 4, 16), KERNEL_DTYPES[0])
    with ops.backend("reference"):
        assert ops.resolve_attention_backend(q) == "reference"
        assert ops.resolve_attention_backend(q, backend="sdpa") == "sdpa"
    with ops.backend("triton"):
        assert ops.resolve_attention_backend(q) == "triton"
    assert ops.resolve_attention_backend(q) == "sdpa"  # auto: on the CPU; on a GPU for a power-of-two D, no bias


def test_bad_inputs():
    q, k, v = _qkv((2, 2, 5, 7, 16), device="cpu")
    cases = [
        ((q, k[..., :8], v[..., :8]), {}, "k has head dim"),
        ((q, k, v[..., :8]), {}, "v must have"),
        ((q, k.double(), v), {}, "k has dtype"),
        ((q, k, v.half()), {}, "v has dtype"),
        ((q, k.to("meta"), v), {}, "k is on"),
        ((q[0], k, v), {}, "q must have shape"),
        ((q, k[:1], v[:1]), {}, "k must have q's batch"),
        ((q, k[:, :1], v[:, :1]), {}, "k must have q's batch and heads"),
        ((q, k, v[:, :, :3]), {}, "v must have"),
        ((q.long(), k, v), {}, "q must be a floating-point"),
        ((q, "k", v), {}, "k must be a tensor"),
        ((q, k, v), {"backend": "flash"}, "backend must be one of"),
        ((q, k, v), {"scale": float("nan")}, "scale must be"),
        ((q, k, v), {"bias": torch.zeros(2, 2, 5, 6)}, "bias must broadcast"),
        ((q, k, v), {"bias": torch.zeros(2, 2, 5, 7, dtype=torch.int32)}, "bias must be a float"),
    ]
    big = torch.zeros(1, 1, 2, 160, device=KERNEL_DEVICE, dtype=KERNEL_DTYPES[0])
    cases.append(((big, big, big), {"backend": "triton"}, "head dims up to"))
    if KERNEL_DEVICE == "cpu":  # the interpreter's dtypes
        cases.append(((q.bfloat16(), k.bfloat16(), v.bfloat16()), {"backend": "triton"}, "float32 or float16"))
    else:  # the GPU kernel's dtypes
        qc, kc, vc = (t.to(KERNEL_DEVICE) for t in (q, k, v))
        cases.append(((qc, kc, vc), {"backend": "triton"}, "float16 or bfloat16"))
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            ops.attention(*args, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_torch_compile_fullgraph(backend):
    _skip_unusable(backend)
    q, k, v = (t.requires_grad_(True) for t in _qkv((2, 2, 9, 13, 40), device="cpu"))
    bias = torch.zeros(2, 1, 1, 13)
    bias[0, ..., 7:] = float("-inf")

    def f(q, k, v):
        return ops.attention(q, k, v, backend=backend, bias=bias).square().sum()

    # inductor once (it compiles C++ on the CPU, slow); aot_eager traces the same graphs for the others
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if backend == "sdpa" else "aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(f(q, k, v), (q, k, v))
    assert torch.allclose(loss, f(q, k, v), rtol=1e-5)
    for g, rg in zip(grads, ref_grads, strict=True):
        assert rel_l2(g, rg) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_opcheck(backend):
    _skip_unusable(backend)
    q, k, v = (t.requires_grad_(True) for t in _qkv((1, 2, 5, 7, 16), device="cpu"))
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, 0.25, backend, None))
    bias = torch.randn(1, 1, 5, 7)
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, 0.25, backend, bias))
    out, lse = torch.ops.fastdiff.attention(q.detach(), k.detach(), v.detach(), 0.25, backend, None)
    torch.library.opcheck(torch.ops.fastdiff.attention_backward.default,
                          (torch.ones_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.25, backend,
                           bias, backend != "triton"))


def test_build_configs_cover_every_tiling():
    """The build-check list names every head-dim class in fp16 and bf16, forward and backward."""
    configs = kattn.build_configs()
    names = [c["name"] for c in configs]
    for arch in (90, 80):
        for dt in ("fp16", "bf16"):
            for d in (16, 40, 64, 72, 80, 96, 128):
                for bias in ("", "_bias"):
                    tag = f"sm{arch}_{dt}_d{d}{bias}_"
                    assert any(n.startswith(f"attn_fwd_{tag}") for n in names), tag
                    assert any(n.startswith(f"attn_bwd_dkdv_{tag}") for n in names), tag
                    assert any(n.startswith(f"attn_bwd_dq_{tag}") for n in names), tag
    for arch in (90, 80):  # the int64-offset variant, launched with its own tiles, is built too
        for kernel in ("fwd", "bwd_dkdv", "bwd_dq"):
            assert any(n.startswith(f"attn_{kernel}_sm{arch}_") and "_i64" in n for n in names), (arch, kernel)
    assert len(set(names)) == len(names)
    for c in configs:
        assert set(c["signature"]) == set(c["fn"].arg_names)
        assert all(c["signature"][n] == "constexpr" for n in c["constexprs"])
        assert len(c["archs"]) == 1 and f"sm{c['archs'][0]}_" in c["name"]


# The module tests compare float32 modules at 1e-5: on CPU tensors, the Triton backend under the interpreter.
MODULE_BACKENDS = ("reference", "triton") if INTERPRET else ("reference",)


def test_attention_module_matches_plain_torch():
    torch.manual_seed(0)
    m = fnn.Attention(96, num_heads=4, qkv_bias=True)
    x = torch.randn(2, 13, 96)
    b, l, c = x.shape
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(b, l, 3, 4, 24).permute(2, 0, 3, 1, 4)
    ref = F.linear(F.scaled_dot_product_attention(*qkv.unbind(0)).transpose(1, 2).reshape(b, l, c),
                   m.proj.weight, m.proj.bias)
    for backend in MODULE_BACKENDS:
        with ops.backend(backend):
            assert rel_l2(m(x), ref) <= 1e-5


def test_cross_attention_module():
    torch.manual_seed(0)
    m = fnn.CrossAttention(64, context_dim=48, heads=2, dim_head=40)
    assert set(m.state_dict()) == {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight",
                                   "to_out.0.bias"}
    x = torch.randn(2, 9, 64)
    ctx = torch.randn(2, 7, 48)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 3:] = False
    split = lambda t: t.reshape(2, -1, 2, 40).transpose(1, 2)
    q, k, v = split(m.to_q(x)), split(m.to_k(ctx)), split(m.to_v(ctx))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    ref = m.to_out[0](o.transpose(1, 2).reshape(2, 9, 80))
    for backend in MODULE_BACKENDS:
        with ops.backend(backend):
            assert rel_l2(m(x, ctx, context_mask=mask), ref) <= 1e-5
    self_attn = fnn.CrossAttention(64, heads=2, dim_head=32)
    assert self_attn(x).shape == x.shape
    with pytest.raises(ValueError, match="context_mask"):
        m(x, ctx, context_mask=mask.float())


def test_needs_int64_offsets():
    """The launcher's choice: int32 offsets unless an offset inside one (batch, head) slice passes 2^31 - 1
    (checked on meta tensors: nothing is allocated)."""
    meta = dict(device="meta", dtype=torch.float16)
    q = torch.empty(64, 16, 4096, 128, **meta)  # 2^32 elements in all, 2^19 per (batch, head)
    assert not kattn.needs_int64_offsets(q, None)
    assert not kattn.needs_int64_offsets(torch.empty(2, 8, 46340, 46340, **meta))  # Sq * Skv just under 2^31
    assert kattn.needs_int64_offsets(q, torch.empty(2, 8, 46341, 46341, **meta))  # a full bias past 2^31
    assert kattn.needs_int64_offsets(torch.empty(1, 1, 1, 1, **meta).expand(1, 1, 3, 5).as_strided(
        (1, 1, 3, 5), (0, 0, 2**31, 1)))
    huge_batch_stride = torch.empty(2, 1, 1, 16, **meta).as_strided((2, 1, 1, 16), (2**32, 16, 16, 1))
    assert not kattn.needs_int64_offsets(huge_batch_stride)  # multiplied by an int64 batch index
    assert kattn._stride_mult(huge_batch_stride) == 1  # ... and passed whole, never divided into int32 range
    assert kattn._stride_mult(q) == 16


@pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="a lazily mapped 8 GiB CPU storage (Triton interpreter)")
def test_bias_offsets_past_int32(monkeypatch):
    """A bias whose query-row stride is 2^30: row 2 sits 2^31 elements in, which int32 offsets wrap to -2^31.
    The bias storage is 8 GiB of address space (only the rows read are touched); the wrapped address lands
    on a row of +30s at its start, so an int32 kernel gives a visibly different answer (checked too)."""
    b, h, sq, skv, d = 1, 2, 3, 5, 16
    row = 2**30
    storage = torch.empty(2**31 + (sq - 1) * row + skv, dtype=torch.float16)  # lazily mapped
    base = 2**31
    storage[:skv] = 30.0  # what a wrapped row-2 offset would read
    g = torch.Generator().manual_seed(11)
    for m in range(sq):
        storage[base + m * row: base + m * row + skv] = torch.randn(skv, generator=g).half()
    bias = storage.as_strided((1, 1, sq, skv), (0, 0, row, 1), storage_offset=base)
    q, k, v = (t.requires_grad_(True) for t in _qkv((b, h, sq, skv, d), seed=12))
    bias_dense = bias.float().clone()
    out = ops.attention(q, k, v, backend="triton", bias=bias)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = ops.attention_reference(*ref_in, bias=bias_dense.double())
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_in)
    assert rel_l2(out.detach(), ref.detach()) <= 1e-4
    for gr, rg in zip(grads, ref_grads, strict=True):
        assert rel_l2(gr, rg) <= 1e-4
    monkeypatch.setattr(kattn, "needs_int64_offsets", lambda *t: False)  # the int32 kernel misreads row 2
    wrong = ops.attention(q.detach(), k.detach(), v.detach(), backend="triton", bias=bias)
    assert rel_l2(wrong, ref.detach()) > 1e-2
