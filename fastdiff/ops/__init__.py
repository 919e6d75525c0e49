"""fastdiff's public ops, each declared once with ``torch.library.custom_op``.

The op contract (DESIGN.md), one file per op family in this package:

- the default implementation is the reference: plain PyTorch, float32 statistics, any device;
- CUDA tensors go to the Triton launcher in ``fastdiff.kernels`` (``register_kernel("cuda", ...)``);
- ``register_fake`` gives shapes for torch.compile and export;
- ``register_autograd`` wires the backward, itself an op with a reference and a Triton kernel.

Backend choice, read at every call, first match wins: the op's own ``backend=`` argument, the
innermost :func:`backend` context manager, the ``FASTDIFF_BACKEND`` environment variable, ``"auto"``.
``"auto"`` is Triton for CUDA tensors and PyTorch's native norm kernels plus one in-place multiply-add
elsewhere (the fast CPU path); ``"reference"`` is the plain-PyTorch reference with shifted-data float32
statistics; ``"triton"`` forces the kernels on any device, which on CPU tensors needs
``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from fastdiff.ops.attention import (
    ATTENTION_BACKENDS,
    attention,
    attention_backward_reference,
    attention_reference,
    resolve_attention_backend,
    xformers_usable,
)
from fastdiff.ops.norm import (
    group_norm_modulate,
    group_norm_modulate_backward_reference,
    group_norm_modulate_native,
    group_norm_modulate_reference,
    layer_norm_modulate,
    layer_norm_modulate_backward_reference,
    layer_norm_modulate_native,
    layer_norm_modulate_reference,
)
from fastdiff.ops.qk_norm_rope import (
    qk_norm_rope,
    qk_norm_rope_backward_reference,
    qk_norm_rope_native,
    qk_norm_rope_reference,
)
from fastdiff.ops.routing import ACTIVATIONS, BACKENDS, backend, current_backend, use_triton
from fastdiff.ops.sampler_step import sampler_step, sampler_step_reference

__all__ = [
    "BACKENDS",
    "ACTIVATIONS",
    "ATTENTION_BACKENDS",
    "backend",
    "current_backend",
    "use_triton",
    "group_norm_modulate",
    "layer_norm_modulate",
    "attention",
    "sampler_step",
    "qk_norm_rope",
    "group_norm_modulate_reference",
    "group_norm_modulate_native",
    "group_norm_modulate_backward_reference",
    "layer_norm_modulate_reference",
    "layer_norm_modulate_native",
    "layer_norm_modulate_backward_reference",
    "attention_reference",
    "attention_backward_reference",
    "resolve_attention_backend",
    "xformers_usable",
    "sampler_step_reference",
    "qk_norm_rope_reference",
    "qk_norm_rope_native",
    "qk_norm_rope_backward_reference",
]


def _defer_dynamo_import() -> None:
    """Keep the first call of a fastdiff op from importing torch._dynamo (about 1.5 s of CPU).

    torch wraps every custom op's implementation in ``torch._disable_dynamo``, which imports torch._dynamo
    on the wrapper's first call to build the dynamo-disabled function it then caches on the implementation
    (attribute ``__dynamo_disable``; torch/_compile.py). Until torch._dynamo is imported nothing can be
    compiling, so disabling dynamo is a no-op: this pre-fills that cache with a function that calls the
    implementation directly while torch._dynamo is absent, and once it is present clears itself so torch
    builds the real one on that very call. Where torch's internals differ the attribute is never read and
    the ops behave exactly as before (tests/test_import.py checks the effect).
    """
    import sys

    try:  # private torch API: where it is absent or shaped otherwise, the ops import dynamo as they would
        from torch._library import custom_ops

        opdefs = list(custom_ops.OPDEFS.items())
    except Exception:
        return
    for name, opdef in opdefs:
        if not name.startswith("fastdiff::"):
            continue
        for wrapper in list(getattr(opdef, "_backend_fns", {}).values()):
            impl = getattr(wrapper, "__wrapped__", None)
            if impl is None or "__dynamo_disable" in vars(impl):
                continue

            def direct(*args, _impl=impl, _wrapper=wrapper, **kwargs):
                if "torch._dynamo" in sys.modules:
                    vars(_impl).pop("__dynamo_disable", None)
                    return _wrapper(*args, **kwargs)
                return _impl(*args, **kwargs)

            setattr(impl, "__dynamo_disable", direct)


_defer_dynamo_import()
