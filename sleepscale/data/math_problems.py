"""GSM-Infinite-style arithmetic word problems: the answer needs exactly `ops` operations, and the
problem is padded with distractor sentences to a target length.

Text layout (question first, no chain of thought), then the answer and an end-of-text token:

    Question: how many apples does Mia have?
    <the needed sentences and the distractors, shuffled together>
    Answer: 27<eos>                      targets: the answer's tokens and <eos> (next-token style)

Sentences (one per quantity; a quantity is a person's count of one item):

    base    "{P} has {v} {item}."
    more    "{P} has {c} more {item} than {Q}."            P = Q + c
    fewer   "{P} has {c} fewer {item} than {Q}."           P = Q - c
    times   "{P} has {c} times as many {item} as {Q}."     P = c * Q
    sum     "{P} has as many {item} as {Q} and {R} together."   P = Q + R

The question's quantity is the end of a chain of exactly `ops` derived quantities (each one
operation), every one of which it depends on. Distractors are further quantities that may refer to
anything already defined but that nothing needed refers to, so they cannot change the answer.
All values stay in 0..999.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sleepscale.data.sample import IGNORE_INDEX, Sample
from sleepscale.data.tokenizer import ByteTokenizer

VERSION = "1"
MAX_VALUE = 999
PEOPLE = (
    "Ada Ben Cal Dee Eli Fay Gus Hal Ivy Jon Kim Lea Max Mia Ned Oli Pam Quin Ray Sam "
    "Tia Uma Vic Wes Xan Yara Zed Amos Bea Cyd Dora Emil Finn Gia Hugo Iris Jude Kai Luz Moe"
).split()
ITEMS = ("apples", "pears", "marbles", "stamps", "coins", "books", "pencils", "shells", "cards", "plums")


@dataclasses.dataclass(frozen=True)
class Quantity:
    person: str
    item: str
    value: int
    sentence: str


class _OutOfNames(ValueError):
    """Every (person, item) pair is taken."""


class _Problem:
    """Quantities under construction, each (person, item) used once."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.unused = [(p, i) for p in PEOPLE for i in ITEMS]
        self.defined: list[Quantity] = []

    def _owner(self, item: str) -> str:
        choices = [index for index, (_, it) in enumerate(self.unused) if it == item]
        if not choices:
            raise _OutOfNames(f"every person already has {item}")
        return self.unused.pop(choices[int(self.rng.integers(len(choices)))])[0]

    def base(self, item: str) -> Quantity:
        value = int(self.rng.integers(1, 21))
        person = self._owner(item)
        return self._define(person, item, value, f"{person} has {value} {item}.")

    def derive(self, source: Quantity) -> Quantity:
        """A new quantity computed from `source` by one operation (sometimes with a second quantity)."""
        rng, item = self.rng, source.item
        options = ["more", "sum"]
        if source.value >= 1:
            options.append("fewer")
        if 2 * source.value <= MAX_VALUE:
            options.append("times")
        while True:
            operation = options[int(rng.integers(len(options)))]
            if operation == "sum":
                partners = [q for q in self.defined if q.item == item and q is not source]
                other = partners[int(rng.integers(len(partners)))] if partners and rng.random() < 0.5 else self.base(item)
                value = source.value + other.value
                template = "{P} has as many {item} as {Q} and {R} together."
            else:
                c = {
                    "more": lambda: int(rng.integers(1, 11)),
                    "fewer": lambda: int(rng.integers(1, min(10, source.value) + 1)),
                    "times": lambda: int(rng.integers(2, 4)),
                }[operation]()
                value = {"more": source.value + c, "fewer": source.value - c, "times": source.value * c}[operation]
                template = {
                    "more": f"{{P}} has {c} more {{item}} than {{Q}}.",
                    "fewer": f"{{P}} has {c} fewer {{item}} than {{Q}}.",
                    "times": f"{{P}} has {c} times as many {{item}} as {{Q}}.",
                }[operation]
                other = None
            if value <= MAX_VALUE:
                break
            options.remove(operation)  # "fewer" always fits, so this ends
        person = self._owner(item)
        sentence = template.format(P=person, item=item, Q=source.person, R=other.person if other else "")
        return self._define(person, item, value, sentence)

    def _define(self, person: str, item: str, value: int, sentence: str) -> Quantity:
        quantity = Quantity(person, item, value, sentence)
        self.defined.append(quantity)
        return quantity


class MathTask:
    name = "math"

    def __init__(self, ops_values=(2, 4, 6, 8), length: int = 2048, tokenizer=None):
        if not ops_values or min(ops_values) < 1:
            raise ValueError("ops_values must be a non-empty list of operation counts >= 1")
        self.ops_values, self.sequence_length = [int(o) for o in ops_values], length
        self.tokenizer = tokenizer or ByteTokenizer()
        self.vocabulary = self.tokenizer

    def params(self) -> dict:
        return {"ops_values": self.ops_values, "length": self.sequence_length}

    def for_validation(self) -> MathTask:
        return self

    def sample(self, rng: np.random.Generator) -> Sample:
        ops = int(rng.choice(self.ops_values))
        problem = _Problem(rng)
        question = problem.base(ITEMS[int(rng.integers(len(ITEMS)))])
        for _ in range(ops):
            question = problem.derive(question)
        needed = len(problem.defined)
        header = f"Question: how many {question.item} does {question.person} have?\n"
        footer = "\nAnswer: "
        answer_ids = self.tokenizer.encode(str(question.value)) + [self.tokenizer.eos_id]
        budget = self.sequence_length - len(answer_ids)

        def cost(quantities):
            return sum(len(self.tokenizer.encode(" " + q.sentence)) for q in quantities)

        used = len(self.tokenizer.encode(header + footer)) + cost(problem.defined)
        if used > budget:
            raise ValueError(f"a {ops}-operation problem does not fit in length {self.sequence_length}; raise the length")
        while True:  # distractors, until the next one would not fit
            before = len(problem.defined)
            try:
                if rng.random() < 0.3:
                    problem.base(ITEMS[int(rng.integers(len(ITEMS)))])
                else:
                    problem.derive(problem.defined[int(rng.integers(before))])
            except _OutOfNames:
                del problem.defined[before:]
                break
            extra = cost(problem.defined[before:])
            if used + extra > budget:
                del problem.defined[before:]
                break
            used += extra
        while True:  # a subword tokenizer may merge across sentences: drop the latest distractors until it fits
            sentences = [q.sentence for q in problem.defined]
            order = rng.permutation(len(sentences))
            ids = self.tokenizer.encode(header + " ".join(sentences[i] for i in order) + footer)
            if len(ids) <= budget or len(problem.defined) == needed:
                break
            problem.defined.pop()  # the latest is never referred to by an earlier one
        if len(ids) > budget:
            raise ValueError(f"a {ops}-operation problem does not fit in length {self.sequence_length}; raise the length")

        input_ids = np.full(self.sequence_length, self.tokenizer.pad_id)
        targets = np.full(self.sequence_length, IGNORE_INDEX)
        input_ids[: len(ids) + len(answer_ids)] = ids + answer_ids
        targets[len(ids) - 1 : len(ids) - 1 + len(answer_ids)] = answer_ids
        meta = {"task": self.name, "difficulty": {"ops": ops}, "answer": question.value, "distractors": len(problem.defined) - needed}
        return Sample(input_ids, targets, meta)
