"""fastdiff.accelerate on tiny diffusion transformers (DiT, PixArt, SD3, SD3.5, Flux) built from the configs of
diffusers' own model tests: patched against unpatched (float32 <= 1e-5 relative, gradients too; bf16 against
diffusers' bf16), the fused ops actually called, the Triton kernels through the patched models under the
interpreter, the report, an exact undo, altered modules reported and left alone, strict mode, the CUDA-graph
bucketing of Flux's forward (emulated on the CPU) and regional compilation."""

import copy

import pytest
import torch
from accelerate_models import assert_packed_every_plain_layer, block_counts
from conftest import DIFFUSERS_WARNINGS, rel_l2
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.models.activations import GELU
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.normalization import FP32LayerNorm, RMSNorm
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxSingleTransformerBlock
from test_accelerate import assert_same, snapshot
from test_accelerate_runtime import EmulatedCapture
from torch import nn

from fastdiff import ops
from fastdiff.compat.diffusers import AccelerateError, accelerate
from fastdiff.compat.diffusers.accelerate import _compile_scope
from fastdiff.compat.diffusers.cuda_graph import CudaGraphForward
from fastdiff.compat.diffusers.patches_flux import FastdiffFluxAttnProcessor, FluxTransformerBlockPatch

pytestmark = [*DIFFUSERS_WARNINGS, pytest.mark.usefixtures("one_thread_module")]


# ---------------------------------------------------------------------------------------------
# tiny models (diffusers' test configs) with one input batch each: MODELS[name](batch) -> (model, inputs)
# ---------------------------------------------------------------------------------------------

FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
SD3 = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
           caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
SD35 = dict(SD3, dual_attention_layers=(0,), qk_norm="rms_norm")
PIXART = dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=2, num_attention_heads=2, in_channels=4,
              cross_attention_dim=8, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
              num_embeds_ada_norm=8, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
              use_additional_conditions=False, caption_channels=None)
DIT = dict(in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2, attention_head_dim=4,
           attention_bias=True, num_layers=1, norm_type="ada_norm_zero", num_embeds_ada_norm=8, patch_size=2,
           sample_size=8)


def _build(cls, cfg):
    torch.manual_seed(0)
    return cls(**cfg).eval()


def flux(batch=2, guidance=False, tokens=(16, 8)):
    model = _build(FluxTransformer2DModel, dict(FLUX, guidance_embeds=guidance))
    g = torch.Generator().manual_seed(1)
    s_img, s_txt = tokens
    inputs = dict(hidden_states=torch.randn(batch, s_img, 4, generator=g),
                  encoder_hidden_states=torch.randn(batch, s_txt, 32, generator=g),
                  pooled_projections=torch.randn(batch, 32, generator=g),
                  img_ids=torch.randn(s_img, 3, generator=g) * 4, txt_ids=torch.zeros(s_txt, 3),
                  timestep=torch.linspace(1.0, 0.3, batch))
    if guidance:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return model, inputs


def sd3(batch=2, cfg=SD3, size=16):
    model = _build(SD3Transformer2DModel, cfg)
    g = torch.Generator().manual_seed(1)
    return model, dict(hidden_states=torch.randn(batch, 4, size, size, generator=g),
                       encoder_hidden_states=torch.randn(batch, 20, 32, generator=g),
                       pooled_projections=torch.randn(batch, 64, generator=g),
                       timestep=torch.randint(0, 1000, (batch,), generator=g))


def pixart(batch=2):
    model = _build(PixArtTransformer2DModel, PIXART)
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, 8)
    mask[0, 6:] = 0  # a padded prompt: PixArt's cross-attention mask
    return model, dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                       timestep=torch.randint(0, 1000, (batch,), generator=g),
                       encoder_hidden_states=torch.randn(batch, 8, 8, generator=g),
                       added_cond_kwargs={"aspect_ratio": None, "resolution": None}, encoder_attention_mask=mask)


def dit(batch=2):
    model = _build(DiTTransformer2DModel, DIT)
    g = torch.Generator().manual_seed(1)
    return model, dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g),
                       timestep=torch.randint(0, 1000, (batch,), generator=g),
                       class_labels=torch.randint(0, 4, (batch,), generator=g))


MODELS = {"dit": dit, "pixart": pixart, "sd3": sd3, "sd35": lambda batch=2: sd3(batch, SD35), "flux": flux,
          "flux-dev": lambda batch=2: flux(batch, guidance=True)}

# how many modules of each patched class the models hold
EXPECTED = {
    "dit": {"BasicTransformerBlock": 1, "AdaLayerNormZero": 1, "AttnProcessor2_0": 1, "DiTTransformer2DModel": 1},
    "pixart": {"BasicTransformerBlock": 1, "AttnProcessor2_0": 2, "PixArtTransformer2DModel": 1},
    "sd3": {"JointTransformerBlock": 4, "AdaLayerNormZero": 7, "AdaLayerNormContinuous": 2,
            "JointAttnProcessor2_0": 4},
    "sd35": {"JointTransformerBlock": 4, "SD35AdaLayerNormZeroX": 1, "AdaLayerNormZero": 6,
             "AdaLayerNormContinuous": 2, "JointAttnProcessor2_0": 5},
    "flux": {"FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 1, "AdaLayerNormZero": 2,
             "AdaLayerNormZeroSingle": 1, "AdaLayerNormContinuous": 1, "FluxAttnProcessor": 2},
}
EXPECTED["flux-dev"] = EXPECTED["flux"]
# fused op calls per forward: (layer_norm_modulate, qk_norm_rope, attention)
OP_CALLS = {"dit": (3, 0, 1), "pixart": (3, 0, 2), "sd3": (16, 0, 4), "sd35": (17, 9, 5), "flux": (6, 3, 2),
            "flux-dev": (6, 3, 2)}


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_float32_patched_matches_unpatched_and_report_lists_every_module(name):
    model, inputs = MODELS[name]()
    ref = run(model, inputs)
    report = accelerate(model, dtype=torch.float32)
    out = run(model, inputs)
    assert rel_l2(out, ref) <= 1e-5
    assert block_counts(report) == EXPECTED[name]
    assert_packed_every_plain_layer(report, model)
    assert report.skipped == []
    for cls_name, paths in report.patched.items():
        modules = dict(model.named_modules())
        assert all(p in modules for p in paths), cls_name
    report.undo()


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_ops_run_in_the_patched_model(name, monkeypatch):
    """Every adaLN norm + modulate is one layer_norm_modulate, every q/k RMSNorm (+ RoPE) one qk_norm_rope per
    stream, every attention one fd.ops.attention: counted per forward."""
    model, inputs = MODELS[name]()
    report = accelerate(model, dtype=torch.float32)
    calls = {"layer_norm_modulate": 0, "qk_norm_rope": 0, "attention": 0}
    for op in calls:
        real = getattr(ops, op)

        def counting(*a, _real=real, _op=op, **k):
            calls[_op] += 1
            return _real(*a, **k)

        monkeypatch.setattr(ops, op, counting)
    run(model, inputs)
    assert (calls["layer_norm_modulate"], calls["qk_norm_rope"], calls["attention"]) == OP_CALLS[name]
    report.undo()


@pytest.mark.parametrize("name", ["pixart", "sd35", "flux-dev"])
def test_bfloat16_error_is_that_of_diffusers_bfloat16(name):
    """A bf16 model called with float32 inputs (the entry point casts; Flux's position ids stay float32): its
    error against the float32 model at most twice that of diffusers' own bf16 model."""
    model, inputs = MODELS[name]()
    ref = run(model, inputs)
    theirs = copy.deepcopy(model).to(torch.bfloat16)
    cast = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() and k not in ("timestep",)
            else v for k, v in inputs.items()}
    err_theirs = rel_l2(run(theirs, cast).float(), ref)
    report = accelerate(model, dtype=torch.bfloat16)
    out = run(model, inputs)
    assert out.dtype == torch.float32
    assert rel_l2(out, ref) <= 2 * err_theirs + 1e-3
    gelus = [p for p, m in model.named_modules() if type(m) is GELU]
    assert sorted(report.patched.get("GELU", [])) == sorted(gelus)  # fused into the packed Linear (CPU, bf16)
    assert_packed_every_plain_layer(report, model)
    report.undo()


@pytest.mark.parametrize("name", ["sd35", "flux"])
def test_gradients_match_unpatched(name):
    """Under autograd the patched forward takes the differentiable paths (qk_norm_rope without out=, the
    norms' backward ops): input and weight gradients as diffusers'."""
    model, inputs = MODELS[name]()
    inputs["hidden_states"].requires_grad_(True)

    def grads(m):
        m.zero_grad(set_to_none=True)
        inputs["hidden_states"].grad = None
        m(**inputs).sample.square().mean().backward()
        return {"x": inputs["hidden_states"].grad.clone()} | {n: p.grad.clone() for n, p in m.named_parameters()
                                                              if p.grad is not None}

    ref = grads(model)
    report = accelerate(model, dtype=torch.float32)
    out = grads(model)
    assert out.keys() == ref.keys()
    for k in ref:
        assert rel_l2(out[k], ref[k]) <= 1e-4, k
    report.undo()


@pytest.mark.parametrize("name", ["pixart", "dit", "sd35", "flux"])
def test_triton_kernels_through_the_patched_model(name, kernel_device, monkeypatch):
    """Under the interpreter on the CPU in float32 (<= 1e-4); on a GPU in float16, within twice the error of
    diffusers' own float16 model."""
    model, inputs = MODELS[name](batch=1)
    ref = run(model, inputs)
    dtype, tol = torch.float32, 1e-4  # DESIGN.md: the attention kernel's float32 tolerance
    if kernel_device != "cpu":
        model.to(kernel_device)
        inputs = {k: v.to(kernel_device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        theirs = copy.deepcopy(model).half()
        half = {k: v.half() if torch.is_tensor(v) and v.is_floating_point() and k not in ("timestep", "img_ids",
                                                                                           "txt_ids") else v
                for k, v in inputs.items()}
        dtype, tol = torch.float16, 2 * rel_l2(run(theirs, half).float().cpu(), ref) + 1e-3
    report = accelerate(model, dtype=dtype, cuda_graph=False)
    calls = []
    import fastdiff.kernels.attention as ka
    import fastdiff.kernels.modulated_norm as kn
    import fastdiff.kernels.qk_norm_rope as kq

    for mod, fname in ((kn, "layer_norm_modulate_forward"), (kq, "qk_norm_rope_forward"), (ka, "attention_forward")):
        real = getattr(mod, fname)
        monkeypatch.setattr(mod, fname, lambda *a, _real=real, _n=fname, **k: calls.append(_n) or _real(*a, **k))
    with ops.backend("triton"):
        out = run(model, inputs).float().cpu()
    assert rel_l2(out, ref) <= tol
    norms, qk, attn = OP_CALLS[name]
    assert calls.count("layer_norm_modulate_forward") == norms
    assert calls.count("qk_norm_rope_forward") == qk
    assert calls.count("attention_forward") == attn
    report.undo()


def test_flux_attention_mask_and_fused_projections():
    """A mask through joint_attention_kwargs becomes the attention bias; fused QKV projections
    (``fuse_qkv_projections``) are read as chunks of one matmul."""
    model, inputs = flux()
    mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    mask[0, ..., 5:8] = False  # padding in the first prompt
    kw = dict(inputs, joint_attention_kwargs={"attention_mask": mask})
    ref = run(model, kw)
    assert rel_l2(run(model, inputs), ref) > 1e-3  # the mask matters
    report = accelerate(model, dtype=torch.float32)
    assert rel_l2(run(model, kw), ref) <= 1e-5
    report.undo()
    model.fuse_qkv_projections()
    ref = run(model, inputs)
    report = accelerate(model, dtype=torch.float32)
    assert report.skipped == [] and len(report.patched["FluxAttnProcessor"]) == 2
    assert rel_l2(run(model, inputs), ref) <= 1e-5
    report.undo()


def test_flux_rotary_embedding_of_another_form_is_rotated_by_diffusers_code():
    """cos / sin the fused op does not take (half precision here) are applied with diffusers' apply_rotary_emb
    after the fused RMSNorm: the same result as diffusers' processor."""
    model, _ = flux()
    attn = model.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 16, 32, generator=g), torch.randn(2, 8, 32, generator=g)
    cos, sin = (t.half() for t in model.pos_embed(torch.randn(24, 3, generator=g)))
    with torch.no_grad():
        ref = FluxAttnProcessor()(attn, x, ctx, image_rotary_emb=(cos, sin))
        out = FastdiffFluxAttnProcessor()(attn, x, ctx, image_rotary_emb=(cos, sin))
    for o, r in zip(out, ref, strict=True):
        assert rel_l2(o, r) <= 1e-5


# ---------------------------------------------------------------------------------------------
# undo
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["pixart", "sd35", "flux-dev"])
def test_undo_restores_bitwise(name, dtype):
    model, inputs = MODELS[name]()
    before = snapshot(model)
    ref = run(model, inputs)
    report = accelerate(model, dtype=dtype)
    run(model, inputs)
    report.undo()
    assert_same(before, snapshot(model))
    assert torch.equal(run(model, inputs), ref)


# ---------------------------------------------------------------------------------------------
# altered modules: reported, not patched; strict raises
# ---------------------------------------------------------------------------------------------


class _MyJointProcessor(JointAttnProcessor2_0):
    pass


class _MySingleBlock(FluxSingleTransformerBlock):
    pass


def _alter(name, model, how):
    """Change one module; returns (its path, a word of the reason, the patched class it no longer counts in)."""
    if how == "joint-processor-subclass":
        model.transformer_blocks[1].attn.processor = _MyJointProcessor()
        return "transformer_blocks.1.attn", "_MyJointProcessor", "JointAttnProcessor2_0"
    if how == "fp32-layer-norm":
        norm = model.transformer_blocks[0].norm1
        norm.norm = FP32LayerNorm(norm.norm.normalized_shape[0], elementwise_affine=False, bias=False, eps=1e-6)
        return "transformer_blocks.0.norm1", "FP32LayerNorm", "AdaLayerNormZero"
    if how == "rms-norm-out":
        model.norm_out.norm = RMSNorm(model.norm_out.norm.normalized_shape[0], eps=1e-6, elementwise_affine=False)
        return "norm_out", "RMSNorm", "AdaLayerNormContinuous"
    if how == "hook":
        model.transformer_blocks[0].norm2.register_forward_hook(lambda m, i, o: None)
        return "transformer_blocks.0", "hooks", "FluxTransformerBlock"
    if how == "subclass":
        model.single_transformer_blocks[0].__class__ = _MySingleBlock
        return "single_transformer_blocks.0", "subclass", "FluxSingleTransformerBlock"
    if how == "attention-backend":
        processor = FluxAttnProcessor()
        processor._attention_backend = "native"
        model.single_transformer_blocks[0].attn.processor = processor
        return "single_transformer_blocks.0.attn", "set_attention_backend", "FluxAttnProcessor"
    if how == "qk-norm-replaced":
        attn = model.transformer_blocks[0].attn
        attn.norm_k = nn.LayerNorm(attn.head_dim, eps=1e-6)
        return "transformer_blocks.0.attn", "LayerNorm", "FluxAttnProcessor"
    raise AssertionError(how)


ALTERATIONS = [("sd3", "joint-processor-subclass"), ("sd3", "fp32-layer-norm"), ("sd3", "rms-norm-out"),
               ("flux", "hook"), ("flux", "subclass"), ("flux", "attention-backend"), ("flux", "qk-norm-replaced")]


@pytest.mark.parametrize("name, how", ALTERATIONS, ids=[h for _, h in ALTERATIONS])
def test_altered_module_is_reported_and_left_alone(name, how):
    model, inputs = MODELS[name]()
    path, word, cls_name = _alter(name, model, how)
    ref = run(model, inputs)
    report = accelerate(model, dtype=torch.float32)
    assert [p for p, _ in report.skipped] == [path]
    assert word in report.skipped[0][1]
    assert all(path not in paths for paths in report.patched.values())
    expected = dict(EXPECTED[name])
    expected[cls_name] -= 1
    assert block_counts(report) == {k: v for k, v in expected.items() if v}
    assert rel_l2(run(model, inputs), ref) <= 1e-5
    report.undo()


def test_sd3_layer_norm_qk_norm_is_reported():
    """SD3 with ``qk_norm="layer_norm"`` (a diffusers option qk_norm_rope does not compute): its attention
    processors are left alone, every other patch applies."""
    model, inputs = sd3(cfg=dict(SD3, qk_norm="layer_norm"))
    ref = run(model, inputs)
    report = accelerate(model, dtype=torch.float32)
    assert len(report.skipped) == 4 and all("LayerNorm" in why for _, why in report.skipped)
    assert "JointAttnProcessor2_0" not in report.patched and len(report.patched["JointTransformerBlock"]) == 4
    assert rel_l2(run(model, inputs), ref) <= 1e-5
    report.undo()


def test_code_of_another_diffusers_release_is_reported(monkeypatch):
    monkeypatch.setattr(FluxTransformerBlockPatch, "checked", {"forward": {"0123456789abcdef": "9.99"}})
    model, _ = flux()
    report = accelerate(model, dtype=torch.float32)
    assert [p for p, _ in report.skipped] == ["transformer_blocks.0"]
    assert "differs from the code this patch was checked against (diffusers 9.99" in report.skipped[0][1]
    report.undo()


def test_strict_raises_and_changes_nothing():
    model, _ = flux()
    path, _, _ = _alter("flux", model, "attention-backend")
    before = snapshot(model)
    with pytest.raises(AccelerateError, match=path.replace(".", r"\.")):
        accelerate(model, dtype=torch.bfloat16, strict=True)
    assert_same(before, snapshot(model))
    accelerate(model, dtype=torch.float32).undo()


# ---------------------------------------------------------------------------------------------
# the loop: CUDA-graph buckets of Flux's forward (emulated capture), regional compilation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def test_graph_wrapper_replays_a_patched_flux_with_its_extra_arguments():
    """Flux's forward takes guidance, img_ids, txt_ids and joint_attention_kwargs besides the latents: they are
    bucketed and copied into static buffers like the rest, and each replay equals the eager forward."""
    model, inputs = flux(guidance=True)
    report = accelerate(model, dtype=torch.float32)
    capture = EmulatedCapture()
    fwd = CudaGraphForward(model.forward, capture=capture, device_type="cpu", name="transformer")
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        kw = dict(inputs, hidden_states=torch.randn(2, 16, 4, generator=g), timestep=torch.full((2,), 1 - step / 3),
                  guidance=torch.full((2,), 2.0 + step), joint_attention_kwargs=None, return_dict=False)
        out = fwd(**kw)[0]
        assert torch.equal(out, model(**kw)[0])
    assert capture.captures == 1 and capture.replays == 2
    fwd(**dict(kw, txt_ids=torch.zeros(5, 3), encoder_hidden_states=torch.randn(2, 5, 32)))  # another bucket
    assert len(fwd.seen) == 2 and len(fwd.buckets) == 1
    report.undo()


@pytest.mark.parametrize("cls, cfg", [
    (FluxTransformer2DModel, dict(guidance_embeds=True)),  # Flux-dev: 19 double + 38 single blocks
    (SD3Transformer2DModel, dict(num_layers=24, num_attention_heads=24, joint_attention_dim=4096,
                                 caption_projection_dim=1536, pooled_projection_dim=2048)),  # SD3-medium
    (PixArtTransformer2DModel, dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                    out_channels=8, cross_attention_dim=1152, caption_channels=4096,
                                    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                    num_embeds_ada_norm=1000, sample_size=128)),  # PixArt-Sigma
], ids=["flux-dev", "sd3-medium", "pixart-sigma"])
def test_compile_true_is_regional_for_the_released_transformers(cls, cfg):
    """At the released sizes the repeated blocks hold most parameters: compile=True compiles them alone (Flux
    declares them; SD3 and PixArt through their transformer_blocks lists). Built on the meta device."""
    with torch.device("meta"):
        model = cls(**cfg)
    assert _compile_scope(model, True) == "regional"


@pytest.mark.parametrize("name, blocks", [("flux", 2), ("sd3", 4), ("pixart", 1)])
def test_regional_compile_traces_the_patched_blocks(name, blocks):
    """compile="regional" compiles each repeated block, and the compiled patched blocks give the eager result."""
    model, inputs = MODELS[name]()
    ref = run(model, inputs)
    torch._dynamo.reset()
    report = accelerate(model, dtype=torch.float32, compile="regional", compile_options={"backend": "eager"})
    assert report.compiled == {"": f"regional ({blocks} blocks)"}
    assert rel_l2(run(model, inputs), ref) <= 1e-5
    report.undo()
    assert all(m._compiled_call_impl is None for m in model.modules())


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_layer_norm_modulate_fake_matches_transposed_tokens(backend):
    """PixArt's and DiT's patch embedding gives tokens as (B, L, D) views of (B, D, L) memory: the op's output
    layout must be what its fake says there, or inductor's stride asserts fail in the compiled model."""
    x = torch.randn(2, 8, 16).transpose(1, 2)  # (B, L, D), transposed memory
    s, t = torch.randn(2, 8), torch.randn(2, 8)
    torch.library.opcheck(torch.ops.fastdiff.layer_norm_modulate.default, (x, s, t, None, None, 1e-6, backend))
