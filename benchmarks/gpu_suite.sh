#!/usr/bin/env bash
# Everything a GPU machine should check, in one command: the kernel tests on CUDA tensors (fp32, and
# the fp16/bf16 error-ratio tests), the build check, and every benchmark script.
#
#     bash benchmarks/gpu_suite.sh OUT_DIR
#
# Writes OUT_DIR/suite.log (every command's output, in order), OUT_DIR/info.txt and one JSON per
# benchmark. Finishes within 10 minutes on an H100. Exits non-zero if any step failed.
set -u
out=${1:?usage: bash benchmarks/gpu_suite.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/suite.log"
: >"$log"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
status=0

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$log"
  [ $rc -eq 0 ] || status=1
}

# The GPU image brings torch and triton; the package itself installs without touching them.
python -m pip install --quiet --no-deps -e . >>"$log" 2>&1 || true
python -m pip install --quiet safetensors tqdm pytest hypothesis >>"$log" 2>&1 || true

{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,memory.total \
    --format=csv 2>&1
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} >"$out/info.txt" 2>&1

step kernel-tests 240 python -m pytest -q -x -p no:cacheprovider \
  tests/test_modulated_norm.py tests/test_lowprecision.py tests/test_sampler_step.py tests/test_attention.py
step build-check 120 python -m fastdiff.kernels --arch 90
for bench in benchmarks/bench_modulated_norm.py benchmarks/bench_attention.py benchmarks/bench_sampler_step.py \
  benchmarks/bench_e2e.py; do
  [ -f "$bench" ] || continue
  step "$(basename "$bench" .py)" 150 python "$bench" --out "$out"
done
if python -c "import onnxruntime, diffusers" >/dev/null 2>&1; then  # ORT's CUDA provider against PyTorch
  step bench_onnx 150 python benchmarks/bench_onnx.py --models ddpm-cifar10 --repeats 2 --out "$out"
fi
echo "suite status: $status" | tee -a "$log"
exit $status
