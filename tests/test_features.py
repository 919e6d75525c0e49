"""FeatureExtractor: parity with a per-timestep loop of full forwards with forward hooks, early exit,
per-sample seeding, streaming shards, bad input, recipes, correspondence."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import rel_l2

from fastdiff.features import (
    RECIPES,
    FeatureExtractor,
    correspondence,
    layer_names,
    load_features,
    tokens_to_map,
)
from fastdiff.models import ADMUNet, DDPMUNet, DiT, UViT
from fastdiff.schedules import VPSchedule

SCHEDULE = VPSchedule("linear", num_train_timesteps=1000)

TINY = {
    "adm": (ADMUNet, dict(image_size=8, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
                          attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16,
                          use_scale_shift_norm=True, resblock_updown=True)),
    "adm-cond": (ADMUNet, dict(image_size=8, in_channels=3, model_channels=32, out_channels=3,
                               num_res_blocks=1, attention_resolutions=(1,), channel_mult=(1, 2),
                               num_classes=4, use_scale_shift_norm=False)),
    "ddpm": (DDPMUNet, dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                            downsample_padding=0, freq_shift=1, flip_sin_to_cos=False, norm_eps=1e-6)),
    "dit": (DiT, dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
                      num_classes=5, class_dropout_prob=0.1, learn_sigma=True)),
    "uvit": (UViT, dict(img_size=8, patch_size=2, in_chans=3, embed_dim=64, depth=4, num_heads=4,
                        num_classes=6, mlp_time_embed=True)),
}

# Layers from the encoder, the middle and the decoder (listed out of forward order on purpose).
LAYERS = {
    "adm": ["output_blocks.1", "input_blocks.1", "middle_block"],
    "adm-cond": ["output_blocks.2", "input_blocks.0"],
    "ddpm": ["up_blocks.0", "down_blocks.0", "mid_block"],
    "dit": ["blocks.2", "blocks.0"],
    "uvit": ["out_blocks.0", "in_blocks.1", "mid_block"],
}


pytestmark = pytest.mark.usefixtures("one_thread_module")


def build(name, seed=0):
    """A tiny model with every parameter redrawn (zero-initialised outputs would hide branches)."""
    cls, cfg = TINY[name]
    torch.manual_seed(seed)
    model = cls(**cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def images_for(model, n, seed=1):
    ex = model.example_inputs(1)["x"]
    return torch.randn((n, *ex.shape[1:]), generator=torch.Generator().manual_seed(seed))


def to_map(model, out):
    if isinstance(out, tuple):  # DDPMUNet's down blocks return (hidden, skip states)
        out = out[0]
    if isinstance(model, DiT):
        return tokens_to_map(out, model.input_size // model.patch_size)
    if isinstance(model, UViT):
        return tokens_to_map(out, model.img_size // model.patch_size, model.extras)
    return out


def hook_loop(model, images, layers, timesteps, noise, y=None):
    """The reference: DDPM-Seg's way, one full forward per timestep (and ensemble member) with forward
    hooks on the layers, then DIFT's mean over the ensemble. noise: (N, E, C, H, W)."""
    modules = dict(model.named_modules())
    seen = {}
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
               for name in layers]
    out = {name: {} for name in layers}
    try:
        with torch.no_grad():
            for t in timesteps:
                tt = torch.full((images.shape[0],), t, dtype=torch.long)
                acc = {name: 0.0 for name in layers}
                for e in range(noise.shape[1]):
                    x_t = SCHEDULE.add_noise(images, noise[:, e], tt)
                    model(x_t, tt, y) if y is not None else model(x_t, tt)
                    for name in layers:
                        acc[name] = acc[name] + to_map(model, seen[name])
                for name in layers:
                    out[name][t] = acc[name] / noise.shape[1]
    finally:
        for h in handles:
            h.remove()
    return out


NULL_Y = {"dit": 5, "uvit": 5}  # DiT: num_classes; U-ViT: num_classes - 1


@pytest.mark.parametrize("name", sorted(TINY))
def test_parity_with_hook_loop(name):
    model = build(name)
    n, ensemble, timesteps = 3, 2, [999, 40]
    images = images_for(model, n)
    y = torch.tensor([0, 3, 1]) if name == "adm-cond" else None
    fx = FeatureExtractor(model, SCHEDULE, layers=LAYERS[name], timesteps=timesteps, ensemble=ensemble,
                          seed=7, batch_size=5)  # 12 rows in chunks of 5: chunks straddle images
    got = fx(images, y=y)
    noise = fx.noise(images.shape[1:], range(7, 7 + n))
    y_ref = y if y is not None else (torch.full((n,), NULL_Y[name]) if name in NULL_Y else None)
    ref = hook_loop(model, images, LAYERS[name], timesteps, noise, y_ref)
    assert fx.forward_calls == 3
    for layer in LAYERS[name]:
        for t in timesteps:
            assert got[layer][t].shape == ref[layer][t].shape
            assert rel_l2(got[layer][t], ref[layer][t]) <= 1e-5, (layer, t)


def test_hook_path_for_other_models_matches_walker():
    """A model the walkers do not know (here a subclass) goes through hooks cut by an exception."""

    class Wrapped(ADMUNet):
        pass

    base = build("adm")
    other = Wrapped(**TINY["adm"][1]).eval()
    other.load_state_dict(base.state_dict())
    images = images_for(base, 2)
    kw = dict(layers=["output_blocks.0", "input_blocks.2"], timesteps=[5, 300], ensemble=2, seed=3)
    fx_walk, fx_hooks = FeatureExtractor(base, SCHEDULE, **kw), FeatureExtractor(other, SCHEDULE, **kw)
    assert fx_walk.kind != "hooks" and fx_hooks.kind == "hooks"
    a, b = fx_walk(images), fx_hooks(images)
    calls = count_calls(other, ["output_blocks.1", "out"])
    fx_hooks(images)
    assert calls == {"output_blocks.1": 0, "out": 0}
    for layer in kw["layers"]:
        for t in kw["timesteps"]:
            assert rel_l2(b[layer][t], a[layer][t]) <= 1e-5


def count_calls(model, names):
    calls = {name: 0 for name in names}
    modules = dict(model.named_modules())
    for name in names:
        modules[name].register_forward_hook(
            lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


@pytest.mark.parametrize("name,layer,skipped", [
    ("adm", "output_blocks.1", ["output_blocks.2", "output_blocks.3", "out"]),
    ("adm", "input_blocks.1", ["input_blocks.2", "middle_block", "output_blocks.0", "out"]),
    ("ddpm", "down_blocks.1", ["mid_block", "up_blocks.0", "up_blocks.1", "conv_norm_out", "conv_out"]),
    ("dit", "blocks.1", ["blocks.2", "blocks.3", "final_layer"]),
    ("uvit", "mid_block", ["out_blocks.0", "out_blocks.1", "norm", "decoder_pred", "final_layer"]),
])
def test_early_exit_skips_work(name, layer, skipped):
    model = build(name)
    first = layer_names(model)[0]
    calls = count_calls(model, [first] + skipped)
    fx = FeatureExtractor(model, SCHEDULE, layers=[layer], timesteps=[10, 200, 600], ensemble=2)
    fx(images_for(model, 2))
    # 2 images x 3 timesteps x 2 members = 12 rows: one forward, the deeper modules never run
    assert calls[first] == 1
    assert all(calls[s] == 0 for s in skipped), calls
    calls[first] = 0
    images = images_for(model, 2)
    hook_loop(model, images, [layer], [10, 200, 600], torch.randn(2, 2, *images.shape[1:]),
              torch.full((2,), NULL_Y[name]) if name in NULL_Y else None)  # 6 full forwards
    assert calls[first] == 6 and all(calls[s] == 6 for s in skipped)


def test_per_sample_seeds_batch_invariance():
    model = build("adm")
    images = images_for(model, 5)
    fx = FeatureExtractor(model, SCHEDULE, layers=["output_blocks.1"], timesteps=[100, 700], ensemble=3,
                          seed=11, noise_per_timestep=True)
    whole = fx(images)
    parts = [fx(images[:2]), fx(images[2:3], start=2), fx(images[3:], start=3)]
    for t in (100, 700):
        joined = torch.cat([p["output_blocks.1"][t] for p in parts])
        assert rel_l2(joined, whole["output_blocks.1"][t]) <= 1e-6
    # the same image with another seed gets other noise, so other features
    other = fx(images[:1], seeds=[12])
    assert rel_l2(other["output_blocks.1"][100], whole["output_blocks.1"][100][:1]) > 1e-3
    # explicit seeds reproduce the default ones
    again = fx(images[3:4], seeds=[11 + 3])
    assert rel_l2(again["output_blocks.1"][700], whole["output_blocks.1"][700][3:4]) <= 1e-6
    # timesteps see different draws with noise_per_timestep, one shared draw without
    assert fx.noise((3, 8, 8), [0]).shape == (1, 2, 3, 3, 8, 8)
    shared = FeatureExtractor(model, SCHEDULE, layers=["output_blocks.1"], timesteps=[100, 700], ensemble=3)
    assert shared.noise((3, 8, 8), [0]).shape == (1, 3, 3, 8, 8)


def test_caller_noise_matches_seeded_noise():
    model = build("adm")
    images = images_for(model, 2)
    fx = FeatureExtractor(model, SCHEDULE, layers=["middle_block"], timesteps=[50, 500], ensemble=2, seed=4)
    noise = fx.noise(images.shape[1:], [4, 5])
    a, b = fx(images), fx(images, noise=noise)
    assert rel_l2(b["middle_block"][50], a["middle_block"][50]) <= 1e-7
    per_t = noise[:, None].expand(2, 2, *noise.shape[1:])  # (N, T, E, ...) form, same draws
    c = fx(images, noise=per_t)
    assert rel_l2(c["middle_block"][500], a["middle_block"][500]) <= 1e-7


def test_pool_upsample_concat():
    model = build("adm")
    images = images_for(model, 2)
    layers, timesteps = ["output_blocks.0", "output_blocks.2"], [30, 300]
    kw = dict(layers=layers, timesteps=timesteps, ensemble=2, seed=1)
    maps = FeatureExtractor(model, SCHEDULE, **kw)(images)
    pooled = FeatureExtractor(model, SCHEDULE, pool="avg", **kw)(images)
    for layer in layers:
        assert rel_l2(pooled[layer][30], maps[layer][30].mean(dim=(2, 3))) <= 1e-6
    seg = FeatureExtractor(model, SCHEDULE, upsample_to="input", concat=True, **kw)(images)
    parts = [F.interpolate(maps[layer][t], size=(8, 8), mode="bilinear", align_corners=False)
             for t in timesteps for layer in layers]  # DDPM-Seg's order: timestep-major
    assert seg.shape == (2, sum(p.shape[1] for p in parts), 8, 8)
    assert rel_l2(seg, torch.cat(parts, dim=1)) <= 1e-6
    vec = FeatureExtractor(model, SCHEDULE, pool="avg", concat=True, **kw)(images)
    assert vec.shape == (2, 2 * (maps[layers[0]][30].shape[1] + maps[layers[1]][30].shape[1]))
    with pytest.raises(ValueError, match="concat"):
        FeatureExtractor(model, SCHEDULE, concat=True, **kw)(images)  # 4x4 and 8x8 maps


def test_recipes_run_by_name():
    assert RECIPES["ddpm-seg"]["timesteps"] == [50, 150, 250]
    assert RECIPES["dift-adm"] == dict(layers=["output_blocks.4"], timesteps=[101], ensemble=8)
    # an ADM deep enough for block 12: 5 levels x 3 = 15 output blocks
    cfg = dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=2,
               attention_resolutions=(), channel_mult=(1, 1, 1, 1, 1))
    model = ADMUNet(**cfg).eval()
    images = torch.randn(2, 3, 16, 16)
    calls = count_calls(model, ["output_blocks.13", "output_blocks.14", "out"])
    seg = FeatureExtractor(model, SCHEDULE, **RECIPES["ddpm-seg"])(images)
    assert seg.shape == (2, 3 * 5 * 32, 16, 16)
    assert calls == {"output_blocks.13": 0, "output_blocks.14": 0, "out": 0}
    dift = FeatureExtractor(model, SCHEDULE, **RECIPES["dift-adm"])(images)
    assert dift["output_blocks.4"][101].shape == (2, 32, 2, 2)  # blocks 3-5 sit at 2x2
    ddae = FeatureExtractor(model, SCHEDULE, **{**RECIPES["ddae"], "layers": ["middle_block"]})(images)
    assert ddae["middle_block"][11].shape == (2, 32)


def test_streaming_shards_round_trip(tmp_path):
    model = build("dit")
    images = images_for(model, 7)
    labels = torch.arange(7)
    fx = FeatureExtractor(model, SCHEDULE, layers=["blocks.1"], timesteps=[20, 400], ensemble=2, seed=5,
                          pool="avg")
    whole = fx(images)
    batches = [(images[:3], labels[:3]), (images[3:4], labels[3:4]), (images[4:], labels[4:])]
    fx.extract_to(tmp_path / "one", batches)
    index = json.loads((tmp_path / "one" / "index.json").read_text())
    assert index["num_images"] == 7 and [s["count"] for s in index["shards"]] == [3, 1, 3]
    loaded = load_features(tmp_path / "one")
    assert torch.equal(loaded["index"], torch.arange(7)) and torch.equal(loaded["labels"], labels)
    for t in (20, 400):
        assert rel_l2(loaded[f"blocks.1/t{t}"], whole["blocks.1"][t]) <= 1e-6
    # two ranks, one after the other as torchrun would run them: each writes its own batches
    for rank in (0, 1):
        fx.extract_to(tmp_path / "two", batches, rank=rank, world_size=2)
    files = sorted(p.name for p in (tmp_path / "two").glob("shard-*"))
    assert files == ["shard-r000-000000.safetensors", "shard-r000-000002.safetensors",
                     "shard-r001-000001.safetensors"]
    merged = load_features(tmp_path / "two")
    assert torch.equal(merged["index"], torch.arange(7))
    assert rel_l2(merged["blocks.1/t400"], whole["blocks.1"][400]) <= 1e-6


def test_concat_stream_and_empty_batch(tmp_path):
    model = build("ddpm")
    fx = FeatureExtractor(model, SCHEDULE, layers=["up_blocks.0", "mid_block"], timesteps=[10],
                          upsample_to=(6, 6), concat=True)
    empty = fx(images_for(model, 1)[:0])
    assert empty.shape == (0, 64 + 64, 6, 6)
    fx.extract_to(tmp_path, [images_for(model, 2), images_for(model, 0)])
    assert load_features(tmp_path)["features"].shape == (2, 128, 6, 6)


def test_bad_input_names_the_argument():
    model = build("adm")
    ok = dict(layers=["output_blocks.1"], timesteps=[10])
    cases = [
        (dict(ok, layers=["output_blocks.9"]), "layers"),
        (dict(ok, layers=[]), "layers"),
        (dict(ok, timesteps=[]), "timesteps"),
        (dict(ok, timesteps=[10, 10]), "timesteps"),
        (dict(ok, timesteps=[1000]), "timesteps"),
        (dict(ok, timesteps=[1.5]), "timesteps"),
        (dict(ok, ensemble=0), "ensemble"),
        (dict(ok, pool="max"), "pool"),
        (dict(ok, upsample_to=(0, 4)), "upsample_to"),
        (dict(ok, batch_size=0), "batch_size"),
        (dict(ok, max_memory="lots"), "max_memory"),
    ]
    for kwargs, word in cases:
        with pytest.raises(ValueError, match=word):
            FeatureExtractor(model, SCHEDULE, **kwargs)
    fx = FeatureExtractor(model, SCHEDULE, **ok, ensemble=2)
    images = images_for(model, 2)
    with pytest.raises(ValueError, match="noise"):
        fx(images, noise=torch.randn(2, 3, 8, 8))  # ensemble 2 needs (N, 2, C, H, W)
    with pytest.raises(ValueError, match="seeds"):
        fx(images, seeds=[1])
    with pytest.raises(ValueError, match="images"):
        fx(images.long())
    with pytest.raises(ValueError, match="y"):
        FeatureExtractor(build("adm-cond"), SCHEDULE, **ok)(images)  # no null label: labels needed


def test_max_memory_sets_rows_per_forward():
    model = build("adm")
    images = images_for(model, 3)
    fx = FeatureExtractor(model, SCHEDULE, layers=["output_blocks.1"], timesteps=[10, 20], max_memory=1)
    assert fx.rows_per_forward(images) == 1
    out = fx(images)
    assert fx.forward_calls == 6 and out["output_blocks.1"][10].shape[0] == 3
    big = FeatureExtractor(model, SCHEDULE, layers=["output_blocks.1"], timesteps=[10, 20], max_memory="1GB")
    assert big.rows_per_forward(images) > 100


def test_correspondence():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(16, 5, 7, generator=g)
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    assert torch.equal(correspondence(src, src), torch.stack([rows.flatten(), cols.flatten()], 1))
    tgt = torch.randn(16, 6, 9, generator=g)
    tgt[:, 1:6, 2:9] = src * 3.0  # the source pasted at offset (1, 2), scaled: cosine ignores the scale
    pts = torch.tensor([[0, 0], [4, 6], [2, 3]])
    assert torch.equal(correspondence(src, tgt, pts), pts + torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="points"):
        correspondence(src, tgt, torch.tensor([[5, 0]]))
    with pytest.raises(ValueError, match="source"):
        correspondence(src, torch.randn(8, 5, 7))


@pytest.mark.parametrize("name,kwargs", [
    ("adm", dict(layers=["output_blocks.1", "input_blocks.1"], timesteps=[30, 400], ensemble=2)),
    ("uvit", dict(layers=["in_blocks.1"], timesteps=[30, 400], ensemble=2, upsample_to=(8, 8),
                  concat=True)),
])
def test_onnx_export_runs_in_ort(tmp_path, name, kwargs):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = build(name)
    fx = FeatureExtractor(model, SCHEDULE, seed=2, **kwargs)
    path = fx.to_onnx(tmp_path / "fx.onnx", example_batch=2)
    images = images_for(model, 3)  # another batch than the traced one
    noise = fx.noise(images.shape[1:], [2, 3, 4])[:, None]
    feeds = {"images": images.numpy(), "noise": noise.numpy()}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if "y" in {i.name for i in session.get_inputs()}:
        feeds["y"] = torch.full((3,), NULL_Y[name]).numpy()
    got = session.run(None, feeds)
    ref = fx(images)
    if fx.concat:
        assert rel_l2(torch.from_numpy(got[0]), ref) <= 1e-4
    else:
        for layer, out in zip(fx.layers, got, strict=True):
            for k, t in enumerate(fx.timesteps):
                assert rel_l2(torch.from_numpy(out[:, k]), ref[layer][t]) <= 1e-4


def test_cli_features_on_an_image_folder(tmp_path):
    """``fastdiff features`` with the bundled digits model (a Denoiser: its schedule and null label)."""
    pytest.importorskip("PIL")
    from PIL import Image

    from fastdiff.cli import main
    from fastdiff.models.digits import DIGITS_WEIGHTS, load_digits_model

    if not os.path.exists(DIGITS_WEIGHTS):
        pytest.skip("digits weights not trained yet")
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for k in range(3):
        pixels = (torch.rand(16, 16, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{k}.png")
    out = tmp_path / "feats"
    assert main(["features", "--model", "digits", "--input", str(folder), "--out", str(out),
                 "--layers", "middle_block", "--timesteps", "50,100", "--pool", "avg",
                 "--images-per-shard", "2", "--device", "cpu"]) == 0
    loaded = load_features(out)
    assert loaded["middle_block/t50"].shape[0] == 3 and torch.equal(loaded["index"], torch.arange(3))
    den = load_digits_model()
    images = torch.stack([torch.from_numpy(np.array(Image.open(folder / f"{k}.png")))
                          for k in range(3)]).float()[:, None] / 127.5 - 1.0
    fx = FeatureExtractor(den, None, layers=["middle_block"], timesteps=[50, 100], pool="avg")
    assert fx.null_label() == den.y_null
    assert rel_l2(loaded["middle_block/t100"], fx(images)["middle_block"][100]) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Built from a Denoiser: the network is called as the Denoiser calls it (its model_fn)
# ---------------------------------------------------------------------------------------------


def loaded_latent_uvit():
    """fastdiff.load's latent U-ViT (ImageNet 256, a small config, random weights): trained on timesteps
    1..1000, its Denoiser calls the network at t + 1 (TimestepOffset)."""
    import fastdiff

    return fastdiff.load("uvit-imagenet256-large", random_weights=True,
                         overrides=dict(embed_dim=64, depth=3, num_heads=2))


def test_denoiser_features_call_the_network_at_t_plus_one():
    from fastdiff.loading import TimestepOffset

    den = loaded_latent_uvit()
    assert isinstance(den.model_fn, TimestepOffset) and den.model_fn.timestep_offset == 1
    model = den.model
    layers, timesteps, label = ["mid_block", "in_blocks.0"], [0, 400, 999], 3
    calls = count_calls(model, ["in_blocks.0", "out_blocks.0", "norm", "decoder_pred"])
    fx = FeatureExtractor(den, layers=layers, timesteps=timesteps, y=label, seed=5)
    images = torch.randn(2, *den.sample_shape, generator=torch.Generator().manual_seed(0))
    got = fx(images)
    assert calls == {"in_blocks.0": 1, "out_blocks.0": 0, "norm": 0, "decoder_pred": 0}  # the walk still stops
    # the reference: the network called directly at t + 1 in full forwards, read with hooks
    noise = fx.noise(images.shape[1:], [5, 6])
    modules, seen = dict(model.named_modules()), {}
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
               for name in layers]
    try:
        with torch.no_grad():
            for t in timesteps:
                tt = torch.full((2,), t, dtype=torch.long)
                model(den.schedule.add_noise(images, noise[:, 0], tt), tt + 1, torch.full((2,), label))
                for name in layers:
                    assert rel_l2(got[name][t], to_map(model, seen[name])) <= 1e-7, (name, t)
    finally:
        for h in handles:
            h.remove()
    # the bare network (no model_fn) sees t: one timestep off, which the check above tells apart (the
    # time token is one of 256 + 2 tokens here: t and t + 1 differ by ~5e-5)
    bare = FeatureExtractor(model, den.schedule, layers=layers, timesteps=timesteps, y=label, seed=5)
    off = bare(images)
    assert min(rel_l2(off[name][t], got[name][t]) for name in layers for t in timesteps) > 1e-5
    # the model call is part of a feature run's identity
    assert fx.settings()["model_fn"] == "TimestepOffset(1)" and "model_fn" not in bare.settings()


def test_denoiser_features_through_other_model_fns():
    """A model_fn that renames the labels (diffusers U-Nets take class_labels) and the hook path for a model
    the walkers do not know both run on the inputs model_fn gives the network."""
    from fastdiff.denoiser import Denoiser, call_model

    base = build("adm-cond")

    def as_class_labels(model, x, t, y=None, **kwargs):  # fastdiff.loading's diffusers-style call, shifted
        return call_model(model, x, t + 7, None, **({"class_labels": y} if y is not None else {}), **kwargs)

    class Relabelled(ADMUNet):  # the hook path; forward takes class_labels
        def forward(self, x, timesteps, class_labels=None):
            return super().forward(x, timesteps, class_labels)

    other = Relabelled(**TINY["adm-cond"][1]).eval()
    other.load_state_dict(base.state_dict())
    kw = dict(layers=["input_blocks.1"], timesteps=[10, 500], y=2)
    images = images_for(base, 2)
    shifted = FeatureExtractor(base, SCHEDULE, **(kw | {"timesteps": [17, 507]}))(images)  # t + 7 directly
    for model in (base, other):
        got = FeatureExtractor(Denoiser(model, SCHEDULE, model_fn=as_class_labels), **kw)(images)
        for t in kw["timesteps"]:  # the noise is drawn per image, not per timestep: the same x_t at t
            ref = FeatureExtractor(base, SCHEDULE, **kw)
            x_t = SCHEDULE.add_noise(images, ref.noise(images.shape[1:], [0, 1])[:, 0], torch.full((2,), t))
            direct = ref.forward_features(x_t, torch.full((2,), t + 7), torch.full((2,), 2))["input_blocks.1"]
            assert rel_l2(got["input_blocks.1"][t], direct) <= 1e-6, (type(model).__name__, t)
            assert rel_l2(got["input_blocks.1"][t], shifted["input_blocks.1"][t + 7]) > 1e-4


def test_denoiser_features_export_with_the_model_call(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    den = loaded_latent_uvit()
    fx = FeatureExtractor(den, layers=["mid_block"], timesteps=[30, 400], y=3, seed=2)
    path = fx.to_onnx(tmp_path / "fx.onnx", example_batch=2)
    images = torch.randn(3, *den.sample_shape, generator=torch.Generator().manual_seed(1))
    feeds = {"images": images.numpy(), "noise": fx.noise(images.shape[1:], [2, 3, 4])[:, None].numpy(),
             "y": np.full((3,), 3, dtype=np.int64)}
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    ref = fx(images)
    for k, t in enumerate(fx.timesteps):
        # ~1e-7 seen; t and t + 1 differ by ~5e-5 here, so the graph must hold the offset
        assert rel_l2(torch.from_numpy(out[:, k]), ref["mid_block"][t]) <= 2e-6
