"""The fastdiff command line: sampling, one-line errors (exit status 2, no traceback), --help defaults,
atomic writes, info, and the bundled digits model's quality at the CLI's defaults."""

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args) -> int:
    return cli.main(list(args))


@pytest.mark.parametrize("classes,expected", [
    (None, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]),  # labels cycle over all classes
    (["3", "7"], [3, 7, 3, 7, 3, 7, 3, 7, 3, 7, 3, 7]),  # over the given ones
], ids=["all-classes", "given-classes"])
def test_sample_writes_grid_and_npz(tmp_path, capsys, classes, expected):
    png, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    extra = ["--class", *classes] if classes else []
    assert run_cli("sample", "--n", "12", "--steps", "3", "--seed", "5", "--dtype", "float32", "--quiet",
                   "--out", str(png), "--save", str(npz), *extra) == 0
    assert "images/s" in capsys.readouterr().out
    d = np.load(npz)
    assert d["samples"].dtype == np.float32 and d["samples"].shape == (12, 1, 16, 16)
    assert d["samples"].min() >= -1 and d["samples"].max() <= 1
    assert d["labels"].dtype == np.int64 and d["labels"].tolist() == expected
    assert d["seeds"].dtype == np.int64 and d["seeds"].tolist() == list(range(5, 17))
    img = Image.open(png)
    assert img.mode == "L" and img.width > img.height > 0
    assert sorted(os.listdir(tmp_path)) == ["grid.png", "s.npz"]  # no temporary files left behind


def test_sample_i_uses_seed_s_plus_i(tmp_path):
    """Samples 1, 2 of a run from seed 4 are samples 0, 1 of a run from seed 5 (with the same labels)."""
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    run_cli("sample", "--n", "3", "--steps", "2", "--seed", "4", "--class", "6", "--dtype", "float32",
            "--quiet", "--out", "", "--save", str(a))
    run_cli("sample", "--n", "2", "--steps", "2", "--seed", "5", "--class", "6", "--dtype", "float32",
            "--quiet", "--out", "", "--save", str(b))
    sa, sb = np.load(a)["samples"], np.load(b)["samples"]
    np.testing.assert_allclose(sa[1:], sb, rtol=0, atol=1e-3)  # batch size changes matmul rounding
    assert np.abs(sa[0] - sa[1]).max() > 1e-2


def test_cli_and_api_give_the_same_samples(tmp_path):
    """The CLI is fd.load + fd.sample: the same model, guidance and labels give the same numbers."""
    npz = tmp_path / "s.npz"
    assert run_cli("sample", "--n", "4", "--steps", "3", "--seed", "2", "--dtype", "float32", "--quiet",
                   "--out", "", "--save", str(npz)) == 0
    den = fastdiff.load("digits")
    ref = fastdiff.sample(den, (4, *den.sample_shape), steps=3, guidance_scale=den.default_guidance_scale,
                          y=torch.arange(4), seeds=2, dtype=torch.float32, progress=False)
    np.testing.assert_allclose(np.load(npz)["samples"], ref.clamp(-1, 1).numpy(), rtol=0, atol=1e-6)


def test_latent_preset_with_vae_writes_images(tmp_path, capsys, monkeypatch):
    """--model PRESET --checkpoint --vae: the samples are decoded to RGB images; without --vae, latents."""
    diffusers = pytest.importorskip("diffusers")
    from fastdiff import models

    tiny = dict(input_size=8, depth=1, hidden_size=32, num_heads=2, num_classes=4)
    monkeypatch.setitem(models.PRESETS, "tiny-dit", (models.DiT, {**models.PRESETS["dit-s-8-256"][1], **tiny}))
    monkeypatch.setitem(models.SAMPLING, "tiny-dit", models.SAMPLING["dit-s-8-256"])
    torch.save(models.preset("tiny-dit").state_dict(), tmp_path / "tiny.pt")
    diffusers.AutoencoderKL(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vae")
    common = ["sample", "--model", "tiny-dit", "--checkpoint", str(tmp_path / "tiny.pt"), "--n", "2", "--steps",
              "1", "--quiet", "--out", str(tmp_path / "g.png"), "--save", str(tmp_path / "s.npz")]
    assert run_cli(*common, "--vae", str(tmp_path / "vae")) == 0
    assert np.load(tmp_path / "s.npz")["samples"].shape == (2, 3, 16, 16)
    assert Image.open(tmp_path / "g.png").mode == "RGB"
    assert run_cli(*common) == 0
    assert np.load(tmp_path / "s.npz")["samples"].shape == (2, 4, 8, 8)
    assert "latents" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# errors: one line on stderr, exit status 2, no traceback
# ---------------------------------------------------------------------------------------------

MISSING = os.path.join("no", "such", "folder")

BAD_SAMPLE = {
    # id: (arguments, words the one line must hold)
    "sampler": (["--sampler", "nope"], ["--sampler", "nope"]),
    "steps-zero": (["--steps", "0"], ["--steps", ">= 1"]),
    "steps-text": (["--steps", "many"], ["--steps", "many"]),
    "n-zero": (["--n", "0"], ["--n", ">= 1"]),
    "batch-zero": (["--batch", "0"], ["--batch", ">= 1"]),
    "threads-zero": (["--threads", "0"], ["--threads", ">= 1"]),
    "seed-negative": (["--seed", "-1"], ["--seed", "2^63"]),
    "seed-too-big": (["--seed", str(2**63)], ["--seed", "2^63"]),
    "seed-range-overflow": (["--seed", str(2**63 - 2), "--n", "5"], ["--seed", "2^63"]),
    "guidance-nan": (["--guidance", "nan"], ["--guidance", "finite"]),
    "guidance-inf": (["--guidance", "inf"], ["--guidance", "finite"]),
    "guidance-text": (["--guidance", "big"], ["--guidance", "number"]),
    "class-out-of-range": (["--class", "12"], ["--class", "12", "out of range"]),
    "class-negative": (["--class", "-3"], ["--class", ">= 0"]),
    "class-text": (["--class", "seven"], ["--class", "seven"]),
    "dtype": (["--dtype", "int8"], ["--dtype", "int8"]),
    "device-unknown": (["--device", "tpu9"], ["--device", "tpu9"]),
    "device-absent": (["--device", "cuda:7"], ["--device", "cuda:7", "not available"]),
    "cuda-graph-word": (["--cuda-graph", "maybe"], ["--cuda-graph", "maybe"]),
    "runtime": (["--runtime", "tensorrt"], ["--runtime", "tensorrt"]),
    "model-unknown": (["--model", "no-such-model"], ["unknown model", "no-such-model"]),
    "model-misspelt": (["--model", "uvit-huge-imagenet256"], ["uvit-huge-imagenet256", "uvit-imagenet256-huge"]),
    "preset-without-checkpoint": (["--model", "dit-s-8-256"], ["dit-s-8-256", "--checkpoint", "--random-weights"]),
    "checkpoint-missing": (["--checkpoint", "missing.safetensors"], ["missing.safetensors", "does not exist"]),
    "checkpoint-empty": (["--checkpoint", "{tmp}/empty.safetensors"], ["empty.safetensors", "empty"]),
    "checkpoint-corrupt": (["--checkpoint", "{tmp}/corrupt.safetensors"], ["corrupt.safetensors"]),
    "out-folder-missing": (["--out", os.path.join(MISSING, "x.png")], ["--out", "does not exist"]),
    "out-is-a-folder": (["--out", "{tmp}"], ["--out", "folder"]),
    "out-suffix": (["--out", "{tmp}/grid.txt"], ["--out", ".png"]),
    "save-folder-missing": (["--save", os.path.join(MISSING, "s.npz")], ["--save", "does not exist"]),
    "out-equals-save": (["--out", "{tmp}/a.png", "--save", "{tmp}/a.png"], ["--out", "--save"]),
    "class-unconditional": (["--model", "uvit-cifar10-small", "--random-weights", "--class", "1"],
                            ["--class", "not class-conditional"]),
    "guidance-without-null": (["--model", "uvit-cifar10-small", "--random-weights", "--guidance", "3"],
                              ["--guidance", "null label"]),
    "vae-for-pixel-model": (["--vae", "{tmp}"], ["vae", "pixel"]),
    "vae-missing": (["--model", "dit-s-8-256", "--random-weights", "--vae", "no-such-vae"],
                    ["no-such-vae", "does not exist"]),
}


def _fill(args, tmp):
    return [a.replace("{tmp}", str(tmp)) for a in args]


def _bad_files(tmp):
    (tmp / "empty.safetensors").write_bytes(b"")
    (tmp / "corrupt.safetensors").write_bytes(os.urandom(300))


@pytest.mark.parametrize("case", sorted(BAD_SAMPLE), ids=sorted(BAD_SAMPLE))
def test_sample_errors_are_one_line_with_status_2(tmp_path, capsys, case):
    args, words = BAD_SAMPLE[case]
    _bad_files(tmp_path)
    before = set(os.listdir(tmp_path))
    assert run_cli("sample", "--steps", "1", "--quiet", "--out", str(tmp_path / "g.png"), *_fill(args, tmp_path)) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastdiff: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert set(os.listdir(tmp_path)) == before  # an error before any work writes nothing


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_out_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert run_cli("sample", "--steps", "1", "--quiet", "--out", str(locked / "g.png")) == 2
    finally:
        locked.chmod(0o700)
    assert "not writable" in capsys.readouterr().err


def test_unwritable_out_folder_is_checked_before_work(tmp_path, capsys, monkeypatch):
    """The writability check itself (os.access), whatever the user running the tests may do."""
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)
    called = []
    monkeypatch.setattr(fastdiff.loading, "load", lambda *a, **k: called.append(1))
    assert run_cli("sample", "--steps", "1", "--quiet", "--out", str(tmp_path / "g.png")) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not writable" in err
    assert not called  # refused before the model was loaded


@pytest.mark.parametrize("exc", [RuntimeError("deep\n  inside\n  the library"), KeyError("x"),
                                 MemoryError(), ValueError("")],
                         ids=["multi-line", "key-error", "no-message", "empty-value-error"])
def test_errors_raised_deep_in_the_library_are_one_line(capsys, monkeypatch, exc):
    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr("fastdiff.engine.sample", boom)
    assert run_cli("sample", "--steps", "1", "--quiet", "--out", "") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastdiff: error: ") and "Traceback" not in err


@pytest.mark.parametrize("args,words", [
    (["export", "--out", "{tmp}/m.txt"], ["--out", ".onnx"]),
    (["export"], ["--out", "required"]),
    (["export", "--out", "{tmp}/m.onnx", "--guidance", "2"], ["--guidance"]),
    (["export", "--out", os.path.join(MISSING, "m.onnx")], ["--out", "does not exist"]),
    (["features", "--model", "digits", "--input", "{tmp}", "--out", "{tmp}/f", "--layers", "nope",
      "--timesteps", "5"], ["layers", "nope"]),
    ([], ["required"]),
    (["nonsense"], ["nonsense"]),
], ids=["export-suffix", "export-no-out", "export-guidance", "export-folder", "features-layer", "no-command",
        "bad-command"])
def test_other_commands_errors(tmp_path, capsys, args, words):
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "a.png")
    assert run_cli(*_fill(args, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastdiff: error: ") and "Traceback" not in err
    for word in words:
        assert word in err


def _subprocess(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastdiff", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_entry_point_exit_status_and_debug(tmp_path):
    """Through ``python -m fastdiff``: status 2 and one line; --debug (anywhere) and FASTDIFF_DEBUG=1 add
    the traceback."""
    plain = _subprocess("sample", "--checkpoint", str(tmp_path / "gone.pt"), "--out", "")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [f"fastdiff: error: checkpoint '{tmp_path / 'gone.pt'}' does not exist"]
    debug = _subprocess("sample", "--checkpoint", str(tmp_path / "gone.pt"), "--debug", "--out", "")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "fastdiff: error:" in debug.stderr
    env = _subprocess("sample", "--steps", "0", env={"FASTDIFF_DEBUG": "1"})
    assert env.returncode == 2 and "Traceback" in env.stderr


def test_python_dash_m_entry_point():
    r = _subprocess("sample", "--help")
    assert r.returncode == 0 and "--guidance" in r.stdout


def _all_parsers():
    parser = cli.build_parser()
    yield "fastdiff", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_help_shows_every_default():
    """Every option of every command says its default (or that it is required) in --help."""
    for name, parser in _all_parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
                continue
            assert action.help, (name, action.option_strings)  # argparse shows nothing without a help text
            text = formatter._get_help_string(action) % {"default": action.default}
            assert "default" in text.lower() or "(required)" in text, (name, action.option_strings, text)
    text = cli.build_parser()._subparsers._group_actions[0].choices["sample"].format_help()
    assert "(default: dpmpp_2m)" in text and "(default: 20)" in text and "(default: digits)" in text


# ---------------------------------------------------------------------------------------------
# writes never lose data
# ---------------------------------------------------------------------------------------------


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "grid.png"
    target.write_bytes(b"the good old file")

    def half_then_fail(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        cli.write_atomically(str(target), half_then_fail)
    assert target.read_bytes() == b"the good old file"
    assert os.listdir(tmp_path) == ["grid.png"]  # no temporary file left
    cli.write_atomically(str(target), lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["grid.png"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not mkstemp's private 0600


def test_failed_sample_run_keeps_previous_outputs(tmp_path, monkeypatch):
    png, npz = tmp_path / "g.png", tmp_path / "s.npz"
    png.write_bytes(b"old grid")
    npz.write_bytes(b"old npz")
    def savez_then_disk_full(f, **arrays):
        f.write(b"half an npz")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", savez_then_disk_full)
    assert run_cli("sample", "--n", "2", "--steps", "1", "--quiet", "--out", str(png), "--save", str(npz)) == 2
    assert npz.read_bytes() == b"old npz"
    assert sorted(os.listdir(tmp_path)) == ["g.png", "s.npz"]


# ---------------------------------------------------------------------------------------------
# info and export
# ---------------------------------------------------------------------------------------------


def test_info_lists_what_runs_here(capsys, monkeypatch):
    assert run_cli("info") == 0
    out = capsys.readouterr().out
    assert "native bf16" in out and "not installed" not in out
    if not torch.cuda.is_available():
        assert "norm ops on cpu tensors: native ATen" in out
        assert "CUDAExecutionProvider" not in out and "TensorrtExecutionProvider" not in out
    try:
        import onnxruntime  # noqa: F401

        assert "onnxruntime providers that run here: CPUExecutionProvider" in out
    except ImportError:
        assert "onnxruntime" not in out.split("packages:")[1].split("\n", 1)[1]
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    assert run_cli("info") == 0
    assert "norm ops on cpu tensors: reference" in capsys.readouterr().out


@pytest.mark.parametrize("step", [None, "dpmpp_2m"], ids=["model", "step"])
def test_export_calls_the_exporter(tmp_path, monkeypatch, step):
    from fastdiff import export

    calls = {}
    monkeypatch.setattr(export, "to_onnx", lambda den, path, **kw: calls.update(fn="model", den=den, kw=kw)
                        or str(path))
    monkeypatch.setattr(export, "step_to_onnx", lambda den, sampler, path, **kw: calls.update(
        fn="step", sampler=sampler, kw=kw) or str(path))
    extra = ["--step", step] if step else []
    assert run_cli("export", "--out", str(tmp_path / "m.onnx"), *extra) == 0
    assert calls["fn"] == ("step" if step else "model")
    assert calls["kw"]["input_shape"] == (1, 16, 16)
    if step:
        assert calls["sampler"] == step and calls["kw"]["guidance"] is True and calls["kw"]["y_null"] == 10


def test_bundled_model_quality_at_cli_defaults():
    """>= 90% of class-conditional samples are read as their class by a classifier trained on real digits,
    at 20 steps of DPM-Solver++(2M) with the CLI's default guidance and dtype (benchmarks/digits_quality.py
    reports every sampler)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    from digits_quality import accuracy, real_digit_classifier

    den = fastdiff.load("digits")
    clf, real_acc = real_digit_classifier()
    assert real_acc > 0.9
    assert os.path.getsize(cli.__file__.replace("cli.py", os.path.join("weights", "digits.safetensors"))) \
        <= 10 * 2**20
    acc = accuracy(clf, den, "dpmpp_2m", 20, n=40, guidance=den.default_guidance_scale, seed=1000)
    assert acc >= 0.9, acc
