"""A static pipeline schedule for sleeping models: every rank computes the same order of work.

A micro-batch crosses the pipeline many times per step. Each pass over a window is one *traversal*
of a run of consecutive stages: the wake pass goes from the embedding (stage 0) to the head (stage
P-1); a sleep pass goes from the stage of the first loop block to the stage of the last, starting
from the previous pass's loop output (`traversals` derives them from the sleep plan). States never
travel: a traversal on a stage continues from the states its predecessor on that stage left.

`build_schedule` places every forward op F(m, t, s) (micro-batch m, traversal t, stage s) and every
backward op B(m, t, s) on a grid of ticks, one op per stage per tick, by a list scheduler run on the
host: at each tick a stage runs the ready op it ranks first (a backward before a forward, so that
memory is freed as soon as possible, then the op that has waited longest, then the lowest
micro-batch), and a micro-batch enters the pipe only while fewer than `in_flight` micro-batches
hold activations (1F1B-like: saved activations are bounded by `in_flight` micro-batches, not M).
Every rank runs the same function on the same plan, so no scheduling decision is communicated.

The hidden states (forward) and their gradients (backward) that an op produces for another stage
are transferred at the start of the next tick. `Schedule.program(stage)` lists, per tick, the
transfers a stage posts (sends and receives, in one canonical order that both ends of a link share)
and then the op it runs. Posting each tick's transfers as one group and waiting for it before the
op cannot deadlock: a group waits only for peers' groups of the same tick, which wait only for
groups of earlier ticks (`check_programs` replays the programs to prove it for a given schedule).

Why our own schedule and not `torch.distributed.pipelining` or Megatron's or DeepSpeed's: they run
each micro-batch once through a fixed chain of stages, carrying one activation and no state. Sleep
re-enters the same stages N times per window, with recurrent state that must stay on its stage, and
N may change per step; unrolling passes into virtual stages would duplicate the state threading.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Literal

from sleepscale.plan import SleepPlan


@dataclasses.dataclass(frozen=True)
class Traversal:
    """One trip of a micro-batch's hidden states through stages first..last (one pass over a window)."""

    first: int
    last: int
    source: tuple[int, int] | None  # (traversal, stage) whose output is this one's input; None: the embedding
    grad: bool = True  # recorded by autograd (truncated backprop runs some sleep passes without it)
    window: int = 0  # the plan's window and pass (1: the wake pass) this traversal runs
    pass_number: int = 1


@dataclasses.dataclass(frozen=True, order=True)
class Op:
    kind: Literal["F", "B"]
    micro_batch: int
    traversal: int
    stage: int


@dataclasses.dataclass(frozen=True, order=True)
class Transfer:
    """A tensor `produced_by` an op on stage `source` that an op on stage `destination` needs: the
    hidden states (after a forward op) or their gradient (after a backward op)."""

    produced_by: Op
    source: int
    destination: int


def traversals(plan: SleepPlan, stages: list[range]) -> list[Traversal]:
    """The traversals of one micro-batch under `plan`, with blocks split into `stages` (block
    ranges, in order): per window the wake pass, then each sleep pass."""
    stage_of = {block: index for index, blocks in enumerate(stages) for block in blocks}
    loop_first, loop_last = stage_of[plan.loop.start], stage_of[plan.loop.stop - 1]
    found: list[Traversal] = []
    for window in plan.windows:
        found.append(Traversal(0, len(stages) - 1, None, True, window.index, 1))
        previous = (len(found) - 1, loop_last)
        for sleep_pass in window.sleep_passes:
            found.append(Traversal(loop_first, loop_last, previous, sleep_pass.grad, window.index, sleep_pass.number))
            previous = (len(found) - 1, loop_last)
    return found


@dataclasses.dataclass
class Schedule:
    stages: int
    ticks: list[dict[int, Op]]  # per tick: stage -> the op it runs
    transfers: list[list[Transfer]]  # per tick: transfers posted at its start (produced the tick before)

    def program(self, stage: int) -> list[tuple[list[tuple[str, int, Transfer]], Op | None]]:
        """Per tick: the transfers this stage posts, as ("send" | "recv", peer stage, transfer) in
        the order both ends of each link share, then the op it runs (None: idle)."""
        steps = []
        for tick, ops in enumerate(self.ticks):
            posted = []
            for transfer in self.transfers[tick]:  # already in canonical order
                if transfer.source == stage:
                    posted.append(("send", transfer.destination, transfer))
                elif transfer.destination == stage:
                    posted.append(("recv", transfer.source, transfer))
            steps.append((posted, ops.get(stage)))
        return steps

    def idle_fraction(self) -> float:
        busy = sum(len(ops) for ops in self.ticks)
        return 1 - busy / (self.stages * len(self.ticks))

    def peak_in_flight(self, stage: int) -> int:
        """The most micro-batches holding activations on `stage` at once (forward begun, backward not done)."""
        first_forward, last_backward = {}, {}
        for tick, ops in enumerate(self.ticks):
            op = ops.get(stage)
            if op is None:
                continue
            if op.kind == "F":
                first_forward.setdefault(op.micro_batch, tick)
            else:
                last_backward[op.micro_batch] = tick
        events = sorted([(tick, 1) for tick in first_forward.values()] +
                        [(last_backward.get(m, len(self.ticks)) + 1, -1) for m in first_forward])
        peak = alive = 0
        for _, change in events:
            alive += change
            peak = max(peak, alive)
        return peak


def _dependencies(micro_batches: list[list[Traversal]], backward: bool) -> dict[Op, list[Op]]:
    """Every op and the ops whose outputs it needs (within a stage, program order is also kept:
    a micro-batch's forward ops run in traversal order and its backward ops in reverse)."""
    needs: dict[Op, list[Op]] = {}
    for m, walks in enumerate(micro_batches):
        consumers = defaultdict(list)  # (traversal, stage) -> traversals that start from its output
        for t, walk in enumerate(walks):
            if walk.source is not None:
                consumers[walk.source].append(t)
        previous_on_stage: dict[int, Op] = {}
        for t, walk in enumerate(walks):
            for stage in range(walk.first, walk.last + 1):
                op = Op("F", m, t, stage)
                inputs = [Op("F", m, t, stage - 1)] if stage > walk.first else \
                    ([Op("F", m, *walk.source)] if walk.source is not None else [])
                if stage in previous_on_stage:
                    inputs.append(previous_on_stage[stage])  # the states it continues from
                needs[op] = inputs
                previous_on_stage[stage] = op
        if not backward:
            continue
        next_on_stage: dict[int, Op] = {}
        for t in reversed(range(len(walks))):
            walk = walks[t]
            if not walk.grad:
                continue
            for stage in reversed(range(walk.first, walk.last + 1)):
                op = Op("B", m, t, stage)
                inputs = [Op("F", m, t, stage)]
                if stage < walk.last:
                    inputs.append(Op("B", m, t, stage + 1))
                inputs += [Op("B", m, c, walks[c].first) for c in consumers[(t, stage)] if walks[c].grad]
                if stage in next_on_stage:
                    inputs.append(next_on_stage[stage])  # the gradient of the states it handed on
                needs[op] = inputs
                next_on_stage[stage] = op
    return needs


def build_schedule(micro_batches: list[list[Traversal]], stages: int, in_flight: int,
                   backward: bool = True) -> Schedule:
    """The schedule of one step: `micro_batches[m]` is micro-batch m's traversals; at most
    `in_flight` micro-batches hold activations at once (>= 1). `backward=False` schedules an
    evaluation (forward ops only)."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    needs = _dependencies(micro_batches, backward)
    dependents: dict[Op, list[Op]] = defaultdict(list)
    unmet = {op: len(inputs) for op, inputs in needs.items()}
    for op, inputs in needs.items():
        for need in inputs:
            dependents[need].append(op)
    ops_left = defaultdict(int)  # micro-batch -> its ops not yet run
    for op in needs:
        ops_left[op.micro_batch] += 1
    ready: dict[int, dict[Op, int]] = defaultdict(dict)  # stage -> ready op -> tick it became ready
    for op, count in unmet.items():
        if count == 0:
            ready[op.stage][op] = 0
    entered: set[int] = set()
    holding, done_at, ticks = 0, {}, []
    while len(done_at) < len(needs):
        tick = len(ticks)
        chosen: dict[int, Op] = {}
        for stage in sorted(ready):
            ranked = sorted(ready[stage], key=lambda op: (ready[stage][op], op.kind != "B", op.micro_batch, op.traversal))
            for op in ranked:
                if op.micro_batch not in entered:
                    if holding >= in_flight:
                        continue
                    entered.add(op.micro_batch)
                    holding += 1
                chosen[stage] = op
                break
        if not chosen:
            raise RuntimeError("pipeline schedule stalled: no op can run (a dependency cycle)")
        for op in chosen.values():
            del ready[op.stage][op]
            done_at[op] = tick
            ops_left[op.micro_batch] -= 1
            holding -= ops_left[op.micro_batch] == 0
            for dependent in dependents[op]:
                unmet[dependent] -= 1
                if unmet[dependent] == 0:
                    ready[dependent.stage][dependent] = tick + 1
        ticks.append(chosen)
    transfers: list[set[Transfer]] = [set() for _ in range(len(ticks) + 1)]
    for op, inputs in needs.items():
        for need in inputs:
            if need.stage != op.stage:
                transfers[done_at[need] + 1].add(Transfer(need, need.stage, op.stage))
    return Schedule(stages, ticks, [sorted(posted) for posted in transfers[: len(ticks)]])


def check_programs(schedule: Schedule) -> None:
    """Replays every stage's program with blocking groups: a stage's group of transfers completes
    only when every peer it touches is at its own group for the same tick and has posted the same
    transfers, in the same order, on their link. Raises if the programs would pair transfers
    differently or could deadlock."""
    programs = [schedule.program(stage) for stage in range(schedule.stages)]
    position = [0] * schedule.stages
    while any(p < len(program) for p, program in zip(position, programs)):
        advancing = []
        for stage, program in enumerate(programs):
            if position[stage] >= len(program):
                continue
            posted, _ = program[position[stage]]
            can = True
            for peer in sorted({peer for _, peer, _ in posted}):
                if position[peer] != position[stage]:
                    can = False
                    continue
                mine = [(kind, transfer) for kind, p, transfer in posted if p == peer]
                theirs = [("recv" if kind == "send" else "send", transfer)
                          for kind, p, transfer in programs[peer][position[peer]][0] if p == stage]
                if mine != theirs:
                    raise RuntimeError(f"stages {stage} and {peer} post {mine} and {theirs}: they do not pair up")
            if can:
                advancing.append(stage)
        if not advancing:
            raise RuntimeError(f"deadlock: stages at ticks {position}")
        for stage in advancing:
            position[stage] += 1
