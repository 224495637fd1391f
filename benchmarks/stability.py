"""Stability of sleep training on real runs: one `sleepscale train` run per variant, same data and
steps, then what the metrics say about loss spikes, gradient norms and GDN state growth across passes.

    python benchmarks/stability.py [--passes 4] [--steps 150] [--variants full k2 ...] [--reuse]

Columns: final loss (mean of the last 10% of steps); worst jump (largest loss / median of the 10
steps before it, after warm-up); largest gradient norm before clipping (after warm-up); the loop GDN
state norm after pass 1 and after pass N (mean of the last 10% of steps) and their ratio; skipped
steps and spikes the guard caught; validation accuracy at t=0 with N passes; wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "full": [],
    "k2": ["sleep.grad_passes=2"],
    "lr10x": ["optimizer.lr=0.03"],
    "lr10x-bounded": ["optimizer.lr=0.03", "sleep.state_norm_bound=1.0"],
    "lr10x-guarded": [
        "optimizer.lr=0.03",
        "train.loss_spike_ratio=1.5",
        "train.grad_spike_ratio=5",
        "train.spike_window=20",
        "train.max_bad_steps=1000",
    ],
}


def summarize(run_dir: Path, passes: int, warmup: int) -> dict[str, float]:
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    tail = steps[-max(1, len(steps) // 10) :]
    loss = [s["loss"] for s in steps]
    jumps = [loss[i] / statistics.median(loss[i - 10 : i]) for i in range(max(10, warmup), len(loss))]
    grads = [s["grad_norm"] for s in steps[warmup:] if s.get("grad_norm") is not None]
    first = statistics.mean(s.get("state_norm_pass1", float("nan")) for s in tail)
    last = statistics.mean(s.get(f"state_norm_pass{passes}", float("nan")) for s in tail)
    return {
        "final loss": statistics.mean(s["loss"] for s in tail),
        "worst jump": max(jumps, default=float("nan")),
        "max grad norm": max(grads, default=float("nan")),
        "state pass 1": first,
        f"state pass {passes}": last,
        "growth": last / first,
        "skipped": steps[-1]["skipped_steps"],
        "spikes": steps[-1].get("loss_spikes", 0) + steps[-1].get("grad_spikes", 0),
    }


def _accuracy_t0(run_dir: Path) -> float:
    if not (run_dir / "eval.csv").exists():  # stopped early
        return float("nan")
    with (run_dir / "eval.csv").open() as table:
        return next(float(r["accuracy"]) for r in csv.DictReader(table) if r["value"] == "0")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="runs/stability")
    parser.add_argument(
        "--reuse", action="store_true", help="summarize finished runs in --out instead of training them again"
    )
    args = parser.parse_args()

    rows = {}
    for name in args.variants:
        run_dir = Path(args.out) / name
        if args.reuse and (run_dir / "eval.csv").exists():
            rows[name] = {
                **summarize(run_dir, args.passes, warmup=20),
                "exit": 0,
                "acc t=0": _accuracy_t0(run_dir),
                "seconds": "-",
            }
            continue
        start = time.perf_counter()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "sleepscale.cli",
                "train",
                args.config,
                f"sleep.passes={args.passes}",
                f"train.steps={args.steps}",
                f"train.run_dir={run_dir}",
                "train.log_every=1",
                f"eval.passes=[{args.passes}]",
                "checkpoint.every=100000",
                *VARIANTS[name],
            ],
            capture_output=True,
            text=True,
            env={**os.environ},
        )
        if result.returncode not in (0, 3):  # 3: stopped by too many bad steps, itself an observation
            sys.exit(f"{name}: exit {result.returncode}\n{result.stderr[-3000:]}")
        rows[name] = summarize(run_dir, args.passes, warmup=20)
        rows[name]["exit"] = result.returncode
        rows[name]["acc t=0"] = _accuracy_t0(run_dir)
        rows[name]["seconds"] = time.perf_counter() - start
        print(f"{name}: {rows[name]['seconds']:.0f} s", file=sys.stderr, flush=True)

    columns = list(next(iter(rows.values())))
    print(
        f"command: python benchmarks/stability.py --passes {args.passes} "
        f"--steps {args.steps} --variants {' '.join(args.variants)}"
    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; "
        f"config {args.config}, N={args.passes}, same data and seed\n"
    )
    print("| variant | overrides | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, row in rows.items():
        cells = [
            f"{row.get(c, float('nan')):.3g}" if isinstance(row.get(c), float) else str(row.get(c, "-"))
            for c in columns
        ]
        print(f"| {name} | {' '.join(VARIANTS[name]) or '-'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
