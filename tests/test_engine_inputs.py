"""fastdiff.sample: every bad input gets a ValueError / TypeError that names the argument, before any work
(no model forward runs); a distributed environment whose peers never come ends in an error, not a hang."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import engine
from fastdiff.denoiser import Denoiser
from fastdiff.models import ADMUNet
from fastdiff.schedules import VPSchedule, VPSDESchedule

REPO = Path(__file__).resolve().parents[1]
ROWS = 5  # the tiny model's label table: labels 0..3, null label 4


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(num_classes=ROWS) -> ADMUNet:
    torch.manual_seed(0)
    return ADMUNet(image_size=8, in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1,
                   attention_resolutions=(), channel_mult=(1, 2), num_classes=num_classes,
                   num_head_channels=32, use_scale_shift_norm=True).eval()


class Forwards:
    """Counts forwards of a model: none may run before an argument error."""

    def __init__(self, model):
        self.count = 0
        model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.count += 1


NO_CUDA_DEVICE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"

# (id, keyword changes, exception type, words the message must hold: the argument's name first)
CASES = [
    ("guidance-nan", dict(guidance_scale=float("nan")), ValueError, ["guidance_scale", "finite"]),
    ("guidance-inf", dict(guidance_scale=float("inf")), ValueError, ["guidance_scale"]),
    ("guidance-negative", dict(guidance_scale=-1.0), ValueError, ["guidance_scale"]),
    ("guidance-huge", dict(guidance_scale=1e30), ValueError, ["guidance_scale"]),
    ("guidance-string", dict(guidance_scale="7.5"), TypeError, ["guidance_scale"]),
    ("guidance-bool", dict(guidance_scale=True), TypeError, ["guidance_scale"]),
    ("guidance-without-labels", dict(y=None, model="unconditional", guidance_scale=3.0), ValueError,
     ["guidance_scale", "y"]),
    ("guidance-without-null", dict(guidance_scale=2.0, y_null=None, denoiser="plain"), ValueError, ["y_null"]),
    ("steps-zero", dict(steps=0), ValueError, ["steps", ">= 1"]),
    ("steps-negative", dict(steps=-3), ValueError, ["steps"]),
    ("steps-float", dict(steps=2.5), ValueError, ["steps"]),
    ("steps-bool", dict(steps=True), ValueError, ["steps"]),
    ("steps-string", dict(steps="10"), TypeError, ["steps"]),
    ("seeds-negative-int", dict(seeds=-1), ValueError, ["seeds", "2**63"]),
    ("seeds-int-overflows", dict(seeds=2**63 - 1), ValueError, ["seeds", "2**63"]),
    ("seeds-too-large", dict(seeds=[0, 2**63]), ValueError, ["seeds", "2**63"]),
    ("seeds-negative", dict(seeds=[0, -5]), ValueError, ["seeds"]),
    ("seeds-float", dict(seeds=[1.5, 2.0]), ValueError, ["seeds", "integers"]),
    ("seeds-count", dict(seeds=[1]), ValueError, ["seeds", "one seed per sample"]),
    ("seeds-string", dict(seeds="12"), TypeError, ["seeds"]),
    ("seeds-float-tensor", dict(seeds=torch.tensor([1.0, 2.0])), ValueError, ["seeds"]),
    ("batch-size-zero", dict(batch_size=0), ValueError, ["batch_size"]),
    ("batch-size-float", dict(batch_size=2.0), ValueError, ["batch_size"]),
    ("batch-size-string", dict(batch_size="4"), TypeError, ["batch_size"]),
    ("threads-zero", dict(threads=0), ValueError, ["threads"]),
    ("threads-float", dict(threads=1.5), ValueError, ["threads"]),
    ("threads-string", dict(threads="2"), TypeError, ["threads"]),
    ("memory-budget-zero", dict(memory_budget=0), ValueError, ["memory_budget"]),
    ("memory-budget-nan", dict(memory_budget=float("nan")), ValueError, ["memory_budget"]),
    ("memory-budget-inf", dict(memory_budget=float("inf")), ValueError, ["memory_budget"]),
    ("memory-budget-string", dict(memory_budget="1GB"), TypeError, ["memory_budget"]),
    ("label-too-large", dict(y=[0, ROWS]), ValueError, ["y", f"[0, {ROWS})"]),
    ("label-negative", dict(y=[-1, 0]), ValueError, ["y"]),
    ("label-float", dict(y=[0.5, 1.5]), ValueError, ["y", "integer class labels"]),
    ("label-bool", dict(y=torch.tensor([True, False])), ValueError, ["y"]),
    ("label-string", dict(y="cat"), TypeError, ["y"]),
    ("label-count", dict(y=[1, 2, 3]), ValueError, ["y", "shape"]),
    ("label-missing", dict(y=None), ValueError, ["y", "class-conditional"]),
    ("label-to-unconditional", dict(model="unconditional", y=[0, 1]), ValueError, ["y", "not class-conditional"]),
    ("null-label-out-of-range", dict(guidance_scale=2.0, y_null=9), ValueError, ["y_null"]),
    ("null-label-string", dict(guidance_scale=2.0, y_null="none"), TypeError, ["y_null"]),
    ("device-absent-cuda", dict(device=NO_CUDA_DEVICE), ValueError, ["device"]),
    ("device-index", dict(device="cuda:3" if not torch.cuda.is_available() else "cuda:99"), ValueError,
     ["device"]),
    ("device-unknown", dict(device="gpu"), ValueError, ["device"]),
    ("device-meta", dict(device="meta"), ValueError, ["device"]),
    ("device-float", dict(device=1.5), TypeError, ["device"]),
    ("generator", dict(generator=torch.Generator()), TypeError, ["generator", "seeds="]),
    ("num-inference-steps", dict(num_inference_steps=10), TypeError, ["num_inference_steps", "steps="]),
    ("eta-keyword", dict(eta=0.5), TypeError, ["eta", "sampler_options"]),
    ("misspelled-keyword", dict(guidance=2.0), TypeError, ["'guidance'", "guidance_scale"]),
    ("ort-keyword-on-torch", dict(providers=["CPUExecutionProvider"]), TypeError, ["providers"]),
    ("runtime", dict(runtime="tensorrt"), ValueError, ["runtime"]),
    ("sampler", dict(sampler="nope"), ValueError, ["sampler must be one of"]),
    ("shape-rank", dict(shape=(2,)), ValueError, ["shape"]),
    ("shape-zero-channels", dict(shape=(2, 0, 8, 8)), ValueError, ["shape"]),
    ("shape-float", dict(shape=(2.5, 1, 8, 8)), ValueError, ["shape"]),
    ("shape-string", dict(shape="2x1x8x8"), TypeError, ["shape"]),
    ("dtype-name", dict(dtype="float8"), ValueError, ["dtype"]),
    ("dtype-integer", dict(dtype=torch.int32), ValueError, ["dtype"]),
    ("sampler-options-unknown", dict(sampler="ddim", sampler_options={"etaa": 0.5}), ValueError,
     ["sampler_options", "etaa", "eta"]),
    ("sampler-options-type", dict(sampler_options="eta=0.5"), TypeError, ["sampler_options"]),
    ("spacing-unknown", dict(spacing="quadratic"), ValueError, ["spacing"]),
    ("spacing-type", dict(spacing=3), TypeError, ["spacing"]),
    ("cuda-graph-word", dict(cuda_graph="yes"), ValueError, ["cuda_graph"]),
    ("cuda-graph-on-cpu", dict(cuda_graph=True, device="cpu"), ValueError, ["cuda_graph"]),
    ("compile-type", dict(compile=3), TypeError, ["compile"]),
    ("model-kwargs-type", dict(model_kwargs=[1]), TypeError, ["model_kwargs"]),
    ("callback-type", dict(callback=3), TypeError, ["callback"]),
    ("return-seeds-word", dict(return_seeds="yes"), ValueError, ["return_seeds"]),
    ("distributed-without-group", dict(distributed=True), ValueError, ["distributed"]),
    ("onnxruntime-torch-only-argument", dict(runtime="onnxruntime", batch_size=4), ValueError,
     ["batch_size", "onnxruntime"]),
    ("onnxruntime-misspelled", dict(runtime="onnxruntime", provider=["CPUExecutionProvider"]), TypeError,
     ["'provider'", "providers"]),
]


@pytest.mark.parametrize("change, error, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument_before_any_work(change, error, words):
    change = dict(change)
    kind = change.pop("model", None) or change.pop("denoiser", None)
    model = tiny_model(None if kind == "unconditional" else ROWS)
    den = Denoiser(model, VPSchedule("linear", 1000))
    if kind != "plain":
        den.y_null = ROWS - 1
    forwards = Forwards(model)
    shape = change.pop("shape", (2, 1, 8, 8))
    kwargs = dict(steps=2, y=[0, 1], seeds=[3, 4], dtype=torch.float32, progress=False)
    kwargs.update(change)
    with pytest.raises(error) as info:
        fastdiff.sample(den, shape, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert forwards.count == 0  # raised before any work


def test_labels_in_range_and_the_null_label_are_accepted():
    den = Denoiser(tiny_model(), VPSchedule("linear", 1000))
    den.y_null = ROWS - 1
    out = fastdiff.sample(den, (3, 1, 8, 8), steps=1, y=[0, ROWS - 2, ROWS - 1], seeds=0, guidance_scale=2.0,
                          dtype=torch.float32, progress=False)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    # numpy labels, one int for all, numpy seeds
    out = fastdiff.sample(den, (2, 1, 8, 8), steps=1, y=np.int64(2), seeds=np.array([1, 2]), dtype="float32",
                          progress=False)
    assert torch.isfinite(out).all()


def test_continuous_schedule_takes_uniform_for_integer_defaults():
    """ddim's default spacing is "leading", which needs a discrete schedule: a VP SDE gets "uniform"."""
    sched = VPSDESchedule()
    assert engine.default_spacing("ddim", sched) == "uniform"
    assert engine.default_spacing("euler", sched) == "karras"
    model = tiny_model(None)
    out = fastdiff.sample(Denoiser(model, sched), (1, 1, 8, 8), sampler="ddim", steps=2, seeds=0,
                          dtype=torch.float32, progress=False)
    assert torch.isfinite(out).all()


def test_rank_variables_without_a_process_group_sample_alone(monkeypatch):
    """RANK / WORLD_SIZE in the environment but no process group: fd.sample runs as one process."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    den = Denoiser(tiny_model(), VPSchedule("linear", 1000))
    out = fastdiff.sample(den, (3, 1, 8, 8), steps=1, y=[0, 1, 2], seeds=0, dtype=torch.float32, progress=False)
    assert out.shape == (3, 1, 8, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank", [0, 1], ids=["master-alone", "worker-alone"])
def test_cli_whose_peers_never_come_stops_with_an_error(tmp_path, rank):
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), FASTDIFF_DIST_TIMEOUT="2", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "fastdiff", "sample", "--model", "digits", "--n", "2",
                           "--steps", "1", "--out", str(tmp_path / "x.png"), "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0
    assert "did not all join within 2 s" in proc.stderr and "WORLD_SIZE" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()
