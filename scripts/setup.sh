#!/usr/bin/env bash
# Creates (or updates) .venv with the CPU build of torch and sleepscale with its test extras.
# torch goes first, pinned: a range left to pip would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
