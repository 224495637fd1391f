"""Rule 110: can the model compute t cellular-automaton steps of strings it can no longer see?

Token layout (T = 100 with the defaults, windows of L = 24):

    positions  0..23   string 1, one bit token ("0"/"1") per cell     no loss
              24..47   string 2                                        no loss
              48..71   string 3                                        no loss
              72..95   string 4                                        no loss
              96..99   query tokens "?1" "?2" "?3" "?4"                target: bit of string i

Label i is cell 0 of string i after t steps of Rule 110 with periodic boundaries (cell 0's left
neighbour is the last cell). The stored information is 96 bits whatever t is; only the
computation needed grows with t. t is drawn per sample from `t_values` and recorded in the meta.
With `t_in_query` the query tokens also name t (`?1t4`: string 1 after 4 steps), so a mixture of t
values has one answer per query; the model still learns t only after the strings are evicted.
"""

from __future__ import annotations

import numpy as np

from sleepscale.data.sample import IGNORE_INDEX, Sample
from sleepscale.data.tokenizer import SymbolVocabulary

VERSION = "1"
RULE = 110


def step(cells: np.ndarray) -> np.ndarray:
    """One Rule 110 step on the last axis, periodic boundary."""
    neighbourhood = 4 * np.roll(cells, 1, axis=-1) + 2 * cells + np.roll(cells, -1, axis=-1)
    return (RULE >> neighbourhood) & 1


def evolve(cells: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        cells = step(cells)
    return cells


class Rule110Task:
    name = "rule110"

    def __init__(self, t_values=(32,), bits: int = 24, strings: int = 4, t_in_query: bool = False):
        if not t_values or min(t_values) < 0:
            raise ValueError("t_values must be a non-empty list of steps >= 0")
        if bits < 1 or strings < 1:
            raise ValueError(f"bits ({bits}) and strings ({strings}) must be >= 1")
        self.t_values, self.bits, self.strings = [int(t) for t in t_values], bits, strings
        self.t_in_query = bool(t_in_query)
        names = [self._query(i, t) for i in range(strings) for t in (self.t_values if t_in_query else [None])]
        self.vocabulary = SymbolVocabulary(["<pad>", "0", "1"] + names)
        self.sequence_length = strings * bits + strings

    def params(self) -> dict:
        named = {"t_in_query": True} if self.t_in_query else {}  # (datasets written before it stay valid)
        return {"t_values": self.t_values, "bits": self.bits, "strings": self.strings, **named}

    @staticmethod
    def _query(string: int, t: int | None) -> str:
        return f"?{string + 1}" if t is None else f"?{string + 1}t{t}"

    def for_validation(self) -> Rule110Task:
        return self

    def sample(self, rng: np.random.Generator) -> Sample:
        t = int(rng.choice(self.t_values))
        cells = rng.integers(0, 2, size=(self.strings, self.bits))
        labels = evolve(cells, t)[:, 0]
        bit = np.array([self.vocabulary["0"], self.vocabulary["1"]])
        queries = [self.vocabulary[self._query(i, t if self.t_in_query else None)] for i in range(self.strings)]
        input_ids = np.concatenate([bit[cells].ravel(), queries])
        targets = np.concatenate([np.full(self.strings * self.bits, IGNORE_INDEX), bit[labels]])
        return Sample(input_ids, targets, {"task": self.name, "difficulty": {"t": t}, "answer": labels.tolist()})
