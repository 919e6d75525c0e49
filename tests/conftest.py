"""Test setup: without a GPU the Triton kernels run under the interpreter, which must be switched on
before triton is imported (DESIGN.md, "Testing")."""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Kernel tests run on CUDA tensors where a GPU is present, else on CPU tensors under the interpreter.
KERNEL_DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE


def _single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# One intra-op thread, for a test file that asks (``pytestmark = pytest.mark.usefixtures(...)``): tiny tensors on a
# shared 2-core runner only pay thread wake-ups with two (a 1.6 ms forward took 46 ms), and the bits of a float32
# run do not depend on thread scheduling. Per test (a test may change the thread count; the next starts at one) or
# per module (also the module's fixtures run single-threaded).
one_thread = pytest.fixture(_single_thread, name="one_thread")
one_thread_module = pytest.fixture(_single_thread, scope="module", name="one_thread_module")

class EagerGraphRunner:
    """fastdiff.engine's CudaGraphRunner contract on the CPU: warm-up steps that scribble on the static buffers
    at construction, then ``replay`` = one step (what the captured graph does); ``captures`` counts them."""

    captures = 0

    def __init__(self, static, warmup: int = 2):
        self.static = static
        for _ in range(warmup):
            static.step()
        EagerGraphRunner.captures += 1

    def replay(self):
        self.static.step()


@pytest.fixture
def cpu_graphs(monkeypatch):
    """The engine's CUDA-graph path on the CPU: every device graph-capable, captures by EagerGraphRunner."""
    from fastdiff import engine

    monkeypatch.setattr(engine, "_graph_capable", lambda device: True)
    monkeypatch.setattr(engine, "CudaGraphRunner", EagerGraphRunner)
    EagerGraphRunner.captures = 0
    return EagerGraphRunner


# diffusers' deprecation notices and its "should be kept in float32" note, which tiny float32 models trigger
DIFFUSERS_WARNINGS = [pytest.mark.filterwarnings("ignore::FutureWarning"),
                      pytest.mark.filterwarnings("ignore:.*should be kept in float32")]


def rel_l2(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are zero)."""
    out, ref = out.double(), ref.double()
    den = ref.norm()
    num = (out - ref).norm()
    return float(num / den) if den > 0 else float(num)


# The upstream fixtures live in the repository (tests/fixtures/upstream, with their provenance README), so a
# fresh clone with nothing beside it passes; FASTDIFF_UPSTREAM_FIXTURES points at another copy.
FIXTURE_DIRS = [Path(p) for p in [os.environ.get("FASTDIFF_UPSTREAM_FIXTURES")] if p]
FIXTURE_DIRS += [Path(__file__).resolve().parent / "fixtures" / "upstream"]


def read_fixture(name) -> tuple[dict, dict]:
    """(metadata, tensors) of ``{name}.safetensors`` in the first of FIXTURE_DIRS that holds it. Fails,
    not skips, when the fixtures are missing."""
    from safetensors import safe_open

    for folder in FIXTURE_DIRS:
        path = folder / f"{name}.safetensors"
        if path.exists():
            break
    else:
        raise FileNotFoundError(f"{name}.safetensors not found in {[str(d) for d in FIXTURE_DIRS]}; set "
                                "FASTDIFF_UPSTREAM_FIXTURES to the folder holding the upstream fixtures")
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["meta"]), {k: f.get_tensor(k) for k in f.keys()}


def load_fixture(name):
    """(config, inputs, state_dict, output, features) of an upstream model fixture (see
    tests/fixtures/upstream/README.md); features keyed by module path."""
    meta, tensors = read_fixture(name)
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return meta["config"], part("inputs."), part("state_dict."), tensors["output"], part("features.")


@pytest.fixture(scope="session")
def kd():
    """k-diffusion's sampler outputs on a Gaussian-mixture denoiser: (metadata, tensors)."""
    return read_fixture("kdiffusion_samplers")
