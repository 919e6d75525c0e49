"""The run-time pieces of fastdiff.accelerate: the CUDA-graph forward's bucketing (with an emulated capture on the
CPU: static buffers, replay, cloned outputs, eager fallbacks), the casting entry points, torch.compile of the
patched models (full and regional, traced by dynamo with the eager backend), and the code checks patches use."""

import pytest
import torch
from accelerate_models import MODELS
from conftest import DIFFUSERS_WARNINGS, rel_l2
from torch import nn
from torch.utils import _pytree as pytree

from fastdiff.compat.diffusers import accelerate
from fastdiff.compat.diffusers.accelerate import CastingCall, _compile_scope
from fastdiff.compat.diffusers.cuda_graph import CudaGraphForward
from fastdiff.compat.diffusers.patching import code_digest, pair_fusable

pytestmark = [*DIFFUSERS_WARNINGS, pytest.mark.usefixtures("one_thread_module")]


# ---------------------------------------------------------------------------------------------
# CudaGraphForward, with a capture emulated on the CPU
# ---------------------------------------------------------------------------------------------


class EmulatedCapture:
    """``capture(call, pool)`` as a CUDA graph behaves: the call runs once at capture, and a replay writes the
    results of a new run on the same static inputs into the same static outputs."""

    def __init__(self):
        self.captures, self.replays = 0, 0

    def __call__(self, call, pool):
        self.captures += 1
        static_out = call()

        def replay():
            self.replays += 1
            for dst, src in zip(pytree.tree_leaves(static_out), pytree.tree_leaves(call()), strict=True):
                dst.copy_(src)

        return static_out, replay


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, sample, timestep, encoder_hidden_states=None, extra=None, return_dict=True):
        self.calls += 1
        out = self.lin(sample) * timestep + (0 if encoder_hidden_states is None else encoder_hidden_states.mean())
        if extra is not None:
            out = out + extra["bias"]
        return {"sample": out} if return_dict else (out,)


def graphed(model, **kw):
    capture = EmulatedCapture()
    return CudaGraphForward(model.forward, capture=capture, device_type="cpu", name="m", **kw), capture


@torch.no_grad()
def test_graph_captures_on_the_second_call_of_a_bucket_and_replays_after():
    model = Counting()
    fwd, capture = graphed(model)
    xs = [torch.randn(2, 3, 4) for _ in range(4)]
    ts = [torch.tensor(float(i)) for i in range(4)]
    outs = [fwd(x, t, extra={"bias": torch.ones(4)})["sample"] for x, t in zip(xs, ts, strict=True)]
    assert capture.captures == 1 and capture.replays == 3  # call 2 captures then replays, calls 3-4 replay
    for x, t, out in zip(xs, ts, outs, strict=True):
        assert torch.allclose(out, model.lin(x) * t + 1)
    # outputs are clones: a later replay must not change an earlier result (PNDM keeps model outputs)
    assert not any(o.data_ptr() == outs[-1].data_ptr() for o in outs[:-1])
    assert torch.allclose(outs[1], model.lin(xs[1]) * ts[1] + 1)


@torch.no_grad()
def test_graph_buckets_by_shape_and_by_other_arguments():
    model = Counting()
    fwd, capture = graphed(model)
    t = torch.tensor(3.0)
    for _ in range(3):
        fwd(torch.randn(2, 4), t)
        fwd(torch.randn(5, 4), t)
        fwd(torch.randn(2, 4), t, return_dict=False)
    assert capture.captures == 3 and len(fwd.buckets) == 3
    out = fwd(torch.ones(2, 4), t, return_dict=False)
    assert isinstance(out, tuple) and torch.allclose(out[0], model.lin(torch.ones(2, 4)) * 3)


@torch.no_grad()
def test_graph_runs_eagerly_where_it_must():
    model = Counting()
    fwd, capture = graphed(model, max_graphs=1)
    x = torch.randn(2, 4)
    for _ in range(3):
        fwd(x, 5)  # a Python-number timestep would make one bucket per value
    assert capture.captures == 0
    with torch.enable_grad():
        for _ in range(3):
            fwd(x, torch.tensor(1.0))  # autograd needs the eager forward
    assert capture.captures == 0
    for _ in range(2):
        fwd(x, torch.tensor(1.0))
    for _ in range(3):
        fwd(torch.randn(3, 4), torch.tensor(1.0))  # past max_graphs
    assert capture.captures == 1
    with pytest.raises(TypeError):
        fwd(x)  # a bad call reaches the forward and raises its own error


@torch.no_grad()
def test_graph_capture_failure_is_reported_and_runs_eagerly():
    model = Counting()

    def failing(call, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    failures = []
    fwd = CudaGraphForward(model.forward, capture=failing, device_type="cpu", name="unet")
    fwd.failures = failures
    x, t = torch.randn(2, 4), torch.tensor(2.0)
    with pytest.warns(UserWarning, match="running it eagerly"):
        for _ in range(4):
            out = fwd(x, t)["sample"]
    assert torch.allclose(out, model.lin(x) * 2)
    assert len(failures) == 1 and failures[0][0] == "unet" and "not permitted" in failures[0][1]


@torch.no_grad()
def test_graph_wrapper_replays_a_patched_unet():
    model, _ = MODELS["unet_sdxl"]()
    report = accelerate(model, dtype=torch.float32)
    fwd, capture = graphed(model)
    g = torch.Generator().manual_seed(0)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.ones(2, 6) * 64}
    emb = torch.randn(2, 5, 32, generator=g)
    for step in range(3):
        x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor(900.0 - 300 * step)
        out = fwd(x, t, encoder_hidden_states=emb, added_cond_kwargs=added).sample
        ref = model(x, t, encoder_hidden_states=emb, added_cond_kwargs=added).sample
        assert torch.equal(out, ref)
    assert capture.captures == 1 and capture.replays == 2
    report.undo()


# ---------------------------------------------------------------------------------------------
# casting entry points
# ---------------------------------------------------------------------------------------------


def test_casting_call_casts_inputs_but_not_the_timestep_and_casts_outputs_back():
    seen = {}

    def forward(sample, timestep, cond=None):
        seen.update(sample=sample.dtype, timestep=timestep.dtype, cond=cond["a"].dtype, ids=cond["ids"].dtype)
        return {"sample": sample * 2, "ids": cond["ids"]}

    call = CastingCall(forward, torch.bfloat16)
    out = call(torch.ones(2), torch.tensor(999.0), cond={"a": torch.ones(1), "ids": torch.arange(3)})
    assert seen == dict(sample=torch.bfloat16, timestep=torch.float32, cond=torch.bfloat16, ids=torch.int64)
    assert out["sample"].dtype == torch.float32 and out["ids"].dtype == torch.int64
    seen.clear()
    call(torch.ones(2, dtype=torch.bfloat16), torch.tensor(1.0), cond={"a": torch.ones(1, dtype=torch.bfloat16),
                                                                         "ids": torch.arange(3)})
    assert seen["sample"] == torch.bfloat16
    CastingCall(forward, torch.bfloat16, keep=("timestep", "cond"))(  # e.g. Flux's float position ids
        torch.ones(2), torch.tensor(1.0), cond={"a": torch.ones(1), "ids": torch.arange(3)})
    assert seen["sample"] == torch.bfloat16 and seen["cond"] == torch.float32


def test_bare_vae_in_bfloat16_takes_and_returns_float32():
    model, _ = MODELS["vae"]()
    x = torch.randn(1, 3, 16, 16)
    report = accelerate(model, dtype=torch.bfloat16)
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        assert dist.mean.dtype == torch.float32
        z = dist.sample(generator=torch.Generator().manual_seed(0))
        assert z.dtype == torch.float32 and model.decode(z).sample.dtype == torch.float32
    report.undo()


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["full", "regional"])
def test_compile_traces_the_patched_model(scope):
    model, fn = MODELS["unet_sd15"]()
    with torch.no_grad():
        ref = fn(model)
    torch._dynamo.reset()
    report = accelerate(model, dtype=torch.float32, compile=scope, compile_options={"backend": "eager"})
    assert list(report.compiled) == [""] and report.compiled[""].startswith(scope)
    with torch.no_grad():
        out = fn(model)
    assert rel_l2(out, ref) <= 1e-5
    if scope == "regional":
        blocks = [m for m in model.modules() if type(m).__name__ == "BasicTransformerBlock"]
        assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    report.undo()
    assert all(m._compiled_call_impl is None for m in model.modules()) and "forward" not in model.__dict__


def test_compile_true_picks_regional_only_where_repeated_blocks_dominate():
    unet, _ = MODELS["unet_sd15"]()
    assert _compile_scope(unet, True) == "full"  # its transformer blocks hold a minority of the parameters
    assert _compile_scope(unet, "regional") == "regional" and _compile_scope(unet, False) is None

    class Stack(nn.Module):
        _repeated_blocks = ["Block"]

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(type("Block", (nn.Linear,), {})(8, 8) for _ in range(8))
            self.head = nn.Linear(8, 1)

    assert _compile_scope(Stack(), True) == "regional"


# ---------------------------------------------------------------------------------------------
# the code checks
# ---------------------------------------------------------------------------------------------


class _Fusable(nn.Module):
    def forward(self, sample):
        if self.conv_norm_out:
            sample = self.conv_norm_out(sample)
            sample = self.conv_act(sample)
        return self.conv_out(sample)


class _Branches(nn.Module):
    def forward(self, sample, emb=None):
        if emb is None:
            sample = self.conv_norm_out(sample)
        else:
            sample = self.conv_norm_out(sample, emb)
        sample = self.conv_act(sample)
        return sample


class _ActTwice(nn.Module):
    def forward(self, sample):
        sample = self.conv_norm_out(sample)
        sample = self.conv_act(sample)
        return self.conv_act(sample)


class _NormElsewhere(nn.Module):
    def forward(self, sample):
        other = self.conv_norm_out(sample * 2)
        sample = self.conv_norm_out(sample)
        sample = self.conv_act(sample)
        return sample + other


class _NotAdjacent(nn.Module):
    def forward(self, sample):
        sample = self.conv_norm_out(sample)
        sample = sample * 2
        sample = self.conv_act(sample)
        return sample


class _Passed(nn.Module):
    def forward(self, sample):
        sample = self.conv_norm_out(sample)
        sample = self.conv_act(sample)
        return self.helper(sample, self.conv_act)


@pytest.mark.parametrize("cls, fusable", [(_Fusable, True), (_Branches, True), (_ActTwice, False),
                                          (_NormElsewhere, False), (_NotAdjacent, False), (_Passed, False)])
def test_pair_fusable_reads_the_forward(cls, fusable):
    reason = pair_fusable(cls.forward, "conv_norm_out", "conv_act")
    assert (reason is None) == fusable, reason


class _CodeA:
    def forward(self, x: int) -> int:
        """doc"""
        return x + 1  # comment


class _CodeB:
    @staticmethod
    def forward(self, x):
        return (x
                + 1)


class _CodeC:
    def forward(self, x):
        return x + 2


class _CodeD:
    def other(self, x):
        return x + 1


def test_code_digest_ignores_formatting_comments_annotations_and_decorators_only():
    assert code_digest(_CodeA.forward) == code_digest(_CodeB.forward)
    assert code_digest(_CodeA.forward) != code_digest(_CodeC.forward)
    assert code_digest(_CodeA.forward) != code_digest(_CodeD.other)  # the name is part of the code
