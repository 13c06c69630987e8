#!/usr/bin/env bash
# The accelerator figures of BENCHMARKS.md in one command (under 8 minutes on one GPU or TPU):
# Inception features/s (FID of 50k images end to end), DiT-XL/2 bf16 train-step MFU and
# DiT-XL/2 sampling images/s at 50 steps; prints a Markdown table.
#
#   benchmarks/device_suite.sh              # on the accelerator machine, from the repository
#   benchmarks/device_suite.sh --smoke      # tiny sizes: checks that it runs, on any CPU
#   benchmarks/device_suite.sh --no-remat --train-batch 64 --peak-tflops 459
#
# Extra arguments go to benchmarks/device_suite.py (see its --help). The run is stopped after
# SUITE_TIMEOUT seconds (default 480) so that it never outlives a lent machine's budget.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
limit="${SUITE_TIMEOUT:-480}"

# XLA's persistent cache is off: every compilation is measured as a first one.
export JAX_ENABLE_COMPILATION_CACHE=false
echo "device_suite: $(date -u +%Y-%m-%dT%H:%MZ), git $(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown), load $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout "$limit" "$python" "$here/device_suite.py" "$@"
