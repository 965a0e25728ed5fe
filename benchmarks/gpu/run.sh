#!/usr/bin/env bash
# The GPU run, one part per device call (benchmarks/gpu/README.md):
#   bash benchmarks/gpu/run.sh part1 OUT_DIR
#   bash benchmarks/gpu/run.sh part2 OUT_DIR
# Extra arguments go to run.py (e.g. --budget_s 400). Run from the repository root.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: bash benchmarks/gpu/run.sh part1|part2|all OUT_DIR [run.py flags]" >&2
  exit 2
fi
part="$1"; out="$2"; shift 2
mkdir -p "$out" && out="$(cd "$out" && pwd)"  # Absolute before leaving the caller's folder.
cd "$(dirname "$0")/../.."
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec python benchmarks/gpu/run.py \
  --part "$part" --out "$out" "$@"
