"""Start-up time of `sleepscale train` to its first step, and time per step, for 1 and 2 ranks.

    python benchmarks/train_speed.py [--steps 30]

Uses configs/quickstart.yaml (its data is generated first, outside the timing). "startup" is from
the process's creation to the end of its first step (imports, process group, data, model, engine,
MLflow run, first step); "step" is the mean wall time of the later steps. With 2 ranks each rank
runs the same micro-batch, so the global batch doubles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = "configs/quickstart.yaml"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(ranks: int, steps: int, run_dir: Path) -> tuple[float, float]:
    overrides = [
        f"train.steps={steps}",
        f"train.run_dir={run_dir}",
        "train.log_every=1",
        "checkpoint.every=100000",
        "eval.max_batches=1",
    ]
    if ranks == 1:
        command = [sys.executable, "-m", "sleepscale.cli", "train", CONFIG, *overrides]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(free_port()),
            "-m",
            "sleepscale.cli",
            "train",
            CONFIG,
            *overrides,
        ]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(2 // ranks)})
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    startup = next(line["startup_seconds"] for line in lines if "startup_seconds" in line)
    step_times = [line["step_seconds"] for line in lines if "step_seconds" in line and line["step"] > 1]
    return startup, sum(step_times) / max(len(step_times), 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        run(1, 2, Path(scratch) / "warm")  # generates the data and warms the file cache
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {CONFIG}, {args.steps} steps\n")
        print("| ranks | start-up to first step (s) | time per step (s) |")
        print("|---|---|---|")
        for ranks in (1, 2):
            target = Path(scratch) / f"ranks{ranks}"
            startup, step = run(ranks, args.steps, target)
            print(f"| {ranks} | {startup:.1f} | {step:.3f} |", flush=True)
            shutil.rmtree(target)


if __name__ == "__main__":
    main()
