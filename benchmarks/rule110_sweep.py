"""Rule 110 at CPU size: train one model per N on the same data and token budget, then report the
validation accuracy per t of each model at its own N (chance for all four bits: 1/16).

    python benchmarks/rule110_sweep.py [--passes 1 2 3] [--steps 300] [--config configs/quickstart.yaml]

Each run is `sleepscale train CONFIG sleep.passes=N`; runs go to runs/rule110-sweep/N<n>.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="runs/rule110-sweep")
    args = parser.parse_args()

    accuracy, seconds = {}, {}
    for n in args.passes:
        run_dir = Path(args.out) / f"N{n}"
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "sleepscale.cli", "train", args.config, f"sleep.passes={n}", f"train.steps={args.steps}",
             f"train.run_dir={run_dir}", f"eval.passes=[{n}]", "checkpoint.every=100000"],
            check=True, capture_output=True, env={**os.environ},
        )
        seconds[n] = time.perf_counter() - start
        with (run_dir / "eval.csv").open() as table:
            for row in csv.DictReader(table):
                accuracy[(int(row["value"]), n)] = float(row["accuracy"])
        print(f"N={n}: {seconds[n]:.0f} s", file=sys.stderr, flush=True)

    ts = sorted({t for t, _ in accuracy})
    print(f"command: python benchmarks/rule110_sweep.py --passes {' '.join(map(str, args.passes))} --steps {args.steps} "
          f"--config {args.config}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; same data, {args.steps} steps each\n")
    print("| t | " + " | ".join(f"N={n}" for n in args.passes) + " |")
    print("|---|" + "---|" * len(args.passes))
    for t in ts:
        print(f"| {t} | " + " | ".join(f"{accuracy[(t, n)]:.3f}" for n in args.passes) + " |")
    print("| wall time (s) | " + " | ".join(f"{seconds[n]:.0f}" for n in args.passes) + " |")


if __name__ == "__main__":
    main()
