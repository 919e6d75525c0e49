"""The real CUDA-graph capture of ``fastdiff.compat.diffusers.cuda_graph`` on a GPU (needs no diffusers, so it can
run in the GPU suite). On the CPU the same bucketing is tested with an emulated capture in
test_accelerate_runtime.py; these tests need CUDA graphs themselves."""

import pytest
import torch
from torch import nn

from fastdiff import ops
from fastdiff.compat.diffusers.cuda_graph import CudaGraphForward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="captures real CUDA graphs "
                                "(the CPU runs the emulated capture in test_accelerate_runtime.py)")


class TinyDenoiser(nn.Module):
    """A conv block with the ops accelerate's patches call: group_norm_modulate (with pre_shift and SiLU) and
    attention, so the Triton kernels are captured."""

    def __init__(self, c=64, heads=2):
        super().__init__()
        self.conv_in, self.conv_out = nn.Conv2d(4, c, 3, padding=1), nn.Conv2d(c, 4, 3, padding=1)
        self.temb, self.qkv, self.norm = nn.Linear(1, c), nn.Linear(c, 3 * c), nn.GroupNorm(8, c)
        self.heads = heads

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        h = self.conv_in(sample)  # (B, C, H, W)
        temb = self.temb(timestep.to(h.dtype).reshape(-1, 1).expand(h.shape[0], 1))  # (B, C)
        h = ops.group_norm_modulate(h, 8, self.norm.weight, self.norm.bias, activation="silu", pre_shift=temb)
        b, c, hh, ww = h.shape
        q, k, v = self.qkv(h.flatten(2).transpose(1, 2)).view(b, -1, 3, self.heads, c // self.heads).unbind(2)
        a = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, heads, S, D)
        h = h + a.transpose(1, 2).reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        out = self.conv_out(h)
        return {"sample": out} if return_dict else (out,)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_replays_equal_the_eager_forward(dtype):
    torch.manual_seed(0)
    model = TinyDenoiser().cuda().to(dtype).to(memory_format=torch.channels_last)
    graphed = CudaGraphForward(model.forward, name="tiny")
    outs, refs = [], []
    for step in range(5):
        x = torch.randn(2, 4, 16, 16, device="cuda", dtype=dtype)
        t = torch.tensor(999.0 - 200 * step, device="cuda")
        outs.append(graphed(x, t)["sample"])
        refs.append(model(x, t)["sample"])
    torch.cuda.synchronize()
    assert len(graphed.buckets) == 1 and graphed.failures == []
    for out, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(out, ref)  # the same kernels, replayed
    assert len({o.data_ptr() for o in outs}) == len(outs)  # every call returns its own tensor


@torch.inference_mode()
def test_cuda_graph_buckets_shapes_and_takes_cpu_timesteps():
    torch.manual_seed(0)
    model = TinyDenoiser().cuda().half()
    graphed = CudaGraphForward(model.forward, name="tiny")
    for batch in (1, 2, 1, 2, 1, 2):
        x = torch.randn(batch, 4, 8, 8, device="cuda", dtype=torch.float16)
        t = torch.tensor(500.0)  # on the CPU: a static buffer on the GPU holds it
        out = graphed(x, t, return_dict=False)[0]
        torch.testing.assert_close(out, model(x, t.cuda(), return_dict=False)[0])
    assert len(graphed.buckets) == 2
    graphed.clear()
    assert not graphed.buckets
