#!/usr/bin/env bash
# fastdiff's GPU suite: one command on the lent GPU machine, as that machine is (its python3 with torch
# 2.11 + cu130, triton 3.6, numpy, onnx, onnxruntime (CPU), nvidia-ml-py, pytest; no diffusers, no package
# index). Nothing is installed: the checkout goes on PYTHONPATH. Wheels in .fastdiff-wheels/ (made on a
# machine with an index by benchmarks/gpu_wheels.sh, carried along) are pip-installed --no-index --no-deps
# into a temporary folder on PYTHONPATH, so the diffusers rows run; without them those rows are skipped
# and marked.
#
#     bash benchmarks/gpu_suite.sh OUT_DIR                      # the core suite: <= 5 minutes on an H100
#     bash benchmarks/gpu_suite.sh OUT_DIR --only STEP ...      # chosen steps, core or heavier
#     bash benchmarks/gpu_suite.sh OUT_DIR --list               # the steps and their time limits
#     bash benchmarks/gpu_suite.sh --dry-run OUT_DIR            # the same plumbing on the CPU, tiny sizes
#
# Core steps, each with its own time limit: preflight (one kernel of each family on CUDA in bf16 against
# its reference; preflight.json is written before any kernel runs, with the device record), kernel_tests
# (pytest on CUDA, no -x), bench_norm / bench_attention / bench_sampler_step (quick shapes), e2e
# (fd.sample with and without the CUDA graph). Heavier steps by name: bench_*_full (all shapes,
# torch.compile baselines in torch's default mode; --full: max-autotune), e2e_diffusers, e2e_compile,
# e2e_dit, bench_onnx (GPU rows only where onnxruntime has its CUDA provider). --budget SECONDS shrinks
# the step limits to fit one call.
#
# OUT_DIR gets at most 7 files: preflight.json, results.jsonl (every measured row, appended as measured),
# summary.json (each step's status, time and row count; rewritten atomically after every step), suite.log,
# pytest.xml. Exit status 0 only if no step failed or timed out. benchmarks/report.py turns results.jsonl
# into benchmarks/results/*.json and the README's tables.
#
# --dry-run: on the CPU (TRITON_INTERPRET=1, tiny shapes, torch.compile's eager backend), first as the GPU
# machine would run it (diffusers hidden by an import blocker, no install), then the steps that add
# diffusers rows again with diffusers present; the kernel tests only collect (CI's pytest runs them).
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" benchmarks/gpu_suite.py "$@"
