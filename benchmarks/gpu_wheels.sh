#!/usr/bin/env bash
# Download, on a machine with a package index (this one, not the GPU machine), the wheels the GPU suite needs
# and the GPU image lacks, into .fastdiff-wheels/ (ignored by git). Carried to the GPU machine (the device
# tool's `carry: [".fastdiff-wheels"]`), benchmarks/gpu_suite.sh pip-installs them there with --no-index
# --no-deps --target into a temporary folder on PYTHONPATH, so that the diffusers rows run.
#
#     bash benchmarks/gpu_wheels.sh [EXTRA_REQUIREMENT ...]
#
# What the image lacks: diffusers. Its other needs are in the image already (python 3.12; torch 2.11, numpy
# 2.5, huggingface-hub 1.33 (diffusers 0.42 asks >= 1.32), safetensors 0.8, regex, requests, filelock,
# Pillow, packaging; importlib_metadata is not imported on python >= 3.8), so one pure-Python wheel of a few
# MB is all that travels. The script lists each downloaded wheel's requirements and flags any that the
# image is not known to hold (IMAGE_HAS below, from the device tool's package list), so a new diffusers
# release that needs more says so here, not on the GPU. DIFFUSERS_VERSION pins the release (default: the
# one the dev venv and CI test against). At most 48 MiB is downloaded: the tree and the wheels travel
# together within 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
dest=.fastdiff-wheels
version=${DIFFUSERS_VERSION:-0.42.1}
tmp=$(mktemp -d "$dest.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$tmp" "diffusers==$version" "$@"
"$py" - "$tmp" <<'PY'
import sys, zipfile, pathlib, re
# on the GPU image (the device tool's package list), or never imported there (importlib_metadata: python 3.12)
IMAGE_HAS = {"torch", "numpy", "huggingface-hub", "huggingface_hub", "safetensors", "regex", "requests", "filelock",
             "pillow", "packaging", "pyyaml", "tqdm", "fsspec", "typing-extensions", "httpx", "hf-xet", "zipp",
             "jinja2", "onnx", "onnxruntime", "onnxscript", "importlib-metadata", "importlib_metadata"}
total, missing = 0, []
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    total += whl.stat().st_size
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
    needed = [r for r in reqs if "extra ==" not in r]
    names = [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0].lower() for r in needed]
    gaps = [n for n in names if n not in IMAGE_HAS]
    missing += gaps
    print(f"{whl.name}  {whl.stat().st_size / 2**20:.1f} MiB  needs: {', '.join(needed) or '-'}")
print(f"{total / 2**20:.1f} MiB in all")
if missing:
    print(f"not known to be on the GPU image (add them as arguments): {', '.join(sorted(set(missing)))}")
if total > 48 * 2**20:
    sys.exit("over 48 MiB: the working tree and the wheels travel together within 64 MiB")
PY
rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "wheels in $dest: $(ls "$dest" | tr '\n' ' ')"
