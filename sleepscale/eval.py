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
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from sleepscale.config import SleepConfig
from sleepscale.data.sample import IGNORE_INDEX
from sleepscale.sleep import sleep_forward

COLUMNS = ("difficulty", "value", "passes", "items", "accuracy", "token_accuracy")


@dataclasses.dataclass
class _Counts:
    items: int = 0
    items_right: int = 0
    tokens: int = 0
    tokens_right: int = 0


@torch.no_grad()
def evaluate(model, batches, sleep: SleepConfig, passes: list[int], forward=None, group=None) -> list[dict]:
    """Rows of COLUMNS for every (difficulty value, N). `batches` is a re-iterable of loader batches;
    `forward(input_ids, targets, sleep)` defaults to `sleep_forward` on `model`. Counts are summed
    over `group` (default: all ranks), the ranks that read different batches."""
    forward = forward or (lambda ids, targets, s: sleep_forward(model, ids, s, targets=targets))
    counts: dict[tuple, _Counts] = defaultdict(_Counts)
    for n in passes:
        setting = sleep.model_copy(update={"passes": n})
        for batch in batches:
            device = next(model.parameters()).device
            input_ids, targets = batch["input_ids"].to(device), batch["targets"].to(device)
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
            "difficulty": name, "value": value, "passes": n, "items": cell.items,
            "accuracy": cell.items_right / cell.items, "token_accuracy": cell.tokens_right / max(cell.tokens, 1),
        }
        for (name, value, n), cell in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2]))
    ]


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


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against difficulty, one line per N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for n in sorted({row["passes"] for row in rows}):
        mine = [row for row in rows if row["passes"] == n]
        axis.plot([row["value"] for row in mine], [row["accuracy"] for row in mine], marker="o", label=f"N={n}")
    names = sorted({row["difficulty"] for row in rows})
    axis.set_xlabel(", ".join(names) or "difficulty")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
