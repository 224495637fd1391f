"""A static pipeline schedule for sleeping models: every rank computes the same order of work.

A micro-batch crosses the pipeline many times per step. Each pass over a window is one *traversal*
of a run of consecutive stages: the wake pass goes from the embedding (stage 0) to the head (stage
P-1); a sleep pass goes from the stage of the first loop block to the stage of the last, starting
from the previous pass's loop output (`traversals` derives them from the sleep plan). States never
travel: a traversal on a stage continues from the states its predecessor on that stage left.

`build_schedule` orders every forward op F(m, t, s) (micro-batch m, traversal t, stage s) and every
backward op B(m, t, s) on each stage by a list scheduler run on the host, with a cost model: a
forward op takes `forward_cost`, a backward op `backward_cost` (default 1 and 2: a backward computes
the gradients of both the inputs and the weights), transfers are free. Whenever a stage is free it starts the ready
op it ranks first, and a micro-batch enters the pipe only while fewer than `in_flight` micro-batches
hold activations (1F1B-like: saved activations are bounded by `in_flight` micro-batches, not M).
No ranking wins everywhere, so it tries a few (`PRIORITIES`: the longest-waiting op; the longest
chain of work still behind an op, the critical path; a backward first, to free memory, then the
critical path; ops of micro-batches in flight before new ones), each also with unit-time ops, and
keeps the order that `simulate` finishes first. Every rank runs the same function on the same plan,
so no scheduling decision is communicated. A micro-batch's ops form nearly one chain, so with
`in_flight` = P each group of P micro-batches fills and drains the pipe on its own: the idle
fraction stays near the M = P value whatever M; 2P in flight brings it near (P-1) / (M S + P-1)
(S traversals per micro-batch).

The order is then written on a grid of ticks, one op per stage per tick, each op at the first tick
after its stage's previous op and the ops it needs. The hidden states (forward) and their gradients
(backward) that an op produces for another stage are transferred at the start of the next tick.
`Schedule.program(stage)` lists, per tick, the transfers a stage posts (sends and receives, in one
canonical order that both ends of a link share) and then the op it runs. Posting each tick's
transfers as one group and waiting for it before the op cannot deadlock: a group waits only for
peers' groups of the same tick, which wait only for groups of earlier ticks (`check_programs`
replays the programs to prove it for a given schedule).

Ticks fix only each stage's order and the transfers' order: `run_step` runs an op as soon as the
tensors it needs have arrived, so a step runs like a dataflow graph, which `simulate` replays with
op costs (its idle fraction, not the ticks' `Schedule.idle_fraction`, is the one to compare with a
measurement). Waiting for a tensor, `run_step` waits for the whole group that brought it; a group
that a stage receives in has a single peer, so that wait ends when the tensor's producer ends.

Why our own schedule and not `torch.distributed.pipelining` or Megatron's or DeepSpeed's: they run
each micro-batch once through a fixed chain of stages, carrying one activation and no state. Sleep
re-enters the same stages N times per window, with recurrent state that must stay on its stage, and
N may change per step; unrolling passes into virtual stages would duplicate the state threading.
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
from collections import defaultdict
from collections.abc import Callable
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
    needs: dict[Op, list[Op]] = dataclasses.field(default_factory=dict, repr=False)  # op -> ops whose outputs it needs

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
        """The empty slots of the grid of ticks. Ticks order the ops but are not time: `simulate`
        tells how long stages idle with op costs."""
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
        events = sorted(
            [(tick, 1) for tick in first_forward.values()]
            + [(last_backward.get(m, len(self.ticks)) + 1, -1) for m in first_forward]
        )
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
                inputs = (
                    [Op("F", m, t, stage - 1)]
                    if stage > walk.first
                    else ([Op("F", m, *walk.source)] if walk.source is not None else [])
                )
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


# How a stage ranks its ready ops, given (op, time it became ready, whether its micro-batch already
# holds activations, the longest chain of ops left after it, its own cost included).
PRIORITIES: dict[str, Callable[[Op, float, bool, float], tuple]] = {
    # the longest-waiting op, then a backward (it frees memory), then the lowest micro-batch
    "waited": lambda op, ready, entered, remaining: (ready, op.kind != "B", op.micro_batch, op.traversal),
    # the op with the most work still chained behind it (critical path), then the longest-waiting
    "critical": lambda op, ready, entered, remaining: (-remaining, ready, op.kind != "B", op.micro_batch, op.traversal),
    # a backward, then the critical path
    "backward-critical": lambda op, ready, entered, remaining: (
        op.kind != "B",
        -remaining,
        ready,
        op.micro_batch,
        op.traversal,
    ),
    # a micro-batch already in flight before a new one, then a backward, then the critical path
    "in-flight-critical": lambda op, ready, entered, remaining: (
        not entered,
        op.kind != "B",
        -remaining,
        ready,
        op.micro_batch,
        op.traversal,
    ),
}


def build_schedule(
    micro_batches: list[list[Traversal]],
    stages: int,
    in_flight: int,
    backward: bool = True,
    forward_cost: float = 1.0,
    backward_cost: float = 2.0,
    priorities: tuple[str, ...] = tuple(PRIORITIES),
) -> Schedule:
    """The schedule of one step: `micro_batches[m]` is micro-batch m's traversals; at most
    `in_flight` micro-batches hold activations at once (>= 1). `backward=False` schedules an
    evaluation (forward ops only). `forward_cost`, `backward_cost`: the time a forward and a
    backward op take (any unit). Each of `priorities` (names in `PRIORITIES`) orders the ops once
    with these costs and once as if every op took one tick; the order that `simulate` finishes
    first with these costs is kept (the earliest tried on ties). The unit-time list schedule alone:
    `backward_cost=1.0, priorities=("waited",)`."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    if not (forward_cost > 0 and backward_cost > 0):
        raise ValueError(f"op costs must be > 0, got forward {forward_cost} and backward {backward_cost}")
    if not priorities or any(name not in PRIORITIES for name in priorities):
        raise ValueError(f"priorities must be names from {sorted(PRIORITIES)}, got {priorities}")
    needs = _dependencies(micro_batches, backward)
    dependents: dict[Op, list[Op]] = defaultdict(list)
    for op, inputs in needs.items():
        for need in inputs:
            dependents[need].append(op)
    best, best_time = None, None
    for costs in dict.fromkeys([(forward_cost, backward_cost), (1.0, 1.0)]):  # as costed, then unit time
        cost = {"F": costs[0], "B": costs[1]}
        remaining = _remaining(needs, dependents, cost)
        for name in priorities:
            started = _list_schedule(needs, dependents, stages, in_flight, cost, PRIORITIES[name], remaining)
            time = _replay(started, needs, stages, {"F": forward_cost, "B": backward_cost})
            if best is None or time < best_time:
                best, best_time = started, time
    return _schedule_of(best, needs, stages)


def _remaining(needs: dict[Op, list[Op]], dependents: dict[Op, list[Op]], cost: dict[str, float]) -> dict[Op, float]:
    """Per op: the costliest chain of ops from it (itself included) to the end of the step."""
    unmet = {op: len(inputs) for op, inputs in needs.items()}
    order = [op for op, count in unmet.items() if count == 0]
    for op in order:  # grows while it is walked: a topological order
        for dependent in dependents[op]:
            unmet[dependent] -= 1
            if unmet[dependent] == 0:
                order.append(dependent)
    remaining: dict[Op, float] = {}
    for op in reversed(order):
        remaining[op] = cost[op.kind] + max((remaining[d] for d in dependents[op]), default=0.0)
    return remaining


def _list_schedule(
    needs: dict[Op, list[Op]],
    dependents: dict[Op, list[Op]],
    stages: int,
    in_flight: int,
    cost: dict[str, float],
    priority: Callable[[Op, float, bool, float], tuple],
    remaining: dict[Op, float],
) -> list[Op]:
    """The ops in the order an event-driven list scheduler starts them: whenever a stage is free, it
    starts the ready op that `priority` ranks first (an op of a micro-batch that has not entered the
    pipe only while fewer than `in_flight` micro-batches hold activations); an op is ready when the
    ops it needs have finished, `cost[kind]` after they started. A micro-batch stops holding
    activations when its last op finishes."""
    unmet = {op: len(inputs) for op, inputs in needs.items()}
    ops_left: dict[int, int] = defaultdict(int)  # micro-batch -> its ops not yet finished
    for op in needs:
        ops_left[op.micro_batch] += 1
    ready: list[dict[Op, float]] = [{} for _ in range(stages)]  # per stage: ready op -> when it became ready
    for op, count in unmet.items():
        if count == 0:
            ready[op.stage][op] = 0.0
    entered: set[int] = set()
    holding, now, started = 0, 0.0, []
    running: list[tuple[float, int, Op]] = []  # heap of (finish time, stage, op)
    busy = [False] * stages
    while True:
        for stage, waiting in enumerate(ready):
            allowed = [] if busy[stage] else [op for op in waiting if op.micro_batch in entered or holding < in_flight]
            if not allowed:
                continue
            op = min(allowed, key=lambda op: priority(op, waiting[op], op.micro_batch in entered, remaining[op]))
            if op.micro_batch not in entered:
                entered.add(op.micro_batch)
                holding += 1
            del waiting[op]
            started.append(op)
            busy[stage] = True
            heapq.heappush(running, (now + cost[op.kind], stage, op))
        if not running:
            break
        now = running[0][0]
        while running and running[0][0] == now:
            _, stage, op = heapq.heappop(running)
            busy[stage] = False
            ops_left[op.micro_batch] -= 1
            holding -= ops_left[op.micro_batch] == 0
            for dependent in dependents[op]:
                unmet[dependent] -= 1
                if unmet[dependent] == 0:
                    ready[dependent.stage][dependent] = now
    if len(started) < len(needs):
        raise RuntimeError("pipeline schedule stalled: no op can run (a dependency cycle)")
    return started


def _schedule_of(started: list[Op], needs: dict[Op, list[Op]], stages: int) -> Schedule:
    """The schedule that runs each stage's ops in the order of `started` (every op after the ops it
    needs): each op at the first tick after its stage's previous op and the ops it needs, where the
    group its outputs join has a single peer on every stage that receives in it. run_step waits
    for a whole group when an op needs one of its receives, so that wait ends with the op that
    produced the tensor, not with another stage's unrelated work."""
    consumers: dict[Op, set[int]] = defaultdict(set)  # op -> the other stages that need its output
    for op, inputs in needs.items():
        for need in inputs:
            if need.stage != op.stage:
                consumers[need].add(op.stage)
    peers: dict[tuple[int, int], set[int]] = defaultdict(set)  # (stage, tick) -> stages it exchanges with then
    receiving: set[tuple[int, int]] = set()  # (stage, tick): the stage receives at that tick

    def fits(op: Op, tick: int) -> bool:  # its outputs, sent at tick + 1, keep every receiving group single-peer
        sent, to = tick + 1, consumers[op]
        return not any(peers[stage, sent] - {op.stage} for stage in to) and (
            (op.stage, sent) not in receiving or len(peers[op.stage, sent] | to) <= 1
        )

    tick_of: dict[Op, int] = {}
    next_tick = [0] * stages
    ticks: list[dict[int, Op]] = []
    for op in started:
        tick = max([next_tick[op.stage]] + [tick_of[need] + 1 for need in needs[op]])
        while not fits(op, tick):
            tick += 1
        tick_of[op], next_tick[op.stage] = tick, tick + 1
        ticks += [{} for _ in range(tick + 1 - len(ticks))]
        ticks[tick][op.stage] = op
        for stage in consumers[op]:
            peers[op.stage, tick + 1].add(stage)
            peers[stage, tick + 1].add(op.stage)
            receiving.add((stage, tick + 1))
    transfers: list[set[Transfer]] = [set() for _ in range(len(ticks) + 1)]
    for op, inputs in needs.items():
        for need in inputs:
            if need.stage != op.stage:
                transfers[tick_of[need] + 1].add(Transfer(need, need.stage, op.stage))
    return Schedule(stages, ticks, [sorted(posted) for posted in transfers[: len(ticks)]], needs)


@dataclasses.dataclass
class SimulatedRun:
    """A schedule run with op costs (`simulate`)."""

    makespan: float  # when the last op ends
    busy: list[float]  # per stage: the time it computes
    start: dict[Op, float]  # when each op starts

    def idle_fraction(self) -> float:
        return 1 - sum(self.busy) / (len(self.busy) * self.makespan) if self.makespan else 0.0


def simulate(
    schedule: Schedule,
    forward_cost: float = 1.0,
    backward_cost: float = 2.0,
    transfer_latency: float = 0.0,
    whole_groups: bool = False,
) -> SimulatedRun:
    """`schedule` run as `sleepscale.parallel.pipeline.run_step` runs it, a forward op taking
    `forward_cost` and a backward op `backward_cost`: each stage runs its program's ops in order,
    each as soon as its previous op has ended and the ops whose outputs it needs have ended, plus
    `transfer_latency` for an output from another stage. Ticks order each stage's ops; they do not
    make a stage wait for a tick. `whole_groups`: an op that needs a received tensor also waits
    for the rest of the group that brought it, as run_step does: for every peer in that group to
    have posted its own group of that tick (ended its ops of earlier ticks)."""
    cost = {"F": forward_cost, "B": backward_cost}
    tick_of = {op: tick for tick, ops in enumerate(schedule.ticks) for op in ops.values()}
    free, busy = [0.0] * schedule.stages, [0.0] * schedule.stages
    done: list[list[tuple[int, float]]] = [[] for _ in range(schedule.stages)]  # per stage: (tick, end) of its ops
    start: dict[Op, float] = {}

    def posted(stage: int, tick: int) -> float:  # when `stage` has ended its ops of ticks before `tick`
        index = bisect.bisect_left(done[stage], (tick, float("-inf")))
        return done[stage][index - 1][1] if index else 0.0

    for tick, ops in enumerate(schedule.ticks):  # an op's inputs come from earlier ticks
        for stage, op in sorted(ops.items()):
            begin = free[stage]
            for need in schedule.needs[op]:
                begin = max(begin, start[need] + cost[need.kind] + (transfer_latency if need.stage != stage else 0.0))
                if whole_groups and need.stage != stage:
                    group = tick_of[need] + 1
                    for transfer in schedule.transfers[group]:
                        if stage in (transfer.source, transfer.destination):
                            peer = transfer.destination if transfer.source == stage else transfer.source
                            begin = max(begin, posted(peer, group))
            start[op], free[stage] = begin, begin + cost[op.kind]
            busy[stage] += cost[op.kind]
            done[stage].append((tick, free[stage]))
    return SimulatedRun(max(free), busy, start)


def _replay(ops: list[Op], needs: dict[Op, list[Op]], stages: int, cost: dict[str, float]) -> float:
    """When `simulate` would end `ops` (each after the ops it needs; per stage, in program order),
    transfers instant."""
    free, end = [0.0] * stages, {}
    for op in ops:
        end[op] = free[op.stage] = max([free[op.stage]] + [end[need] for need in needs[op]]) + cost[op.kind]
    return max(free)


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
                theirs = [
                    ("recv" if kind == "send" else "send", transfer)
                    for kind, p, transfer in programs[peer][position[peer]][0]
                    if p == stage
                ]
                if mine != theirs:
                    raise RuntimeError(f"stages {stage} and {peer} post {mine} and {theirs}: they do not pair up")
            if can:
                advancing.append(stage)
        if not advancing:
            raise RuntimeError(f"deadlock: stages at ticks {position}")
        for stage in advancing:
            position[stage] += 1
