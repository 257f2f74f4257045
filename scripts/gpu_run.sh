#!/usr/bin/env bash
# One device call's command (docs/gpu.md): scripts/gpu_run.py with this checkout on the import path.
# Usage: scripts/gpu_run.sh OUT [--smoke] [--stages ...] [--time-limit S]
cd "$(dirname "$0")/.." && PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 exec python3 scripts/gpu_run.py "$@"
