#!/usr/bin/env bash
# benchmarks/gpu.py on a lent GPU machine, as one prepared command.
#
# The lent machine (the workplace's `device` tool; .library/device/KINDS.md) has Python 3.12, torch, transformers,
# accelerate and safetensors, but no diffusers and no bitsandbytes, and it reaches no package index. So:
#
#   1. here, where PyPI answers:   bash benchmarks/gpu_device.sh fetch
#      downloads the two wheels for the machine's Python into .whl/ (ignored by git; ~50 MB, with the ~14 MB tree
#      under the 64 MiB a call may carry);
#   2. on the machine, one call:   run(command="bash benchmarks/gpu_device.sh", carry=[".whl"], timeout_s=590)
#      installs them into /tmp/site, runs the dry mode on the GPU first (seconds: the CUDA paths, before the
#      budgeted full run) and then the full run (< 8 minutes), and leaves gpu.log and gpu.json in $OUT.
#
# Our package is not installed there: it runs from src/ (its pinned torch is the CPU build of this workplace; the
# machine's own CUDA torch is the one to measure).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-.whl}"  # where `fetch` puts the wheels and the machine finds them
PACKAGES=(diffusers==0.42.1 bitsandbytes==0.50.2)  # the diffusers our pyproject pins; bitsandbytes for 8-bit Adam

if [[ "${1:-}" == "fetch" ]]; then
    mkdir -p "$WHEELS"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
    ls -l "$WHEELS"
    exit 0
fi
if [[ $# -gt 0 ]]; then
    echo "gpu_device.sh: unknown argument '$1'; expected none (run on the GPU machine) or 'fetch' (here)" >&2
    exit 2
fi

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_device.sh: no wheels in $WHEELS/: run 'bash benchmarks/gpu_device.sh fetch' here and carry .whl" >&2
    exit 2
fi
OUT_DIR="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT_DIR"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu tries this script here (gpu.py then runs its dry mode twice)
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true; } 2>&1 | tee "$OUT_DIR/gpu.log"
# the dry mode on the GPU first: every section's code path in seconds, so a broken path costs seconds, not the
# budgeted full run; then the full run. Both limits together stay under one call's 10 minutes.
timeout 90 python3 benchmarks/gpu.py --dry --device "$DEVICE" 2>&1 | tee -a "$OUT_DIR/gpu.log" \
    || echo "gpu_device.sh: the dry run failed (above); the full run starts anyway" | tee -a "$OUT_DIR/gpu.log"
timeout 480 python3 benchmarks/gpu.py --device "$DEVICE" --out "$OUT_DIR/gpu.json" 2>&1 | tee -a "$OUT_DIR/gpu.log"
