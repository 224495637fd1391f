"""Refuses, in one line and with exit status 2, a torch or Triton that cannot run the GPU check.

Run by benchmarks/gpu/check.sh before check.py, with the machine's own torch (never reinstalled):

    python benchmarks/gpu/versions.py [--smoke] [--torch VERSION] [--triton VERSION]

--smoke (the CPU run) asks for no Triton. --torch/--triton replace the versions found (the tests
fake them). Both versions are read from the installed packages' metadata, without importing either:
a refusal is instant, and nothing is imported before check.sh has put the wheels on the path.
Whether torch sees a GPU is check.sh's next question, once they are.

The window, from the code that runs:
- torch: pyproject.toml's ">=2.6,<2.14", raised to 2.7 by fla-core 0.6.0, whose kernels run the
  check's `fla` backend (its METADATA: torch>=2.7.0 with its cuda extra).
- Triton: 3.3, fla-core 0.6.0's minimum (triton>=3.3). Our window kernel
  (sleepscale/kernels/window_delta_rule.py) uses only older language features (tl.sqrt_rn,
  tl.debug_barrier, loads, stores, sums), so fla's bound is the binding one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys

TORCH_MIN = (2, 7)  # fla-core 0.6.0
TORCH_BELOW = (2, 14)  # pyproject.toml: torch<2.14
TRITON_MIN = (3, 3)  # fla-core 0.6.0


def release(version: str) -> tuple[int, int]:
    """(major, minor) of "2.11.0+cu128", "3.6.0", "2.14.0.dev20260101"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"cannot read a version from {version!r}")
    return int(match[1]), int(match[2])


def dotted(pair: tuple[int, int]) -> str:
    return ".".join(map(str, pair))


def problem(torch_version: str, triton_version: str | None, smoke: bool = False) -> str | None:
    """Why this torch and Triton cannot run the check (one line), or None. `triton_version` None:
    Triton is not installed."""
    torch_release = release(torch_version)
    if not TORCH_MIN <= torch_release < TORCH_BELOW:
        return (
            f"torch {torch_version} is outside the {dotted(TORCH_MIN)} <= torch < {dotted(TORCH_BELOW)} this check "
            "runs with (fla-core 0.6.0 and pyproject.toml); use a Python whose torch is in that range "
            "(SLEEPSCALE_PYTHON=...)"
        )
    if smoke:
        return None  # the CPU run uses the PyTorch backend: no Triton needed
    if triton_version is None:
        return (
            f"torch {torch_version} comes without Triton, which the check's kernels need; install a CUDA build of torch"
        )
    if release(triton_version) < TRITON_MIN:
        return (
            f"Triton {triton_version} is older than the {dotted(TRITON_MIN)} fla-core 0.6.0 needs; "
            "use a torch whose Triton is newer (torch >= 2.7 ships one)"
        )
    return None


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="the CPU run: no Triton needed")
    parser.add_argument("--torch", help="the torch version to judge (default: the installed one)")
    parser.add_argument("--triton", help="the Triton version to judge (default: the installed one)")
    args = parser.parse_args()
    torch_version = args.torch or installed("torch")
    if torch_version is None:  # a torch built from source may carry no metadata
        import torch

        torch_version = torch.__version__
    found = problem(torch_version, args.triton or installed("triton"), smoke=args.smoke)
    if found:
        print(f"benchmarks/gpu/check.sh: {found}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
