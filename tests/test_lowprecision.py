"""Low-precision rule for every kernel family (FlashAttention's, DESIGN.md): in fp16/bf16 the kernel's error
against float64 is at most twice that of the same computation in PyTorch in that dtype. The conditioning
norms, attention forward and backward, and the fused sampler update. On a GPU these run on CUDA tensors in
fp16 and bf16; on the CPU, fp16 under the Triton interpreter (it mishandles bf16 loads and dots)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import INTERPRET, KERNEL_DEVICE, rel_l2

from fastdiff import ops

DTYPES = [torch.float16] + ([torch.bfloat16] if not INTERPRET else [])
SHAPES = [("unet-16x16", (4, 128, 16, 16), 32), ("odd-7x5", (2, 96, 7, 5), 32),
          ("channels-last", (2, 64, 9, 9), 32)]


def adagn_torch(x, g, w, b, s, t):
    """The unfused PyTorch chain, in x's dtype."""
    expand = (slice(None), slice(None), None, None)
    return F.silu(F.group_norm(x, g, w, b, 1e-5) * (1 + s[expand]) + t[expand])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", SHAPES, ids=[c[0] for c in SHAPES])
def test_group_norm_modulate_low_precision(case, dtype):
    label, shape, groups = case
    gen = torch.Generator().manual_seed(0)
    n, c = shape[:2]
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    f64 = dict(generator=gen, dtype=torch.float64)
    w64, b64 = 1 + 0.3 * torch.randn(c, **f64), torch.randn(c, **f64)
    s64, t64 = 0.5 * torch.randn(n, c, **f64), torch.randn(n, c, **f64)
    ref = adagn_torch(x64, groups, w64, b64, s64, t64)
    low = [t.to(KERNEL_DEVICE, dtype) for t in (x64, w64, b64, s64, t64)]
    if label == "channels-last":
        low[0] = low[0].to(memory_format=torch.channels_last)
    torch_err = rel_l2(adagn_torch(low[0], groups, *low[1:]), ref)
    out = ops.group_norm_modulate(low[0], groups, *low[1:], activation="silu", backend="triton")
    kernel_err = rel_l2(out, ref)
    assert out.dtype == dtype
    assert kernel_err <= 2 * torch_err, f"kernel {kernel_err:.2e} vs torch {torch_err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(4, 64, 72), (2, 17, 96)], ids=["dit-like", "odd"])
def test_layer_norm_modulate_low_precision(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    n, _, d = shape
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) + 3
    f64 = dict(generator=gen, dtype=torch.float64)
    s64, t64 = 0.5 * torch.randn(n, d, **f64), torch.randn(n, d, **f64)

    def chain(x, s, t):
        return F.layer_norm(x, (d,), eps=1e-6) * (1 + s[:, None]) + t[:, None]

    ref = chain(x64, s64, t64)
    x, s, t = (v.to(KERNEL_DEVICE, dtype) for v in (x64, s64, t64))
    torch_err = rel_l2(chain(x, s, t), ref)
    kernel_err = rel_l2(ops.layer_norm_modulate(x, scale=s, shift=t, backend="triton"), ref)
    assert kernel_err <= 2 * torch_err, f"kernel {kernel_err:.2e} vs torch {torch_err:.2e}"


# ---------------------------------------------------------------------------------------------
# attention (forward and the Triton backward) and the fused sampler update, by the same rule
# ---------------------------------------------------------------------------------------------

ATTENTION_SHAPES = [("dit-d72-split", (2, 3, 77, 70, 72)), ("cross-d40-skv7", (1, 2, 65, 7, 40)),
                    ("self-d64", (1, 2, 64, 64, 64)), ("d128-odd", (1, 1, 33, 45, 128))]


def attention_same_dtype(q, k, v, scale):
    """softmax(q k^T * scale) v with every op in the inputs' dtype: FlashAttention's PyTorch baseline."""
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", ATTENTION_SHAPES, ids=[c[0] for c in ATTENTION_SHAPES])
def test_attention_low_precision(case, dtype):
    """Output and q/k/v gradients of ops.attention(backend="triton") (the Triton forward and backward)."""
    _, (b, h, sq, skv, d) = case
    gen = torch.Generator().manual_seed(3)
    scale = d ** -0.5
    q64, k64, v64, g64 = (torch.randn(b, h, s, d, generator=gen, dtype=torch.float64) for s in (sq, skv, skv, sq))
    low = [t.to(KERNEL_DEVICE, dtype).requires_grad_(True) for t in (q64, k64, v64)]
    grad = g64.to(KERNEL_DEVICE, dtype)
    # the reference sees the same (rounded) inputs, in float64
    ref_in = [t.detach().double().requires_grad_(True) for t in low]
    ref = attention_same_dtype(*ref_in, scale)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    out = ops.attention(*low, scale=scale, backend="triton")
    grads = torch.autograd.grad(out, low, grad)
    torch_in = [t.detach().clone().requires_grad_(True) for t in low]
    torch_out = attention_same_dtype(*torch_in, scale)
    torch_grads = torch.autograd.grad(torch_out, torch_in, grad)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    pairs = [("out", out, torch_out, ref)] + [
        (name, g, tg, rg) for name, g, tg, rg in zip(("dq", "dk", "dv"), grads, torch_grads, ref_grads, strict=True)]
    for name, kernel, same, want in pairs:
        kernel_err, torch_err = rel_l2(kernel.detach(), want.detach()), rel_l2(same.detach(), want.detach())
        assert kernel_err <= 2 * torch_err + 1e-6, f"{name}: kernel {kernel_err:.2e} vs torch {torch_err:.2e}"


SAMPLER_SHAPES = [("latent", (2, 4, 16, 16)), ("odd", (3, 3, 7, 5))]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", SAMPLER_SHAPES, ids=[c[0] for c in SAMPLER_SHAPES])
def test_sampler_step_low_precision(case, dtype):
    """A guided, noisy DPM-Solver++(3M) SDE row: state and model outputs in dtype, history in float32 (as the
    engine keeps it). The bar is the op's PyTorch path on the same inputs (float32 math, rounded to dtype)."""
    from fastdiff import samplers as S
    from fastdiff.denoiser import Denoiser
    from fastdiff.schedules import VPSchedule

    _, shape = case
    sch = VPSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    sigmas, ts = sch.sigmas(12, "karras")
    table = S.build_table("dpmpp_3m_sde", sigmas, timesteps=ts)
    dev = S.to_device(table, Denoiser(lambda x, t, y=None: x, sch), KERNEL_DEVICE, torch.float32)
    gen = torch.Generator().manual_seed(5)
    x, c, u, z = (torch.randn(shape, generator=gen, dtype=torch.float64).to(KERNEL_DEVICE, dtype) for _ in range(4))
    hist0 = torch.randn((table.num_slots, *shape), generator=gen).to(KERNEL_DEVICE)
    for r in (1, table.num_rows // 2, table.num_rows - 1):  # first-, second- and third-order rows
        rows = dev.row_ids[r].expand(shape[0])

        def call(backend, as64=False, x=x, c=c, u=u, z=z, rows=rows):
            hist = hist0.double().clone() if as64 else hist0.clone()
            args = [t.double() for t in (x, c, u, z)] if as64 else [x, c, u, z]
            out = ops.sampler_step(args[0], args[1], hist, dev.coef, rows, uncond=args[2], guidance_scale=4.0,
                                   noise=args[3], backend=backend)
            return out, hist

        ref_out, ref_hist = call("reference", as64=True)
        out, hist = call("triton")
        torch_out, torch_hist = call("reference")
        assert out.dtype == dtype
        for name, kernel, same, want in (("x_next", out, torch_out, ref_out), ("history", hist, torch_hist, ref_hist)):
            kernel_err, torch_err = rel_l2(kernel, want), rel_l2(same, want)
            assert kernel_err <= 2 * torch_err + 1e-6, f"row {r} {name}: kernel {kernel_err:.2e} vs {torch_err:.2e}"
