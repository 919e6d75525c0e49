"""fastdiff.accelerate on tiny diffusers models: patched against unpatched outputs (float32 <= 1e-5 relative,
bf16 against diffusers' own bf16), the Triton kernels through the patched model under the interpreter, the
report, an exact undo, altered modules reported (not patched), strict mode and bad arguments."""

import copy

import pytest
import torch
from accelerate_models import EXPECTED, MODELS, assert_packed_every_plain_layer, block_counts
from conftest import DIFFUSERS_WARNINGS, rel_l2
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from fastdiff import ops, prepack
from fastdiff.compat.diffusers import AccelerateError, accelerate
from fastdiff.compat.diffusers.accelerate import CastingCall
from fastdiff.compat.diffusers.patches_unet import FastdiffAttnProcessor, ResnetBlock2DPatch

pytestmark = [*DIFFUSERS_WARNINGS, pytest.mark.usefixtures("one_thread_module")]


def snapshot(model: nn.Module) -> dict:
    """Everything accelerate may change on a model, to compare bitwise after undo."""
    return {
        "tensors": {k: (v.dtype, v.stride(), v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()},
        "param_ids": {n: id(p) for n, p in model.named_parameters()},
        "processors": {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")},
        "instance_attrs": {n: sorted(k for k in ("forward", "encode", "decode") if k in m.__dict__)
                           for n, m in model.named_modules()},
        "compiled": {n: m._compiled_call_impl for n, m in model.named_modules()},
        "classes": {n: type(m) for n, m in model.named_modules()},
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["tensors"].keys() == b["tensors"].keys()
    for k, (dtype, stride, value) in a["tensors"].items():
        dtype2, stride2, value2 = b["tensors"][k]
        assert (dtype, stride) == (dtype2, stride2), k
        assert torch.equal(value, value2), k
    for key in ("param_ids", "instance_attrs", "compiled", "classes"):
        assert a[key] == b[key], key
    assert a["processors"].keys() == b["processors"].keys()
    assert all(a["processors"][k] is b["processors"][k] for k in a["processors"])


def run(model, fn):
    with torch.no_grad():
        return fn(model)


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("name", list(MODELS))
def test_float32_patched_matches_unpatched_and_report_lists_every_module(name, channels_last):
    model, fn = MODELS[name]()
    ref = run(model, fn)
    if channels_last:  # against diffusers in the same layout
        ref_cl = run(copy.deepcopy(model).to(memory_format=torch.channels_last), fn)
        assert rel_l2(ref_cl, ref) <= 1e-5
    report = accelerate(model, dtype=torch.float32, channels_last=channels_last)
    out = run(model, fn)
    assert rel_l2(out, ref_cl if channels_last else ref) <= 1e-5
    assert block_counts(report) == EXPECTED[name]
    assert_packed_every_plain_layer(report, model)
    assert report.skipped == []
    assert report.dtype == torch.float32 and report.memory_kept == 0
    block_paths = [p for p, m in model.named_modules() if type(m) is ResnetBlock2D]
    assert sorted(report.patched["ResnetBlock2D"]) == sorted(block_paths)
    report.undo()


@pytest.mark.parametrize("name", ["unet_2d", "unet_sd15", "vae"])
def test_bfloat16_error_is_that_of_diffusers_bfloat16(name):
    """A bf16 model called with float32 inputs (the entry points cast): its error against the float32 model is
    at most twice that of diffusers' own bf16 model (the same-dtype rule of DESIGN.md)."""
    model, fn = MODELS[name]()
    ref = run(model, fn)
    theirs = copy.deepcopy(model).to(torch.bfloat16)
    for method in ("forward", "encode", "decode"):
        if hasattr(theirs, method):
            setattr(theirs, method, CastingCall(getattr(theirs, method), torch.bfloat16))
    err_theirs = rel_l2(run(theirs, fn), ref)
    report = accelerate(model, dtype=torch.bfloat16)
    out = run(model, fn)
    assert out.dtype == torch.float32  # the caller's dtype comes back
    assert rel_l2(out, ref) <= 2 * err_theirs + 1e-3
    assert report.memory_kept == sum(t.numel() * 4 for t in model.state_dict().values())
    report.undo()


def _small_groups(name):
    """Models with 8 groups and one layer per block: the Triton interpreter runs every GroupNorm program in
    Python, so fewer programs keep the test to seconds."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "unet_2d":
        model = UNet2DModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=3,
                            out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
        x, t = torch.randn(1, 3, 8, 8, generator=g), torch.tensor([321])
        return model, lambda m: m(x, t).sample
    model = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4,
                                 out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                 attention_head_dim=8, norm_num_groups=8,
                                 resnet_time_scale_shift="scale_shift").eval()
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor(77)
    emb = torch.randn(1, 5, 16, generator=g)
    return model, lambda m: m(x, t, encoder_hidden_states=emb).sample


@pytest.mark.parametrize("name", ["unet_2d", "unet_sd15_scale_shift"])
def test_triton_kernels_through_the_patched_model(name, monkeypatch):
    model, fn = _small_groups(name)
    ref = run(model, fn)
    report = accelerate(model, dtype=torch.float32)
    calls = []
    import fastdiff.kernels.attention as ka
    import fastdiff.kernels.modulated_norm as kn

    for mod, fname in ((kn, "group_norm_modulate_forward"), (ka, "attention_forward")):
        real = getattr(mod, fname)
        monkeypatch.setattr(mod, fname, lambda *a, _real=real, _n=fname, **k: calls.append(_n) or _real(*a, **k))
    with ops.backend("triton"):
        out = run(model, fn)
    assert rel_l2(out, ref) <= 1e-4  # DESIGN.md: the attention kernel's float32 tolerance
    assert calls.count("group_norm_modulate_forward") >= 2 * len(report.patched["ResnetBlock2D"])
    assert calls.count("attention_forward") == len(report.patched["AttnProcessor2_0"])
    report.undo()


# ---------------------------------------------------------------------------------------------
# undo
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(dtype=torch.float32), dict(dtype=torch.bfloat16, channels_last=True),
                                dict(dtype=torch.float16, channels_last=False), dict(channels_last=True,
                                                                                      dtype=torch.float32)],
                         ids=["fp32", "bf16-channels_last", "fp16", "fp32-channels_last"])
@pytest.mark.parametrize("name", ["unet_sdxl", "vae"])
def test_undo_restores_bitwise(name, kw):
    model, fn = MODELS[name]()
    before = snapshot(model)
    ref = run(model, fn)
    report = accelerate(model, threads=1, **kw)
    assert report.channels_last == kw.get("channels_last", False)
    if kw.get("channels_last"):
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    run(model, fn)
    report.undo()
    assert report.undone
    assert_same(before, snapshot(model))
    assert torch.equal(run(model, fn), ref)
    report.undo()  # a second undo does nothing
    assert_same(before, snapshot(model))


def test_layout_only_change_keeps_no_memory_and_threads_are_restored():
    model, fn = MODELS["unet_sd15"]()
    threads = torch.get_num_threads()
    report = accelerate(model, dtype=torch.float32, channels_last=True, threads=2)
    assert report.memory_kept == 0 and report.threads == 2 and torch.get_num_threads() == 2
    assert report.converted == {"": "channels_last"}
    report.undo()
    assert torch.get_num_threads() == threads


def test_accelerating_twice_needs_undo_first():
    model, _ = MODELS["unet_2d"]()
    report = accelerate(model, dtype=torch.float32)
    with pytest.raises(ValueError, match="accelerated already"):
        accelerate(model, dtype=torch.float32)
    report.undo()
    accelerate(model, dtype=torch.float32).undo()


# ---------------------------------------------------------------------------------------------
# altered modules: reported, not patched; strict raises
# ---------------------------------------------------------------------------------------------


class _MyBlock(ResnetBlock2D):
    pass


def _alter(model, how):
    block = model.down_blocks[0].resnets[0]
    attn = model.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    if how == "activation":
        block.nonlinearity = nn.Mish()
        return "down_blocks.0.resnets.0", "Mish"
    if how == "norm":
        block.norm2 = nn.GroupNorm(block.norm2.num_groups, block.norm2.num_channels, eps=1e-6)
        block.norm2.__class__ = type("MyGroupNorm", (nn.GroupNorm,), {})
        return "down_blocks.0.resnets.0", "MyGroupNorm"
    if how == "subclass":
        block.__class__ = _MyBlock
        return "down_blocks.0.resnets.0", "subclass"
    if how == "hook":
        block.norm1.register_forward_hook(lambda m, i, o: None)
        return "down_blocks.0.resnets.0", "hooks"
    if how == "forward":
        block.forward = lambda x, temb: ResnetBlock2D.forward(block, x, temb)
        return "down_blocks.0.resnets.0", "forward was replaced"
    if how == "processor":
        attn.set_processor(AttnProcessor())
        return "down_blocks.1.attentions.0.transformer_blocks.0.attn1", "AttnProcessor "
    if how == "conv_act":
        model.conv_act = nn.GELU()
        return "", "GELU"
    raise AssertionError(how)


ALTERATIONS = ["activation", "norm", "subclass", "hook", "forward", "processor", "conv_act"]


@pytest.mark.parametrize("how", ALTERATIONS)
def test_altered_module_is_reported_and_left_alone(how):
    model, fn = MODELS["unet_sd15"]()
    path, word = _alter(model, how)
    ref = run(model, fn)
    report = accelerate(model, dtype=torch.float32)
    assert [p for p, _ in report.skipped] == [path]
    assert word in report.skipped[0][1]
    assert all(path not in paths for paths in report.patched.values())
    total = block_counts(report)
    expected = dict(EXPECTED["unet_sd15"])
    key = {"processor": "AttnProcessor2_0", "conv_act": "UNet2DConditionModel"}.get(how, "ResnetBlock2D")
    expected[key] -= 1
    assert total == {k: v for k, v in expected.items() if v}
    assert rel_l2(run(model, fn), ref) <= 1e-5
    report.undo()


def test_hooks_on_a_patched_block_keep_firing():
    model, fn = MODELS["unet_sd15"]()
    seen = []
    model.down_blocks[0].resnets[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    report = accelerate(model, dtype=torch.float32)
    assert "down_blocks.0.resnets.1" in report.patched["ResnetBlock2D"]
    run(model, fn)
    assert len(seen) == 1
    report.undo()


def test_code_of_another_diffusers_release_is_reported(monkeypatch):
    monkeypatch.setattr(ResnetBlock2DPatch, "checked", {"forward": {"0123456789abcdef": "9.99"}})
    model, _ = MODELS["unet_2d"]()
    report = accelerate(model, dtype=torch.float32)
    assert "ResnetBlock2D" not in report.patched
    reasons = {r for _, r in report.skipped}
    assert len(report.skipped) == 12 and len(reasons) == 1
    assert "differs from the code this patch was checked against (diffusers 9.99" in reasons.pop()
    report.undo()


@pytest.mark.parametrize("how", ["processor", "activation"])
def test_strict_raises_and_changes_nothing(how):
    model, _ = MODELS["unet_sd15"]()
    path, _ = _alter(model, how)
    before = snapshot(model)
    with pytest.raises(AccelerateError, match=path.replace(".", r"\.")):
        accelerate(model, dtype=torch.bfloat16, channels_last=True, strict=True)
    assert_same(before, snapshot(model))
    accelerate(model, dtype=torch.float32, strict=False).undo()  # not left marked as accelerated


def test_processor_and_forward_installed_are_fastdiff_s():
    model, _ = MODELS["unet_2d"]()
    report = accelerate(model, dtype=torch.float32)
    assert all(isinstance(m.processor, FastdiffAttnProcessor) for m in model.modules() if hasattr(m, "processor"))
    assert all("forward" in m.__dict__ for m in model.modules() if type(m) is ResnetBlock2D)
    keys = set(model.state_dict())
    report.undo()
    assert set(model.state_dict()) == keys
    assert all(type(m.processor) is AttnProcessor2_0 for m in model.modules() if hasattr(m, "processor"))


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(dtype="int8"), "dtype must be"),
    (dict(dtype=torch.int32), "floating-point"),
    (dict(channels_last="yes"), "channels_last must be"),
    (dict(cuda_graph=1), "cuda_graph must be"),
    (dict(cuda_graph=True), "cuda_graph=True needs the model on a CUDA device"),
    (dict(compile="max"), "compile must be one of"),
    (dict(scheduler=None), "scheduler must be"),
    (dict(strict="no"), "strict must be"),
    (dict(threads=0), "threads must be"),
    (dict(compile_options="max-autotune"), "compile_options must be"),
])
def test_bad_arguments_raise_before_any_change(kw, match):
    model, _ = MODELS["unet_2d"]()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        accelerate(model, **kw)
    assert_same(before, snapshot(model))


def test_not_a_model_raises():
    with pytest.raises(ValueError, match="DiffusionPipeline or a torch.nn.Module"):
        accelerate(object())


def test_default_dtype_follows_the_policy_and_keeps_a_low_precision_model():
    from fastdiff.policy import default_dtype

    model, _ = MODELS["unet_2d"]()
    report = accelerate(model)
    assert report.dtype == default_dtype("cpu")
    report.undo()
    model.to(torch.float16)
    report = accelerate(model)
    assert report.dtype == torch.float16 and report.converted == {} and report.memory_kept == 0
    report.undo()


def test_cpu_weights_are_packed_once_and_repacked_when_they_change():
    model, fn = MODELS["unet_sd15"]()
    twin = copy.deepcopy(model)
    report = accelerate(model, dtype=torch.bfloat16)
    run(model, fn)
    w = model.conv_in.weight
    packed = prepack._CACHE[w.data_ptr()].packed
    assert packed is not None
    run(model, fn)
    assert prepack._CACHE[w.data_ptr()].packed is packed  # kept between calls
    new = {k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(new)
    out = run(model, fn)
    assert prepack.is_packed(w) and prepack._CACHE[w.data_ptr()].packed is not packed
    twin.load_state_dict(new)
    twin_report = accelerate(twin, dtype=torch.bfloat16)  # packs the new weights at its first call
    assert torch.equal(out, run(twin, fn))
    twin_report.undo()
    report.undo()
    assert not prepack.is_packed(model.conv_in.weight)


def test_compile_keeps_packed_weights():
    model, _ = MODELS["unet_2d"]()
    report = accelerate(model, dtype=torch.bfloat16, compile=True)
    assert_packed_every_plain_layer(report, model)
    report.undo()


def test_bfloat16_packs_linear_weights_too():
    model, fn = MODELS["unet_sd15"]()
    report = accelerate(model, dtype=torch.bfloat16)
    assert_packed_every_plain_layer(report, model)
    assert len(report.patched["Linear"]) == sum(type(m) is nn.Linear for m in model.modules())
    report.undo()


def test_a_convolution_that_cannot_be_packed_is_reported():
    model, fn = MODELS["unet_2d"]()
    model.conv_in.padding_mode = "reflect"
    ref = run(model, fn)  # float32
    report = accelerate(model, dtype=torch.bfloat16)
    assert ("conv_in", "Conv2d: padding_mode='reflect' (only 'zeros' is packed)") in report.skipped
    assert "conv_in" not in report.patched["Conv2d"]
    assert rel_l2(run(model, fn), ref) <= 5e-2  # conv_in runs its own (reflect-padded) forward in bf16
    with pytest.raises(AccelerateError, match="padding_mode"):
        report.undo()
        accelerate(model, dtype=torch.bfloat16, strict=True)
