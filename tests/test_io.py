"""Writes that never lose data: a write killed half-way (a disk that fills up after some bytes) leaves the
previous file byte-identical and no partial or temporary file behind, for fastdiff.io and for every writer
that uses it (CLI grid and .npz, ONNX graphs with external data, feature shards and indexes, the feature
extractor's graph, train_digits' weights). A missing output folder is an error before any work."""

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff import io as fio

pytestmark = pytest.mark.usefixtures("one_thread")


class DiskFull(OSError):
    def __init__(self):
        super().__init__(errno.ENOSPC, "No space left on device (simulated)")


class FillingFile:
    """A real file object on the temporary file that accepts ``budget`` bytes, then raises ENOSPC (the
    bytes before it really reach the file, as on a disk that fills up)."""

    def __init__(self, f, budget: int):
        self._f, self.budget = f, budget

    def write(self, data):
        data = bytes(data)
        if len(data) > self.budget:
            self._f.write(data[: self.budget])
            self._f.flush()
            self.budget = 0
            raise DiskFull()
        self.budget -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def disk_fills_after(monkeypatch):
    """``disk_fills_after(n)``: every file fastdiff.io opens from now on takes n bytes, then raises."""
    def arm(budget: int):
        real = fio._fdopen
        monkeypatch.setattr(fio, "_fdopen", lambda fd, mode: FillingFile(real(fd, mode), budget))
    return arm


def partial_path_writer(budget: int):
    """A writer taking a path that writes ``budget`` bytes to it and then fails (a full disk)."""
    def write(path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * budget)
        raise DiskFull()
    return write


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder`` (hidden ones included)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# the helper itself
# ---------------------------------------------------------------------------------------------


def test_atomic_write_replaces_or_keeps(tmp_path, disk_fills_after):
    target = tmp_path / "a.bin"
    fio.write_bytes(target, b"old content")
    os.chmod(target, 0o640)
    fio.write_bytes(target, b"new content, longer")
    assert target.read_bytes() == b"new content, longer"
    assert oct(target.stat().st_mode & 0o777) == oct(0o640)  # the old file's permissions are kept
    before = snapshot(tmp_path)
    disk_fills_after(5)
    with pytest.raises(DiskFull):
        fio.write_bytes(target, b"x" * 100)
    assert snapshot(tmp_path) == before


def test_atomic_write_body_exception_and_text(tmp_path):
    target = tmp_path / "t.json"
    fio.write_json(target, {"a": 1})
    before = snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with fio.atomic_write(target) as f:
            f.write(b"{\"a\": 2")
            raise KeyboardInterrupt
    assert snapshot(tmp_path) == before
    with pytest.raises(TypeError):  # serialisation fails before the file is touched
        fio.write_json(target, {"a": object()})
    assert snapshot(tmp_path) == before


def test_atomic_path_and_files(tmp_path):
    target = tmp_path / "g.onnx"
    with fio.atomic_path(target) as tmp:
        assert tmp.endswith(".onnx") and os.path.dirname(tmp) == str(tmp_path)
        Path(tmp).write_bytes(b"graph-1")
    before = snapshot(tmp_path)
    with pytest.raises(DiskFull):
        with fio.atomic_path(target) as tmp:
            partial_path_writer(3)(tmp)
    assert snapshot(tmp_path) == before
    with fio.atomic_files(target) as staged:  # a graph and its companion, under their final names
        assert os.path.basename(staged) == "g.onnx" and os.path.dirname(os.path.dirname(staged)) == str(tmp_path)
        Path(staged).write_bytes(b"graph-2")
        Path(staged + ".data").write_bytes(b"weights-2")
    assert target.read_bytes() == b"graph-2" and (tmp_path / "g.onnx.data").read_bytes() == b"weights-2"
    before = snapshot(tmp_path)
    with pytest.raises(DiskFull):
        with fio.atomic_files(target) as staged:
            Path(staged + ".data").write_bytes(b"weights-3")
            partial_path_writer(2)(staged)
    assert snapshot(tmp_path) == before
    with pytest.raises(FileNotFoundError, match="did not create"):
        with fio.atomic_files(target) as staged:
            pass
    assert snapshot(tmp_path) == before


def test_create_exclusive(tmp_path):
    assert fio.create_exclusive(tmp_path / "run.json", b"first")
    assert not fio.create_exclusive(tmp_path / "run.json", b"second")
    assert (tmp_path / "run.json").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


@pytest.mark.parametrize("path,exc,word", [
    ("no/such/folder/x.png", FileNotFoundError, "does not exist"),
    (".", IsADirectoryError, "is a folder"),
    ("", ValueError, "output file path"),
])
def test_check_output_path(tmp_path, monkeypatch, path, exc, word):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(exc, match=word) as err:
        fio.check_output_path(path, "--out")
    assert str(err.value).startswith("--out")


# ---------------------------------------------------------------------------------------------
# the writers
# ---------------------------------------------------------------------------------------------


def cli_error(capsys, *args) -> str:
    """The error text of a failing CLI call: raised, or printed with a non-zero status."""
    from fastdiff import cli

    try:
        status = cli.main(list(args))
    except SystemExit as e:
        status = e.code
    except (OSError, ValueError) as e:
        return str(e)
    assert status not in (0, None)
    return capsys.readouterr().err


SAMPLE = ["sample", "--n", "2", "--steps", "1", "--dtype", "float32", "--quiet"]


def test_cli_grid_and_npz(tmp_path, monkeypatch, disk_fills_after):
    from PIL import Image

    from fastdiff import cli

    png, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    assert cli.main([*SAMPLE, "--out", str(png), "--save", str(npz)]) == 0
    assert np.load(npz)["samples"].shape == (2, 1, 16, 16) and Image.open(png).format == "PNG"
    before = snapshot(tmp_path)
    disk_fills_after(64)  # the grid and the .npz both go through fastdiff.io: each write fails after 64 bytes
    for args in (["--out", str(png), "--save", ""], ["--out", "", "--save", str(npz)]):
        assert cli.main([*SAMPLE, "--seed", "1", *args]) == 2  # one line on stderr, exit status 2
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("option,value", [("--out", "missing/grid.png"), ("--save", "missing/s.npz"),
                                          ("--out", "grid.notanimage")])
def test_cli_checks_outputs_before_work(tmp_path, monkeypatch, capsys, option, value):
    from fastdiff import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    args = [*SAMPLE, "--out", "", option, value] if option == "--save" else [*SAMPLE, option, value]
    message = cli_error(capsys, *args)
    assert option in message and ("does not exist" in message or "must end in" in message)
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def small_model():
    from fastdiff.models import UViT

    torch.manual_seed(0)
    return UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2).eval()


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_to_onnx(tmp_path, monkeypatch, small_model, external):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from torch.onnx import ONNXProgram

    from fastdiff.export import to_onnx
    from fastdiff.export.ort import OrtDenoiser

    path = tmp_path / "m.onnx"
    to_onnx(small_model, path, external_data=external)
    if external:  # the graph names its data file by the final name, not the staging one
        proto = onnx.load(str(path), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"m.onnx.data"}
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(OrtDenoiser(path)(x, t), small_model(x, t), rtol=1e-4, atol=1e-4)
    before = snapshot(tmp_path)
    with monkeypatch.context() as m:  # the exporter's save fills the disk half-way
        m.setattr(ONNXProgram, "save", lambda self, dest, **k: partial_path_writer(1000)(dest))
        with pytest.raises(DiskFull):
            to_onnx(small_model, path, external_data=external)
    assert snapshot(tmp_path) == before
    with monkeypatch.context() as m:  # or the written graph fails the checker
        m.setattr(onnx.checker, "check_model", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad graph")))
        with pytest.raises(ValueError, match="bad graph"):
            to_onnx(small_model, path, external_data=external)
    assert snapshot(tmp_path) == before
    with pytest.raises(FileNotFoundError, match="path"):
        to_onnx(small_model, tmp_path / "nowhere" / "m.onnx")


def test_step_to_onnx(tmp_path, monkeypatch, small_model):
    pytest.importorskip("onnxscript")
    from torch.onnx import ONNXProgram

    from fastdiff.denoiser import Denoiser
    from fastdiff.export import step_to_onnx
    from fastdiff.schedules import VPSchedule

    den = Denoiser(small_model, VPSchedule())
    path = step_to_onnx(den, "ddim", tmp_path / "step.onnx")
    before = snapshot(tmp_path)
    monkeypatch.setattr(ONNXProgram, "save", lambda self, dest, **k: partial_path_writer(10)(dest))
    with pytest.raises(DiskFull):
        step_to_onnx(den, "ddim", path)
    assert snapshot(tmp_path) == before


def _extractor(model):
    from fastdiff.features import FeatureExtractor
    from fastdiff.schedules import VPSchedule

    return FeatureExtractor(model, VPSchedule(), layers=["in_blocks.0"], timesteps=[10, 500], pool="avg")


def test_feature_extractor_onnx(tmp_path, disk_fills_after, small_model):
    pytest.importorskip("onnxscript")
    fx = _extractor(small_model)
    path = fx.to_onnx(tmp_path / "fx.onnx")
    before = snapshot(tmp_path)
    disk_fills_after(4096)
    with pytest.raises(DiskFull):
        fx.to_onnx(path)
    assert snapshot(tmp_path) == before


def test_feature_shards_and_indexes(tmp_path, monkeypatch, disk_fills_after, small_model):
    import safetensors.torch

    from fastdiff.features import load_features

    fx = _extractor(small_model)
    images = torch.randn(6, 3, 8, 8)
    batches = [images[:2], images[2:4], images[4:]]
    real_save = safetensors.torch.save_file
    written = []

    def fails_on_second(tensors, filename, metadata=None):
        written.append(filename)
        if len(written) == 2:
            partial_path_writer(50)(filename)
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fails_on_second)
    with pytest.raises(DiskFull):
        fx.extract_to(tmp_path / "f", batches)
    names = sorted(p.name for p in (tmp_path / "f").iterdir())
    assert names == ["index-rank0.json", "run.json", "shard-r000-000000.safetensors"]  # no partial shard
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    fx.extract_to(tmp_path / "f", batches, resume=True)
    whole = load_features(tmp_path / "f")
    before = snapshot(tmp_path)
    disk_fills_after(10)  # the index writes fail now: the complete folder stays as it was
    with pytest.raises(DiskFull):
        fx.extract_to(tmp_path / "f", batches, resume=True)
    assert snapshot(tmp_path) == before
    monkeypatch.setattr(fio, "_fdopen", os.fdopen)
    fx.extract_to(tmp_path / "f", batches, resume=True)
    again = load_features(tmp_path / "f")
    assert all(torch.equal(again[k], whole[k]) for k in whole)


def test_train_digits_writes(tmp_path, monkeypatch, disk_fills_after):
    import safetensors.torch

    from fastdiff import nn as fnn
    from fastdiff import train_digits
    from fastdiff.models import adm

    prefix = str(tmp_path / "d")
    args = ["--steps", "1", "--batch-size", "4", "--warmup", "1", "--save-every", "100", "--bf16", "off",
            "--out", prefix]
    ops_before = fnn.GroupNormModulate.forward, adm.ops
    train_digits.main(args)
    assert (fnn.GroupNormModulate.forward, adm.ops) == ops_before  # training's native ops are undone
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["d.ckpt.pt", "d.json", "d.safetensors"]
    before = snapshot(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", lambda t, filename, **k: partial_path_writer(64)(filename))
        with pytest.raises(DiskFull):
            train_digits.main(args)
    assert {n: b for n, b in snapshot(tmp_path).items() if n != "d.ckpt.pt"} == \
        {n: b for n, b in before.items() if n != "d.ckpt.pt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    before = snapshot(tmp_path)
    disk_fills_after(1000)  # the checkpoint (torch.save into the temporary file) fails; torch reports it
    with pytest.raises((DiskFull, RuntimeError)):  # as its own RuntimeError
        train_digits.main(args)
    assert snapshot(tmp_path) == before


def test_train_digits_keeps_the_bundled_weights(tmp_path, monkeypatch, capsys):
    from fastdiff import train_digits
    from fastdiff.models.digits import DIGITS_WEIGHTS

    monkeypatch.chdir(tmp_path)
    assert os.path.realpath(train_digits.parse_args([]).out + ".safetensors") == str(tmp_path / "digits.safetensors")
    bundled = train_digits.bundled_prefix()
    assert bundled + ".safetensors" == DIGITS_WEIGHTS
    monkeypatch.setattr(train_digits, "train", lambda args: pytest.fail("training started"))
    with pytest.raises(SystemExit) as err:
        train_digits.main(["--out", bundled])
    assert err.value.code == 2 and "--overwrite-bundled" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_digits.main(["--out", str(tmp_path / "no" / "digits")])
    assert "--out" in capsys.readouterr().err
    assert train_digits.parse_args(["--out", bundled, "--overwrite-bundled"]).out == bundled
