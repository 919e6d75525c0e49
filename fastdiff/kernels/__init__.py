"""Triton kernels, one family per module, each with its launcher.

Each module also lists its configurations for the GPU build check (``python -m fastdiff.kernels``)
through ``build_configs()``, a list of dicts with keys ``name``, ``fn`` (the ``@triton.jit``
function), ``signature`` (argument name -> Triton type, "constexpr" for compile-time arguments),
``constexprs`` (name -> value), ``num_warps`` and ``num_stages``; optionally ``attrs`` (the
alignment/divisibility specialisation the JIT would apply) and ``archs`` (the compute capabilities
this configuration is meant for; all by default).
"""

KERNEL_MODULES = ("modulated_norm", "attention", "sampler_step", "qk_norm_rope")


def build_spec(name, fn, types=None, constexprs=None, num_warps=4, num_stages=1) -> dict:
    """A build-check entry for ``fn``: arguments not named in ``types`` default to ``*fp32`` for
    upper-case names (pointers), ``fp32`` for ``eps`` and ``i32`` otherwise; ``constexprs`` also
    pins integer arguments (a unit stride, as the JIT specialises it)."""
    types, constexprs = dict(types or {}), dict(constexprs or {})
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in types:
            signature[arg] = types[arg]
        elif arg.isupper() or arg.upper() == arg:
            signature[arg] = "*fp32"
        else:
            signature[arg] = "fp32" if arg == "eps" else "i32"
    return dict(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=num_warps,
                num_stages=num_stages)
