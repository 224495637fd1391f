"""The static pipeline schedule (`sleepscale.parallel.pipeline_schedule`): traversals from the sleep plan,
and for random configurations a schedule that runs every op once after its inputs, keeps at most
`in_flight` micro-batches alive, and whose per-stage programs pair up on every link without
deadlock."""

import random

import pytest

from sleepscale.config import SleepConfig
from sleepscale.parallel.pipeline_schedule import Op, Traversal, build_schedule, check_programs, traversals
from sleepscale.plan import make_plan


def _plan(passes=3, windows=3, loop=range(0, 4), grad_passes=None, blocks=4):
    sleep = SleepConfig(window=8, passes=passes, checkpoint="none", grad_passes=grad_passes)
    return make_plan(sleep, 2, 8 * windows, blocks, loop)


def test_traversals_follow_the_sleep_plan():
    walks = traversals(_plan(passes=3, windows=3), [range(0, 2), range(2, 4)])
    # windows 0 and 1 are evicted and slept on (wake + 2 sleep passes); the last window only wakes
    assert walks == [Traversal(0, 1, None, True, 0, 1), Traversal(0, 1, (0, 1), True, 0, 2), Traversal(0, 1, (1, 1), True, 0, 3),
                     Traversal(0, 1, None, True, 1, 1), Traversal(0, 1, (3, 1), True, 1, 2), Traversal(0, 1, (4, 1), True, 1, 3),
                     Traversal(0, 1, None, True, 2, 1)]
    # a partial loop (blocks 2..3 on stages 1..2 of 3) sleeps on those stages only
    walks = traversals(_plan(passes=2, windows=2, loop=range(2, 4), blocks=6), [range(0, 2), range(2, 3), range(3, 6)])
    assert [(w.first, w.last, w.source) for w in walks] == [(0, 2, None), (1, 2, (0, 2)), (0, 2, None)]
    # truncated backprop: of N = 3 passes only the last carries gradient
    walks = traversals(_plan(passes=3, windows=2, grad_passes=1), [range(0, 2), range(2, 4)])
    assert [walk.grad for walk in walks] == [True, False, True, True]


def _random_case(seed):
    rng = random.Random(seed)
    stages = rng.choice([2, 3, 4])
    blocks = rng.randint(stages, 8)
    cuts = sorted(rng.sample(range(1, blocks), stages - 1))
    ranges = [range(a, b) for a, b in zip([0, *cuts], [*cuts, blocks])]
    start = rng.randrange(blocks)
    loop = range(start, rng.randint(start + 1, blocks))
    passes = rng.randint(1, 4)
    grad_passes = rng.choice([None, *range(1, passes + 1)])
    micro_batches = [traversals(_plan(passes=passes, windows=rng.randint(1, 4), loop=loop, grad_passes=grad_passes,
                                      blocks=blocks), ranges)
                     for _ in range(rng.randint(1, 8))]  # windows per micro-batch may differ
    return stages, micro_batches, rng.choice([stages, 2 * stages])


@pytest.mark.parametrize("seed", range(40))
def test_random_schedules_run_every_op_once_after_its_inputs_and_pair_up_on_every_link(seed):
    stages, micro_batches, in_flight = _random_case(seed)
    schedule = build_schedule(micro_batches, stages, in_flight)
    done_at = {}
    for tick, ops in enumerate(schedule.ticks):
        for stage, op in ops.items():
            assert op.stage == stage and op not in done_at
            done_at[op] = tick
    expected = {Op(kind, m, t, s) for m, walks in enumerate(micro_batches) for t, walk in enumerate(walks)
                for s in range(walk.first, walk.last + 1) for kind in ("F", "B") if kind == "F" or walk.grad}
    assert set(done_at) == expected
    for tick, posted in enumerate(schedule.transfers):
        for transfer in posted:  # produced the tick before it is posted, consumed after
            assert done_at[transfer.produced_by] == tick - 1 and transfer.source != transfer.destination
    for m, walks in enumerate(micro_batches):  # the hidden states go forward, their gradients back
        for t, walk in enumerate(walks):
            for s in range(walk.first + 1, walk.last + 1):
                assert done_at[Op("F", m, t, s - 1)] < done_at[Op("F", m, t, s)]
                if walk.grad:
                    assert done_at[Op("B", m, t, s)] < done_at[Op("B", m, t, s - 1)] and \
                        done_at[Op("F", m, t, s)] < done_at[Op("B", m, t, s)]
            if walk.source is not None:
                assert done_at[Op("F", m, *walk.source)] < done_at[Op("F", m, t, walk.first)]
    assert all(schedule.peak_in_flight(stage) <= in_flight for stage in range(stages))
    check_programs(schedule)


def test_programs_that_would_pair_transfers_differently_are_caught():
    """One end of a link posting a tick's two transfers on it (a hidden one way, a gradient the
    other) in the other order is what NCCL could deadlock on: the replay refuses it."""
    walks = traversals(_plan(passes=2, windows=3), [range(0, 2), range(2, 4)])
    schedule = build_schedule([walks] * 4, 2, in_flight=4)
    tick = next(t for t, posted in enumerate(schedule.transfers) if len(posted) >= 2)
    original = schedule.program

    def reordered(stage):
        program = original(stage)
        if stage == 1:
            posted, op = program[tick]
            program[tick] = (list(reversed(posted)), op)
        return program

    check_programs(schedule)
    schedule.program = reordered
    with pytest.raises(RuntimeError, match="do not pair up"):
        check_programs(schedule)


@pytest.mark.parametrize("passes", [1, 2, 4])
def test_activations_alive_are_bounded_by_in_flight_not_by_micro_batches(passes):
    walks = traversals(_plan(passes=passes, windows=4), [range(0, 2), range(2, 4)])
    few = build_schedule([walks] * 2, 2, in_flight=4)
    many = build_schedule([walks] * 8, 2, in_flight=4)
    assert max(few.peak_in_flight(s) for s in range(2)) == 2
    assert max(many.peak_in_flight(s) for s in range(2)) == 4  # at most 2x the M = P case, whatever M is
    ideal = (2 - 1) / (8 * len(walks) + 2 - 1)
    assert many.idle_fraction() < 3 * ideal  # measured in benchmarks/pipeline.py against the wall clock
