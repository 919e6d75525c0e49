"""The U-Nets of the zoo: ADM (guided-diffusion) and its classifier, and the DDPM U-Net (diffusers).

Oracles: the guided-diffusion fixture (tests/fixtures/upstream/adm_unet_tiny), diffusers'
``UNet2DModel`` itself, upstream's attention math written out here, float64 runs, and published counts.
"""

import json
import math

import pytest
import torch
from conftest import read_fixture, rel_l2
from torch import nn

import fastdiff
from fastdiff.models.adm import PRESETS as ADM_PRESETS
from fastdiff.models.adm import ADMClassifier, ADMUNet, AttentionBlock, AttentionPool2d
from fastdiff.models.ddpm_unet import PRESETS as DDPM_PRESETS
from fastdiff.models.ddpm_unet import DDPMUNet, SpatialSelfAttention

# A small ADM: two levels, attention at the second, AdaGN, resblock up/down.
TINY_ADM = dict(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                attention_resolutions=(2,), channel_mult=(1, 2), num_classes=4, num_head_channels=16,
                use_scale_shift_norm=True, resblock_updown=True)

TINY_CLASSIFIER = dict(image_size=8, in_channels=3, model_channels=32, out_channels=10, num_res_blocks=1,
                       attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16,
                       use_scale_shift_norm=True, resblock_updown=True, pool="attention")


def randomize_(model: nn.Module, std: float = 0.1, seed: int = 0) -> nn.Module:
    """Redraw every parameter (upstream zero-initialises output convs, which would hide branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def hand_macs(model: nn.Module, inputs: dict) -> int:
    """Multiply-accumulates counted from the output shapes of every conv and linear, plus
    2 * B * Tq * Tk * C for each attention (q k^T and p v), as guided-diffusion's count_flops_attn."""
    total = [0]
    conv_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def conv(m, i, o):
        total[0] += o.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear(m, i, o):
        total[0] += o.numel() * m.in_features

    def self_attention(m, i, o):
        b, c = i[0].shape[:2]
        t = math.prod(i[0].shape[2:])
        total[0] += 2 * b * t * t * c

    def pool(m, i, o):  # one query (the mean token) over HW + 1 keys
        b, c = i[0].shape[:2]
        total[0] += 2 * b * (math.prod(i[0].shape[2:]) + 1) * c

    handles = []
    for m in model.modules():
        if isinstance(m, conv_types):
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear))
        elif isinstance(m, (AttentionBlock, SpatialSelfAttention)):
            handles.append(m.register_forward_hook(self_attention))
        elif isinstance(m, AttentionPool2d):
            handles.append(m.register_forward_hook(pool))
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return total[0]


# ---------------------------------------------------------------------------------------------
# ADM U-Net
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adm_fixture():
    meta, tensors = read_fixture("adm_unet_tiny")
    state_dict = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    return meta, tensors, state_dict


def test_adm_matches_guided_diffusion_fixture(adm_fixture):
    meta, tensors, state_dict = adm_fixture
    model = ADMUNet(**meta["config"]).eval()
    model.load_state_dict(state_dict, strict=True)
    features = {k[len("features."):] for k in tensors if k.startswith("features.")}
    assert features, "fixture holds no features"
    got = {}
    for name in features:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: got.__setitem__(name, o))
    with torch.no_grad():
        out = model(tensors["inputs.x"], tensors["inputs.timesteps"], y=tensors["inputs.y"])
    assert out.shape == tensors["output"].shape
    assert rel_l2(out, tensors["output"]) <= 1e-5
    for name in sorted(features):
        assert rel_l2(got[name], tensors["features." + name]) <= 1e-5, name


def test_adm_load_names_missing_and_unexpected_keys(adm_fixture):
    meta, _, state_dict = adm_fixture
    model = ADMUNet(**meta["config"])
    broken = dict(state_dict)
    broken.pop("middle_block.1.qkv.weight")
    broken["middle_block.1.qkv_extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"middle_block\.1\.qkv\.weight") as err:
        model.load_state_dict(broken, strict=True)
    assert "middle_block.1.qkv_extra" in str(err.value)


def upstream_qkv_attention(qkv: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """guided-diffusion's QKVAttentionLegacy / QKVAttention math, written out:
    (B, 3*H*ch, T) -> (B, H*ch, T)."""
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = (z.reshape(b * heads, ch, t) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
    s = 1 / math.sqrt(math.sqrt(ch))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, t)


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy-order", "new-order"])
@pytest.mark.parametrize("spatial", [(4, 4), (3, 5)], ids=["4x4", "odd-3x5"])
def test_adm_attention_block_head_order(new_order, spatial):
    torch.manual_seed(0)
    block = randomize_(AttentionBlock(64, num_head_channels=16, use_new_attention_order=new_order)).double()
    x = torch.randn(2, 64, *spatial, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
        xf = x.reshape(2, 64, -1)
        qkv = block.qkv(nn.functional.group_norm(xf, 32, block.norm.weight, block.norm.bias, 1e-5))
        ref = (xf + block.proj_out(upstream_qkv_attention(qkv, 4, new_order))).reshape(x.shape)
    assert rel_l2(out, ref) <= 1e-12
    # the two orders really differ on the same weights, so the flag is not ignored
    other = AttentionBlock(64, num_head_channels=16, use_new_attention_order=not new_order).double()
    other.load_state_dict(block.state_dict())
    with torch.no_grad():
        assert rel_l2(other(x), out) > 1e-3


@pytest.mark.parametrize("scale_shift", [True, False], ids=["adagn", "add-emb"])
def test_adm_float32_and_grad_match_float64(scale_shift):
    torch.manual_seed(0)
    cfg = dict(TINY_ADM, use_scale_shift_norm=scale_shift, resblock_updown=scale_shift)
    model = randomize_(ADMUNet(**cfg))
    model64 = ADMUNet(**cfg).double()
    model64.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 8, 8)
    t, y = torch.tensor([0, 400, 999]), torch.tensor([0, 3, 1])
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    out32, out64 = model(x32, t, y), model64(x64, t, y)
    assert out32.shape == (3, 6, 8, 8)
    assert rel_l2(out32.detach(), out64.detach()) <= 1e-5
    g = torch.randn_like(out64)
    out32.backward(g.float())
    out64.backward(g)
    assert rel_l2(x32.grad, x64.grad) <= 1e-5
    assert rel_l2(model.label_emb.weight.grad, model64.label_emb.weight.grad) <= 1e-5


def test_adm_layouts_and_dtypes():
    torch.manual_seed(0)
    model = randomize_(ADMUNet(**TINY_ADM)).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 700]), torch.tensor([2, 0])
    with torch.no_grad():
        ref = model(x, t, y)
        assert rel_l2(model(x.to(memory_format=torch.channels_last), t, y), ref) <= 1e-6
        bf16 = ADMUNet(**TINY_ADM).to(torch.bfloat16).eval()
        bf16.load_state_dict(model.state_dict())
        out = bf16(x.to(torch.bfloat16).to(memory_format=torch.channels_last), t, y)
        assert out.dtype == torch.bfloat16 and rel_l2(out, ref) <= 5e-2
        # torso convs in float16, as upstream's convert_to_fp16
        fp16 = ADMUNet(**TINY_ADM, use_fp16=True).eval()
        assert fp16.dtype == torch.float16 and fp16.out[2].weight.dtype == torch.float32
        fp16.load_state_dict(model.state_dict())
        out = fp16(x, t, y)
        assert out.dtype == torch.float32 and rel_l2(out, ref) <= 1e-2
        empty = model(x[:0], t[:0], y[:0])
        assert empty.shape == (0, 6, 8, 8)


def test_adm_bad_inputs_raise_value_errors():
    model = ADMUNet(**TINY_ADM)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="y must be given"):
        model(x, t)
    with pytest.raises(ValueError, match="y must have shape"):
        model(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1, 2, 3]), y)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 4, 8, 8), t, y)
    uncond = ADMUNet(**dict(TINY_ADM, num_classes=None))
    with pytest.raises(ValueError, match="y must be given"):
        uncond(x, t, y)
    assert uncond(x, 10).shape == (2, 6, 8, 8)  # a scalar timestep is broadcast


# ---------------------------------------------------------------------------------------------
# ADM classifier (EncoderUNetModel)
# ---------------------------------------------------------------------------------------------


def _res_keys(prefix, c_in, c_out, emb, scale_shift=True):
    """State-dict keys and shapes of guided-diffusion's ResBlock (read from guided_diffusion/unet.py)."""
    keys = {f"{prefix}.in_layers.0.weight": (c_in,), f"{prefix}.in_layers.0.bias": (c_in,),
            f"{prefix}.in_layers.2.weight": (c_out, c_in, 3, 3), f"{prefix}.in_layers.2.bias": (c_out,),
            f"{prefix}.emb_layers.1.weight": ((2 if scale_shift else 1) * c_out, emb),
            f"{prefix}.emb_layers.1.bias": ((2 if scale_shift else 1) * c_out,),
            f"{prefix}.out_layers.0.weight": (c_out,), f"{prefix}.out_layers.0.bias": (c_out,),
            f"{prefix}.out_layers.3.weight": (c_out, c_out, 3, 3), f"{prefix}.out_layers.3.bias": (c_out,)}
    if c_in != c_out:
        keys.update({f"{prefix}.skip_connection.weight": (c_out, c_in, 1, 1),
                     f"{prefix}.skip_connection.bias": (c_out,)})
    return keys


def _attn_keys(prefix, c):
    return {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,),
            f"{prefix}.qkv.weight": (3 * c, c, 1), f"{prefix}.qkv.bias": (3 * c,),
            f"{prefix}.proj_out.weight": (c, c, 1), f"{prefix}.proj_out.bias": (c,)}


def test_classifier_state_dict_is_encoder_unet_models():
    """TINY_CLASSIFIER's keys and shapes as upstream's EncoderUNetModel builds them."""
    expected = {"time_embed.0.weight": (128, 32), "time_embed.0.bias": (128,),
                "time_embed.2.weight": (128, 128), "time_embed.2.bias": (128,),
                "input_blocks.0.0.weight": (32, 3, 3, 3), "input_blocks.0.0.bias": (32,),
                "out.0.weight": (64,), "out.0.bias": (64,),
                "out.2.positional_embedding": (64, (8 // 2) ** 2 + 1),
                "out.2.qkv_proj.weight": (192, 64, 1), "out.2.qkv_proj.bias": (192,),
                "out.2.c_proj.weight": (10, 64, 1), "out.2.c_proj.bias": (10,)}
    expected.update(_res_keys("input_blocks.1.0", 32, 32, 128))   # level 0, ds 1: no attention
    expected.update(_res_keys("input_blocks.2.0", 32, 32, 128))   # resblock downsample
    expected.update(_res_keys("input_blocks.3.0", 32, 64, 128))   # level 1, ds 2
    expected.update(_attn_keys("input_blocks.3.1", 64))
    expected.update(_res_keys("middle_block.0", 64, 64, 128))
    expected.update(_attn_keys("middle_block.1", 64))
    expected.update(_res_keys("middle_block.2", 64, 64, 128))
    got = {k: tuple(v.shape) for k, v in ADMClassifier(**TINY_CLASSIFIER).state_dict().items()}
    assert got == expected


def test_attention_pool_matches_upstream_full_computation():
    torch.manual_seed(0)
    pool = randomize_(AttentionPool2d(4, 64, 16, 10)).double()
    x = torch.randn(3, 64, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        xs = x.reshape(3, 64, -1)
        xs = torch.cat([xs.mean(-1, keepdim=True), xs], -1) + pool.positional_embedding[None]
        ref = pool.c_proj(upstream_qkv_attention(pool.qkv_proj(xs), 4, new_order=True))[:, :, 0]
        assert rel_l2(pool(x), ref) <= 1e-12
    with pytest.raises(ValueError, match="wrong size"):
        pool(torch.randn(1, 64, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("pool", ["attention", "adaptive", "spatial", "spatial_v2"])
def test_classifier_logits_and_guidance_gradient(pool):
    torch.manual_seed(0)
    cfg = dict(TINY_CLASSIFIER, pool=pool)
    clf = randomize_(ADMClassifier(**cfg))
    clf64 = ADMClassifier(**cfg).double()
    clf64.load_state_dict(clf.state_dict())
    x = torch.randn(3, 3, 8, 8)
    t, y = torch.tensor([10, 500, 990]), torch.tensor([1, 7, 3])
    grads = []
    for m, xx in ((clf, x), (clf64, x.double())):
        xx = xx.clone().requires_grad_()
        logits = m(xx, t)
        assert logits.shape == (3, 10)
        # classifier guidance: grad_x log p(y | x_t)
        selected = torch.log_softmax(logits, -1)[torch.arange(3), y].sum()
        grads.append((logits.detach(), torch.autograd.grad(selected, xx)[0]))
    (l32, g32), (l64, g64) = grads
    assert rel_l2(l32, l64) <= 1e-5
    assert g32.abs().sum() > 0 and rel_l2(g32, g64) <= 1e-5


# ---------------------------------------------------------------------------------------------
# presets and counts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, millions", [
    ("adm-256-cond", 553.8),   # the count issue 5 gives for the 256x256 checkpoint
    ("adm-512-cond", 559.0),   # "559M parameters" for the 512 model
    ("ddpm-cifar10", 35.7),    # DDPM paper: 35.7M
])
def test_preset_parameter_counts(name, millions):
    cls, kwargs = {**ADM_PRESETS, **DDPM_PRESETS}[name]
    with torch.device("meta"):
        model = cls(**kwargs)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


@pytest.mark.parametrize("name", sorted(ADM_PRESETS))
def test_adm_presets_build_with_upstream_flags(name):
    cls, kwargs = ADM_PRESETS[name]
    with torch.device("meta"):
        model = cls(**kwargs)
    size = kwargs["image_size"]
    # "--attention_resolutions 32,16,8" are pixels; the constructor takes downsample rates
    assert model.attention_resolutions == tuple(size // r for r in (32, 16, 8))
    assert kwargs["use_scale_shift_norm"] and kwargs["resblock_updown"]
    # classifiers: 1000 ImageNet classes; U-Nets: learn_sigma doubles the 3 channels
    assert model.out_channels == (1000 if cls is ADMClassifier else 6)


@pytest.mark.parametrize("name", sorted(DDPM_PRESETS))
def test_ddpm_presets_equal_diffusers_structure(name):
    from diffusers import UNet2DModel

    cls, kwargs = DDPM_PRESETS[name]
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in cls(**kwargs).state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in UNet2DModel(**kwargs).state_dict().items()}
    assert ours == theirs


def test_adm_macs_match_published_figures():
    """DiT (Peebles & Xie 2023), Tables 3 and 4, list ADM at 1983 and 1120 "Gflops" (multiply-accumulates)
    for 512x512 and 256x256."""
    for name, published in (("adm-256-cond", 1120e9), ("adm-512-cond", 1983e9)):
        cls, kwargs = ADM_PRESETS[name]
        with torch.device("meta"):
            model = cls(**kwargs)
        assert abs(model.macs(1) - published) / published < 1e-3, name


@pytest.mark.parametrize("which", ["adm", "classifier", "ddpm"])
def test_macs_equal_hand_count(which):
    if which == "adm":
        model = ADMUNet(**TINY_ADM)
    elif which == "classifier":
        model = ADMClassifier(**TINY_CLASSIFIER)
    else:
        model = DDPMUNet(**SMALL_DDPM["ddpm-like"])
    assert model.macs(2) == hand_macs(model, model.example_inputs(2)) > 0
    assert model.flops(2) == 2 * model.macs(2)


# ---------------------------------------------------------------------------------------------
# DDPM U-Net against diffusers' UNet2DModel
# ---------------------------------------------------------------------------------------------

SMALL_DDPM = {
    # the DDPM checkpoints' options: TF padding, sin-cos with shift 1, one head of all channels
    "ddpm-like": dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                      downsample_padding=0, freq_shift=1, flip_sin_to_cos=False, norm_eps=1e-6,
                      mid_block_scale_factor=2 ** 0.5),
    # the rest of what DDPMUNet supports: scale-shift, class labels, centring, several heads, 3 levels
    "scale-shift-classes": dict(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2,
                                norm_num_groups=8, in_channels=4, out_channels=2, attention_head_dim=16,
                                down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
                                resnet_time_scale_shift="scale_shift", num_class_embeds=5,
                                center_input_sample=True),
}


def _diffusers_pair(cfg):
    from diffusers import UNet2DModel

    # std 0.1: at 0.2 the scale-shift config's mid attention (no GroupNorm there, as diffusers builds it)
    # sees logits ~1e4, and float32 gradients become rounding noise in diffusers itself
    ref = randomize_(UNet2DModel(**cfg), std=0.1).eval()
    return ref, DDPMUNet.from_diffusers(ref)


@pytest.mark.parametrize("name", sorted(SMALL_DDPM))
def test_ddpm_matches_diffusers(name):
    cfg = SMALL_DDPM[name]
    ref, model = _diffusers_pair(cfg)
    assert set(model.state_dict()) == set(ref.state_dict())
    torch.manual_seed(1)
    x = torch.randn(3, cfg.get("in_channels", 3), 16, 16)
    t = torch.tensor([3, 500, 999])
    kw = dict(class_labels=torch.tensor([0, 2, 4])) if "num_class_embeds" in cfg else {}
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = ref(xr, t, **kw).sample, model(xm, t, **kw)
    assert isinstance(out, torch.Tensor) and out.shape == out_ref.shape
    assert rel_l2(out.detach(), out_ref.detach()) <= 1e-5
    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)
    assert rel_l2(xm.grad, xr.grad) <= 1e-5
    with torch.no_grad():  # a scalar timestep broadcasts as in diffusers
        assert rel_l2(model(x, 250, **kw), ref(x, 250, **kw).sample) <= 1e-5


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin-deprecated-names"])
def test_ddpm_from_pretrained(tmp_path, fmt):
    cfg = SMALL_DDPM["ddpm-like"]
    ref, _ = _diffusers_pair(cfg)
    ref.save_pretrained(tmp_path, safe_serialization=(fmt == "safetensors"))
    if fmt == "bin-deprecated-names":  # hub files from before diffusers 0.14
        sd = torch.load(tmp_path / "diffusion_pytorch_model.bin", weights_only=True)
        renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        old = {}
        for k, v in sd.items():
            for new, dep in renames.items():
                if f".attentions.0.{new}." in k:
                    k = k.replace(f".attentions.0.{new}.", f".attentions.0.{dep}.")
            old[k] = v
        assert any(".query." in k for k in old)
        torch.save(old, tmp_path / "diffusion_pytorch_model.bin")
    model = DDPMUNet.from_pretrained(str(tmp_path))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 900])
    with torch.no_grad():
        assert rel_l2(model(x, t), ref(x, t).sample) <= 1e-5


def test_ddpm_rejects_what_it_does_not_build(tmp_path):
    base = SMALL_DDPM["ddpm-like"]
    for key, value in (("down_block_types", ("CrossAttnDownBlock2D", "DownBlock2D")),
                       ("time_embedding_type", "fourier"), ("act_fn", "gelu"),
                       ("class_embed_type", "timestep"),
                       ("resnet_time_scale_shift", "spatial"), ("upsample_type", "resnet")):
        with pytest.raises(ValueError, match=key):
            DDPMUNet(**dict(base, **{key: value}))
    config = dict(base, _class_name="UNet2DModel", cross_attention_dim=8)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        DDPMUNet.from_pretrained(str(tmp_path))
    model = DDPMUNet(**base)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="timesteps"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2, 3]))
    sd = model.state_dict()
    sd.pop("mid_block.attentions.0.to_q.weight")
    with pytest.raises(RuntimeError, match=r"mid_block\.attentions\.0\.to_q\.weight"):
        DDPMUNet(**base).load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# the fused kernels inside the models (Triton interpreter on the CPU)
# ---------------------------------------------------------------------------------------------


def _count_norm_launches(monkeypatch) -> list:
    """Count calls of the Triton norm launcher, so a silent fallback to the reference cannot pass."""
    import fastdiff.kernels.modulated_norm as kernels

    calls = []
    launcher = kernels.group_norm_modulate_forward

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(kernels, "group_norm_modulate_forward", counted)
    return calls


def test_adm_triton_backend_equals_reference(kernel_device, monkeypatch):
    """AdaGN (SiLU(GN * (1 + scale) + shift)), GN + SiLU, plain GN (attention's) and attention, each
    through the op's "triton" backend."""
    torch.manual_seed(0)
    # one level keeps the number of norm launches (each one interpreted) small
    cfg = dict(TINY_ADM, channel_mult=(1,), attention_resolutions=(1,), image_size=4)
    model = randomize_(ADMUNet(**cfg)).to(kernel_device).eval()
    x = torch.randn(2, 3, 4, 4, device=kernel_device)
    t, y = torch.tensor([10, 900], device=kernel_device), torch.tensor([1, 3], device=kernel_device)
    calls = _count_norm_launches(monkeypatch)
    with torch.no_grad():
        with fastdiff.ops.backend("reference"):
            ref = model(x, t, y)
        assert not calls
        with fastdiff.ops.backend("triton"):
            out = model(x, t, y)
    # every norm once: 5 ResBlocks x 2, 4 attention blocks, the output norm
    assert len(calls) == sum(isinstance(m, fastdiff.nn.GroupNormModulate) for m in model.modules()) == 15
    assert rel_l2(out, ref) <= 1e-5


def test_ddpm_triton_backend_equals_reference(kernel_device, monkeypatch):
    """GN + SiLU with the time embedding added before the norm, through the Triton launcher."""
    torch.manual_seed(0)
    cfg = dict(SMALL_DDPM["ddpm-like"], norm_num_groups=4, sample_size=8)
    model = randomize_(DDPMUNet(**cfg)).to(kernel_device).eval()
    x, t = torch.randn(2, 3, 8, 8, device=kernel_device), torch.tensor([3, 700], device=kernel_device)
    calls = _count_norm_launches(monkeypatch)
    with torch.no_grad():
        with fastdiff.ops.backend("reference"):
            ref = model(x, t)
        with fastdiff.ops.backend("triton"):
            out = model(x, t)
    assert len(calls) == sum(isinstance(m, fastdiff.nn.GroupNormModulate) for m in model.modules()) > 0
    assert rel_l2(out, ref) <= 1e-5
