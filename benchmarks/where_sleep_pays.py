"""Where sleep pays for its compute (issue 30): every cell of the study (a config under
configs/study/) trained at N=3 and at N=1 given the same training tokens, the same training FLOPs
and twice those FLOPs, one `sleepscale sweep` per cell and seed; then the table of
benchmarks/results/where_sleep_pays.md.

    python benchmarks/where_sleep_pays.py run [--cells rule110_t4 ...] [--seeds 0 1 2] [--set key=value ...]
    python benchmarks/where_sleep_pays.py table [--cells ...] [--seeds ...]

`run` is, per cell and seed (resumable: the same command skips finished runs):

    sleepscale sweep configs/study/CELL.yaml sleep.passes=1,3 --equal-flops --flops-factor 2 \
        --parallel 2 --out runs/study/CELL-seedS train.seed=S

Under the configs' constant learning rate the N=1 run is one run to twice N=3's FLOPs, evaluated
where it meets N=3's tokens and FLOPs (`eval.at_steps`). `table` prints, per cell, seed and
difficulty: N=3 at its end evaluated at N = 1, 3, 5 (more passes at test time than trained); N=1
at equal tokens, equal FLOPs and 2x FLOPs (evaluated at N=1); the gaps N=3 minus N=1 at 1x and 2x
FLOPs with two standard errors of the gap (both accuracies' sampling errors, one seed); and per
cell whether sleep is ahead by at least 0.2 at both budgets in every seed.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

from sleepscale.report import RunResult, evaluation_near, read_runs

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "study"
SLEEPING, AWAKE, TEST_PASSES, MARGIN = 3, 1, (1, 3, 5), 0.2


def cells() -> list[str]:
    return sorted(path.stem for path in CONFIGS.glob("*.yaml"))


def sweep_directory(out: Path, cell: str, seed: int) -> Path:
    return out / f"{cell}-seed{seed}"


def run(cell_names: list[str], seeds: list[int], out: Path, settings: list[str]) -> None:
    for cell in cell_names:
        for seed in seeds:
            command = [
                sys.executable, "-m", "sleepscale.cli", "sweep", str(CONFIGS / f"{cell}.yaml"),
                f"sleep.passes={AWAKE},{SLEEPING}", "--equal-flops", "--flops-factor", "2", "--parallel", "2",
                "--out", str(sweep_directory(out, cell, seed)), f"train.seed={seed}", *settings,
            ]  # fmt: skip
            print(" ".join(command[2:]), flush=True)
            subprocess.run(command, check=True)


def _accuracy(run: RunResult, step: int | None, item: tuple[str, str], passes: int) -> float | None:
    """`run`'s accuracy on `item` at N = `passes`: at its end (step None) or at that evaluation."""
    if step is None:
        rows = [r for r in run.final if (r["difficulty"], r["value"], int(r["passes"])) == (*item, passes)]
        return float(rows[0]["accuracy"]) if rows else None
    entry = next(entry for entry in run.history if entry[3] == step)
    return entry[2].get((*item, passes))


def _two_se(accuracies: list[float | None], items: int) -> float:
    return 2 * math.sqrt(sum(p * (1 - p) / items for p in accuracies if p is not None))


def rows(directory: Path) -> list[dict]:
    """One row per difficulty of a finished sweep directory (N=3 against N=1)."""
    runs = {run.passes: run for run in read_runs(directory) if run.finished}
    if set(runs) != {AWAKE, SLEEPING}:
        return []
    sleeping, awake = runs[SLEEPING], runs[AWAKE]
    steps = {
        "tokens": evaluation_near(awake, sleeping.tokens, sleeping.steps, 0),
        "flops": evaluation_near(awake, sleeping.flops, sleeping.steps, 1),
        "flops2": evaluation_near(awake, 2 * sleeping.flops, sleeping.steps, 1),
    }
    found = []
    items = sorted({(r["difficulty"], r["value"]) for r in sleeping.final}, key=lambda item: float(item[1]))
    for item in items:
        count = min(int(r["items"]) for r in sleeping.final if (r["difficulty"], r["value"]) == item)
        row = {"item": f"{item[0]}={item[1]}", "items": count}
        for n in TEST_PASSES:
            row[f"N3@{n}"] = _accuracy(sleeping, None, item, n)
        for name, step in steps.items():
            row[f"N1 {name}"] = None if step is None else _accuracy(awake, step, item, AWAKE)
        mine = row[f"N3@{SLEEPING}"]
        for name in ("flops", "flops2"):
            other = row[f"N1 {name}"]
            row[f"gap {name}"] = None if mine is None or other is None else mine - other
            row[f"2se {name}"] = _two_se([mine, other], count)
        row["steps"] = f"{sleeping.steps} / {steps['tokens']}, {steps['flops']}, {awake.steps}"
        found.append(row)
    return found


def _cell(value, fmt=".3f") -> str:
    return "-" if value is None else format(value, fmt)


def table(cell_names: list[str], seeds: list[int], out: Path) -> str:
    header = [
        "cell", "seed", "item", "N=3 eval N=1", "N=3 eval N=3", "N=3 eval N=5", "N=1 equal tokens",
        "N=1 equal FLOPs", "N=1 2x FLOPs", "gap 1x (2se)", "gap 2x (2se)", "steps N=3 / N=1 at tokens, FLOPs, 2x",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    verdicts = []
    for cell in cell_names:
        gaps: dict[str, list[float]] = {}
        for seed in seeds:
            directory = sweep_directory(out, cell, seed)
            found = rows(directory) if (directory / "sweep.json").exists() else []
            if not found:
                lines.append(f"| {cell} | {seed} | (not run or unfinished) |" + " |" * (len(header) - 3))
            for row in found:
                for name in ("flops", "flops2"):
                    gaps.setdefault(row["item"], []).append(
                        row[f"gap {name}"] if row[f"gap {name}"] is not None else -1
                    )
                lines.append(
                    "| " + " | ".join([
                        cell, str(seed), row["item"], *(_cell(row[f"N3@{n}"]) for n in TEST_PASSES),
                        _cell(row["N1 tokens"]), _cell(row["N1 flops"]), _cell(row["N1 flops2"]),
                        f"{_cell(row['gap flops'], '+.3f')} ({_cell(row['2se flops'])})",
                        f"{_cell(row['gap flops2'], '+.3f')} ({_cell(row['2se flops2'])})", row["steps"],
                    ]) + " |"
                )  # fmt: skip
        for item, values in gaps.items():
            complete = len(values) == 2 * len(seeds)
            holds = complete and min(values) >= MARGIN
            verdicts.append(
                f"- {cell} {item}: sleep ahead by >= {MARGIN} at 1x and 2x FLOPs in every seed: "
                f"{'yes' if holds else 'no'} (smallest gap {min(values):+.3f} over {len(values) // 2} seed(s)"
                f"{'' if complete else ', not every seed finished'})"
            )
    return "\n".join(lines + [""] + verdicts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["run", "table"])
    parser.add_argument("--cells", nargs="+", default=None, help=f"default: every config in {CONFIGS}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="key=value", help="overrides for every run (e.g. a shorter look)"
    )
    args = parser.parse_args(argv)
    chosen = args.cells or cells()
    unknown = sorted(set(chosen) - set(cells()))
    if unknown:
        parser.error(f"--cells {' '.join(unknown)}: not in {CONFIGS}; give some of {' '.join(cells())}")
    if args.what == "run":
        run(chosen, args.seeds, args.out, args.set)
    print(table(chosen, args.seeds, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
