"""Accuracy per task difficulty and per number of sleep passes N.

An item is what a difficulty value describes (see `sleepscale.data.sample`): a scalar difficulty
(`{"t": 32}`, `{"ops": 6}`) describes the whole sample, which counts as right when every supervised
token is predicted right (for Rule 110: all four bits; chance 1/16); a list (`{"k": [...]}`) gives
one value per supervised position, each its own item. `token_accuracy` counts supervised tokens.
Under torch.distributed every rank evaluates its share of the split and the counts are summed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from sleepscale.config import SleepConfig
from sleepscale.data.sample import IGNORE_INDEX
from sleepscale.inference.session import SleepingSession
from sleepscale.sleep import sleep_forward

COLUMNS = ("difficulty", "value", "passes", "items", "accuracy", "token_accuracy")


@dataclasses.dataclass
class _Counts:
    items: int = 0
    items_right: int = 0
    tokens: int = 0
    tokens_right: int = 0


@torch.no_grad()
def evaluate(
    model, batches, sleep: SleepConfig, passes: list[int], forward=None, group=None, by_generation: bool = False
) -> list[dict]:
    """Rows of COLUMNS for every (difficulty value, N). `batches` is a re-iterable of loader batches;
    `forward(input_ids, targets, sleep)` defaults to `sleep_forward` on `model`. Counts are summed
    over `group` (default: all ranks), the ranks that read different batches. `by_generation`: the
    answers are generated (`generated_answers`) instead of read off teacher-forced logits; an item's
    exact match is the same either way."""
    forward = forward or (lambda ids, targets, s: sleep_forward(model, ids, s, targets=targets))
    counts: dict[tuple, _Counts] = defaultdict(_Counts)
    for n in passes:
        setting = sleep.model_copy(update={"passes": n})
        for batch in batches:
            device = next(model.parameters()).device
            input_ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
            if by_generation:
                predictions = generated_answers(model, input_ids, targets, setting)
            else:
                predictions = forward(input_ids, targets, setting).logits.argmax(-1)
            for row, meta in enumerate(batch["meta"]):
                supervised = (targets[row] != IGNORE_INDEX).nonzero().flatten()
                right = (predictions[row, supervised] == targets[row, supervised]).tolist()
                for name, value in meta["difficulty"].items():
                    if isinstance(value, list):
                        for item_value, item_right in zip(value, right):
                            _count(counts[(name, item_value, n)], [item_right])
                    else:
                        _count(counts[(name, value, n)], right)
    return _rows(_sum_over_ranks(counts, group))


def generated_answers(model, input_ids: torch.Tensor, targets: torch.Tensor, sleep: SleepConfig) -> torch.Tensor:
    """[batch, length] answers the model generates, greedily, at the supervised positions (the rest
    IGNORE_INDEX): each sample is read in a `SleepingSession` up to the start of each answer run
    (`_answer_runs`), the run is generated token by token, and the given tokens are read between
    runs (the session rewound first). A run is generated right exactly when every teacher-forced
    argmax in it is right, so exact matches agree with `evaluate`'s."""
    answers = torch.full_like(targets, IGNORE_INDEX)
    for row in range(input_ids.shape[0]):
        session = SleepingSession(model, sleep)
        read = 0  # tokens of the sample read so far
        for start, end in _answer_runs(input_ids[row].tolist(), targets[row].tolist()):
            session.feed(input_ids[row : row + 1, read : start + 1])
            read = start + 1
            rewind = session.snapshot()
            generated = list(session.generate(end - start))
            answers[row, start:end] = torch.cat(generated)
            session.restore(rewind)
    return answers


def _answer_runs(input_ids: list[int], targets: list[int]) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of supervised positions that a model answers by generating: a
    position joins the run before it when its input is that run's last answer token (a math
    answer's digits). Where the next input is something else (Rule 110's queries ?1 ?2 ...,
    each answered at its own position) every position is a run of its own."""
    runs = []
    for position, target in enumerate(targets):
        if target == IGNORE_INDEX:
            continue
        if runs and runs[-1][1] == position and input_ids[position] == targets[position - 1]:
            runs[-1] = (runs[-1][0], position + 1)
        else:
            runs.append((position, position + 1))
    return runs


def _count(cell: _Counts, right: list[bool]) -> None:
    cell.items += 1
    cell.items_right += all(right)
    cell.tokens += len(right)
    cell.tokens_right += sum(right)


def _sum_over_ranks(counts: dict[tuple, _Counts], group) -> dict[tuple, _Counts]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return counts
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, {key: dataclasses.astuple(cell) for key, cell in counts.items()}, group=group)
    total: dict[tuple, _Counts] = defaultdict(_Counts)
    for part in gathered:
        for key, values in part.items():
            cell = total[key]
            for field, value in zip(dataclasses.fields(_Counts), values):
                setattr(cell, field.name, getattr(cell, field.name) + value)
    return total


def _rows(counts: dict[tuple, _Counts]) -> list[dict]:
    return [
        {
            "difficulty": name,
            "value": value,
            "passes": n,
            "items": cell.items,
            "accuracy": cell.items_right / cell.items,
            "token_accuracy": cell.tokens_right / max(cell.tokens, 1),
        }
        for (name, value, n), cell in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))
    ]


def metrics(rows: list[dict], prefix: str = "eval") -> dict[str, float]:
    """The rows as metrics: `eval_accuracy_t2_N3` (difficulty t, value 2, N 3)."""
    return {f"{prefix}_accuracy_{r['difficulty']}{r['value']}_N{r['passes']}": r["accuracy"] for r in rows}


_METRIC = re.compile(r"eval_accuracy_(?P<difficulty>[A-Za-z_]+?)(?P<value>-?[0-9.]+)_N(?P<passes>\d+)$")


def evaluations(metrics_file: Path) -> list[tuple[dict, list[dict]]]:
    """Every evaluation a run logged to its `metrics.jsonl`: (the record, its rows with difficulty,
    value, passes and accuracy), in order."""
    found = []
    for line in Path(metrics_file).read_text().splitlines():
        record = json.loads(line)
        rows = []
        for name, accuracy in record.items():
            match = _METRIC.match(name)
            if match:
                value = float(match["value"])
                rows.append(
                    {
                        "difficulty": match["difficulty"],
                        "value": int(value) if value.is_integer() else value,
                        "passes": int(match["passes"]),
                        "accuracy": accuracy,
                    }
                )
        if rows:
            found.append((record, rows))
    return found


def format_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append(
            f"| {row['difficulty']} | {row['value']} | {row['passes']} | {row['items']} | "
            f"{row['accuracy']:.3f} | {row['token_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with Path(path).open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path) -> dict[str, tuple[list, list]]:
    """Accuracy against N, one line per difficulty value (`eval.png`); with a single N, one bar per
    difficulty value. Returns what it drew: label -> (x values, accuracies)."""
    import matplotlib  # ~0.6 s with pyplot: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    figure, axis = plt.subplots(figsize=(5, 3.5))
    drawn = {}
    passes = sorted({row["passes"] for row in rows})
    items = sorted({(row["difficulty"], row["value"]) for row in rows}, key=lambda item: (item[0], float(item[1])))
    if len(passes) > 1:
        for difficulty, value in items:
            mine = sorted(
                (row["passes"], row["accuracy"])
                for row in rows
                if (row["difficulty"], row["value"]) == (difficulty, value)
            )
            drawn[f"{difficulty}={value}"] = tuple(list(values) for values in zip(*mine))
            axis.plot(*zip(*mine), marker="o", label=f"{difficulty}={value}")
        axis.set_xticks(passes)
        axis.set_xlabel("N (sleep passes at evaluation)")
        axis.legend(fontsize=8)
    else:
        labels = [f"{difficulty}={value}" for difficulty, value in items]
        accuracies = [
            next(row["accuracy"] for row in rows if (row["difficulty"], row["value"]) == item) for item in items
        ]
        axis.bar(labels, accuracies)
        drawn = {f"N={passes[0]}": (labels, accuracies)} if passes else {}
        axis.set_xlabel(f"difficulty (N={passes[0] if passes else '?'})")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return drawn


def plot_history(history: list[tuple[int, list[dict]]], path: Path) -> dict[str, tuple[list, list]]:
    """Accuracy against training step from periodic evaluations (`eval_steps.png`): one panel per
    difficulty value, one line per N. `history`: (step, rows of `evaluate`) in step order. Returns
    what it drew: label -> (steps, accuracies)."""
    import matplotlib  # ~0.6 s with pyplot: only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    items = sorted(
        {(row["difficulty"], row["value"]) for _, rows in history for row in rows},
        key=lambda item: (item[0], float(item[1])),
    )
    passes = sorted({row["passes"] for _, rows in history for row in rows})
    figure, axes = plt.subplots(1, max(len(items), 1), figsize=(4 * max(len(items), 1), 3.4), squeeze=False)
    drawn = {}
    for axis, (difficulty, value) in zip(axes[0], items):
        for n in passes:
            points = [
                (step, row["accuracy"])
                for step, rows in history
                for row in rows
                if (row["difficulty"], row["value"], row["passes"]) == (difficulty, value, n)
            ]
            drawn[f"{difficulty}={value} N={n}"] = tuple(list(values) for values in zip(*points))
            axis.plot(*zip(*points), marker=".", label=f"N={n}")
        axis.set_title(f"{difficulty}={value}")
        axis.set_xlabel("step")
        axis.set_ylabel("accuracy")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return drawn
