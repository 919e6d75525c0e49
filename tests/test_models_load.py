"""fastdiff.models.load: a preset plus an upstream checkpoint file in one call."""

import pytest
import torch
from safetensors.torch import save_file

from fastdiff import models

TINY_DIT = dict(input_size=8, depth=2, hidden_size=64, num_heads=2, num_classes=10)


@pytest.mark.parametrize("form", ["pt", "pt-ema", "pt-module-prefix", "safetensors"])
def test_load_checkpoint_forms(tmp_path, form):
    torch.manual_seed(0)
    source = models.preset("dit-s-8-256", **TINY_DIT)
    state = source.state_dict()
    path = tmp_path / ("ckpt.safetensors" if form == "safetensors" else "ckpt.pt")
    if form == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif form == "pt-ema":
        torch.save({"ema": state, "opt": {"step": 3}}, path)
    elif form == "pt-module-prefix":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    model = models.load("dit-s-8-256", str(path), **TINY_DIT)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 2])
    torch.testing.assert_close(model(x, t, y), source(x, t, y), rtol=0, atol=0)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        models.load("no-such-model", "x.pt")
    with pytest.raises(ValueError, match="checkpoint"):
        models.load("dit-s-8-256", str(tmp_path / "missing.pt"))
    torch.save({"weights": [1, 2]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="state dict"):
        models.load("dit-s-8-256", str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="folder"):
        models.load("dit-s-8-256", str(tmp_path))
    torch.save(models.preset("dit-s-8-256", **TINY_DIT).state_dict(), tmp_path / "small.pt")
    with pytest.raises(models.CheckpointError, match="small.pt.*mis-shaped"):  # the shapes differ
        models.load("dit-s-8-256", str(tmp_path / "small.pt"), depth=2, hidden_size=32, num_heads=2)


# ---------------------------------------------------------------------------------------------
# what each preset needs to be sampled (models.SAMPLING, models.preset_info)
# ---------------------------------------------------------------------------------------------

LINEAR = dict(type="VPSchedule", beta_schedule="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)


@pytest.mark.parametrize("name,schedule,learned,classes,null,guidance,shape", [
    ("adm-64-cond", "squaredcos_cap_v2", True, 1000, None, 1.0, (3, 64, 64)),  # guided-diffusion: cosine at 64
    ("adm-256-cond", "linear", True, 1000, None, 1.0, (3, 256, 256)),
    ("adm-256-uncond", "linear", True, None, None, 1.0, (3, 256, 256)),
    ("ddpm-cifar10", "linear", False, None, None, 1.0, (3, 32, 32)),
    ("dit-xl-2-256", "linear", True, 1000, 1000, 4.0, (4, 32, 32)),
    ("dit-xl-2-512", "linear", True, 1000, 1000, 4.0, (4, 64, 64)),
    ("uvit-imagenet256-huge", "scaled_linear", False, 1000, 1000, 1.4, (4, 32, 32)),
    ("uvit-imagenet512-large", "scaled_linear", False, 1000, 1000, 1.7, (4, 64, 64)),
    ("uvit-imagenet64-mid", "VPSDESchedule", False, 1000, None, 1.0, (3, 64, 64)),
    ("uvit-cifar10-small", "VPSDESchedule", False, None, None, 1.0, (3, 32, 32)),
])
def test_preset_info(name, schedule, learned, classes, null, guidance, shape):
    info = models.preset_info(name)
    kind = info["schedule"]["type"]
    assert (info["schedule"].get("beta_schedule") if kind == "VPSchedule" else kind) == schedule
    assert (info["learned_sigma"], info["num_classes"], info["y_null"]) == (learned, classes, null)
    assert (info["guidance_scale"], info["sample_shape"], info["kind"]) == (guidance, shape, "denoiser")
    assert (info["latent_scale"] is not None) == (shape[0] == 4)
    assert models.preset(name, device="meta").y_null == null  # the model carries its null label


def test_every_preset_has_sampling_facts_and_a_buildable_schedule():
    from fastdiff.loading import schedule_from_config

    assert set(models.SAMPLING) == set(models.PRESETS)
    for name, facts in models.SAMPLING.items():
        sched = schedule_from_config(facts["schedule"])
        assert sched.sigma_max > sched.sigma_min > 0, name
        x = models.preset(name, device="meta").example_inputs(1)["x"]  # the shape the model takes
        assert models.preset_info(name)["sample_shape"] == tuple(x.shape[1:]), name
    assert models.SAMPLING["dit-s-2-256"]["schedule"] == LINEAR
    assert models.SAMPLING["adm-classifier-64"]["kind"] == "classifier"


def test_preset_info_follows_overrides():
    info = models.preset_info("dit-s-8-256", **TINY_DIT)
    assert (info["num_classes"], info["y_null"], info["sample_shape"]) == (10, 10, (4, 8, 8))
    info = models.preset_info("dit-s-8-256", class_dropout_prob=0.0)  # trained without label dropout
    assert info["y_null"] is None and info["guidance_scale"] == 1.0
    assert models.preset_info("dit-s-8-256", learn_sigma=False)["learned_sigma"] is False
    with pytest.raises(ValueError, match="unknown preset"):
        models.preset_info("uvit-huge-imagenet256")
