"""The GPU check script (benchmarks/gpu/check.py) run end to end on the CPU: tiny shapes, Triton's
kernels (ours and fla's) interpreted, so that the script a GPU session runs is itself tested."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
RUN = (
    "import runpy, sys; sys.path.insert(0, 'tests'); import triton_cpu_interpreter; "
    "sys.argv = ['check.py', '--smoke', '--steps', '1', '--out', sys.argv[1]]; "
    "runpy.run_path('benchmarks/gpu/check.py', run_name='__main__')"
)


@pytest.mark.slow
def test_the_gpu_check_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "gpu.md"
    result = subprocess.run(
        [sys.executable, "-c", RUN, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = out.read_text()
    print(table)
    parity = [line for line in table.splitlines() if re.match(r"\| 24 \| (float32|bfloat16) \|", line)]
    assert len(parity) == 3, table  # 2 dtypes of ours, fp32 of fla's (the interpreter garbles bf16 dots)
    for line in parity:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        errors = [float(cells[3]), float(cells[4]), float(cells[5].split()[0])]
        assert max(errors) < (1e-4 if cells[1] == "float32" else 5e-2), line
    trained = [
        line
        for line in table.splitlines()
        if re.match(r"\| 2 \| (pass|none) \| (all|1) \| (auto|fla) \| (yes|no) \|", line)
    ]
    assert len(trained) == 3, table  # the three training settings ran, one compiled
    assert len([line for line in table.splitlines() if re.match(r"\| [14] \| [0-9.]+ \|$", line)]) == 2, table
