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
