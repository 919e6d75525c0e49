"""Turn a suite's results.jsonl into the committed result files and the README's tables.

    python benchmarks/report.py OUT_DIR/results.jsonl [MORE.jsonl ...] # print the tables (markdown)
    python benchmarks/report.py OUT_DIR/results.jsonl --write         # + benchmarks/results/{bench}-{device}.json
    python benchmarks/report.py OUT_DIR/results.jsonl --readme README.md   # + the tables into README.md

Reads every line it can parse (a line torn by a step killed at its limit is skipped and counted). Tables:

- kernels: per (op, shape, dtype, layout or case) the fastdiff kernel's time, its floor (fewest bytes over
  the copy bandwidth, or FLOPs over the matmul rate, both measured in the same run) and the fraction of the
  floor it reaches, and the strongest alternative measured in the same file (the fastest of eager,
  torch.compile, every SDPA backend, xformers, diffusers) with the ratio of its time to fastdiff's (> 1:
  fastdiff is faster);
- fd.sample end to end: images/s and ms per sampler step, with and without the CUDA graph, and the
  diffusers rows where they ran;
- the preflight's checks, and every skip row with its reason.

``--readme`` replaces the text between ``<!-- gpu-results:begin -->`` and ``<!-- gpu-results:end -->``
(the file is written to a temporary name and renamed; without the markers it is left alone and the
tables are printed). Where the same measurement appears more than once (a rerun), the latest counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, write_json_atomic  # noqa: E402

BEGIN, END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"
KERNEL_BENCHES = ("modulated_norm", "attention", "bench_sampler_step")


def read_jsonl(path) -> tuple[list[dict], int]:
    """(records, number of lines that did not parse)."""
    records, torn = [], 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if isinstance(rec, dict) and "kind" in rec:
                records.append(rec)
            else:
                torn += 1
    return records, torn


def device_label(device: dict) -> str:
    """'cpu' or the GPU's name with dashes, from a device record."""
    if device.get("device_type") != "cuda":
        return "cpu"
    return str(device.get("name", "gpu")).replace(" ", "-")


def _fmt(v, digits=3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _key(r: dict) -> tuple:
    return (r.get("op"), r.get("case", ""), r.get("shape"), r.get("dtype"), r.get("layout", ""))


def kernel_table(rows: list[dict]) -> str:
    latest = {}  # (key, impl) -> row; later lines win
    for r in rows:
        if r.get("bench") in KERNEL_BENCHES and "ms" in r and "impl" in r:
            latest[(_key(r), r["impl"])] = r
    by_key = defaultdict(dict)
    for (key, impl), r in latest.items():
        by_key[key][impl] = r
    out = []
    for key, impls in by_key.items():
        ours = impls.get("fastdiff")
        if ours is None:
            continue
        alts = {i: r for i, r in impls.items() if not i.startswith("fastdiff")}
        best = min(alts.items(), key=lambda kv: kv[1]["ms"]) if alts else None
        op, case, shape, dtype, layout = key
        out.append([op + (f" {case}" if case else ""), shape + (f" {layout}" if layout else ""), dtype,
                    ours["ms"], ours.get("floor_ms"), ours.get("frac_floor"),
                    best[0] if best else "(none measured)", best[1]["ms"] if best else None,
                    best[1]["ms"] / ours["ms"] if best else None])
    if not out:
        return "(no kernel rows)"
    return _table(["op", "shape", "dtype", "fastdiff ms", "floor ms", "fraction of floor", "strongest alternative",
                   "its ms", "alternative ms / fastdiff ms"], out)


def e2e_table(rows: list[dict]) -> str:
    latest = {}
    for r in rows:
        if r.get("bench") == "bench_e2e" and "images_per_s" in r:
            latest[(r["model"], r["batch"], r["variant"])] = r
    if not latest:
        return "(no end-to-end rows)"
    out = []
    for (model, batch, variant), r in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        graph = latest.get((model, batch, "fastdiff"))
        nograph = latest.get((model, batch, "fastdiff-nograph"))
        speedup = graph["images_per_s"] / nograph["images_per_s"] if variant == "fastdiff" and graph and nograph \
            else None
        base = latest.get((model, batch, "diffusers-ddim-bf16-cl"))
        out.append([model, batch, r.get("steps"), variant, r.get("dtype", "policy"),
                    "yes" if r.get("cuda_graph") else "no", r["images_per_s"], r.get("ms_per_step"), r.get("mfu"),
                    speedup, r["images_per_s"] / base["images_per_s"] if base else None])
    return _table(["model", "batch", "steps", "variant", "dtype", "CUDA graph", "images/s", "ms/step", "MFU",
                   "graph / no graph", "x diffusers bf16"], out)


def preflight_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r.get("bench") == "preflight" and "check" in r:
            errs = r.get("errors") or {}
            worst = max((e.get("ratio") or 0 for e in errs.values()), default=None)
            out.append([r["check"], r.get("dtype"), "ok" if r.get("ok") else "FAILED", worst, r.get("seconds"),
                        r.get("error", "")[:80]])
    return _table(["check", "dtype", "result", "worst kernel/torch error", "s", "error"], out) if out else ""


def skip_list(records: list[dict]) -> str:
    seen, lines = set(), []
    for r in records:
        if r["kind"] == "skip":
            item = (r.get("bench"), r.get("what"), r.get("reason"))
            if item not in seen:
                seen.add(item)
                lines.append(f"- {r.get('bench')}: {r.get('what')}: {'FAILED: ' if r.get('failed') else ''}"
                             f"{r.get('reason')}")
    return "\n".join(lines)


def device_line(records: list[dict]) -> str:
    devices = [r for r in records if r["kind"] == "device"]
    if not devices:
        return "(no device record)"
    d = devices[0]
    bits = [str(d.get("name"))]
    fields = (("sm_clock_mhz", "SM {} MHz"), ("max_sm_clock_mhz", "max {} MHz"), ("mem_clock_mhz", "memory {} MHz"),
              ("power_w", "{:.0f} W"), ("power_limit_w", "limit {:.0f} W"), ("driver", "driver {}"),
              ("torch", "torch {}"), ("triton", "triton {}"), ("cuda", "CUDA {}"))
    for key, fmt in fields:
        if d.get(key) is not None:
            bits.append(fmt.format(d[key]))
    return ", ".join(bits) + f" ({d.get('time_utc', '')})"


def by_device(records: list[dict]) -> dict:
    """device label -> that device's records (a rerun may land on another machine: never mix them)."""
    devices = {r["run"]: device_label(r) for r in records if r["kind"] == "device"}
    groups = defaultdict(list)
    for r in records:
        groups[devices.get(r.get("run"), "unknown")].append(r)
    return groups


def tables(records: list[dict]) -> str:
    groups = by_device(records)
    return "\n".join(device_tables(recs) for _, recs in sorted(groups.items()))


def device_tables(records: list[dict]) -> str:
    rows = [r for r in records if r["kind"] == "row"]
    parts = [f"Device: {device_line(records)}", ""]
    pf = preflight_table(rows)
    if pf:
        parts += ["Preflight (kernel error against float64 over the same-dtype PyTorch error; pass <= 2):", "", pf,
                  ""]
    parts += ["Kernels: time, floor, fraction of the floor, and the strongest alternative measured in the same run:",
              "", kernel_table(rows), "", "fd.sample end to end:", "", e2e_table(rows)]
    skips = skip_list(records)
    if skips:
        parts += ["", "Not measured:", "", skips]
    return "\n".join(parts) + "\n"


def write_result_files(records: list[dict], folder: Path) -> list[Path]:
    """One JSON per (benchmark, device): device record, floors, rows and skips of every run in the file."""
    groups = defaultdict(list)
    for label, recs in by_device(records).items():
        for r in recs:
            groups[(r["bench"], label)].append(r)
    paths = []
    for (bench, label), recs in sorted(groups.items()):
        strip = lambda r: {k: v for k, v in r.items() if k not in ("bench", "kind")}
        payload = {
            "benchmark": bench,
            "device": strip(next((r for r in recs if r["kind"] == "device"), {})),
            "source": "benchmarks/gpu_suite.sh results.jsonl, via benchmarks/report.py",
            "floors": [strip(r) for r in recs if r["kind"] == "floor"],
            "results": [strip(r) for r in recs if r["kind"] == "row"],
            "skipped": [strip(r) for r in recs if r["kind"] == "skip"],
        }
        paths.append(write_json_atomic(folder / f"{bench}-{label}.json", payload))
    return paths


def replace_in_readme(path: Path, text: str) -> bool:
    content = path.read_text()
    if BEGIN not in content or END not in content:
        return False
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{text}{END}{tail}"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, path)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("jsonl", nargs="+", help="a suite's results.jsonl (several: e.g. a core run and a rerun with "
                   "--only, read in order)")
    p.add_argument("--write", action="store_true", help="write benchmarks/results/{bench}-{device}.json")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where --write writes (default: %(default)s)")
    p.add_argument("--readme", default=None, help="put the tables between the gpu-results markers of this file")
    args = p.parse_args(argv)
    records, torn = [], 0
    for path in args.jsonl:
        more, bad = read_jsonl(path)
        records += more
        torn += bad
    if torn:
        print(f"({torn} line(s) did not parse: torn by a killed step; skipped)", file=sys.stderr)
    text = tables(records)
    print(text)
    if args.write:
        for path in write_result_files(records, Path(args.results_dir)):
            print(f"wrote {path}")
    if args.readme:
        if replace_in_readme(Path(args.readme), text):
            print(f"updated {args.readme}")
        else:
            print(f"{args.readme} has no {BEGIN} ... {END} markers: left alone", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
