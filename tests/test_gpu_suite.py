"""The GPU suite's plumbing, on the CPU in seconds: rows written as measured, a step killed at its limit keeps
its rows, summary.json rewritten after every step, torn lines skipped, the import blocker, the report.
(CI also runs the whole dry run: `bash benchmarks/gpu_suite.sh --dry-run OUT` in .ci/run.)"""

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import gpu_suite  # noqa: E402
import report  # noqa: E402


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_row_writer_appends_each_row_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv(common.STEP_ENV, "bench_x")
    jsonl = tmp_path / "results.jsonl"
    args = types.SimpleNamespace(jsonl=str(jsonl), out=None, save=False)
    rec = common.RowWriter("x", "cpu", args)
    rec.floor("copy_gbs", 12.5, "GB/s")
    rec.row(op="a", impl="fastdiff", ms=1.0)
    lines = _lines(jsonl)  # before finish: already on disk
    assert [r["kind"] for r in lines] == ["device", "floor", "row"]
    assert all(r["step"] == "bench_x" and r["bench"] == "x" for r in lines)
    rec.skip("y rows", "not installed")
    assert rec.finish() is None  # no --out, no --save: no file anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]
    assert rec.exit_status == 0
    args = types.SimpleNamespace(jsonl=None, out=str(tmp_path / "o"), save=False)
    rec = common.RowWriter("x", "cpu", args)
    rec.row(op="a", ms=2.0)
    rec.skip("z", "crashed", failed=True)
    path = rec.finish()
    payload = json.loads(path.read_text())
    assert path.name == "x-cpu.json" and payload["results"] == [{"op": "a", "ms": 2.0}]
    assert rec.exit_status == 1


def _suite(tmp_path, **kw):
    args = types.SimpleNamespace(**dict(dict(dry_run=False, full=False, budget=None, gpu=False, xdist=0,
                                             test_timeout=0), **kw))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, **{common.RESULTS_ENV: str(out / "results.jsonl")}, PYTHONPATH=str(BENCH))
    return gpu_suite.Suite(out, args, env), out


def test_a_step_killed_at_its_limit_keeps_its_rows(tmp_path):
    suite, out = _suite(tmp_path)
    script = textwrap.dedent("""
        import json, os, time
        fd = os.open(os.environ["FASTDIFF_RESULTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        for i in range(2):
            os.write(fd, (json.dumps({"bench": "slow", "kind": "row", "step": os.environ["FASTDIFF_SUITE_STEP"],
                                      "i": i}) + "\\n").encode())
        os.write(fd, b'{"bench": "slow", "kind": "row", "torn')  # a line cut off mid-write
        time.sleep(60)
    """)
    ok = gpu_suite.Step("fast", 30, [sys.executable, "-c", "print('hello')"])
    slow = gpu_suite.Step("slow", 3, [sys.executable, "-c", script])
    suite.plan(["fast", "slow", "later"])
    assert json.loads((out / "summary.json").read_text())["steps"][2]["status"] == "pending"
    suite.run(ok, "fast")
    suite.run(slow, "slow")
    summary = json.loads((out / "summary.json").read_text())
    fast, killed = summary["steps"][:2]
    assert fast["status"] == "ok" and fast["rows"] == 0
    assert killed["status"] == "timeout" and killed["rows"] == 2
    text = (out / "results.jsonl").read_text()
    assert text.endswith("\n")  # sealed: the torn line cannot swallow the next step's first row
    records, torn = report.read_jsonl(out / "results.jsonl")
    assert torn == 1 and [r.get("i") for r in records if r["kind"] == "row"] == [0, 1]
    assert "hello" in (out / "suite.log").read_text()


def test_budget_skips_with_a_reason(tmp_path):
    suite, out = _suite(tmp_path, budget=60)
    suite.plan(["big"])
    entry = suite.run(gpu_suite.Step("big", 300, [sys.executable, "-c", "pass"]), "big")
    assert entry["status"] == "ok" and entry["limit_s"] <= 60  # shrunk to the budget
    suite.t0 -= 50  # under 20 s left: the next step does not start
    entry = suite.run(gpu_suite.Step("big", 300, [sys.executable, "-c", "pass"]), "big")
    assert entry["status"] == "skipped" and "budget" in entry["reason"]


def test_out_dir_must_hold_only_suite_files(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    assert gpu_suite.main([str(tmp_path), "--only", "preflight"]) == 2
    assert gpu_suite.main([str(tmp_path / "new"), "--only", "no_such_step"]) == 2


def test_steps_are_well_formed():
    names = [s.name for s in gpu_suite.STEPS]
    assert len(set(names)) == len(names)
    core = [s for s in gpu_suite.STEPS if s.core]
    assert core[0].name == "preflight" and sum(s.limit_s for s in core) <= 300  # the core suite's 5 minutes
    for s in gpu_suite.STEPS:
        script = next(a for a in s.argv if a.endswith(".py") or a == "pytest")
        assert script == "pytest" or (BENCH.parent / script).exists(), script
    assert len(gpu_suite.OUT_FILES) <= 7
    kernel_tests = next(s for s in gpu_suite.STEPS if s.name == "kernel_tests")
    assert "-x" not in kernel_tests.argv
    for path in gpu_suite.KERNEL_TESTS:
        assert (BENCH.parent / path).exists(), path


def test_import_blocker_hides_diffusers(tmp_path):
    folder = gpu_suite._blocker_dir(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(folder), FASTDIFF_HIDE_MODULES="json_not_really,fractions")
    code = "import importlib\ntry:\n    import fractions\nexcept ModuleNotFoundError as e:\n    print('hidden', e)\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "hidden" in proc.stdout and "dry run" in proc.stdout, proc.stderr


@pytest.fixture
def sample_rows(tmp_path):
    path = tmp_path / "results.jsonl"
    base = {"bench": "modulated_norm", "run": "r1", "step": "bench_norm"}
    lines = [dict(base, kind="device", device_type="cuda", name="NVIDIA H100 80GB HBM3", sm_clock_mhz=1980),
             dict(base, kind="row", op="gn", shape="s", dtype="bfloat16", layout="nchw", impl="eager", ms=3.0),
             dict(base, kind="row", op="gn", shape="s", dtype="bfloat16", layout="nchw", impl="compiled", ms=2.0),
             dict(base, kind="row", op="gn", shape="s", dtype="bfloat16", layout="nchw", impl="fastdiff", ms=1.0,
                  floor_ms=0.8, frac_floor=0.8),
             dict(base, kind="skip", what="x", reason="why"),
             {"bench": "bench_e2e", "run": "r2", "kind": "row", "model": "m", "batch": 8, "variant": "fastdiff",
              "images_per_s": 100.0, "ms_per_step": 4.0, "cuda_graph": True, "steps": 20},
             {"bench": "bench_e2e", "run": "r2", "kind": "row", "model": "m", "batch": 8,
              "variant": "fastdiff-nograph", "images_per_s": 50.0, "ms_per_step": 8.0, "cuda_graph": False,
              "steps": 20}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"torn": ')
    return path


def test_report_tables_and_files(sample_rows, tmp_path):
    records, torn = report.read_jsonl(sample_rows)
    assert torn == 1
    text = report.tables(records)
    assert "| gn | s nchw | bfloat16 | 1 | 0.8 | 0.8 | compiled | 2 | 2 |" in text  # the strongest alternative
    assert "| m | 8 | 20 | fastdiff | policy | yes | 100 | 4 |  | 2 |" in text  # graph over no graph: 2x
    assert "x: why" in text
    paths = report.write_result_files(records, tmp_path / "results")
    names = sorted(p.name for p in paths)
    assert "modulated_norm-NVIDIA-H100-80GB-HBM3.json" in names
    payload = json.loads((tmp_path / "results" / "modulated_norm-NVIDIA-H100-80GB-HBM3.json").read_text())
    assert len(payload["results"]) == 3 and payload["device"]["sm_clock_mhz"] == 1980
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{report.BEGIN}\nold\n{report.END}\nb\n")
    assert report.replace_in_readme(readme, "new\n")
    assert readme.read_text() == f"a\n{report.BEGIN}\nnew\n{report.END}\nb\n"
