"""fastdiff.prepack: Conv2d / Linear on oneDNN-packed weights against the modules' own forward and float64."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from fastdiff import prepack

pytestmark = pytest.mark.skipif(not prepack.available(), reason="this torch build has no oneDNN")

# dtype -> bound on the relative L2 error against float64, as a multiple of the module's own forward's error
# plus a floor (the packed path is the same oneDNN primitive: its error is the module's).
DTYPES = {torch.float32: 1e-6, torch.bfloat16: 1e-3}

CONVS = {
    "3x3": dict(in_channels=32, out_channels=48, kernel_size=3, padding=1),
    "1x1-no-bias": dict(in_channels=32, out_channels=16, kernel_size=1, bias=False),
    "stride-2": dict(in_channels=32, out_channels=32, kernel_size=3, stride=2, padding=1),
    "groups-4": dict(in_channels=32, out_channels=64, kernel_size=3, padding=1, groups=4),
    "dilation-2": dict(in_channels=16, out_channels=16, kernel_size=3, padding=2, dilation=2),
    "rect-kernel": dict(in_channels=8, out_channels=8, kernel_size=(1, 3), padding=(0, 1)),
}
INPUTS = {"nchw": (2, 17, 19), "batch-1": (1, 8, 8), "odd-1x1": (3, 1, 1)}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _conv(cfg, dtype, channels_last=False):
    torch.manual_seed(0)
    m = nn.Conv2d(**cfg).to(dtype).eval()
    return m.to(memory_format=torch.channels_last) if channels_last else m


def _check(packed_out, own_out, ref, dtype):
    assert packed_out.shape == own_out.shape and packed_out.dtype == own_out.dtype
    assert rel(packed_out, ref) <= 2 * rel(own_out, ref) + DTYPES[dtype]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("size", list(INPUTS), ids=list(INPUTS))
@pytest.mark.parametrize("name", list(CONVS))
def test_conv2d_matches_module_and_float64(name, size, layout, dtype):
    cfg = CONVS[name]
    m = _conv(cfg, dtype, layout == "channels_last")
    n, h, w = INPUTS[size]
    x = torch.randn(n, cfg["in_channels"], h, w, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ref = nn.functional.conv2d(x.double(), m.weight.double(), None if m.bias is None else m.bias.double(),
                               m.stride, m.padding, m.dilation, m.groups)
    with torch.no_grad():
        own = m(x)
        undo, done, skipped = prepack.install(m)
        assert done == [""] and skipped == []
        out = m(x)
        assert prepack.is_packed(m.weight)  # the packed path ran
    _check(out, own, ref, dtype)
    undo()
    assert "forward" not in m.__dict__ and not prepack.is_packed(m.weight)


LINEAR_INPUTS = {"2d": (5, 40), "3d": (2, 7, 40), "one-row": (1, 40), "strided": None}


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", list(LINEAR_INPUTS))
def test_linear_matches_module_and_float64(shape, bias, dtype):
    torch.manual_seed(0)
    m = nn.Linear(40, 24, bias=bias).to(dtype).eval()
    if LINEAR_INPUTS[shape] is None:  # a transposed view: (2, 6, 40) with the last dimension not innermost
        x = torch.randn(2, 40, 6, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(*LINEAR_INPUTS[shape], dtype=dtype)
    ref = nn.functional.linear(x.double(), m.weight.double(), None if m.bias is None else m.bias.double())
    with torch.inference_mode():
        own = m(x)
        prepack.install(m)
        out = m(x)
    if dtype == torch.bfloat16:
        assert prepack.is_packed(m.weight)
        _check(out, own, ref, dtype)
    else:  # float32 Linear is ATen's (MKL): not packed, the module's own bits
        assert not prepack.is_packed(m.weight) and torch.equal(out, own)


def test_autograd_calls_take_the_module_forward_with_gradients():
    m = _conv(CONVS["3x3"], torch.float32)
    prepack.install(m)
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    out = m(x)
    assert out.grad_fn is not None and not prepack.is_packed(m.weight)  # nothing was packed
    out.square().sum().backward()
    g_packed = (x.grad.clone(), m.weight.grad.clone())
    x.grad, m.weight.grad = None, None
    nn.Conv2d.forward(m, x).square().sum().backward()
    assert torch.equal(g_packed[0], x.grad) and torch.equal(g_packed[1], m.weight.grad)


@pytest.mark.parametrize("change", ["load_state_dict", "copy_under_no_grad", "assign_data", "module_to_float64"])
def test_a_weight_change_repacks(change):
    m = nn.Linear(16, 8).to(torch.bfloat16).eval()
    prepack.install(m)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        m(x)
        packed = prepack._CACHE[m.weight.data_ptr()].packed
        new = torch.randn(8, 16, dtype=torch.bfloat16)
        if change == "load_state_dict":
            m.load_state_dict({"weight": new, "bias": m.bias.detach().clone()})
        elif change == "copy_under_no_grad":
            m.weight.copy_(new)
        elif change == "assign_data":
            m.weight.data = new.clone()
        else:  # float64 is not packed: the module's forward on the float64 weights
            m.double()
            x, new = x.double(), m.weight.detach().clone()
        out = m(x)
    assert torch.equal(m.weight.detach(), new.to(m.weight.dtype))
    assert torch.equal(out, nn.Linear.forward(m, x))
    if change != "module_to_float64":
        assert prepack.is_packed(m.weight) and prepack._CACHE[m.weight.data_ptr()].packed is not packed


def test_inference_weights_float16_and_bad_inputs():
    with torch.inference_mode():
        m = nn.Conv2d(4, 4, 3, padding=1).to(torch.bfloat16)  # inference tensors: no version counter
        prepack.install(m)
        x = torch.randn(1, 4, 5, 5, dtype=torch.bfloat16)
        assert torch.equal(m(x), nn.Conv2d.forward(m, x))
    h = nn.Conv2d(8, 8, 1).half()
    prepack.install(h)
    xh = torch.randn(2, 8, 3, 3, dtype=torch.float16)
    with torch.no_grad():  # float16 is not packed: the module's own forward
        assert torch.allclose(h(xh).float(), nn.Conv2d.forward(h, xh).float(), atol=1e-2)
    c = nn.Conv2d(4, 4, 3)
    prepack.install(c)
    with torch.no_grad():
        assert c(torch.randn(0, 4, 5, 5)).shape == (0, 4, 3, 3)  # an empty batch: the module's forward
        with pytest.raises(RuntimeError, match="channels"):  # torch's own error, not oneDNN's
            c(torch.randn(1, 3, 5, 5))
        with pytest.raises(RuntimeError, match="should be the same|expected"):  # dtype mismatch: torch's error
            c(torch.randn(1, 4, 5, 5, dtype=torch.float64))


def test_copies_pack_their_own_weights_and_pickle():
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 25, 3)).to(torch.bfloat16).eval()
    undo, done, _ = prepack.install(m)
    assert done == ["0", "2"]
    x = torch.randn(2, 4, 5, 5, dtype=torch.bfloat16)
    with torch.no_grad():
        before = m(x)
        twin = copy.deepcopy(m)
        assert not prepack.is_packed(twin[0].weight)  # a copy packs its own weights
        twin[0].weight.mul_(2)
        assert not torch.allclose(twin(x), before)
        assert torch.equal(m(x), before)
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert torch.allclose(loaded(x), before)
        assert torch.allclose(pickle.loads(pickle.dumps(m))(x), before)
    prepack.forget(m)
    assert not any(prepack.is_packed(p) for p in m.parameters())


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compile_runs_the_packed_ops_and_sees_weight_changes(backend):
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 36, 5))
    m = m.to(torch.bfloat16).eval()
    prepack.install(m)
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)
    compiled = torch.compile(m, backend=backend, dynamic=False)
    with torch.no_grad():
        want = nn.Linear.forward(m[3], m[2](m[1](nn.Conv2d.forward(m[0], x))))
        assert torch.equal(compiled(x), want)
        assert prepack.is_packed(m[0].weight) and prepack.is_packed(m[3].weight)
        m[0].weight.mul_(2)  # a compiled graph passes the weight in: the change is seen
        want = nn.Linear.forward(m[3], m[2](m[1](nn.Conv2d.forward(m[0], x))))
        assert torch.equal(compiled(x), want)


def test_export_keeps_the_standard_ops():
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 5)).to(torch.bfloat16).eval()
    prepack.install(m)
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        graph = torch.export.export(m, (x,)).graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert not any("fastdiff" in t or "mkldnn" in t for t in targets), targets


@pytest.mark.parametrize("module,reason", [
    (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "padding_mode"),
    (nn.Conv2d(2, 2, 3, padding="same"), "padding='same'"),
    (nn.LazyLinear(4), "not a plain"),
], ids=["reflect", "same", "subclass"])
def test_modules_left_alone_are_reported(module, reason):
    undo, done, skipped = prepack.install(nn.Sequential(module))
    assert done == [] and len(skipped) == 1 and reason in skipped[0][1]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(3, 40), (2, 9, 40)], ids=["2d", "3d"])
def test_linear_gelu_fuses_in_bf16_and_is_the_two_ops_elsewhere(shape, approximate):
    torch.manual_seed(0)
    m = nn.Linear(40, 64).eval()
    x = torch.randn(*shape)
    ref = nn.functional.gelu(nn.functional.linear(x.double(), m.weight.double(), m.bias.double()),
                             approximate=approximate)
    with torch.no_grad():
        assert torch.equal(prepack.linear_gelu(m, x, approximate), nn.functional.gelu(m(x), approximate=approximate))
        b = m.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        two_ops = nn.functional.gelu(b(xb), approximate=approximate)
        fused = prepack.linear_gelu(b, xb, approximate)
    assert prepack.is_packed(b.weight) and fused.shape == two_ops.shape and fused.dtype == torch.bfloat16
    assert rel(fused, ref) <= 2 * rel(two_ops, ref)
    with pytest.raises(ValueError, match="approximate"):
        prepack.linear_gelu(b, xb, "erf")
    seen = []
    b.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():  # a hook on the Linear: it is called as a module, the hook fires
        assert torch.equal(prepack.linear_gelu(b, xb, approximate), two_ops)
    assert len(seen) == 1


def test_a_weight_shared_by_two_convolutions_is_packed_for_each_use():
    a = nn.Conv2d(8, 8, 3, padding=1).to(torch.bfloat16).eval()
    b = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2).to(torch.bfloat16).eval()
    b.weight, b.bias = a.weight, a.bias  # tied
    prepack.install(a)
    prepack.install(b)
    x = torch.randn(2, 8, 9, 9, dtype=torch.bfloat16)
    with torch.no_grad():
        for m in (a, b, a, b):
            assert torch.equal(m(x), nn.Conv2d.forward(m, x))
