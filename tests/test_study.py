"""The study of where sleep pays (benchmarks/where_sleep_pays.py, configs/study/): its configs train,
its sweeps give N=1 the sleeping run's tokens, FLOPs and twice its FLOPs, and its table reads them."""

import subprocess
import sys
from pathlib import Path

import pytest

from sleepscale.config_loading import load_config

ROOT = Path(__file__).resolve().parent.parent
STUDY = sorted((ROOT / "configs" / "study").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDY, ids=[path.stem for path in STUDY])
def test_study_configs_are_valid(path):
    config = load_config(str(path), [])
    assert config.schedule.kind == "constant"  # the sweep extends N=1 in place, evaluated at each budget
    assert config.sleep.eviction == "hard" and config.eval.passes == [1, 3, 5]


@pytest.mark.slow
def test_a_study_cell_runs_end_to_end_and_its_table_compares_n3_with_n1(tmp_path):
    """The mixture cell (queries naming t) for a few steps on little data: N=3 for 4 steps, N=1 to
    twice its FLOPs, and the table's row per t with the gaps and the verdict."""
    tiny = [
        f"data.path={tmp_path / 'data'}",
        "data.generate.train_samples=64",
        "data.generate.validation_samples=24",
        "data.generate.samples_per_shard=32",
        "train.steps=4",
        "train.micro_batch_size=8",
        "schedule.warmup_steps=1",
        "eval.every=2",
        "eval.batch_size=24",
        "checkpoint.every=2",
    ]
    command = [sys.executable, str(ROOT / "benchmarks" / "where_sleep_pays.py"), "run", "--cells", "rule110_mix248"]
    result = subprocess.run(
        [*command, "--seeds", "0", "--out", str(tmp_path / "study"), "--set", *tiny],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| rule110_mix248 | 0 |")]
    assert [row.split(" | ")[2] for row in rows] == ["t=2", "t=4", "t=8"], result.stdout
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert all(cell != "-" for cell in cells[3:9]), row  # N=3 at N=1,3,5; N=1 at tokens, FLOPs, 2x
        assert cells[-1].startswith("4 / 4, ") and int(cells[-1].split(", ")[-1]) > 2 * 4, row
    assert "- rule110_mix248 t=8: sleep ahead by >= 0.2 at 1x and 2x FLOPs in every seed: " in result.stdout
    bad = subprocess.run([*command[:-1], "rule110_none", "--seeds", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--cells rule110_none: not in" in bad.stderr
