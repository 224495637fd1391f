#!/usr/bin/env bash
# One GPU check for sleepscale, from a bare machine with one NVIDIA GPU (H100/H200), in under 8 minutes:
# installs what it needs, then runs benchmarks/gpu/check.py, which writes benchmarks/results/gpu.md
# (device named) and prints it.
#
#   bash benchmarks/gpu/bundle.sh                # first, where pip reaches PyPI: the wheels into .whl
#   bash benchmarks/gpu/check.sh                 # then on the GPU machine, offline: its own torch
#                                                # (python3) plus the wheels in .whl, no index
#   SLEEPSCALE_WHEELS=DIR ...                    # the same with the wheels in DIR
#   SLEEPSCALE_PYTHON=python3 ...                # a Python that already has CUDA torch (with no wheels:
#                                                # pip install -e . from the network)
#   SLEEPSCALE_ONLINE=1 ...                      # ignore .whl: without SLEEPSCALE_PYTHON, install into
#                                                # .venv-gpu from PyPI / download.pytorch.org
#   ... check.sh --smoke  (or SLEEPSCALE_SMOKE=1)  # on the CPU, no CUDA nor Triton: one tiny training
#                                                # step and decode (check.py --cpu-smoke), no results file
#
# torch and Triton are never installed from the wheels: the machine's own CUDA build is the one that
# works there. A torch or Triton too old or too new for our kernels is refused in one line (exit 2,
# benchmarks/gpu/versions.py) before anything runs.
set -euo pipefail
cd "$(dirname "$0")/../.."

smoke=${SLEEPSCALE_SMOKE:-0}
args=()
for arg in "$@"; do
    if [ "$arg" = --smoke ]; then smoke=1; else args+=("$arg"); fi
done

python=${SLEEPSCALE_PYTHON:-}
wheels=${SLEEPSCALE_WHEELS:-}
if [ -z "$wheels" ] && [ -z "${SLEEPSCALE_ONLINE:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
    wheels=.whl # bundle.sh's default folder: a machine with no network gets it through `carry`
fi

if [ -n "$wheels" ]; then
    python=${python:-python3}
    if ! compgen -G "$wheels/*.whl" >/dev/null; then
        echo "benchmarks/gpu/check.sh: no wheels in $wheels; run bash benchmarks/gpu/bundle.sh $wheels first" >&2
        exit 1
    fi
    if compgen -G "$wheels/torch-*.whl" >/dev/null || compgen -G "$wheels/triton-*.whl" >/dev/null; then
        echo "benchmarks/gpu/check.sh: $wheels holds a torch or triton wheel, which would replace the machine's own CUDA build; remove it" >&2
        exit 1
    fi
elif [ -z "$python" ]; then
    python3 -m venv .venv-gpu
    python=.venv-gpu/bin/python
    "$python" -m pip install -q --upgrade pip
    "$python" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
fi

# Before installing anything: a torch or Triton our kernels cannot run with ends here, in one line.
smoke_flag=()
if [ "$smoke" = 1 ]; then smoke_flag=(--smoke); fi
"$python" benchmarks/gpu/versions.py "${smoke_flag[@]}"

if [ -n "$wheels" ]; then
    # Into a folder of their own put first on PYTHONPATH, not into the interpreter's site-packages:
    # no root needed, and the machine's torch and Triton stay untouched (--no-deps: pip resolves nothing).
    site=${SLEEPSCALE_SITE:-${TMPDIR:-/tmp}/sleepscale-site}
    if ! "$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "$wheels"/*.whl; then
        # Most often wheels built for another CPython (bundle.sh makes 3.12's by default).
        version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        echo "benchmarks/gpu/check.sh: the wheels in $wheels do not install on $python (Python $version); empty $wheels and run SLEEPSCALE_BUNDLE_PYTHON=$version bash benchmarks/gpu/bundle.sh $wheels" >&2
        exit 1
    fi
    # The project itself travels as source, uninstalled.
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    "$python" -m pip install -q -e .
fi

if [ "$smoke" = 1 ]; then
    PYTHONUNBUFFERED=1 exec "$python" benchmarks/gpu/check.py --cpu-smoke "${args[@]}"
fi
"$python" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"benchmarks/gpu/check.sh: torch {torch.__version__} sees no CUDA device; install a CUDA build of torch, or pass --smoke")
PY
PYTHONUNBUFFERED=1 exec "$python" benchmarks/gpu/check.py "${args[@]}"
