"""GPU build check without a GPU: compile every kernel configuration for sm_90 and sm_80.

    python -m fastdiff.kernels [--arch 90 80] [--only NAME_SUBSTRING]

For each configuration listed by a kernel module's ``build_configs()``, ``triton.compile`` builds
PTX and cubin for the target on this machine; Triton's bundled ``ptxas -v`` on that PTX reports
registers and spills. Prints one line per build and exits non-zero on a compile error or a spill.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for this arch (newer Triton ships a second one for sm_90+)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, TypeError, AttributeError):
        import triton.backends.nvidia as nvidia

        return os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill stores/loads and stack of every kernel in ``ptx`` (ptxas -v)."""
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(arch), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{text}")
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", text)]
    spill_st = [int(m) for m in re.findall(r"(\d+) bytes spill stores", text)]
    spill_ld = [int(m) for m in re.findall(r"(\d+) bytes spill loads", text)]
    stack = [int(m) for m in re.findall(r"(\d+) bytes stack frame", text)]
    return dict(registers=max(regs, default=0), spill_bytes=sum(spill_st) + sum(spill_ld),
                stack_bytes=max(stack, default=0))


def compile_config(cfg: dict, arch: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    src = ASTSource(fn=cfg["fn"], signature=cfg["signature"], constexprs=cfg["constexprs"], attrs=cfg.get("attrs"))
    options = dict(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 1))
    compiled = compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    report = ptxas_report(ptx, arch)
    report["shared_bytes"] = int(compiled.metadata.shared)
    report["wgmma"] = "wgmma" in ptx
    return report


def collect(only: str | None = None) -> list[tuple[str, dict]]:
    from fastdiff.kernels import KERNEL_MODULES

    configs = []
    for module_name in KERNEL_MODULES:
        try:
            module = importlib.import_module(f"fastdiff.kernels.{module_name}")
        except ModuleNotFoundError as e:
            if e.name == f"fastdiff.kernels.{module_name}":
                continue  # a kernel family not written yet
            raise
        for cfg in module.build_configs():
            if only is None or only in cfg["name"]:
                configs.append((module_name, cfg))
    return configs


def _build(job: tuple[int, int, str | None]) -> tuple[str, int, dict | str, float]:
    """Worker: build configuration ``index`` of ``collect(only)`` for ``arch`` (configs hold jitted
    functions, which do not pickle, so each worker collects them itself)."""
    index, arch, only = job
    module_name, cfg = collect(only)[index]
    t0 = time.time()
    try:
        result: dict | str = compile_config(cfg, arch)
    except Exception as e:  # reported, then the run exits non-zero
        result = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return f"{module_name}.{cfg['name']}", arch, result, time.time() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastdiff.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    parser.add_argument("--only", default=None, help="build only configurations whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel builds")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter has no compiler
    configs = collect(args.only)
    jobs = [(i, arch, args.only) for i, (_, cfg) in enumerate(configs)
            for arch in args.arch if arch in cfg.get("archs", args.arch)]
    if args.jobs > 1:
        import multiprocessing

        # fork: the builds touch no CUDA state (spawned workers re-running this -m module stalled here)
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(_build, jobs, chunksize=4)
    else:
        results = [_build(job) for job in jobs]
    failures = 0
    print(f"{'kernel':<52} {'arch':>4} {'regs':>5} {'spill':>6} {'smem':>7} {'wgmma':>5} {'s':>5}")
    for name, arch, r, seconds in results:
        if isinstance(r, str):
            failures += 1
            print(f"{name:<52} {arch:>4} COMPILE ERROR: {r}")
            continue
        bad = r["spill_bytes"] > 0
        failures += bad
        print(f"{name:<52} {arch:>4} {r['registers']:>5} {r['spill_bytes']:>6} {r['shared_bytes']:>7} "
              f"{'yes' if r['wgmma'] else '-':>5} {seconds:>5.1f}" + ("  SPILL" if bad else ""))
    import triton

    print(f"{len(results)} builds, {failures} failed (triton {triton.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
