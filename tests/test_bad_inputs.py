"""Bad inputs to the models, checkpoints, ONNX files, the feature extractor and attention: one table, each case
a clear error of a stated type whose message names the argument (or the file), raised before any work."""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastdiff import models
from fastdiff.features import FeatureExtractor
from fastdiff.models import ADMClassifier, ADMUNet, CheckpointError, DDPMUNet, DiT, UViT
from fastdiff.ops import attention
from fastdiff.schedules import VPSchedule

TINY = {
    "adm": (ADMUNet, dict(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                          attention_resolutions=(2,), channel_mult=(1, 2), num_classes=4, num_head_channels=16)),
    "adm-uncond": (ADMUNet, dict(image_size=8, in_channels=3, model_channels=32, out_channels=3,
                                 num_res_blocks=1, attention_resolutions=(), channel_mult=(1, 2, 2))),
    "classifier": (ADMClassifier, dict(image_size=8, in_channels=3, model_channels=32, out_channels=5,
                                       num_res_blocks=1, attention_resolutions=(), channel_mult=(1, 2),
                                       num_head_channels=16, pool="attention")),
    "ddpm": (DDPMUNet, dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                            down_block_types=("DownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "UpBlock2D"), attention_head_dim=None,
                            num_class_embeds=6)),
    "dit": (DiT, dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                      num_classes=5, class_dropout_prob=0.1, learn_sigma=False)),
    "uvit": (UViT, dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                        num_classes=7)),
}
LABEL_KEY = {"ddpm": "class_labels"}


def tiny(name):
    cls, cfg = TINY[name]
    torch.manual_seed(0)
    return cls(**cfg).eval()


def call(name, **change):
    """A forward of tiny model ``name`` on its example inputs with some of them replaced; checks that no
    submodule ran (the error comes before any work)."""
    model = tiny(name)
    inputs = model.example_inputs(2)
    inputs.update(change)
    ran = []
    for m in model.modules():
        if m is not model:
            m.register_forward_hook(lambda *a: ran.append(1))
    try:
        model(**{k: v for k, v in inputs.items() if v is not _DROP})
    finally:
        assert not ran, "a submodule ran before the input was refused"


_DROP = object()
Y_FLOAT = torch.tensor([0.0, 1.0])

MODEL_CASES = [
    # class labels out of range, of the wrong dtype or length, or missing
    ("adm-label-too-big", "adm", dict(y=torch.tensor([0, 4])), "y"),
    ("adm-label-negative", "adm", dict(y=torch.tensor([-1, 0])), "y"),
    ("adm-label-float", "adm", dict(y=Y_FLOAT), "y"),
    ("adm-label-bool", "adm", dict(y=torch.tensor([True, False])), "y"),
    ("adm-label-length", "adm", dict(y=torch.tensor([0, 1, 2])), "y"),
    ("adm-label-missing", "adm", dict(y=_DROP), "y"),
    ("adm-label-on-unconditional", "adm-uncond", dict(y=torch.tensor([0, 1])), "y"),
    ("ddpm-label-too-big", "ddpm", dict(class_labels=torch.tensor([6, 0])), "class_labels"),
    ("ddpm-label-float", "ddpm", dict(class_labels=Y_FLOAT), "class_labels"),
    ("ddpm-label-missing", "ddpm", dict(class_labels=_DROP), "class_labels"),
    ("dit-label-past-null", "dit", dict(y=torch.tensor([6, 0])), "y"),
    ("dit-label-negative", "dit", dict(y=torch.tensor([-3, 0])), "y"),
    ("dit-label-missing", "dit", dict(y=None), "y"),
    ("dit-label-length", "dit", dict(y=torch.tensor([1])), "y"),
    ("uvit-label-too-big", "uvit", dict(y=torch.tensor([7, 0])), "y"),
    ("uvit-label-float", "uvit", dict(y=Y_FLOAT), "y"),
    ("uvit-label-missing", "uvit", dict(y=_DROP), "y"),
    # resolutions and channel counts the model cannot take
    ("adm-odd-size", "adm", dict(x=torch.randn(2, 3, 9, 9)), "x"),
    ("adm-size-not-multiple-of-4", "adm-uncond", dict(x=torch.randn(2, 3, 6, 6)), "x"),
    ("adm-channels", "adm", dict(x=torch.randn(2, 4, 8, 8)), "x"),
    ("adm-int-image", "adm", dict(x=torch.zeros(2, 3, 8, 8, dtype=torch.long)), "x"),
    ("adm-rank", "adm", dict(x=torch.randn(2, 3, 8)), "x"),
    ("classifier-attention-pool-size", "classifier", dict(x=torch.randn(2, 3, 16, 16)), "x"),
    ("ddpm-odd-size", "ddpm", dict(x=torch.randn(2, 3, 7, 8)), "x"),
    ("ddpm-channels", "ddpm", dict(x=torch.randn(2, 1, 8, 8)), "x"),
    ("dit-size", "dit", dict(x=torch.randn(2, 4, 10, 10)), "x"),
    ("dit-channels", "dit", dict(x=torch.randn(2, 3, 8, 8)), "x"),
    ("uvit-size", "uvit", dict(x=torch.randn(2, 3, 16, 16)), "x"),
]


@pytest.mark.parametrize("name,change,word", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_model_inputs(name, change, word):
    with pytest.raises(ValueError) as err:
        call(name, **change)
    message = str(err.value)
    assert message.startswith(word + " ") or f"{word}:" in message, message
    assert len(message) < 400


def test_label_range_allows_the_null_label():
    """The null label of classifier-free guidance is a valid label (DiT's extra row, U-ViT's last class)."""
    dit, uvit = tiny("dit"), tiny("uvit")
    assert dit(**dict(dit.example_inputs(2), y=torch.tensor([5, 4]))).shape == (2, 4, 8, 8)
    assert uvit(**dict(uvit.example_inputs(2), y=torch.tensor([6, 0]))).shape == (2, 3, 8, 8)
    adm = tiny("adm")
    assert adm(**dict(adm.example_inputs(2), y=torch.tensor([3, 0], dtype=torch.int32))).shape == (2, 3, 8, 8)
    ddpm = tiny("ddpm")  # any multiple of 2 (one downsampling) runs, not only the configured 8
    assert ddpm(torch.randn(1, 3, 12, 12), torch.tensor([3]), class_labels=torch.tensor([5])).shape == (1, 3, 12, 12)


# ---------------------------------------------------------------------------------------------
# checkpoint files
# ---------------------------------------------------------------------------------------------

TINY_DIT = dict(input_size=8, depth=2, hidden_size=64, num_heads=2, num_classes=10)


def _dit_state():
    torch.manual_seed(0)
    return models.preset("dit-s-8-256", **TINY_DIT).state_dict()


def _write_checkpoint(kind, folder: Path) -> Path:
    state = _dit_state()
    if kind == "missing":
        return folder / "nowhere.pt"
    if kind == "empty":
        (folder / "empty.safetensors").write_bytes(b"")
        return folder / "empty.safetensors"
    if kind in ("truncated-safetensors", "truncated-pt"):
        good = folder / ("good.safetensors" if kind.endswith("safetensors") else "good.pt")
        if kind.endswith("safetensors"):
            save_file({k: v.contiguous() for k, v in state.items()}, str(good))
        else:
            torch.save(state, good)
        data = good.read_bytes()
        bad = folder / ("cut" + good.suffix)
        bad.write_bytes(data[: len(data) // 2])
        return bad
    if kind == "corrupt":
        (folder / "noise.pt").write_bytes(os.urandom(4096))
        return folder / "noise.pt"
    if kind == "python-objects":
        torch.save({"model": state, "optimizer": object.__new__(_Opaque)}, folder / "objects.pt")
        return folder / "objects.pt"
    if kind == "other-architecture":  # U-ViT weights for a DiT preset
        torch.manual_seed(0)
        uvit = models.preset("uvit-cifar10-small", embed_dim=64, depth=2, num_heads=2)
        save_file({k: v.contiguous() for k, v in uvit.state_dict().items()}, str(folder / "uvit.safetensors"))
        return folder / "uvit.safetensors"
    if kind == "other-size":  # the same architecture, another width
        torch.save(models.preset("dit-s-8-256", **dict(TINY_DIT, hidden_size=32)).state_dict(), folder / "w32.pt")
        return folder / "w32.pt"
    if kind == "missing-keys":
        state.pop("final_layer.linear.weight")
        state["extra.weight"] = torch.zeros(1)
        torch.save(state, folder / "partial.pt")
        return folder / "partial.pt"
    raise AssertionError(kind)


class _Opaque:
    pass


CHECKPOINT_CASES = [
    ("missing", FileNotFoundError, "does not exist"),
    ("empty", CheckpointError, "empty"),
    ("truncated-safetensors", CheckpointError, "truncated or corrupt"),
    ("truncated-pt", CheckpointError, "truncated or corrupt"),
    ("corrupt", CheckpointError, "truncated or corrupt"),
    ("python-objects", CheckpointError, "Python objects"),
    ("other-architecture", CheckpointError, "does not fit DiT"),
    ("other-size", CheckpointError, "mis-shaped"),
    ("missing-keys", CheckpointError, "1 missing key: final_layer.linear.weight. 1 unexpected key: extra.weight"),
]


@pytest.mark.parametrize("kind,exc,words", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_checkpoint_files(tmp_path, kind, exc, words):
    path = _write_checkpoint(kind, tmp_path)
    with pytest.raises(exc) as err:
        models.load("dit-s-8-256", str(path), **TINY_DIT)
    message = str(err.value)
    assert isinstance(err.value, ValueError)  # every checkpoint error is a ValueError too
    assert str(path) in message and words in message, message
    assert len(message) < 1500, len(message)  # counts and the first few keys, not torch's dump


def test_checkpoint_of_another_preset_is_named(tmp_path):
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in models.preset("dit-s-8-256").state_dict().items()},
              str(tmp_path / "s8.safetensors"))
    with pytest.raises(CheckpointError, match="It fits the presets? .*dit-s-8-256") as err:
        models.load("dit-b-8-256", str(tmp_path / "s8.safetensors"))
    assert "mis-shaped" in str(err.value)


def test_digits_and_diffusers_folders_name_the_file(tmp_path):
    from fastdiff.models.digits import DIGITS_WEIGHTS, load_digits_model

    bad = tmp_path / "digits.safetensors"
    bad.write_bytes(Path(DIGITS_WEIGHTS).read_bytes()[:1000])
    (tmp_path / "digits.json").write_bytes(Path(DIGITS_WEIGHTS).with_suffix(".json").read_bytes())
    with pytest.raises(CheckpointError, match="digits.safetensors.*truncated or corrupt"):
        load_digits_model(str(bad))
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_digits_model(str(tmp_path / "none.safetensors"))
    folder = tmp_path / "unet"
    folder.mkdir()
    model = tiny("ddpm")
    (folder / "config.json").write_text(__import__("json").dumps(dict(TINY["ddpm"][1], _class_name="UNet2DModel")))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("conv_out")}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors.*2 missing keys"):
        DDPMUNet.from_pretrained(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        DDPMUNet.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------
# the feature extractor's labels
# ---------------------------------------------------------------------------------------------

SCHEDULE = VPSchedule("linear", num_train_timesteps=1000)
FX = dict(layers=["input_blocks.1"], timesteps=[10])


@pytest.mark.parametrize("make", [
    lambda m, x: FeatureExtractor(m, SCHEDULE, y=4, **FX),
    lambda m, x: FeatureExtractor(m, SCHEDULE, y=-1, **FX),
    lambda m, x: FeatureExtractor(m, SCHEDULE, y="all", **FX),
    lambda m, x: FeatureExtractor(m, SCHEDULE, **FX)(x, y=torch.tensor([0, 9])),
    lambda m, x: FeatureExtractor(m, SCHEDULE, **FX)(x, y=torch.tensor([0.0, 1.0])),
    lambda m, x: FeatureExtractor(m, SCHEDULE, **FX)(x, y=torch.tensor([0, 1, 2])),
    lambda m, x: FeatureExtractor(m, SCHEDULE, **FX)(x),  # class-conditional, no null label: labels needed
], ids=["int-too-big", "int-negative", "word", "tensor-out-of-range", "float", "length", "missing"])
def test_feature_extractor_labels(make):
    model = tiny("adm")
    calls = []
    model.time_embed.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"^y\b"):
        make(model, torch.randn(2, 3, 8, 8))
    assert not calls
    with pytest.raises(ValueError, match=r"^y\b"):
        FeatureExtractor(tiny("adm-uncond"), SCHEDULE, layers=["input_blocks.1"], timesteps=[10], y=1)


# ---------------------------------------------------------------------------------------------
# attention: zero head dim refused, empty batches give a defined result in the backward too
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "reference", "sdpa"])
def test_attention_zero_head_dim(backend):
    q = torch.randn(1, 2, 4, 0)
    with pytest.raises(ValueError, match="head dim D >= 1"):
        attention(q, q, q, backend=backend)
    with pytest.raises(ValueError, match="head dim D >= 1"):
        attention(q, q, q, scale=1.0, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("q_shape,kv_shape", [((0, 2, 4, 8), (0, 2, 4, 8)), ((1, 2, 0, 8), (1, 2, 5, 8)),
                                               ((1, 2, 4, 8), (1, 2, 0, 8))],
                         ids=["empty-batch", "no-queries", "no-keys"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
def test_attention_empty_backward(backend, q_shape, kv_shape, with_bias):
    q = torch.randn(q_shape, requires_grad=True)
    k, v = (torch.randn(kv_shape, requires_grad=True) for _ in range(2))
    bias = torch.randn(q_shape[0], 1, q_shape[2], kv_shape[2], requires_grad=True) if with_bias else None
    out = attention(q, k, v, backend=backend, bias=bias)
    assert out.shape == q_shape and not out.any()
    (out * 2).sum().backward()
    for t in (q, k, v) + ((bias,) if with_bias else ()):
        assert t.grad.shape == t.shape and not t.grad.any()


# ---------------------------------------------------------------------------------------------
# the ONNX path: files, labels, keywords
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """A model graph and a ddim step graph of the tiny class-conditional ADM (4 classes, no null label)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from fastdiff.denoiser import Denoiser
    from fastdiff.export import step_to_onnx, to_onnx

    folder = tmp_path_factory.mktemp("graphs")
    model = tiny("adm")
    model_path = to_onnx(model, folder / "adm.onnx")
    step_path = step_to_onnx(Denoiser(model, SCHEDULE), "ddim", folder / "adm_step.onnx", guidance=False)
    return folder, model_path, step_path


def _onnx_case(kind, folder: Path, model_path, step_path):
    from fastdiff.export.ort import OrtDenoiser, sample_onnxruntime

    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 20.0])
    if kind in ("missing", "empty", "corrupt", "truncated"):
        path = folder / f"{kind}.onnx"
        if kind == "empty":
            path.write_bytes(b"")
        elif kind == "corrupt":
            path.write_bytes(os.urandom(2048))
        elif kind == "truncated":
            data = Path(model_path).read_bytes()
            path.write_bytes(data[: len(data) // 3])
        return lambda: OrtDenoiser(path), str(path)
    if kind == "step-missing":
        return lambda: sample_onnxruntime(folder / "nowhere.onnx", (2, 3, 8, 8), sampler="ddim", steps=2,
                                          schedule=SCHEDULE), "nowhere.onnx"
    if kind == "misspelled-keyword":
        return lambda: sample_onnxruntime(step_path, (2, 3, 8, 8), sampler="ddim", steps=2, y=1,
                                          providerz=["CPUExecutionProvider"]), "providerz"
    if kind == "callback":
        return lambda: sample_onnxruntime(step_path, (2, 3, 8, 8), sampler="ddim", steps=2, y=1,
                                          callback=print), "callback"
    if kind == "unknown-provider":
        return lambda: OrtDenoiser(model_path, providers=["NoSuchExecutionProvider"]), "providers"
    if kind == "model-label-too-big":
        return lambda: OrtDenoiser(model_path)(x, t, torch.tensor([0, 4])), "y"
    if kind == "model-label-float":
        return lambda: OrtDenoiser(model_path)(x, t, torch.tensor([0.0, 1.0])), "y"
    if kind == "model-label-length":
        return lambda: OrtDenoiser(model_path)(x, t, torch.tensor([0, 1, 2])), "y"
    if kind == "step-label-too-big":
        return lambda: sample_onnxruntime(step_path, (2, 3, 8, 8), sampler="ddim", steps=2, y=7), "y"
    if kind == "step-label-negative":
        return lambda: sample_onnxruntime(step_path, (2, 3, 8, 8), sampler="ddim", steps=2,
                                          y=torch.tensor([0, -1])), "y"
    raise AssertionError(kind)


ONNX_CASES = [
    ("missing", FileNotFoundError), ("empty", ValueError), ("corrupt", ValueError), ("truncated", ValueError),
    ("step-missing", FileNotFoundError), ("misspelled-keyword", TypeError), ("callback", ValueError),
    ("unknown-provider", ValueError), ("model-label-too-big", ValueError), ("model-label-float", ValueError),
    ("model-label-length", ValueError), ("step-label-too-big", ValueError), ("step-label-negative", ValueError),
]


@pytest.mark.parametrize("kind,exc", ONNX_CASES, ids=[c[0] for c in ONNX_CASES])
def test_onnx_path(graphs, kind, exc):
    folder, model_path, step_path = graphs
    run, word = _onnx_case(kind, folder, model_path, step_path)
    with pytest.raises(exc) as err:
        run()
    message = str(err.value)
    assert word in message, message
    assert len(message) < 400, message
    if kind == "misspelled-keyword":
        assert "did you mean 'providers'" in message


def test_onnx_labels_in_range_run(graphs):
    from fastdiff.export.ort import OrtDenoiser, sample_onnxruntime

    _, model_path, step_path = graphs
    model = OrtDenoiser(model_path)
    assert model.num_labels == 4
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([10.0, 20.0]), torch.tensor([3, 0]))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    x = sample_onnxruntime(step_path, (2, 3, 8, 8), sampler="ddim", steps=2, y=3, batch_size=2, compile=False)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
