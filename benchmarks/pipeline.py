"""Pipeline parallelism with sleep on the static schedule: the bubble (idle fraction per stage), the
bytes between stages and the bytes saved for backward per stage, for M micro-batches and N passes,
next to the analytic values.

    torchrun --nproc_per_node P benchmarks/pipeline.py [--micro-batches 2 4 8] [--passes 1 2 4]

Each of the P processes is one stage of 2 Gated DeltaNet blocks; the loop is the whole stack, so
every pass visits every stage and loops back from the last to the first. One step is
`sleepscale.parallel.pipeline.run_step` (forward and a backward per traversal, at most P
micro-batches holding activations).

Idle fraction: the time a stage waits for its transfers (blocked on another stage), over the step's
wall time; mean over stages and measured steps. Analytic: every micro-batch needs S = (W-1) N + 1
traversals (the wake pass of W windows and N-1 sleep passes over the W-1 evicted ones), each a
forward and a backward op per stage, in a chain that visits the stages in a ring; with the pipe
full but for the fill and drain of each direction:

    ideal idle = (P-1) / (M S + P-1)                 (M >= P)

"simulated" is the idle fraction of the static schedule run by `simulate` with a backward op costing
2 forward ops and free transfers (what run_step would idle if ops took exactly those times);
"schedule" counts the empty slots of its grid of ticks (unit-time ops; the ticks only order the
ops, so this is no prediction of time).

Bytes: one hidden state [B, L, H] per transfer. A window's wake pass crosses P-1 stage boundaries,
each sleep pass P (the loop-back included); backward sends one gradient per forward transfer:

    bytes per step = 2 M [W (P-1) + (W-1)(N-1) P] B L H x 4 bytes (fp32)

Saved: the most bytes saved for backward (saved_tensors_hooks) alive at once on a stage.

On a CPU machine with fewer cores than processes the stages time-share cores; the idle fraction is
a ratio of times within one run and stays comparable.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from sleepscale.config import validate
from sleepscale.model import build_model
from sleepscale.parallel.groups import init_parallel_groups
from sleepscale.parallel.pipeline import run_step
from sleepscale.parallel.pipeline_schedule import build_schedule, simulate, traversals
from sleepscale.parallel.pipeline_stage import PipelineStage
from sleepscale.plan import make_plan


def analytic_bytes(stages, micro_batches, passes, windows, batch, window, hidden) -> int:
    transfers = windows * (stages - 1) + (windows - 1) * (passes - 1) * stages
    return 2 * micro_batches * transfers * batch * window * hidden * 4


class SavedBytes:
    """The most bytes saved for backward alive at once."""

    def __init__(self):
        self.alive, self.peak = {}, 0

    def pack(self, tensor):
        key = object()
        self.alive[key] = tensor.numel() * tensor.element_size()
        self.peak = max(self.peak, sum(self.alive.values()))
        return key, tensor

    def unpack(self, packed):
        key, tensor = packed
        self.alive.pop(key, None)
        return tensor


def measure(args, groups, micro_batches: int, passes: int) -> dict:
    stages = groups.pipeline.size()
    config = validate(
        {
            "model": {
                "vocab_size": 64,
                "hidden_size": args.hidden,
                "pattern": "|".join(["GG"] * stages),
                "intermediate_size": 2 * args.hidden,
                "gdn": {"num_heads": 4},
            },
            "sleep": {"window": args.window, "passes": passes, "checkpoint": "pass"},
            "train": {"steps": 1},
            "parallel": {"pipeline": stages},
        }
    )
    stage = PipelineStage(build_model(config.model), config.model.stage_ranges, groups.pipeline.rank())
    in_flight = args.in_flight or stages
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, 64, (args.batch, args.window * args.windows), generator=generator)
        for _ in range(micro_batches)
    ]
    plan = make_plan(
        config.sleep, args.batch, args.window * args.windows, len(config.model.blocks), range(*config.model.loop_range)
    )

    def step(saved: SavedBytes | None = None):
        start = time.perf_counter()
        if saved is None:
            out = run_step(
                stage, groups.pipeline, [plan] * micro_batches, batches, batches, args.window, in_flight=in_flight
            )
        else:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                out = run_step(
                    stage, groups.pipeline, [plan] * micro_batches, batches, batches, args.window, in_flight=in_flight
                )
        return time.perf_counter() - start, out.wait_seconds, out.sent_bytes

    step()  # warm-up
    saved = SavedBytes()
    step(saved)
    times = []
    for _ in range(args.steps):
        dist.barrier(group=groups.pipeline)
        times.append(step())
    seconds, waited, sent = (sum(column) for column in zip(*times))
    per_stage = [None] * stages
    dist.all_gather_object(
        per_stage, (waited / seconds, sent / args.steps, seconds / args.steps, saved.peak), group=groups.pipeline
    )
    slices = (args.windows - 1) * passes + 1
    schedule = build_schedule([traversals(plan, config.model.stage_ranges)] * micro_batches, stages, in_flight)
    return {
        "P": stages,
        "M": micro_batches,
        "N": passes,
        "S": slices,
        "idle": statistics.mean(r[0] for r in per_stage),
        "idle_max": max(r[0] for r in per_stage),
        "schedule": schedule.idle_fraction(),
        "simulated": simulate(schedule, 1.0, 2.0).idle_fraction(),
        "ideal": (stages - 1) / (micro_batches * slices + stages - 1),
        "bytes": sum(r[1] for r in per_stage),
        "step_ms": 1e3 * max(r[2] for r in per_stage),
        "bytes_formula": analytic_bytes(
            stages, micro_batches, passes, args.windows, args.batch, args.window, args.hidden
        ),
        "saved_mb": max(r[3] for r in per_stage) / 1e6,
        "in_flight": in_flight,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--in-flight", type=int, default=None, help="micro-batches holding activations at once (default P)"
    )
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    groups = init_parallel_groups(pipeline=dist.get_world_size())
    rows = [measure(args, groups, m, n) for m in args.micro_batches for n in args.passes]
    if dist.get_rank() == 0:
        print(
            f"{groups.pipeline.size()} stages x 2 GDN blocks, hidden "
            f"{args.hidden}; micro-batch {args.batch} x {args.windows} "
            f"windows of {args.window}; {args.steps} steps; at most {rows[0]['in_flight']} micro-batches in flight; "
            "idle = waiting for transfers / step time"
        )
        print(
            "\n| P | M | N | S | step ms | idle (mean) | idle (max "
            "stage) | simulated | schedule | ideal | MB sent | formula "
            "| saved MB (max stage) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        )
        for r in rows:
            print(
                f"| {r['P']} | {r['M']} | {r['N']} | {r['S']} | "
                f"{r['step_ms']:.0f} | {r['idle']:.3f} | {r['idle_max']:.3f} "
                f"| {r['simulated']:.3f} | {r['schedule']:.3f} | {r['ideal']:.3f} | {r['bytes'] / 1e6:.3f} "
                f"| {r['bytes_formula'] / 1e6:.3f} | {r['saved_mb']:.2f} |"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
