#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py: what it runs, its budget and its targets).
# On the device machine, from the repository root:  bash benchmarks/gpu_check.sh [gpu_check.py flags]
# Its tables land in $OUT (default /tmp/ferkd-gpu-check), with this run's whole output in $OUT/log.txt.
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
export OUT="${OUT:-/tmp/ferkd-gpu-check}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" || exit 2
"${PYTHON:-python3}" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
