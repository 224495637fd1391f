"""The GPU check's offline path: benchmarks/gpu/bundle.sh's wheels, check.sh installing them on a
torch it does not touch (`--smoke`, on the CPU), and versions.py refusing a torch or Triton our
kernels cannot run with."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
GPU = ROOT / "benchmarks" / "gpu"


def load_versions():
    spec = importlib.util.spec_from_file_location("gpu_versions", GPU / "versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_versions_accepts_the_window_and_refuses_outside_it():
    versions = load_versions()
    assert versions.problem("2.11.0+cu128", "3.6.0") is None  # the GPU images seen so far
    assert versions.problem("2.13.0", "3.7.1") is None
    assert versions.problem("2.13.0+cpu", None, smoke=True) is None  # the CPU run needs no Triton
    for torch_version, triton_version, words in [
        ("2.6.0", "3.2.0", "torch 2.6.0 is outside"),  # pyproject allows it, fla-core 0.6.0 does not
        ("2.14.0", "3.7.1", "torch 2.14.0 is outside"),
        ("2.15.0.dev20270101+cu130", "3.8.0", "outside"),
        ("2.9.0", "3.2.0", "Triton 3.2.0 is older than the 3.3"),
        ("2.13.0+cpu", None, "comes without Triton"),
    ]:
        found = versions.problem(torch_version, triton_version)
        assert found is not None and words in found and "\n" not in found, (torch_version, triton_version, found)
    assert "outside" in versions.problem("2.5.1", None, smoke=True)  # the smoke run still checks torch


def test_versions_upper_bound_is_pyprojects():
    versions = load_versions()
    pin = re.search(r'"torch>=(\d+)\.(\d+),<(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml no longer pins torch as >=A.B,<C.D"
    low, below = (int(pin[1]), int(pin[2])), (int(pin[3]), int(pin[4]))
    assert versions.TORCH_BELOW == below
    assert versions.TORCH_MIN >= low


def test_a_refused_torch_is_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, str(GPU / "versions.py"), "--torch", "2.5.1", "--triton", "3.6.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("benchmarks/gpu/check.sh: torch 2.5.1 is outside"), result.stderr


def setup_sh_torch() -> str:
    """The torch pin of scripts/setup.sh, which the emulated machine installs the same way."""
    pin = re.search(r"pip install .*\b(torch==\S+)", (ROOT / "scripts" / "setup.sh").read_text())
    assert pin, "scripts/setup.sh no longer pip-installs a pinned torch"
    return pin[1]


@pytest.mark.slow
def test_the_bundle_runs_the_smoke_check_on_a_bare_torch(tmp_path):
    """A bare machine: a fresh venv with only (CPU) torch, installed as scripts/setup.sh does; the
    bundle, for this interpreter's version, brings everything else; check.sh --smoke runs."""
    wheels = tmp_path / "wheels"
    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "SLEEPSCALE_BUNDLE_PYTHON": python_version, "SLEEPSCALE_PIP_PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)  # nothing of this checkout's environment may leak into the bare one
    bundled = subprocess.run(
        ["bash", str(GPU / "bundle.sh"), str(wheels)], capture_output=True, text=True, timeout=600, env=env
    )
    assert bundled.returncode == 0, bundled.stderr[-3000:]
    assert "MiB" in bundled.stdout
    files = sorted(wheels.glob("*.whl"))
    assert files and sum(f.stat().st_size for f in files) < 64 * 2**20
    assert not [f.name for f in files if f.name.startswith(("torch-", "triton-"))]

    again = subprocess.run(["bash", str(GPU / "bundle.sh"), str(wheels)], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and sorted(wheels.glob("*.whl")) == files  # a rerun reuses them

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bare = venv / "bin" / "python"
    subprocess.run(
        [str(bare), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", setup_sh_torch()],
        check=True,
        timeout=900,
        env=env,
    )
    results = ROOT / "benchmarks" / "results" / "gpu.md"
    before = results.stat().st_mtime if results.exists() else None
    smoke = subprocess.run(
        ["bash", str(GPU / "check.sh"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **env,
            "SLEEPSCALE_PYTHON": str(bare),
            "SLEEPSCALE_WHEELS": str(wheels),
            "SLEEPSCALE_SITE": str(tmp_path / "site"),
            "OMP_NUM_THREADS": "1",
        },
    )
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    assert (results.stat().st_mtime if results.exists() else None) == before  # the smoke run writes nothing
    rows = [line for line in smoke.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 3, smoke.stdout  # header, separator, one row
    cells = [cell.strip() for cell in rows[2].strip("|").split("|")]
    assert cells[0].startswith(setup_sh_torch().removeprefix("torch==")), rows[2]  # the venv's own torch
    assert float(cells[2]) > 0 and len(cells[4].strip("[]").split(",")) == 4, rows[2]  # a loss, four tokens
