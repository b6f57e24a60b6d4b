#!/usr/bin/env bash
# The device check for a lent GPU machine (squinchcomm/bench/gpu_check.py):
#   PYTHONPATH=. bench/gpu_check.sh "$OUT"
# from the repository root, nothing to install; under 9 minutes; logs, JSON and
# summary.json under OUT, a short table last. Exit 1 if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bench/gpu_check.sh OUT_FOLDER}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
exec python -m squinchcomm.bench gpu-check --out "$out" "${@:2}"
