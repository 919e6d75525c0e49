"""fastdiff.load: every source gives a ready Denoiser (schedule, prediction, learned sigma, classes, null
label, default guidance, sample shape, latent scale, VAE), and every bad path gives one error naming it."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastdiff
from fastdiff import models
from fastdiff.loading import TimestepOffset
from fastdiff.schedules import VPSchedule, VPSDESchedule

TINY_DIT = dict(input_size=8, depth=2, hidden_size=64, num_heads=2, num_classes=10)
TINY_UVIT = dict(img_size=8, embed_dim=64, depth=2, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def dit_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = models.preset("dit-s-8-256", **TINY_DIT)
    path = tmp_path_factory.mktemp("dit") / "tiny-dit.pt"
    torch.save({"ema": model.state_dict()}, path)
    return str(path), model


def _alphas(schedule):
    return np.asarray(schedule.alphas_cumprod)


# ---------------------------------------------------------------------------------------------
# the sources
# ---------------------------------------------------------------------------------------------


def test_digits():
    den = fastdiff.load("digits")
    assert isinstance(den, fastdiff.Denoiser) and den.source == "digits"
    assert (den.num_classes, den.y_null, den.default_guidance_scale) == (10, 10, 2.0)
    assert den.sample_shape == (1, 16, 16) and not den.latent and den.vae is None and den.can_decode()
    assert den.prediction == "eps" and not den.learned_sigma
    np.testing.assert_allclose(_alphas(den.schedule), _alphas(VPSchedule("linear", 1000)), rtol=0, atol=0)
    assert den.model.y_null == 10  # the model carries its null label too
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(den.decode(x), x)  # a pixel model's samples are images already


def test_preset_with_checkpoint(dit_checkpoint):
    path, source = dit_checkpoint
    den = fastdiff.load("dit-s-8-256", checkpoint=path, overrides=TINY_DIT)
    assert den.source == path and den.learned_sigma and den.prediction == "eps"
    assert (den.num_classes, den.y_null, den.default_guidance_scale) == (10, 10, 4.0)
    assert den.sample_shape == (4, 8, 8) and den.latent and den.latent_scale == pytest.approx(0.18215)
    assert not den.can_decode()  # latent, no VAE
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    torch.testing.assert_close(den.model(x, t, y), source(x, t, y), rtol=0, atol=0)
    assert not den.model.training and not any(p.requires_grad for p in den.model.parameters())


def test_preset_needs_checkpoint_or_random_weights():
    with pytest.raises(ValueError, match="checkpoint=.*random_weights=True"):
        fastdiff.load("dit-s-8-256", overrides=TINY_DIT)
    den = fastdiff.load("dit-s-8-256", random_weights=True, overrides=TINY_DIT)
    assert den.y_null == 10 and den.source == "dit-s-8-256"
    with pytest.raises(ValueError, match="exclude"):
        fastdiff.load("dit-s-8-256", checkpoint="x.pt", random_weights=True)


@pytest.mark.parametrize("name,kind,extra", [
    ("uvit-imagenet256-large", "VPSchedule", dict(TINY_UVIT, in_chans=4)),
    ("uvit-imagenet512-huge", "VPSchedule", dict(TINY_UVIT, in_chans=4)),
    ("uvit-cifar10-small", "VPSDESchedule", TINY_UVIT),
    ("uvit-imagenet64-mid", "VPSDESchedule", TINY_UVIT),
], ids=["latent-256", "latent-512", "cifar10", "imagenet64"])
def test_uvit_presets_get_their_schedule(name, kind, extra):
    """Latent U-ViT: Stable Diffusion's scaled-linear betas, timesteps shifted by one (trained on 1..1000),
    the last label as null, guidance 1 + U-ViT's scale; pixel U-ViT: the VP SDE fed 999 t."""
    den = fastdiff.load(name, random_weights=True, overrides=extra)
    assert type(den.schedule).__name__ == kind
    if kind == "VPSchedule":
        ref = VPSchedule("scaled_linear", 1000, 0.00085, 0.012)
        np.testing.assert_allclose(_alphas(den.schedule), _alphas(ref), rtol=0, atol=0)
        assert isinstance(den.model_fn, TimestepOffset) and den.model_fn.timestep_offset == 1
        assert (den.num_classes, den.y_null) == (1000, 1000) and den.latent
        assert den.default_guidance_scale == (1.4 if "256" in name else 1.7)
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.0, 999.0]), torch.tensor([3, 1000])
        cond, _, _ = den.model_output(x, t, y)
        torch.testing.assert_close(cond, den.model(x, t + 1, y), rtol=0, atol=0)
    else:
        assert isinstance(den.schedule, VPSDESchedule) and den.schedule.time_scale == 999.0
        assert den.model_fn is not TimestepOffset and not den.latent and den.y_null is None
        assert den.num_classes == (1000 if "imagenet" in name else None) and den.default_guidance_scale == 1.0


def test_preset_vae_decode_and_sample(tmp_path, dit_checkpoint):
    """vae= a diffusers AutoencoderKL folder: fd.sample(decode=True) returns its decode of latents / scale."""
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                                  layers_per_block=1, sample_size=16).eval()
    vae.save_pretrained(tmp_path / "vae")
    path, _ = dit_checkpoint
    den = fastdiff.load("dit-s-8-256", checkpoint=path, overrides=TINY_DIT, vae=str(tmp_path / "vae"))
    assert den.can_decode() and den.latent
    kw = dict(steps=2, y=[1, 2, 3], guidance_scale=den.default_guidance_scale, seeds=0, dtype=torch.float32,
              progress=False)
    latents = fastdiff.sample(den, (3, *den.sample_shape), **kw)
    images = fastdiff.sample(den, (3, *den.sample_shape), decode=True, **kw)
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        ref = den.vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(images, ref, rtol=0, atol=1e-5)
    given = fastdiff.load("dit-s-8-256", checkpoint=path, overrides=TINY_DIT, vae=vae)  # the object: as given
    assert given.vae is vae
    assert den.decode(latents[:0]).shape == (0, 3, 16, 16)


def test_decode_needs_a_vae_before_any_work(dit_checkpoint, monkeypatch):
    path, _ = dit_checkpoint
    den = fastdiff.load("dit-s-8-256", checkpoint=path, overrides=TINY_DIT)
    monkeypatch.setattr("fastdiff.engine.build_table", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="decode=True"):
        fastdiff.sample(den, (1, *den.sample_shape), y=[0], decode=True, progress=False)
    with pytest.raises(ValueError, match="decode=True"):
        fastdiff.sample(den.model, (1, 4, 8, 8), y=[0], decode=True, progress=False)  # a bare model
    with pytest.raises(ValueError, match="no VAE"):
        den.decode(torch.zeros(1, 4, 8, 8))


def test_checkpoint_alone_finds_its_preset(tmp_path, monkeypatch, dit_checkpoint):
    """A checkpoint without a name: the preset whose parameter names and shapes it holds."""
    monkeypatch.setitem(models.PRESETS, "tiny-dit", (models.DiT, {**models.PRESETS["dit-s-8-256"][1], **TINY_DIT}))
    monkeypatch.setitem(models.SAMPLING, "tiny-dit", models.SAMPLING["dit-s-8-256"])
    path, source = dit_checkpoint
    den = fastdiff.load(path)
    assert den.y_null == 10 and den.sample_shape == (4, 8, 8)
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([7.0]), torch.tensor([3])
    torch.testing.assert_close(den.model(x, t, y), source(x, t, y), rtol=0, atol=0)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match="matches no preset") as e:
        fastdiff.load(str(other))
    assert str(other) in str(e.value)


def test_digits_checkpoint_alone_with_its_json(tmp_path):
    from fastdiff.models.digits import DIGITS_WEIGHTS

    for suffix in (".safetensors", ".json"):
        src = os.path.splitext(DIGITS_WEIGHTS)[0] + suffix
        (tmp_path / f"mine{suffix}").write_bytes(open(src, "rb").read())
    den = fastdiff.load(str(tmp_path / "mine.safetensors"))
    assert den.y_null == 10 and den.default_guidance_scale == 2.0 and den.source.endswith("mine.safetensors")


# ---------------------------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------------------------

UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, downsample_padding=0,
            freq_shift=1, flip_sin_to_cos=False, norm_eps=1e-6)


@pytest.mark.parametrize("layout", ["pipeline", "model-with-scheduler-config"])
def test_diffusers_folder(tmp_path, layout):
    """The U-Net from a diffusers folder, the schedule, prediction and clipping from its scheduler config."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**UNET).eval()
    sched = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                                    clip_sample=True, clip_sample_range=1.5)
    if layout == "pipeline":
        unet.save_pretrained(tmp_path / "unet")
        sched.save_pretrained(tmp_path / "scheduler")
    else:  # google/ddpm-*: config.json, the weights and scheduler_config.json side by side
        unet.save_pretrained(tmp_path)
        sched.save_pretrained(tmp_path)
    den = fastdiff.load(str(tmp_path))
    assert den.prediction == "v" and den.clip_x0 == 1.5 and not den.learned_sigma
    theirs = sched.alphas_cumprod.double().numpy()  # computed in float32
    np.testing.assert_allclose(_alphas(den.schedule), theirs, rtol=1e-4, atol=0)
    assert den.sample_shape == (3, 8, 8) and den.num_classes is None and den.y_null is None
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        torch.testing.assert_close(den.model(x, t), unet(x, t).sample, rtol=1e-4, atol=1e-5)


def test_diffusers_folder_without_scheduler_warns(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    diffusers.UNet2DModel(**UNET).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no scheduler config"):
        den = fastdiff.load(str(tmp_path))
    np.testing.assert_allclose(_alphas(den.schedule), _alphas(VPSchedule("linear", 1000)), rtol=0, atol=0)


def test_diffusers_learned_range_and_bad_folders(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    diffusers.UNet2DModel(**dict(UNET, out_channels=6)).save_pretrained(tmp_path / "learned")
    diffusers.DDPMScheduler(variance_type="learned_range").save_pretrained(tmp_path / "learned")
    assert fastdiff.load(str(tmp_path / "learned")).learned_sigma
    diffusers.UNet2DModel(**UNET).save_pretrained(tmp_path / "mismatch")
    diffusers.DDPMScheduler(variance_type="learned_range").save_pretrained(tmp_path / "mismatch")
    with pytest.raises(ValueError, match="twice the input channels"):
        fastdiff.load(str(tmp_path / "mismatch"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        fastdiff.load(str(tmp_path / "empty"))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as e:
        fastdiff.load(str(tmp_path / "badjson"))
    assert "badjson" in str(e.value)
    diffusers.UNet2DModel(**UNET).save_pretrained(tmp_path / "cut")
    weights = tmp_path / "cut" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError) as e:
        fastdiff.load(str(tmp_path / "cut"))
    assert str(weights) in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# ONNX graphs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from fastdiff.export import to_onnx

    den = fastdiff.load("digits")
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    to_onnx(den, str(path), input_shape=den.sample_shape)
    return str(path), den


def test_onnx_graph_carries_what_sampling_needs(digits_onnx):
    path, ref = digits_onnx
    den = fastdiff.load(path)
    from fastdiff.export.ort import OrtDenoiser

    assert isinstance(den.model, OrtDenoiser) and den.model.y_null == 10  # the null label stored in the graph
    assert (den.num_classes, den.y_null, den.default_guidance_scale) == (10, 10, 2.0)
    assert den.sample_shape == (1, 16, 16) and den.prediction == "eps" and not den.learned_sigma
    np.testing.assert_allclose(_alphas(den.schedule), _alphas(ref.schedule), rtol=0, atol=0)
    kw = dict(steps=3, y=torch.arange(4), seeds=0, dtype=torch.float32, progress=False)
    out = fastdiff.sample(den, (4, *den.sample_shape), guidance_scale=den.default_guidance_scale, **kw)
    want = fastdiff.sample(ref, (4, *ref.sample_shape), guidance_scale=ref.default_guidance_scale, **kw)
    torch.testing.assert_close(out, want, rtol=0, atol=2e-3)
    # guidance through fd.sample finds the graph's null label on the OrtDenoiser without any y_null=
    bare = fastdiff.Denoiser(den.model, den.schedule)
    torch.testing.assert_close(fastdiff.sample(bare, (4, 1, 16, 16), guidance_scale=2.0, **kw), out,
                               rtol=0, atol=0)


def test_onnx_sources_that_are_refused(tmp_path, digits_onnx):
    pytest.importorskip("onnxruntime")
    import onnx

    path, _ = digits_onnx
    legacy = onnx.load(path)  # an older export: no schedule in the metadata
    kept = [p for p in legacy.metadata_props if p.key != "fastdiff.schedule"]
    del legacy.metadata_props[:]
    legacy.metadata_props.extend(kept)
    onnx.save(legacy, str(tmp_path / "legacy.onnx"))
    with pytest.raises(ValueError, match="schedule="):
        fastdiff.load(str(tmp_path / "legacy.onnx"))
    assert fastdiff.load(str(tmp_path / "legacy.onnx"), schedule=VPSchedule()).y_null == 10
    for name, data in (("random.onnx", os.urandom(500)), ("cut.onnx", open(path, "rb").read()[:3000])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as e:
            fastdiff.load(str(tmp_path / name))
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# bad input: one error that names the file or the argument
# ---------------------------------------------------------------------------------------------


def _write(kind: str, folder, dit_state) -> str:
    """A bad checkpoint of one kind; returns its path."""
    path = folder / (f"{kind}.safetensors" if "safetensors" in kind else f"{kind}.pt")
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        torch.save(dit_state, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "truncated-safetensors":
        save_file({k: v.contiguous() for k, v in dit_state.items()}, str(path))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "other-architecture":
        adm = models.ADMUNet(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                             attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16)
        torch.save(adm.state_dict(), path)
    elif kind == "wrong-shapes":
        torch.save(models.preset("dit-s-8-256", **dict(TINY_DIT, hidden_size=32)).state_dict(), path)
    elif kind == "not-a-state-dict":
        torch.save({"weights": [1, 2, 3]}, path)
    return str(path)


@pytest.mark.parametrize("kind,exc,words", [
    ("missing", FileNotFoundError, ["does not exist"]),
    ("empty", ValueError, ["empty"]),
    ("corrupt", ValueError, []),
    ("truncated", ValueError, []),
    ("truncated-safetensors", ValueError, []),
    ("other-architecture", ValueError, []),
    ("wrong-shapes", ValueError, []),
    ("not-a-state-dict", ValueError, []),
])
def test_bad_checkpoints_give_one_error_naming_the_file(tmp_path, dit_checkpoint, kind, exc, words):
    state = dit_checkpoint[1].state_dict()
    path = str(tmp_path / "missing.pt") if kind == "missing" else _write(kind, tmp_path, state)
    with pytest.raises(exc) as e:
        fastdiff.load("dit-s-8-256", checkpoint=path, overrides=TINY_DIT)
    msg = str(e.value)
    assert path in msg and "\n" not in msg and len(msg) < 700, msg
    for word in words:
        assert word in msg
    if kind == "other-architecture":
        assert "missing" in msg.lower() or "unexpected" in msg.lower()


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fastdiff.load("uvit-huge-imagenet256"), ValueError, "did you mean 'uvit-imagenet256-huge'"),
    (lambda: fastdiff.load("no/such/folder"), FileNotFoundError, "does not exist"),
    (lambda: fastdiff.load(3), ValueError, "source must be"),
    (lambda: fastdiff.load("adm-classifier-64", random_weights=True), ValueError, "classifier"),
    (lambda: fastdiff.load("digits", random_weights=True), ValueError, "random_weights"),
    (lambda: fastdiff.load("digits", vae="."), ValueError, "pixel space"),
    (lambda: fastdiff.load("digits", device="cuda:9"), ValueError, "device"),
    (lambda: fastdiff.load("digits", device="gpu"), ValueError, "device"),
    (lambda: fastdiff.load("digits", prediction="noise"), ValueError, "prediction"),
    (lambda: fastdiff.load("digits", overrides=[1]), ValueError, "overrides"),
    (lambda: fastdiff.load("digits", vae="no/such/vae"), FileNotFoundError, "vae"),
    (lambda: fastdiff.load("uvit-cifar10-small", random_weights=True, vae="."), ValueError, "pixel space"),
    (lambda: fastdiff.load(__file__), ValueError, "not a source"),
], ids=["misspelt-preset", "missing-path", "not-a-name", "classifier", "digits-random", "digits-vae",
        "absent-device", "bad-device", "prediction", "overrides-type", "vae-missing", "pixel-preset-vae",
        "python-file"])
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_schedule_and_prediction_overrides():
    den = fastdiff.load("digits", schedule=VPSchedule("scaled_linear", 1000, 0.00085, 0.012), prediction="v")
    assert den.prediction == "v" and den.schedule.betas[0] == pytest.approx(0.00085)
    assert den.y_null == 10 and den.sample_shape == (1, 16, 16)


def test_feature_extractor_takes_a_loaded_denoiser():
    den = fastdiff.load("digits")
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    kw = dict(layers=["middle_block"], timesteps=[50])
    alone = fastdiff.FeatureExtractor(den, **kw)(images)["middle_block"][50]
    split = fastdiff.FeatureExtractor(den.model, den.schedule, **kw)(images)["middle_block"][50]
    assert alone.shape == (2, 64, 4, 4)
    torch.testing.assert_close(alone, split, rtol=0, atol=0)
    with pytest.raises(ValueError, match="schedule"):
        fastdiff.FeatureExtractor(den.model, **kw)
