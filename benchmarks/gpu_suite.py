"""The GPU suite's steps and their runner (``bash benchmarks/gpu_suite.sh`` calls this; see its header).

Each step is one command with its own time limit, run in its own process group (killed whole at its
limit). After every step ``summary.json`` is rewritten (temporary file + rename) with each step's status
(``ok`` | ``failed`` | ``timeout`` | ``skipped`` with the reason | ``pending``), seconds and the number of
rows it appended to ``results.jsonl``; the log of every command goes to ``suite.log``. The output folder
holds at most 7 files (the GPU machine hands back 8): preflight.json, results.jsonl, summary.json,
suite.log, pytest.xml. Exit status 0 only if no step failed or timed out.

Adding a step is one line in ``STEPS``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_ENV, STEP_ENV, write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
KERNEL_TESTS = ["tests/test_lowprecision.py", "tests/test_cuda.py", "tests/test_modulated_norm.py",
                "tests/test_sampler_step.py", "tests/test_attention.py", "tests/test_qk_norm_rope.py"]
OUT_FILES = ("preflight.json", "results.jsonl", "summary.json", "suite.log", "pytest.xml")
E2E = ["benchmarks/bench_e2e.py", "--batches", "8", "64", "--steps", "20", "--repeats", "3"]
E2E_DRY = ["--batches", "2", "--steps", "1", "--repeats", "1", "--tiny"]  # appended in the dry run (last wins)


@dataclass
class Step:
    name: str
    limit_s: int  # on an H100; the dry run gives every step DRY_LIMIT_S
    argv: list  # "{out}" is the output folder; "{full}" becomes --full under gpu_suite --full, else nothing
    core: bool = False  # in the default run (the core suite: <= 5 minutes of limits on an H100)
    needs: tuple = ()  # importable modules whose rows it adds (the dry run repeats it with them present)
    dry: list = field(default_factory=list)  # extra arguments in the dry run (tiny sizes, eager compile)
    gpu_only: str = ""  # reason it cannot run on a CPU, if so
    dry_env: dict = field(default_factory=dict)  # environment changes in the dry run


STEPS = [
    # --- the core suite: 300 s of limits -------------------------------------------------------------
    Step("preflight", 40, [PY, "benchmarks/preflight.py", "--out", "{out}/preflight.json"], core=True),
    # -v: each test's result reaches suite.log as it finishes (a step killed at its limit writes no pytest.xml)
    Step("kernel_tests", 100, [PY, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--junitxml={out}/pytest.xml",
                               *KERNEL_TESTS], core=True),
    Step("bench_norm", 20, [PY, "benchmarks/bench_modulated_norm.py", "--quick"], core=True),
    Step("bench_attention", 50, [PY, "benchmarks/bench_attention.py", "--quick"], core=True),
    Step("bench_sampler_step", 20, [PY, "benchmarks/bench_sampler_step.py", "--quick"], core=True),
    Step("e2e", 70, [PY, *E2E, "--rows", "fastdiff", "--only", "fastdiff", "fastdiff-nograph"], core=True,
         dry=E2E_DRY),  # the CUDA graph on and off; the float32 row is in e2e_diffusers
    # --- heavier steps, by name (--only): full shapes, torch.compile baselines, diffusers and ONNX rows ---
    Step("bench_norm_full", 240, [PY, "benchmarks/bench_modulated_norm.py", "--compile", "{full}"],
         dry=["--compile-backend", "eager"]),
    Step("bench_attention_full", 300, [PY, "benchmarks/bench_attention.py", "--backward", "{full}"]),
    Step("bench_sampler_step_full", 180, [PY, "benchmarks/bench_sampler_step.py", "--compile", "{full}"],
         dry=["--compile-backend", "eager"]),
    Step("e2e_diffusers", 240, [PY, *E2E, "--rows", "fastdiff", "reference", "diffusers"], needs=("diffusers",),
         dry=E2E_DRY),
    Step("e2e_compile", 400, [PY, *E2E, "--rows", "fastdiff", "diffusers", "--compile", "{full}"],
         needs=("diffusers",), dry=[*E2E_DRY, "--compile-backend", "eager", "--only", "fastdiff-compiled",
                                    "diffusers-ddim-bf16-cl-compiled"]),
    Step("e2e_dit", 300, [PY, "benchmarks/bench_e2e.py", "--models", "dit", "--steps", "20", "--repeats", "3",
                          "--rows", "fastdiff", "diffusers", "{full}"], needs=("diffusers",),
         dry=["--steps", "2", "--repeats", "1", "--dit-small", "--compile-backend", "eager"]),
    Step("bench_qk_norm_rope", 150, [PY, "benchmarks/bench_qk_norm_rope.py", "--no-compile"], dry=["--quick"]),
    Step("bench_diffusers", 480, [PY, "benchmarks/bench_diffusers.py", "--cases", "sd15-512", "sdxl-1024",
                                  "--repeats", "3", "{full}"], needs=("diffusers",),
         dry=["--tiny", "--cases", "ddpm-cifar10", "--repeats", "1", "--no-profile", "--no-compile"],
         dry_env={"TRITON_INTERPRET": "0"}),  # whole pipelines: the CPU paths (the interpreter takes minutes)
    # its diffusers row (ddpm-cifar10) runs where diffusers imports; the dry run samples the digits model
    Step("bench_onnx", 240, [PY, "benchmarks/bench_onnx.py", "--models", "ddpm-cifar10", "--steps", "20"],
         needs=("onnxruntime",), dry=["--models", "digits", "--steps", "2", "--repeats", "1", "--batch", "2"]),
]
DRY_LIMIT_S = 150  # a CPU step of the dry run (tiny shapes); the whole dry run is meant to take <= 3 minutes


def _count_rows(path: Path, step: str) -> int:
    """Rows (kind "row") of ``step`` in results.jsonl; a torn or foreign line is skipped."""
    n = 0
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            n += rec.get("step") == step and rec.get("kind") == "row"
    return n


def _seal(path: Path) -> None:
    """End results.jsonl with a newline, so that a line torn by a killed step never swallows the next."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


class Suite:
    def __init__(self, out: Path, args, env: dict):
        self.out, self.args, self.env = out, args, env
        self.log_path = out / "suite.log"
        self.results = out / "results.jsonl"
        self.summary = {"suite": "fastdiff gpu_suite", "dry_run": args.dry_run, "full": args.full,
                        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "argv": sys.argv[1:], "steps": []}
        self.t0 = time.monotonic()
        self.temp_dirs: list = []  # removed when the suite ends

    def log(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log_path, "a") as f:
            f.write(text + "\n")

    def write_summary(self) -> None:
        self.summary["seconds"] = round(time.monotonic() - self.t0, 1)
        write_json_atomic(self.out / "summary.json", self.summary)

    def plan(self, names: list) -> None:
        """Name every step in summary.json from the start, as pending."""
        self.summary["steps"] = [{"step": n, "status": "pending"} for n in names]
        self.write_summary()

    def entry(self, name: str) -> dict:
        return next(e for e in self.summary["steps"] if e["step"] == name)

    def add(self, name: str, status: str, **fields) -> dict:
        entry = self.entry(name)
        entry.update(status=status, **fields)
        self.write_summary()
        return entry

    def run(self, step: Step, name: str, env_extra: dict | None = None) -> dict:
        """Run one step under its limit; record its status. Never raises for the step's own failure."""
        limit = DRY_LIMIT_S if self.args.dry_run else step.limit_s
        if self.args.budget:
            left = self.args.budget - (time.monotonic() - self.t0)
            if left < min(limit, 20):
                return self.add(name, "skipped", reason=f"the --budget of {self.args.budget} s is spent "
                                                        f"({left:.0f} s left, the step's limit is {limit} s)")
            limit = int(min(limit, left))
        if step.gpu_only and not self.args.gpu:
            return self.add(name, "skipped", reason=step.gpu_only)
        argv = [a.replace("{out}", str(self.out)) for a in step.argv]
        argv = [a for a in argv if a != "{full}"] + (["--full"] if self.args.full and "{full}" in step.argv else [])
        if self.args.dry_run:
            argv += step.dry
            if step.name == "kernel_tests":  # CI's pytest runs these tests; the dry run checks they collect
                argv = [a for a in argv if not a.startswith("--junitxml") and a != "-v"] + ["-q", "--collect-only"]
        elif step.name == "kernel_tests":
            if self.args.xdist:  # the Triton compiles, CPU work, spread over processes
                argv += ["-n", str(self.args.xdist)]
            if self.args.test_timeout:  # one hung test does not take the step's whole limit
                argv += [f"--timeout={self.args.test_timeout}"]
        env = dict(self.env, **(env_extra or {}), **(step.dry_env if self.args.dry_run else {}))
        env[STEP_ENV] = name
        self.log(f"=== {name} (limit {limit} s): {' '.join(argv)}")
        entry = self.add(name, "running", limit_s=limit, argv=argv)
        start = time.monotonic()
        with open(self.log_path, "a") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                rc, status = None, "timeout"
                self._kill(proc)
        _seal(self.results)
        entry.update(status=status, returncode=rc, seconds=round(time.monotonic() - start, 1),
                     rows=_count_rows(self.results, name))
        if status == "ok" and step.name == "kernel_tests" and self.args.dry_run:
            entry["note"] = "collect-only: the dry run leaves running these tests to CI's pytest"
        self.write_summary()
        self.log(f"=== {name}: {status} (rc {rc}) in {entry['seconds']} s, {entry['rows']} rows")
        return entry

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """SIGTERM to the step's process group, SIGKILL after 5 s (rows already written stay)."""
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


WHEELS = ROOT / ".fastdiff-wheels"  # benchmarks/gpu_wheels.sh fills it on a machine with a package index


def install_wheels(suite: Suite, env: dict) -> None:
    """pip install --no-index --no-deps --target the carried wheels (diffusers for the GPU image) into a
    folder outside OUT_DIR and append it to PYTHONPATH, after the checkout (gpu_wheels.sh carries only what
    the image lacks, so nothing of the image is shadowed). A pseudo-step "wheels" in summary.json says what
    happened."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if suite.args.dry_run:
        suite.add("wheels", "skipped", reason="dry run: the second phase takes diffusers from this environment")
        return
    if not wheels:
        suite.add("wheels", "skipped", reason=f"no wheels in {WHEELS} (benchmarks/gpu_wheels.sh makes them): the "
                                              "diffusers rows are skipped and marked")
        return
    site = Path(os.environ.get("TMPDIR", "/tmp")) / f"fastdiff-suite-site-{os.getpid()}"
    argv = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--disable-pip-version-check",
            "--target", str(site), *map(str, wheels)]
    suite.log(f"=== wheels: {' '.join(argv)}")
    start = time.monotonic()
    with open(suite.log_path, "a") as log:
        rc = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120)
    suite.temp_dirs.append(site)
    if rc == 0:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(site)]))
    suite.add("wheels", "ok" if rc == 0 else "failed", returncode=rc, seconds=round(time.monotonic() - start, 1),
              wheels=[w.name for w in wheels], target=str(site))


def _blocker_dir(parent: Path) -> Path:
    """A folder in ``parent`` whose sitecustomize hides the named modules from every Python started with it
    on PYTHONPATH (the dry run's stand-in for the GPU image, which has no diffusers)."""
    folder = parent / "import-blocker"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_BLOCKER)
    return folder


_BLOCKER = """import os, sys
class _Hide:
    names = set(filter(None, os.environ.get("FASTDIFF_HIDE_MODULES", "").split(",")))
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the dry run, as on the GPU image)",
                                      name=name)
        return None
sys.meta_path.insert(0, _Hide())
# then the sitecustomize this one shadows, if any
_here = os.path.dirname(os.path.abspath(__file__))
for _d in sys.path:
    _f = os.path.join(os.path.abspath(_d or "."), "sitecustomize.py")
    if os.path.dirname(_f) != _here and os.path.isfile(_f):
        exec(compile(open(_f).read(), _f, "exec"), {"__name__": "sitecustomize", "__file__": _f})
        break
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="fastdiff's GPU suite (see benchmarks/gpu_suite.sh)")
    p.add_argument("out", help="output folder (at most 7 files are written there)")
    p.add_argument("--only", nargs="+", default=None, metavar="STEP",
                   help="run these steps (core or heavier), in this order")
    p.add_argument("--all", action="store_true", help="every step, core and heavier (more than one 10-minute call)")
    p.add_argument("--full", action="store_true", help="heavier steps at full size; torch.compile max-autotune")
    p.add_argument("--dry-run", action="store_true", help="the same plumbing on the CPU at tiny sizes")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run: a step's limit shrinks to what is left; none starts with <20 s")
    p.add_argument("--xdist", type=int, default=None, help="pytest-xdist workers for the kernel tests (GPU)")
    p.add_argument("--list", action="store_true", help="print the steps and their limits, run nothing")
    args = p.parse_args(argv)
    names = [s.name for s in STEPS]
    if args.list:
        for s in STEPS:
            print(f"{s.name:26s} {s.limit_s:4d} s  {'core' if s.core else '    '}  {' '.join(s.argv[1:])}")
        return 0
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        print(f"gpu_suite: error: unknown step(s) {unknown}; the steps are {names}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stray = sorted(f.name for f in out.iterdir() if f.name not in OUT_FILES and not f.name.startswith("."))
    if stray:
        print(f"gpu_suite: error: {out} holds other files ({stray[:5]}); give an empty folder or one of an "
              "earlier suite run (the machine hands back at most 8 files)", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{RESULTS_ENV: str(out / "results.jsonl")})
    env.pop("FASTDIFF_BACKEND", None)
    args.gpu, args.test_timeout = False, 0
    if args.dry_run:
        env.update(TRITON_INTERPRET="1", FASTDIFF_DRY_RUN="1", CUDA_VISIBLE_DEVICES="")
    else:
        env.pop("TRITON_INTERPRET", None)
        import torch

        args.gpu = torch.cuda.is_available()
        import importlib.util

        if args.xdist is None and args.gpu:
            args.xdist = 8 if importlib.util.find_spec("xdist") else 0
        args.test_timeout = 60 if importlib.util.find_spec("pytest_timeout") else 0
    suite = Suite(out, args, env)
    # --only: those steps in the order given (the first get the --budget first); else the dry run checks every
    # step's plumbing and a GPU run takes the core steps (--all: every step)
    by_name = {s.name: s for s in STEPS}
    selected = [by_name[n] for n in dict.fromkeys(args.only)] if args.only else \
        [s for s in STEPS if args.all or args.dry_run or s.core]
    again = [s for s in selected if "diffusers" in s.needs] if args.dry_run else []
    suite.plan(["wheels"] + [s.name for s in selected] + [f"{s.name}+diffusers" for s in again])
    install_wheels(suite, env)
    suite.log(f"gpu_suite {'dry run ' if args.dry_run else ''}into {out}: steps {[s.name for s in selected]}")
    if not args.dry_run and not args.gpu:
        suite.log("gpu_suite: no CUDA device here: the steps run on the CPU (use --dry-run for the CPU plumbing)")
    hide_env = {}
    if args.dry_run:  # phase 1: as the GPU machine would, diffusers hidden
        scratch = Path(tempfile.mkdtemp(prefix="fastdiff-suite-"))  # outside OUT_DIR
        suite.temp_dirs.append(scratch)
        blocker = _blocker_dir(scratch)
        hide_env = {"FASTDIFF_HIDE_MODULES": "diffusers",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), env.get("PYTHONPATH")]))}
    try:
        for step in selected:
            suite.run(step, step.name, hide_env)
        for step in again:  # dry run, phase 2: the steps that add rows with diffusers, with diffusers present
            suite.run(step, f"{step.name}+diffusers")
    finally:
        for folder in suite.temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)
    bad = [e["step"] for e in suite.summary["steps"] if e["status"] in ("failed", "timeout")]
    suite.summary["status"] = "failed" if bad else "ok"
    suite.write_summary()
    suite.log(f"gpu_suite: {'FAILED: ' + ', '.join(bad) if bad else 'ok'} in {suite.summary['seconds']} s "
              f"({sum(e.get('rows', 0) for e in suite.summary['steps'])} rows in {suite.results})")
    counts = {k: sum(e["status"] == k for e in suite.summary["steps"]) for k in ("ok", "skipped")}
    suite.log(f"gpu_suite: {counts['ok']} passed, {len(bad)} failed, {counts['skipped']} skipped")  # steps
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
