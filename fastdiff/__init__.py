"""fastdiff: fast sampling from diffusion models and fast feature extraction.

``import fastdiff`` imports torch and registers the ops (``torch.ops.fastdiff.*``); everything else loads on
first use (module ``__getattr__``), so the import does not pull in torch._dynamo, ONNX, ONNX Runtime or
diffusers:

    import fastdiff as fd
    den = fd.load("digits")                        # fastdiff.loading.load
    x = fd.sample(den, (8, *den.sample_shape))     # fastdiff.engine.sample
    fd.models, fd.export, fd.compat, fd.features   # submodules, imported on first access
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fastdiff import ops  # the op registrations: a saved graph that calls torch.ops.fastdiff.* needs them

__version__ = "0.1.0"

# submodules reachable as attributes of the package
_SUBMODULES = ("ops", "nn", "models", "schedules", "samplers", "denoiser", "engine", "features", "export",
               "compat", "kernels", "policy", "loading", "cli")
# public names, each from the module that defines it
_NAMES = {
    "Denoiser": "fastdiff.denoiser",
    "sample": "fastdiff.engine",
    "clear_cache": "fastdiff.engine",
    "FeatureExtractor": "fastdiff.features",
    "load": "fastdiff.loading",
    "accelerate": "fastdiff.compat.diffusers.accelerate",
}

__all__ = ["__version__", "ops", "nn", "models", "schedules", "samplers", "export", "compat", "features",
           "Denoiser", "sample", "FeatureExtractor", "load", "accelerate"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from fastdiff import compat, export, features, models, nn, samplers, schedules  # noqa: F401
    from fastdiff.denoiser import Denoiser  # noqa: F401
    from fastdiff.engine import sample  # noqa: F401
    from fastdiff.features import FeatureExtractor  # noqa: F401
    from fastdiff.loading import load  # noqa: F401


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"fastdiff.{name}")  # the import also sets it on this package
    module_name = _NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # a dependency of that module is missing: say which
            raise
        raise AttributeError(f"fastdiff.{name} is not available: {module_name} is not part of this "
                             "installation") from e
    try:
        value = getattr(module, name)
    except AttributeError as e:
        raise AttributeError(f"fastdiff.{name} is not available: {module_name} does not define it") from e
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_NAMES))
