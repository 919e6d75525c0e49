"""ONNX export and ONNX Runtime (CPU provider): zoo models, the step graph's loop, the bundled digits model.

Oracles: the PyTorch forward of the same model (and the upstream outputs of the three fixtures), and
fastdiff.samplers.sample_loop (the PyTorch loop) for whole sampling loops. Exports are slow-ish (seconds
each), so each graph is exported once per module and used by every test that needs it.
"""

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_fixture, rel_l2

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff.denoiser import Denoiser  # noqa: E402
from fastdiff.export import check_standard_onnx, read_metadata, step_to_onnx, to_onnx  # noqa: E402
from fastdiff.export.ort import OrtDenoiser, initial_state, sample_onnxruntime  # noqa: E402
from fastdiff.models import ADMUNet, DDPMUNet, DiT, UViT  # noqa: E402
from fastdiff.samplers import make_generators, randn_per_sample, sample_loop  # noqa: E402
from fastdiff.schedules import VPSchedule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = {"adm_unet_tiny": ADMUNet, "dit_tiny": DiT, "uvit_tiny": UViT}
# the DDPM checkpoints' options (TF padding, sin-cos with shift 1, one head of all channels), tiny
TINY_DDPM = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                 downsample_padding=0, freq_shift=1, flip_sin_to_cos=False, norm_eps=1e-6)
MODELS = list(UPSTREAM) + ["ddpm_tiny"]
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread_module")


def build_model(name):
    """(model in eval mode, upstream (inputs, output) or None)."""
    if name in UPSTREAM:
        config, inputs, state_dict, output, _ = load_fixture(name)
        model = UPSTREAM[name](**config).eval()
        model.load_state_dict(state_dict, strict=True)
        return model, (inputs, output)
    model = DDPMUNet(**TINY_DDPM).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # redraw every weight: upstream zero-initialises output convs
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, None


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def exported(tmp_module):
    """name -> (model, upstream, path): each model exported once with a dynamic batch (lazily)."""
    cache = {}

    def get(name):
        if name not in cache:
            model, upstream = build_model(name)
            path = to_onnx(model, tmp_module / f"{name}.onnx", example_batch=2, dynamic_batch=True)
            cache[name] = (model, upstream, path)
        return cache[name]

    return get


def random_inputs(model, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = model.example_inputs(batch)
    x = torch.randn(ex["x"].shape, generator=g)
    t = torch.rand(batch, generator=g) * 999
    label_key = next((k for k in ("y", "class_labels") if k in ex), None)
    y = None
    if label_key is not None:
        y = torch.randint(0, 10, (batch,), generator=g)
    return x, t, label_key, y


# ---------------------------------------------------------------------------------------------
# model graphs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_model_graph_matches_pytorch_at_two_batches(exported, name):
    model, upstream, path = exported(name)
    ort_model = OrtDenoiser(path, providers=["CPUExecutionProvider"])
    assert ort_model.batch is None
    for batch in (1, 3):  # one export, two batch sizes
        x, t, label_key, y = random_inputs(model, batch, seed=batch)
        with torch.no_grad():
            ref = model(x, t, **({label_key: y} if label_key else {}))
        out = ort_model(x, t, y)
        assert out.shape == ref.shape
        assert rel_l2(out, ref) <= TOL, (name, batch, rel_l2(out, ref))
    if upstream is not None:  # the upstream implementation's own output, through ORT
        inputs, output = upstream
        t = inputs["timesteps"] if "timesteps" in inputs else inputs["t"]
        out = ort_model(inputs["x"], t.float(), inputs.get("y"))
        assert rel_l2(out, output) <= TOL, (name, rel_l2(out, output))


@pytest.mark.parametrize("name", MODELS)
def test_model_graph_holds_only_default_domain(exported, name):
    _, _, path = exported(name)
    proto = onnx.load(path)
    domains = {node.domain for node in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert not proto.functions
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert not any(node.op_type.startswith("fastdiff") for node in proto.graph.node)
    onnx.checker.check_model(proto, full_check=True)
    meta = read_metadata(proto)
    assert meta["kind"] == "model" and meta["batch"] is None


def test_standard_check_rejects_custom_domain(exported):
    _, _, path = exported("uvit_tiny")
    proto = onnx.load(path)
    proto.graph.node[0].domain = "com.microsoft"
    with pytest.raises(ValueError, match="outside the default ONNX domain"):
        check_standard_onnx(proto)


class AllOps(torch.nn.Module):
    """Every fastdiff op in the variants the zoo does not reach: GroupNorm without affine and modulation
    on 3-D input, with both on 5-D input; LayerNorm with affine; attention with a key-padding mask (one
    sample fully masked), cross-attention lengths and a negative scale."""

    def forward(self, x3, x5, tokens, w, b, scale, shift, q, k, v, mask):
        from fastdiff import ops

        a = ops.group_norm_modulate(x3, 2, activation="silu")
        c = ops.group_norm_modulate(x5, 4, w, b, scale, shift, eps=1e-6)
        d = ops.layer_norm_modulate(tokens, scale=scale, shift=shift, weight=w, bias=b, eps=1e-5)
        e = ops.attention(q, k, v, bias=mask)
        f = ops.attention(q, k, v, scale=-0.3)
        return a, c, d, e, f


def all_ops_inputs(n):
    g = torch.Generator().manual_seed(n)
    r = lambda *shape: torch.randn(*shape, generator=g)
    mask = torch.ones(n, 1, 1, 7, dtype=torch.bool)
    mask[:, :, :, 5:] = False
    mask[-1] = False  # the last sample attends to nothing: zeros, not NaN
    return (r(n, 8, 5), r(n, 8, 3, 4, 2) + 3, r(n, 6, 8), r(8), r(8), r(n, 8), r(n, 8), r(n, 2, 4, 16),
            r(n, 2, 7, 16), r(n, 2, 7, 16), mask)


@pytest.mark.parametrize("opset, lowering", [
    (18, dict(group_norm="instance_norm", attention="matmul")),
    (18, dict(group_norm="basic", attention="matmul")),
    (23, dict(group_norm="group_norm", attention="attention")),
], ids=["instance-norm", "basic", "opset23-ops"])
def test_every_op_lowering_matches_the_reference(tmp_module, opset, lowering):
    import onnxruntime as ort

    from fastdiff.export.onnx import translation_table

    path = str(tmp_module / f"ops_{opset}_{lowering['group_norm']}.onnx")
    b = torch.export.Dim("batch", min=1, max=64)
    dyn = ({0: b}, {0: b}, {0: b}, None, None, {0: b}, {0: b}, {0: b}, {0: b}, {0: b}, {0: b})
    with torch.no_grad(), fastdiff.ops.backend("reference"):
        program = torch.onnx.export(AllOps().eval(), all_ops_inputs(2), dynamo=True, opset_version=opset,
                                    dynamic_shapes=dyn, custom_translation_table=translation_table(
                                        opset, **lowering), verbose=False)
    program.save(path)
    check_standard_onnx(path)
    onnx.checker.check_model(path, full_check=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (1, 3):
        inputs = all_ops_inputs(n + 10)
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
        outs = session.run(None, feeds)
        with torch.no_grad(), fastdiff.ops.backend("reference"):
            refs = AllOps()(*[t.double() if t.is_floating_point() else t for t in inputs])
        for out, ref in zip(outs, refs, strict=True):
            assert np.isfinite(out).all()
            assert rel_l2(torch.from_numpy(out), ref) <= TOL, (lowering, rel_l2(torch.from_numpy(out), ref))


@pytest.fixture(scope="module")
def fixed_batch_graph(tmp_module):
    """A fixed-batch export (batch 2) whose weights are written as external data."""
    model, _ = build_model("uvit_tiny")
    path = to_onnx(model, tmp_module / "uvit_fixed.onnx", example_batch=2, dynamic_batch=False,
                   external_data=True)
    return model, path


def test_fixed_batch_graph_runs_its_batch_and_rejects_another(fixed_batch_graph):
    model, path = fixed_batch_graph
    ort_model = OrtDenoiser(path)
    assert ort_model.batch == 2
    x, t, _, y = random_inputs(model, 2)
    with torch.no_grad():
        ref = model(x, t, y=y)
    assert rel_l2(ort_model(x, t, y), ref) <= TOL
    x3, t3, _, y3 = random_inputs(model, 3)
    with pytest.raises(ValueError, match="fixed batch of 2"):
        ort_model(x3, t3, y3)


def test_external_data_is_written_and_loaded(fixed_batch_graph):
    _, path = fixed_batch_graph
    data = Path(str(path) + ".data")
    assert data.exists() and data.stat().st_size > 0.9 * os.path.getsize(path)
    onnx.checker.check_model(str(path), full_check=True)


@pytest.mark.parametrize("change, message", [
    (lambda x, t, y: (x[:, :2], t, y), "x must have shape"),
    (lambda x, t, y: (x, t.repeat(2), y), "timesteps"),
    (lambda x, t, y: (x, t, None), "pass y"),
    (lambda x, t, y: (x, t, y[:1].repeat(3)), "y must have shape"),
])
def test_ort_model_bad_inputs_name_the_argument(exported, change, message):
    model, _, path = exported("uvit_tiny")
    ort_model = OrtDenoiser(path)
    x, t, _, y = random_inputs(model, 2)
    with pytest.raises(ValueError, match=message):
        ort_model(*change(x, t, y))


def test_export_bad_arguments(tmp_module):
    model, _ = build_model("uvit_tiny")
    with pytest.raises(ValueError, match="opset"):
        to_onnx(model, tmp_module / "bad.onnx", opset=16)
    with pytest.raises(ValueError, match="example_batch"):
        to_onnx(model, tmp_module / "bad.onnx", example_batch=0)
    with pytest.raises(ValueError, match="model_or_denoiser"):
        to_onnx("not a model", tmp_module / "bad.onnx")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(ValueError, match="model_or_denoiser: the model's weights are bfloat16"):
        to_onnx(bf16, tmp_module / "bad.onnx")
    with pytest.raises(ValueError, match="bfloat16"):
        step_to_onnx(Denoiser(bf16, VPSchedule()), "ddim", tmp_module / "bad.onnx")
    assert not (tmp_module / "bad.onnx").exists()
    denoiser = Denoiser(model, VPSchedule(), dynamic_threshold=0.995)
    with pytest.raises(ValueError, match="dynamic thresholding"):
        step_to_onnx(denoiser, "ddim", tmp_module / "bad.onnx")


# ---------------------------------------------------------------------------------------------
# step graphs: whole sampling loops through ONNX Runtime against the PyTorch loop
# ---------------------------------------------------------------------------------------------

STEP_CASES = {
    # DiT (learned sigma) with classifier-free guidance
    "dpmpp_2m": dict(model="dit_tiny", guidance_scale=3.0, y_null=10, labels=True, learned_sigma=True,
                     options={}, frame="sigma"),
    # U-Net, unconditional, eps
    "ddim": dict(model="ddpm_tiny", guidance_scale=1.0, y_null=None, labels=False, learned_sigma=False,
                 options={}, frame="sigma"),
    # DiT with labels but no guidance; learned-range variance in the update; state in the VP frame
    "ddpm": dict(model="dit_tiny", guidance_scale=1.0, y_null=None, labels=True, learned_sigma=True,
                 options={"variance": "learned_range"}, frame="vp"),
}


@pytest.fixture(scope="module")
def step_graphs(tmp_module):
    cache = {}

    def get(sampler):
        if sampler not in cache:
            case = STEP_CASES[sampler]
            model, _ = build_model(case["model"])
            denoiser = Denoiser(model, VPSchedule(), learned_sigma=case["learned_sigma"])
            path = step_to_onnx(denoiser, sampler, tmp_module / f"step_{sampler}.onnx",
                                guidance=case["guidance_scale"] != 1.0, y_null=case["y_null"],
                                sampler_options=case["options"], frame=case["frame"])
            cache[sampler] = (denoiser, path)
        return cache[sampler]

    return get


def pytorch_loop(denoiser, table, shape, seeds, *, y=None, y_null=None, guidance_scale=1.0, frame="sigma"):
    gens = make_generators(seeds)
    x = initial_state(denoiser.schedule, float(table.sigma[0]), randn_per_sample(gens, shape[1:]), frame)
    with torch.no_grad():
        return sample_loop(denoiser, x, table, y=y, y_null=y_null, guidance_scale=guidance_scale,
                           generators=gens, frame=frame)


@pytest.mark.parametrize("sampler, options", [
    ("dpmpp_2m", None),
    ("ddim", None),
    ("ddim", {"eta": 1.0}),  # noise at every step: the per-sample seeds must match
    ("ddpm", None),
], ids=["dpmpp_2m-cfg", "ddim", "ddim-eta1", "ddpm-learned-range-vp"])
def test_step_graph_loop_matches_pytorch_loop(step_graphs, sampler, options):
    case = STEP_CASES[sampler]
    denoiser, path = step_graphs(sampler)
    shape = (3, *read_metadata(path)["input_shape"])
    seeds = [11, 12, 13]
    y = torch.tensor([1, 5, 7]) if case["labels"] else None
    run = dict(sampler=sampler, steps=6, guidance_scale=case["guidance_scale"], sampler_options=options,
               frame=case["frame"])
    out, dtab = sample_onnxruntime(path, shape, y=y, seeds=seeds, return_table=True,
                                   providers=["CPUExecutionProvider"], **run)
    assert dtab.table.learned_range == (sampler == "ddpm")
    ref = pytorch_loop(denoiser, dtab.table, shape, seeds, y=y, y_null=case["y_null"],
                       guidance_scale=case["guidance_scale"], frame=case["frame"])
    assert torch.isfinite(out).all()
    assert rel_l2(out, ref) <= TOL, rel_l2(out, ref)
    # a sample does not depend on the batch it is drawn in
    one = sample_onnxruntime(path, (1, *shape[1:]), y=None if y is None else y[1:2], seeds=seeds[1:2], **run)
    assert rel_l2(one[0], out[1]) <= TOL


def test_step_graph_holds_only_default_domain_and_its_metadata(step_graphs):
    _, path = step_graphs("dpmpp_2m")
    proto = onnx.load(path)
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    onnx.checker.check_model(proto, full_check=True)
    names = [i.name for i in proto.graph.input]
    assert names == ["x", "timestep", "c_in", "coef", "history", "noise", "y", "guidance_scale"]
    assert [o.name for o in proto.graph.output] == ["x_next", "history_next"]
    meta = read_metadata(proto)
    assert meta["kind"] == "step" and meta["sampler"] == "dpmpp_2m" and meta["guided"]


def test_step_graph_bad_requests(step_graphs):
    _, path = step_graphs("ddim")
    shape = (2, *read_metadata(path)["input_shape"])
    with pytest.raises(ValueError, match="guidance"):
        sample_onnxruntime(path, shape, sampler="ddim", steps=3, guidance_scale=4.0)
    with pytest.raises(ValueError, match="sampler"):
        sample_onnxruntime(path, shape, sampler="dpmpp_2m", steps=3)
    with pytest.raises(ValueError, match="seeds"):
        sample_onnxruntime(path, shape, sampler="ddim", steps=3, seeds=[1])
    with pytest.raises(ValueError, match="shape"):
        sample_onnxruntime(path, (2, 1, 8, 8), sampler="ddim", steps=3)
    with pytest.raises(ValueError, match="unconditional"):
        sample_onnxruntime(path, shape, sampler="ddim", steps=3, y=1)


def test_step_session_is_reused_until_the_file_changes(step_graphs, tmp_path):
    import shutil

    from fastdiff.export import ort as fort

    _, src = step_graphs("ddim")
    path = tmp_path / "step.onnx"
    shutil.copy(src, path)
    shape = (2, *read_metadata(path)["input_shape"])
    run = dict(sampler="ddim", steps=2, providers=["CPUExecutionProvider"])
    first = sample_onnxruntime(path, shape, **run)
    step = fort._cached_step_session(path, ["CPUExecutionProvider"], torch.device("cpu"))[0]
    again = sample_onnxruntime(path, shape, **run)
    assert fort._cached_step_session(path, ["CPUExecutionProvider"], torch.device("cpu"))[0] is step
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    shutil.copy(src, tmp_path / "tmp.onnx")
    os.replace(tmp_path / "tmp.onnx", path)  # a new file at the same path
    os.utime(path, ns=(0, 0))
    assert fort._cached_step_session(path, ["CPUExecutionProvider"], torch.device("cpu"))[0] is not step


def test_engine_runtime_onnxruntime_matches_pytorch(step_graphs):
    """``fastdiff.sample(..., runtime="onnxruntime")`` (fastdiff/engine.py) on a step graph against the
    engine's own PyTorch loop: same seeds, same start, same table."""
    if not hasattr(fastdiff, "sample"):
        pytest.skip("fastdiff.sample (fastdiff/engine.py) is not in this tree yet")
    denoiser, path = step_graphs("dpmpp_2m")
    shape = (2, *read_metadata(path)["input_shape"])
    kw = dict(sampler="dpmpp_2m", steps=5, guidance_scale=3.0, y=torch.tensor([2, 3]), seeds=[5, 6],
              device="cpu", dtype=torch.float32, progress=False, y_null=10)
    ref = fastdiff.sample(denoiser, shape, **kw)
    out = fastdiff.sample(path, shape, runtime="onnxruntime", **kw)
    assert rel_l2(out, ref) <= TOL, rel_l2(out, ref)


def test_ort_model_inside_the_engine_matches_the_pytorch_model(exported):
    """OrtDenoiser as the model of a Denoiser under ``fastdiff.sample`` (guided: the doubled batch goes
    through the graph; learned sigma: the graph's 2C channels are split by the Denoiser)."""
    if not hasattr(fastdiff, "sample"):
        pytest.skip("fastdiff.sample (fastdiff/engine.py) is not in this tree yet")
    model, _, path = exported("dit_tiny")
    kw = dict(sampler="dpmpp_2m", steps=4, guidance_scale=2.5, y=torch.tensor([4, 9]), seeds=[1, 2],
              device="cpu", dtype=torch.float32, progress=False, y_null=10)
    shape = (2, 4, 16, 16)
    ref = fastdiff.sample(Denoiser(model, VPSchedule(), learned_sigma=True), shape, **kw)
    out = fastdiff.sample(Denoiser(OrtDenoiser(path), VPSchedule(), learned_sigma=True), shape, **kw)
    assert rel_l2(out, ref) <= TOL, rel_l2(out, ref)


# ---------------------------------------------------------------------------------------------
# the bundled digits model: class-conditional samples through ORT classified as well as PyTorch's
# ---------------------------------------------------------------------------------------------

DIGITS = Path(fastdiff.__file__).resolve().parent / "weights" / "digits.safetensors"


def digits_classifier():
    """Logistic regression on the real 8x8 digits, the training split of the bundled model."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, _, y_train, _ = train_test_split(digits.data, digits.target, test_size=0.25, random_state=0)
    return LogisticRegression(max_iter=3000).fit(x_train, y_train)


def classify(clf, samples):
    """(N, 1, 16, 16) samples in [-1, 1] -> labels, at 8x8 on the digits' 0..16 scale."""
    small = torch.nn.functional.avg_pool2d(samples.float().clamp(-1, 1), 2)
    return clf.predict(((small + 1) * 8).reshape(samples.shape[0], -1).numpy())


@pytest.mark.skipif(not DIGITS.exists(), reason="the bundled digits weights are not in this tree")
def test_digits_samples_through_ort_classified_like_pytorch():
    """The bundled model through ``fastdiff.sample(runtime="onnxruntime")`` (step graph exported from the
    Denoiser) against the PyTorch engine: the classifier's accuracy within one point."""
    pytest.importorskip("sklearn")
    from fastdiff.models.digits import load_digits_model

    denoiser = load_digits_model()
    w = float(denoiser.metadata.get("default_guidance", 2.0))
    labels = torch.arange(10).repeat(5)  # 50 samples: "within one point" means the same count
    shape = (labels.shape[0], 1, 16, 16)
    kw = dict(sampler="dpmpp_2m", steps=10, guidance_scale=w, y=labels, seeds=1000, device="cpu",
              dtype=torch.float32, progress=False)
    ref = fastdiff.sample(denoiser, shape, **kw)
    out = fastdiff.sample(denoiser, shape, runtime="onnxruntime", **kw)
    clf = digits_classifier()
    acc_torch = float(np.mean(classify(clf, ref) == labels.numpy()))
    acc_ort = float(np.mean(classify(clf, out) == labels.numpy()))
    assert acc_torch >= 0.5, f"the classifier pipeline or the model is broken: PyTorch accuracy {acc_torch}"
    assert abs(acc_ort - acc_torch) <= 0.01, (acc_ort, acc_torch)
    assert rel_l2(out, ref) <= 1e-3, rel_l2(out, ref)


# ---------------------------------------------------------------------------------------------
# flow matching through ONNX Runtime: the run starts at sigma = inf, in the flow frame
# ---------------------------------------------------------------------------------------------


class TinyVelocity(torch.nn.Module):
    """A tiny velocity model ``(x, t) -> v`` (flow prediction), timesteps in [0, 1000]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Conv2d(2, 8, 3, padding=1)
        self.temb = torch.nn.Linear(1, 8)
        self.out = torch.nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x, t):
        h = self.inp(x) + self.temb(t[:, None].to(x.dtype) / 1000)[:, :, None, None]   # (N, 8, H, W)
        return self.out(torch.tanh(h))


FLOW_CASES = [
    ("euler", dict(shift=3.0)),                    # SD3's static shift
    ("heun", dict(use_dynamic_shifting=True)),     # Flux's shift from the token count; Heun in flow time
    ("lcm", dict(shift=3.0)),                      # noise on every row (FlowMatchEuler stochastic_sampling)
]


@pytest.mark.parametrize("sampler, schedule", FLOW_CASES, ids=[c[0] for c in FLOW_CASES])
def test_flow_model_through_onnxruntime_matches_torch(sampler, schedule, tmp_path):
    from fastdiff.schedules import FlowSchedule

    den = Denoiser(TinyVelocity(), FlowSchedule(**schedule), prediction="flow", patch_size=2)
    shape = (3, 2, 8, 8)
    kw = dict(sampler=sampler, steps=4, seeds=[1, 2, 3], dtype=torch.float32, progress=False)
    ref = fastdiff.sample(den, shape, **kw)
    out = fastdiff.sample(den, shape, runtime="onnxruntime", **kw)
    assert torch.isfinite(out).all() and rel_l2(out, ref) <= TOL, rel_l2(out, ref)
    # the graph alone: its frame, schedule (shift included) and patch size come from its metadata
    path = step_to_onnx(den, sampler, tmp_path / "flow_step.onnx", input_shape=shape[1:])
    meta = read_metadata(path)
    assert meta["frame"] == "flow" and meta["schedule"]["type"] == "FlowSchedule" and meta["patch_size"] == 2
    alone = sample_onnxruntime(path, shape, sampler=sampler, steps=4, seeds=[1, 2, 3],
                               providers=["CPUExecutionProvider"])
    assert rel_l2(alone, ref) <= TOL, rel_l2(alone, ref)


def test_flow_step_graph_in_the_sigma_view_is_refused(tmp_path):
    from fastdiff.schedules import FlowSchedule

    den = Denoiser(TinyVelocity(), FlowSchedule(shift=3.0), prediction="flow")
    with pytest.raises(ValueError, match="sigma = inf.*frame='flow'"):
        step_to_onnx(den, "euler", tmp_path / "s.onnx", frame="sigma", input_shape=(2, 8, 8))
    with pytest.raises(ValueError, match="frame"):
        step_to_onnx(den, "euler", tmp_path / "s.onnx", frame="vp", input_shape=(2, 8, 8))
    assert not (tmp_path / "s.onnx").exists()


def test_initial_state_is_the_schedules_initial_scale():
    from fastdiff.schedules import FlowSchedule, VESDESchedule

    noise = torch.randn(2, 1, 4, 4)
    flow = FlowSchedule(shift=3.0)
    assert torch.equal(initial_state(flow, float("inf"), noise, "flow"), noise)
    assert torch.equal(initial_state(flow, 3.0, noise, "sigma"), noise * 4.0)  # x = (1 + sigma) x_s
    with pytest.raises(ValueError, match="inf"):
        initial_state(flow, float("inf"), noise, "sigma")
    assert torch.equal(initial_state(VPSchedule(), 80.0, noise, "vp"), noise)
    torch.testing.assert_close(initial_state(VPSchedule(), 80.0, noise, "sigma"), noise * (1 + 80.0 ** 2) ** 0.5)
    assert torch.equal(initial_state(VESDESchedule(), 50.0, noise, "sigma"), noise * 50.0)


def test_step_graph_lays_out_the_samplers_default_spacing(step_graphs):
    """sample_onnxruntime's spacing=None is the sampler's default as fastdiff.sample lays it out (DDIM:
    diffusers' "leading")."""
    from fastdiff import engine

    denoiser, path = step_graphs("ddim")
    shape = (1, *read_metadata(path)["input_shape"])
    _, dtab = sample_onnxruntime(path, shape, sampler="ddim", steps=5, return_table=True,
                                 providers=["CPUExecutionProvider"])
    _, timesteps = engine._sampling_sigmas(denoiser, "ddim", 5, None, shape)
    np.testing.assert_array_equal(dtab.table.timestep[:5], timesteps)


def test_guidance_none_takes_a_guided_graphs_stored_default():
    """sample_onnxruntime(path, ..., guidance_scale=None): the default stored in a guided graph (what
    fastdiff.load set on the Denoiser it was exported from) when labels are given, else 1."""
    from fastdiff.engine_args import default_guidance
    from fastdiff.export.ort import _MetaDenoiser

    meta = {"guided": True, "y_null": 10, "default_guidance_scale": 4.0}
    assert default_guidance(_MetaDenoiser(meta, VPSchedule()), True) == 4.0
    assert default_guidance(_MetaDenoiser(meta, VPSchedule()), False) == 1.0
    assert default_guidance(_MetaDenoiser(meta | {"guided": False}, VPSchedule()), True) == 1.0  # no guidance in it
