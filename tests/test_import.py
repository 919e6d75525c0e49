"""``import fastdiff`` is light (no torch._dynamo, ONNX, ONNX Runtime or diffusers) and the package's
attributes load on first use."""

import json
import subprocess
import sys

import pytest
import torch

HEAVY = ("torch._dynamo", "onnx", "onnxruntime", "diffusers")


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_pulls_in_nothing_heavy():
    got = _run("import json, sys, torch, fastdiff; "
               f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))")
    assert not any(got.values()), got


def test_attributes_load_lazily_and_stay_light():
    """fd.models, fd.features, fd.export, fd.compat, fd.load, fd.sample ... reachable; none of them drags in
    torch._dynamo or ONNX (the export package imports onnx only when a function runs)."""
    code = (
        "import json, sys, fastdiff as fd\n"
        "names = ['models', 'features', 'export', 'compat', 'schedules', 'samplers', 'nn', 'ops', 'load', "
        "'sample', 'Denoiser', 'FeatureExtractor']\n"
        "got = {n: getattr(fd, n) is not None for n in names}\n"
        "got['preset'] = callable(fd.models.preset) and callable(fd.export.to_onnx)\n"
        "got['in_dir'] = all(n in dir(fd) for n in names + ['accelerate'])\n"
        f"got['heavy'] = [m for m in {('torch._dynamo', 'onnx', 'onnxruntime')!r} if m in sys.modules]\n"
        "print(json.dumps(got))\n"
    )
    got = _run(code)
    assert got.pop("heavy") == []
    assert all(got.values()), got


def test_ops_are_registered_by_the_import():
    got = _run("import json, torch, fastdiff; print(json.dumps([hasattr(torch.ops.fastdiff, n) for n in "
               "('attention', 'group_norm_modulate', 'layer_norm_modulate', 'sampler_step')]))")
    assert all(got), got


def test_unknown_attribute_and_accelerate():
    import fastdiff

    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        _ = fastdiff.no_such_thing
    try:
        accelerate = fastdiff.accelerate
    except AttributeError as e:  # fastdiff/compat/diffusers/accelerate.py not written yet
        assert "fastdiff.accelerate is not available" in str(e)
    except ImportError as e:  # it exists but a dependency of it (diffusers) is missing
        assert "diffusers" in str(e)
    else:
        assert callable(accelerate)


def test_constant_marker_matches_torch():
    """fastdiff.ops.attention marks _cuda_major constant without importing torch._dynamo: the attribute
    it sets must be the one torch's own decorator sets (checked here, where importing dynamo is fine)."""
    import importlib

    import torch._dynamo

    attention = importlib.import_module("fastdiff.ops.attention")  # the module, not the op of that name

    def probe():
        return 0

    marked = torch._dynamo.assume_constant_result(probe)
    assert dict(vars(marked)) == {"_dynamo_marked_constant": True}
    assert attention._cuda_major._dynamo_marked_constant is True


def test_flop_formula_registered_on_first_count():
    from fastdiff.models import preset

    model = preset("dit-s-8-256", input_size=8, depth=1, hidden_size=64, num_heads=2, num_classes=10)
    with torch.no_grad():
        macs = model.macs(1)
    assert macs > 0 and model.flops(2) == 2 * model.macs(2)
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 2, 4, 8)
    with FlopCounterMode(display=False) as counter:
        torch.ops.fastdiff.attention(q, q, q, 0.25, "reference")
    assert counter.get_total_flops() == 2 * 1 * 2 * 4 * 4 * (8 + 8)


def test_running_ops_and_the_cli_stays_off_dynamo():
    """torch wraps custom-op implementations in a dynamo-disable that imports torch._dynamo on first call;
    fastdiff.ops defers that until dynamo is imported by something else (then torch's own wrapper takes
    over on that call)."""
    code = (
        "import json, sys, torch, fastdiff as fd\n"
        "from fastdiff.cli import main\n"
        "x = torch.randn(2, 4, 3, 3)\n"
        "fd.ops.group_norm_modulate(x, 2, activation='silu')\n"
        "q = torch.randn(1, 1, 4, 8)\n"
        "fd.ops.attention(q, q, q)\n"
        "assert main(['sample', '--n', '2', '--steps', '2', '--quiet', '--out', '']) == 0\n"
        "before = 'torch._dynamo' in sys.modules\n"
        "import torch._dynamo\n"
        "from torch._library import custom_ops\n"
        "y = fd.ops.group_norm_modulate(x, 2, activation='silu')\n"
        "impl = custom_ops.OPDEFS['fastdiff::group_norm_modulate']._backend_fns[None].__wrapped__\n"
        "cached = vars(impl).get('__dynamo_disable')\n"
        "print(json.dumps({'before': before, 'torch_took_over': cached is not None and cached.__name__ != 'direct'}))\n"
    )
    got = _run(code)
    assert got == {"before": False, "torch_took_over": True}, got
