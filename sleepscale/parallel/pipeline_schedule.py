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

The planner asks only how idle a step of identical micro-batches is: `idle_fraction` answers what
`simulate(build_schedule(...))` would, exactly, without the ticks and simulating only up to the first
micro-batch whose entry repeats an earlier entry's state (a few groups of `in_flight`, not M).

Why our own schedule and not `torch.distributed.pipelining` or Megatron's or DeepSpeed's: they run
each micro-batch once through a fixed chain of stages, carrying one activation and no state. Sleep
re-enters the same stages N times per window, with recurrent state that must stay on its stage, and
N may change per step; unrolling passes into virtual stages would duplicate the state threading.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
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
    needs = _dependencies(micro_batches, backward)
    graph = _Graph(needs)
    order = _best_order(graph, stages, in_flight, forward_cost, backward_cost, priorities)
    return _schedule_of([graph.ops[i] for i in order], needs, stages)


def idle_fraction(
    walks: list[Traversal],
    micro_batches: int,
    stages: int,
    in_flight: int,
    forward_cost: float = 1.0,
    backward_cost: float = 2.0,
    priorities: tuple[str, ...] = tuple(PRIORITIES),
    budget: int | None = None,
) -> float | None:
    """`simulate(build_schedule([walks] * micro_batches, stages, in_flight, ...), forward_cost,
    backward_cost).idle_fraction()`: the planner's question, for a fraction of the time.

    Two shortcuts, both exact (`tests/test_pipeline_schedule.py` holds them to `simulate`):

    - no ticks: `simulate` runs each stage's ops in the order the list scheduler started them,
      each after the ops it needs, which is `_replay` of that order; so its makespan is the one
      `build_schedule` chose the order by, and a stage is busy for the sum of its ops' costs.
    - periodic steps: micro-batches enter in order, and a scheduler's decisions from the entry of
      one on depend only on the state then (what each micro-batch in flight has ready, running and
      done, at times relative to now; ranks compare times and micro-batch numbers only relatively;
      the ops not entered yet all wait since time 0 and rank as they did), and likewise `_replay`'s.
      `_list_schedule` records that state at each entry; once it recurs (entry e as entry e - d,
      the replay `shift` later), every later entry repeats it, so M micro-batches end `shift`
      later than M - d: the order is simulated for the fewest micro-batches with the same tail.
      A run that never repeats within its micro-batches is simulated whole.

    The costs must add up exactly in floating point (integers, as the defaults) for the result to
    equal `simulate`'s to the last bit; otherwise they agree up to rounding. `budget`: the most ops
    one list schedule may start before the answer is given up (None: the step is too long to simulate
    at that cost; `idle_lower_bound` bounds it)."""
    one = _identical(tuple(walks), 1)
    replay_cost = [forward_cost if op.kind == "F" else backward_cost for op in one.ops]
    # A run simulates whole micro-batches before any repeat (micro-batch in_flight enters once one has ended), and
    # `budget` ops are at most that many micro-batches' ops: only those are built; a run that ends them all
    # without a repeat, short of M, is over the budget too.
    simulated = micro_batches if budget is None else min(micro_batches, budget // len(one.ops) + 1)
    if simulated < min(micro_batches, in_flight + 1):
        return None
    makespans = []
    for cost, priority in _variants(forward_cost, backward_cost, priorities, in_flight):
        remaining = _remaining(one, [cost[op.kind] for op in one.ops]) * simulated  # a micro-batch's own
        graph = _identical(tuple(walks), simulated)
        found = _list_schedule(graph, stages, in_flight, cost, priority, remaining, replay_cost * simulated, budget)
        if found is None or (simulated < micro_batches and not isinstance(found, _Period)):
            return None
        if isinstance(found, _Period):  # M micro-batches end `shift` later than M - length
            repeats = (micro_batches - found.first - 1) // found.length
            graph = _identical(tuple(walks), micro_batches - repeats * found.length)
            order = _list_schedule(graph, stages, in_flight, cost, priority, remaining)
            makespans.append(
                _replay(order, graph, stages, replay_cost * (len(graph.ops) // len(one.ops))) + repeats * found.shift
            )
        else:
            makespans.append(_replay(found, graph, stages, replay_cost * micro_batches))
    busy = sum(replay_cost) * micro_batches
    return 1 - busy / (stages * min(makespans))


def idle_lower_bound(
    walks: list[Traversal],
    micro_batches: int,
    stages: int,
    forward_cost: float = 1.0,
    backward_cost: float = 2.0,
) -> float:
    """The least idle fraction any schedule of `micro_batches` micro-batches of `walks` can have (what
    `idle_fraction` answers is at least this): a step lasts at least as long as its busiest stage
    works and as a micro-batch's critical path, whatever the micro-batches in flight. (Not
    ceil(M / in_flight) critical paths: the order `simulate` replays keeps the in-flight limit only
    as its list scheduler timed it, so that bound need not hold for it.)"""
    one = _identical(tuple(walks), 1)
    cost = [forward_cost if op.kind == "F" else backward_cost for op in one.ops]
    busy = [0.0] * stages
    for op, c in zip(one.ops, cost):
        busy[op.stage] += c * micro_batches
    critical_path = max(_remaining(one, cost))
    shortest = max(max(busy), critical_path)
    return 1 - sum(busy) / (stages * shortest)


@functools.lru_cache(maxsize=4)
def _identical(walks: tuple[Traversal, ...], micro_batches: int) -> _Graph:
    """The graph of `micro_batches` micro-batches of `walks` each, as `_Graph(_dependencies(...))`
    numbers it (micro-batch by micro-batch), one micro-batch's built and repeated."""
    if micro_batches == 1:
        return _Graph(_dependencies([list(walks)], True))
    one = _identical(walks, 1)
    size = len(one.ops)
    graph = _Graph({})
    graph.ops = [Op(op.kind, m, op.traversal, op.stage) for m in range(micro_batches) for op in one.ops]
    graph.needs = [[n + m * size for n in needs] for m in range(micro_batches) for needs in one.needs]
    graph.dependents = [
        [d + m * size for d in dependents] for m in range(micro_batches) for dependents in one.dependents
    ]
    return graph


@dataclasses.dataclass(frozen=True)
class _Period:
    """Entry `first + length` of a micro-batch repeats the scheduler's and the replay's state at entry
    `first`, with the replay `shift` later."""

    first: int
    length: int
    shift: float


class _Graph:
    """The ops of a step numbered 0.. (in `needs`' order), with the numbers of the ops each needs
    and of the ops that need it: the schedulers below work on numbers, not on hashed `Op`s."""

    def __init__(self, needs: dict[Op, list[Op]]):
        self.ops = list(needs)
        number = {op: i for i, op in enumerate(self.ops)}
        self.needs = [[number[need] for need in needs[op]] for op in self.ops]
        self.dependents: list[list[int]] = [[] for _ in self.ops]
        for i, inputs in enumerate(self.needs):
            for need in inputs:
                self.dependents[need].append(i)

    @functools.cached_property
    def other_stage_dependents(self) -> list[int]:
        """Per op: how many of its dependents run on another stage."""
        return [sum(self.ops[d].stage != op.stage for d in ds) for op, ds in zip(self.ops, self.dependents)]


def _best_order(
    graph: _Graph,
    stages: int,
    in_flight: int,
    forward_cost: float,
    backward_cost: float,
    priorities: tuple[str, ...],
) -> list[int]:
    """The order (op numbers) `build_schedule` keeps: of `_variants`' list schedules, the one
    `_replay` ends first with the true costs (the earliest tried on ties)."""
    costed = [forward_cost if op.kind == "F" else backward_cost for op in graph.ops]
    best, best_time, remaining = None, None, {}
    for cost, priority in _variants(forward_cost, backward_cost, priorities, in_flight):
        key = (cost["F"], cost["B"])
        if key not in remaining:
            remaining[key] = _remaining(graph, [cost[op.kind] for op in graph.ops])
        started = _list_schedule(graph, stages, in_flight, cost, priority, remaining[key])
        time = _replay(started, graph, stages, costed)
        if best is None or time < best_time:
            best, best_time = started, time
    return best


def _variants(
    forward_cost: float, backward_cost: float, priorities: tuple[str, ...], in_flight: int
) -> list[tuple[dict[str, float], Callable]]:
    """The list schedules `build_schedule` tries, in order: (op costs, priority) for each of
    `priorities` with the true costs, then with unit time."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    if not (forward_cost > 0 and backward_cost > 0):
        raise ValueError(f"op costs must be > 0, got forward {forward_cost} and backward {backward_cost}")
    if not priorities or any(name not in PRIORITIES for name in priorities):
        raise ValueError(f"priorities must be names from {sorted(PRIORITIES)}, got {priorities}")
    return [
        ({"F": costs[0], "B": costs[1]}, PRIORITIES[name])
        for costs in dict.fromkeys([(forward_cost, backward_cost), (1.0, 1.0)])
        for name in priorities
    ]


def _remaining(graph: _Graph, cost: list[float]) -> list[float]:
    """Per op: the costliest chain of ops from it (itself included) to the end of the step."""
    unmet = [len(inputs) for inputs in graph.needs]
    order = [i for i, count in enumerate(unmet) if count == 0]
    for i in order:  # grows while it is walked: a topological order
        for dependent in graph.dependents[i]:
            unmet[dependent] -= 1
            if unmet[dependent] == 0:
                order.append(dependent)
    remaining = [0.0] * len(unmet)
    for i in reversed(order):
        remaining[i] = cost[i] + max((remaining[d] for d in graph.dependents[i]), default=0.0)
    return remaining


def _list_schedule(
    graph: _Graph,
    stages: int,
    in_flight: int,
    cost: dict[str, float],
    priority: Callable[[Op, float, bool, float], tuple],
    remaining: list[float],
    replay_cost: list[float] | None = None,
    budget: int | None = None,
) -> list[int] | _Period | None:
    """The ops in the order an event-driven list scheduler starts them: whenever a stage is free, it
    starts the ready op that `priority` ranks first (an op of a micro-batch that has not entered the
    pipe only while fewer than `in_flight` micro-batches hold activations); an op is ready when the
    ops it needs have finished, `cost[kind]` after they started. A micro-batch stops holding
    activations when its last op finishes.

    Each stage keeps its ready ops in two heaps by rank: those of micro-batches in flight, and those
    of micro-batches not yet entered (only their first ops: nothing of theirs has run). Ranks are
    distinct (they end in the op's kind, micro-batch and traversal, and a stage holds one op of each),
    so the heaps start exactly the op a scan of all ready ops would.

    With `replay_cost` (per op), it also replays the order as it grows (`_replay`) and, right after a
    micro-batch enters, records the state both are in (`idle_fraction`); the first time a state
    recurs it returns the `_Period` instead of the order. A micro-batch's done ops are those not
    reachable from its ready and running ops, so those, the replay's stage free times and the
    replay's ends of ops that an op on another stage still waits for say the whole state. None:
    more than `budget` ops started without a repeat."""
    ops = graph.ops
    unmet = [len(inputs) for inputs in graph.needs]
    ops_left: dict[int, int] = defaultdict(int)  # micro-batch -> its ops not yet finished
    for op in ops:
        ops_left[op.micro_batch] += 1
    in_pipe: list[list[tuple[tuple, int]]] = [[] for _ in range(stages)]  # per stage: (rank, op) of entered ones
    new: list[list[tuple[tuple, int]]] = [[] for _ in range(stages)]  # per stage: (rank, op) of not entered ones
    first_ops: dict[int, list[int]] = defaultdict(list)  # micro-batch -> its ops ready at the start
    for i, count in enumerate(unmet):
        if count == 0:
            op = ops[i]
            first_ops[op.micro_batch].append(i)
            heapq.heappush(new[op.stage], (priority(op, 0.0, False, remaining[i]), i))
    entered: set[int] = set()
    holding, now, started = 0, 0.0, []
    running: list[tuple[float, int, int]] = []  # heap of (finish time, stage, op)
    busy = [False] * stages
    if replay_cost is not None:
        ready_at: dict[int, float] = {}  # ready ops of micro-batches in flight -> when they became ready
        replay_free, replay_end = [0.0] * stages, [0.0] * len(ops)
        # per op: its dependents on other stages not yet replayed (one on its own stage starts after the stage is
        # free, so after the op's end: only the stage's free time matters to it)
        unstarted_dependents = list(graph.other_stage_dependents)
        still_needed: set[int] = set()  # replayed ops with a dependent on another stage not yet replayed
        seen: dict[tuple, tuple[int, float]] = {}  # state -> (micro-batch entering, replay time)

    def make_ready(i: int, at: float) -> None:
        heapq.heappush(in_pipe[ops[i].stage], (priority(ops[i], at, True, remaining[i]), i))
        if replay_cost is not None:
            ready_at[i] = at

    while True:
        for stage in range(stages):
            if busy[stage]:
                continue
            waiting, fresh = in_pipe[stage], new[stage]
            heap = waiting
            if holding < in_flight:
                while fresh and ops[fresh[0][1]].micro_batch in entered:  # entered since: in `in_pipe` now
                    heapq.heappop(fresh)
                if fresh and (not waiting or fresh[0][0] < waiting[0][0]):
                    heap = fresh
            if not heap:
                continue
            _, i = heapq.heappop(heap)
            micro_batch = ops[i].micro_batch
            entering = micro_batch not in entered
            if entering:
                entered.add(micro_batch)
                holding += 1
                for j in first_ops[micro_batch]:  # its other first ops now rank as in flight
                    if j != i:
                        make_ready(j, 0.0)
            started.append(i)
            busy[stage] = True
            heapq.heappush(running, (now + cost[ops[i].kind], stage, i))
            if replay_cost is None:
                continue
            if budget is not None and len(started) > budget:
                return None
            ready_at.pop(i, None)
            needs = graph.needs[i]
            replay_end[i] = replay_free[stage] = (
                max([replay_free[stage]] + [replay_end[n] for n in needs]) + replay_cost[i]
            )
            for need in needs:
                if ops[need].stage != stage:
                    unstarted_dependents[need] -= 1
                    if not unstarted_dependents[need]:
                        still_needed.discard(need)
            if unstarted_dependents[i]:
                still_needed.add(i)
            if entering:
                base = replay_end[i]

                def relative(j: int, tag: str, time: float) -> tuple:
                    return (ops[j].micro_batch - micro_batch, ops[j].kind, ops[j].traversal, ops[j].stage, tag, time)

                state = (
                    len(entered) < len(first_ops),
                    tuple(free - base for free in replay_free),
                    tuple(
                        sorted(
                            [relative(j, "ready", at - now) for j, at in ready_at.items()]
                            + [relative(j, "running", end - now) for end, _, j in running]
                            + [relative(j, "replayed", replay_end[j] - base) for j in still_needed]
                        )
                    ),
                )
                if state in seen:
                    first, then = seen[state]
                    return _Period(first, micro_batch - first, base - then)
                seen[state] = (micro_batch, base)
        if not running:
            break
        now = running[0][0]
        while running and running[0][0] == now:
            _, stage, i = heapq.heappop(running)
            busy[stage] = False
            micro_batch = ops[i].micro_batch
            ops_left[micro_batch] -= 1
            holding -= ops_left[micro_batch] == 0
            for dependent in graph.dependents[i]:
                unmet[dependent] -= 1
                if unmet[dependent] == 0:
                    make_ready(dependent, now)
    if len(started) < len(ops):
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


def _replay(order: list[int], graph: _Graph, stages: int, cost: list[float]) -> float:
    """When `simulate` would end the ops `order` numbers (each after the ops it needs; per stage, in
    program order), transfers instant."""
    free, end = [0.0] * stages, [0.0] * len(graph.ops)
    ops, needs = graph.ops, graph.needs
    for i in order:
        stage = ops[i].stage
        end[i] = free[stage] = max([free[stage]] + [end[need] for need in needs[i]]) + cost[i]
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
