#!/usr/bin/env bash
# One GPU check for sleepscale, from a bare machine with one NVIDIA GPU (H100/H200), in under 8 minutes:
# installs the CUDA build of torch and the project, then runs benchmarks/gpu/check.py, which writes
# benchmarks/results/gpu.md (device named) and prints it.
#
#   bash benchmarks/gpu/check.sh                 # installs into .venv-gpu from PyPI / download.pytorch.org
#   SLEEPSCALE_PYTHON=python3 bash benchmarks/gpu/check.sh   # a Python that already has CUDA torch
#   SLEEPSCALE_WHEELS=DIR ...                    # offline: also install the wheels in DIR (no index)
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${SLEEPSCALE_PYTHON:-}
if [ -z "$python" ]; then
    python3 -m venv .venv-gpu
    python=.venv-gpu/bin/python
    "$python" -m pip install -q --upgrade pip
    "$python" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
fi
if [ -n "${SLEEPSCALE_WHEELS:-}" ]; then
    "$python" -m pip install -q --no-index --no-deps "$SLEEPSCALE_WHEELS"/*.whl
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project itself, uninstalled
else
    "$python" -m pip install -q -e .
fi
"$python" - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit(f"benchmarks/gpu/check.sh: torch {torch.__version__} sees no CUDA device; install a CUDA build of torch")
PY
PYTHONUNBUFFERED=1 exec "$python" benchmarks/gpu/check.py "$@"
