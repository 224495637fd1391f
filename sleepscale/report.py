"""The comparison report of a sweep: read from its run directories, whoever ran them.

    sleepscale sweep-report SWEEP_DIR

A run directory is any subdirectory holding the `config.yaml` that `sleepscale train` writes; a local
sweep (`sleepscale.sweep`) and `slurm/sweep.sbatch` both lay them out as `<sweep dir>/<tag>-<value>`.
Per run it reads the final evaluation (`eval.csv`) and, from `metrics.jsonl`, what the run spent
(training tokens, training FLOPs, seconds in training steps) and the periodic evaluations. It
writes `report.md` (the table, with the evaluation's sampling error, and the comparisons at equal
training tokens and at equal training FLOPs), `report.csv` and `report.png` (accuracy against
training tokens and against training FLOPs, one curve per run, one column per difficulty value)
into the sweep directory, and logs them to MLflow.

A run's accuracy in the comparisons and curves is at its own trained N when it was evaluated at it
(else at the first N it was evaluated at); the table has every N evaluated.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

import yaml

from sleepscale.eval import evaluations


@dataclasses.dataclass
class RunResult:
    name: str
    passes: int  # trained N
    finished: bool
    final: list[dict]  # eval.csv rows
    tokens: float | None
    flops: float | None
    train_seconds: float | None
    wall_seconds: float | None  # from a local sweep's sweep.json
    steps: int
    history: list[
        tuple[float, float, dict[tuple[str, str, int], float], int]
    ]  # (tokens, flops, accuracy by item, step)

    def accuracy(self, difficulty: str, value: str) -> float | None:
        """At the trained N if evaluated there, else at the first N evaluated."""
        rows = [row for row in self.final if row["difficulty"] == difficulty and row["value"] == value]
        mine = [row for row in rows if int(row["passes"]) == self.passes] or rows
        return float(mine[0]["accuracy"]) if mine else None

    @property
    def eval_passes(self) -> int:
        evaluated = sorted({int(row["passes"]) for row in self.final})
        return self.passes if self.passes in evaluated or not evaluated else evaluated[0]


@dataclasses.dataclass
class Report:
    text: str
    paths: list[Path]


def read_run(directory: Path, state: dict) -> RunResult:
    config = yaml.safe_load((directory / "config.yaml").read_text())
    final = []
    if (directory / "eval.csv").exists():
        with (directory / "eval.csv").open() as file:
            final = list(csv.DictReader(file))
    budget, history = {}, []
    metrics_file = directory / "metrics.jsonl"
    if metrics_file.exists():
        budgets = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        budget = next((record for record in reversed(budgets) if "training_flops" in record), {})
        for record, rows in evaluations(metrics_file):
            accuracies = {(row["difficulty"], str(row["value"]), row["passes"]): row["accuracy"] for row in rows}
            history.append(
                (
                    record.get("tokens", math.nan),
                    record.get("training_flops", math.nan),
                    accuracies,
                    record.get("step", 0),
                )
            )
    recorded = state.get("runs", {}).get(directory.name)
    finished = recorded["finished"] if recorded is not None else bool(final)
    return RunResult(
        directory.name,
        config["sleep"]["passes"],
        finished,
        final,
        budget.get("tokens"),
        budget.get("training_flops"),
        budget.get("train_seconds"),
        recorded["seconds"] if recorded is not None else None,
        budget.get("step", 0),
        history,
    )


def read_runs(directory: Path) -> list[RunResult]:
    state_file = directory / "sweep.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    order = list(state.get("runs", {}))
    found = sorted(
        (path for path in directory.iterdir() if (path / "config.yaml").exists()),
        key=lambda path: (order.index(path.name) if path.name in order else len(order), path.name),
    )
    if not found:
        raise FileNotFoundError(f"{directory}: no run directories (subdirectories with config.yaml) to report on")
    return [read_run(path, state) for path in found]


def _items(runs: list[RunResult]) -> list[tuple[str, str]]:
    """Every (difficulty, value) evaluated, in numeric order."""
    items = {(row["difficulty"], row["value"]) for run in runs for row in run.final}
    return sorted(items, key=lambda item: (item[0], float(item[1])))


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(runs: list[RunResult]) -> tuple[list[str], list[list[str]]]:
    items = _items(runs)
    header = [
        "run",
        "trained N",
        "eval N",
        *(f"{d}={v}" for d, v in items),
        "tokens",
        "training FLOPs",
        "train s",
        "wall s",
        "status",
    ]
    rows = []
    for run in runs:
        for n in sorted({int(row["passes"]) for row in run.final}) or [None]:
            cells = []
            for difficulty, value in items:
                match = [
                    row
                    for row in run.final
                    if (row["difficulty"], row["value"], int(row["passes"])) == (difficulty, value, n)
                ]
                cells.append(f"{float(match[0]['accuracy']):.3f}" if match else "-")
            rows.append(
                [
                    run.name,
                    str(run.passes),
                    "-" if n is None else str(n),
                    *cells,
                    _number(run.tokens, ",.0f"),
                    _number(run.flops, ".3g"),
                    _number(run.train_seconds, ".0f"),
                    _number(run.wall_seconds, ".0f"),
                    "finished" if run.finished else "unfinished",
                ]
            )
    return header, rows


def _matches(first: float, first_steps: int, value: float, steps: int) -> bool:
    """Whether two budgets agree to within one training step of either run."""
    return abs(first - value) <= max(first / max(first_steps, 1), value / max(steps, 1))


def evaluation_near(run: RunResult, target: float, target_steps: int, position: int) -> int | None:
    """The step of `run`'s periodic evaluation closest to the budget `target` (tokens: position 0,
    FLOPs: 1), if one is within a training step of it."""
    near = [entry for entry in run.history if entry[3] and _matches(target, target_steps, entry[position], entry[3])]
    return min(near, key=lambda entry: abs(entry[position] - target))[3] if near else None


def _run_at(run: RunResult, target: float, target_steps: int, position: int) -> tuple[RunResult, int | None] | None:
    """`run` where it spent the budget `target` (tokens: position 0, FLOPs: 1): at its end (step
    None) or at its periodic evaluation nearest it, within a training step; None if neither."""
    if _matches(target, target_steps, (run.tokens, run.flops)[position], run.steps):
        return run, None
    step = evaluation_near(run, target, target_steps, position)
    return None if step is None else (run, step)


def _points(runs: list[RunResult], position: int) -> list[list[tuple[RunResult, int | None]]]:
    """Runs compared at one budget (training tokens: position 0, FLOPs: 1), in groups of two or
    more: for every finished run's final budget, each finished run at its end (step None) or at a
    periodic evaluation of that budget (its step). A run extended under a constant learning rate
    (`sweep --equal-flops`) so meets a shorter run at the shorter run's end: with the same data
    order and learning rate at every step, its model there is the shorter run's model."""
    finished = [run for run in runs if run.finished and (run.tokens, run.flops)[position] is not None]
    groups, seen = [], set()
    for anchor in finished:
        target, group = (anchor.tokens, anchor.flops)[position], []
        for run in finished:
            found = _run_at(run, target, anchor.steps, position)
            if found is not None:
                group.append(found)
        key = tuple((run.name, step) for run, step in group)
        if len(group) > 1 and key not in seen:
            seen.add(key)
            groups.append(group)
    return groups


def _accuracy_at(run: RunResult, step: int | None, difficulty: str, value: str) -> float | None:
    if step is None:
        return run.accuracy(difficulty, value)
    entry = next(entry for entry in run.history if entry[3] == step)
    return entry[2].get((difficulty, value, run.eval_passes))


def _at_multiple(runs: list[RunResult], factor: float) -> list[list[tuple[RunResult, int | None]]]:
    """Each finished run at its end with every other finished run at `factor` times its training
    FLOPs (at the other's end or at a periodic evaluation there), where any has one."""
    finished = [run for run in runs if run.finished and run.flops is not None]
    groups = []
    for anchor in finished:
        target, group = anchor.flops * factor, [(anchor, None)]
        for run in finished:
            found = None if run is anchor else _run_at(run, target, anchor.steps, 1)
            if found is not None:
                group.append(found)
        if len(group) > 1:
            groups.append(group)
    return groups


def _describe(run: RunResult, step: int | None, items) -> str:
    scores = ", ".join(f"{d}={v}: {_number(_accuracy_at(run, step, d, v), '.3f')}" for d, v in items)
    where = "" if step is None else f", at step {step} of {run.steps}"
    return f"{run.name} (N={run.passes}, eval N={run.eval_passes}{where}): {scores}"


def comparisons(runs: list[RunResult], flops_factor: float = 1.0) -> list[str]:
    """The report's comparison lines: at equal training tokens, at equal training FLOPs, and (for a
    sweep run with `--flops-factor F`) each run against the others given F times its FLOPs."""
    items = _items(runs)
    lines = []
    for title, position, unit in (("equal training tokens", 0, "tokens"), ("equal training FLOPs", 1, "FLOPs")):
        for group in _points(runs, position):
            budget = (
                (group[0][0].tokens, group[0][0].flops)[position]
                if group[0][1] is None
                else next(e for e in group[0][0].history if e[3] == group[0][1])[position]
            )
            parts = [_describe(run, step, items) for run, step in group]
            lines.append(f"- At {title} (~{budget:.3g} {unit}): " + "; ".join(parts))
    if flops_factor != 1:
        for (anchor, _), *others in _at_multiple(runs, flops_factor):
            parts = [_describe(run, step, items) for run, step in others]
            lines.append(
                f"- At {flops_factor:g}x training FLOPs (~{anchor.flops * flops_factor:.3g} FLOPs against "
                f"{_describe(anchor, None, items)}): " + "; ".join(parts)
            )
    return lines


def sampling_note(runs: list[RunResult]) -> str:
    counts = [int(row["items"]) for run in runs for row in run.final]
    if not counts:
        return "No run has a final evaluation yet."
    fewest = min(counts)
    return (
        f"Evaluation: at least {fewest} items per cell; two standard errors of an accuracy p are "
        f"2 sqrt(p(1-p)/{fewest}), at most {2 * math.sqrt(0.25 / fewest):.3f} (at p = 0.5)."
    )


def plot(runs: list[RunResult], path: Path) -> None:
    import matplotlib  # ~0.6 s with pyplot: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    items = _items(runs) or [("", "")]
    figure, axes = plt.subplots(2, len(items), figsize=(4.2 * len(items), 6.4), squeeze=False)
    for column, (difficulty, value) in enumerate(items):
        for row, (label, position) in enumerate((("training tokens", 0), ("training FLOPs", 1))):
            axis = axes[row][column]
            for run in runs:
                key = (difficulty, value, run.eval_passes)
                points = [(entry[position], entry[2][key]) for entry in run.history if key in entry[2]]
                if points:
                    axis.plot(*zip(*points), marker=".", label=run.name)
            axis.set_xlabel(label)
            axis.set_ylabel("accuracy")
            axis.set_ylim(0, 1.02)
            axis.set_title(f"{difficulty}={value}")
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(directory: str | Path, tracking: tuple[str, str | None] | None = None) -> Report:
    """Writes report.md, report.csv and report.png into `directory`; `tracking` = (MLflow URI,
    run id to log them to; None makes a run named after the sweep)."""
    directory = Path(directory)
    runs = read_runs(directory)
    header, rows = table(runs)
    lines = [f"# Sweep {directory.name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    recorded = directory / "sweep.json"  # a local sweep's command: its --flops-factor
    factor = json.loads(recorded.read_text()).get("command", {}).get("flops_factor", 1.0) if recorded.exists() else 1.0
    compared = comparisons(runs, factor) or ["No two finished runs share tokens or FLOPs."]
    lines += ["", sampling_note(runs), "", *compared]
    text = "\n".join(lines) + "\n"
    (directory / "report.md").write_text(text)
    with (directory / "report.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    plot(runs, directory / "report.png")
    paths = [directory / name for name in ("report.md", "report.csv", "report.png")]
    if tracking is not None:
        _log(directory, paths, *tracking)
    return Report(text, paths)


def report_command(args) -> int:
    """`sleepscale sweep-report`: the report of a sweep directory, logged to the parent run the sweep
    recorded (with `--tracking-uri`, or with none recorded: to a new run)."""
    directory = Path(args.directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory; give a sweep directory")
    state = directory / "sweep.json"
    recorded = json.loads(state.read_text()) if state.exists() else {}
    parent = recorded.get("parent_run_id") if args.tracking_uri is None else None
    uri = args.tracking_uri or recorded.get("tracking_uri") or f"sqlite:///{directory.resolve()}/mlflow.db"
    print(write_report(directory, tracking=(uri, parent)).text)
    return 0


def _log(directory: Path, paths: list[Path], uri: str, run_id: str | None) -> None:
    try:
        from mlflow.tracking import MlflowClient  # ~2 s: only to log the report to MLflow

        client = MlflowClient(uri)
        if run_id is None:
            experiment = client.get_experiment_by_name("sleepscale")
            experiment_id = (
                experiment.experiment_id
                if experiment
                else client.create_experiment(
                    "sleepscale", artifact_location=(directory / "mlartifacts").resolve().as_uri()
                )
            )
            run_id = client.create_run(experiment_id, run_name=f"sweep report {directory.name}").info.run_id
            for path in paths:
                client.log_artifact(run_id, str(path))
            client.set_terminated(run_id)
        else:
            for path in paths:
                client.log_artifact(run_id, str(path))
    except Exception as error:  # the report is on disk whatever MLflow does
        print(
            f"sweep report: not logged to MLflow at {uri} ({type(error).__name__}: {str(error).splitlines()[0][:200]})",
            file=sys.stderr,
        )
