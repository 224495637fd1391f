"""Pipeline parallelism with sleep: the bubble (idle fraction per stage) and the bytes between stages
per training step, for M micro-batches and N passes, next to the analytic values.

    torchrun --nproc_per_node P benchmarks/pipeline.py [--micro-batches 1 2 4] [--passes 1 2 4]

Each of the P processes is one stage of 2 Gated DeltaNet blocks; the loop is the whole stack, so
every pass visits every stage and loops back from the last to the first. One step is the forward of
M micro-batches (run as lanes that interleave, `sleepscale.parallel.pipeline`) and one backward.

Idle fraction: the time a stage is blocked waiting for another stage (forward receives and backward
gradient receives), over the step's wall time; mean over stages and measured steps. Analytic: every
micro-batch needs S = (W-1) N + 1 stage passes per stage (the wake pass of W windows and N-1 sleep
passes over the W-1 evicted ones), in a chain that visits the stages in a ring. With lanes offset by
one stage the pipe is full but for the fill and drain, so a step takes S max(M, P) + min(M, P) - 1
slots of which each stage works M S:

    idle = 1 - M S / (S max(M, P) + min(M, P) - 1)      = (P-1) / (M S + P-1) when M >= P

Bytes: one hidden state [B, L, H] per transfer. A window's wake pass crosses P-1 stage boundaries,
each sleep pass P (the loop-back included); backward sends one gradient per forward transfer:

    bytes per step = 2 M [W (P-1) + (W-1)(N-1) P] B L H x 4 bytes (fp32)

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
from sleepscale.parallel.pipeline import PipelineStage, lane_groups
from sleepscale.plan import SleepPlan, make_plan
from sleepscale.sleep import sleep_forward


def analytic_idle(plan: SleepPlan, stage_ranges: list[range], micro_batches: int) -> float:
    """Idle fraction of the ideal schedule of `micro_batches` micro-batches, each run as `plan`, over
    stages holding `stage_ranges` of the blocks: unit-time stage passes (one pass's visit to one
    stage), each stage running the one that became ready first (ties: lowest micro-batch), with the
    engine's dependencies: the hidden states from the stage before on the same pass (for a sleep
    pass's first stage, from the stage of the previous pass's last loop block), and the stage's
    states from its previous stage pass."""
    stage_of = {block: stage for stage, blocks in enumerate(stage_ranges) for block in blocks}
    tasks, deps = [], {}
    for m in range(micro_batches):
        last_on_stage = {}
        for window in plan.windows:
            loop_output = None
            for planned in window.passes:
                hidden = loop_output  # a window's wake pass starts from the embedding
                blocks = [block for blocks in (*planned.blocks, planned.readout or range(0)) for block in blocks]
                for s in dict.fromkeys(stage_of[block] for block in blocks):  # stages in the order the pass visits them
                    task = (m, window.index, planned.number, s)
                    tasks.append(task)
                    deps[task] = [d for d in (hidden, last_on_stage.get(s)) if d is not None]
                    hidden = last_on_stage[s] = task
                loop_output = (m, window.index, planned.number, stage_of[plan.loop[-1]])
    done, ready_since, time_step = {}, {}, 0
    stages = len(stage_ranges)
    while len(done) < len(tasks):
        for s in range(stages):
            ready = [t for t in tasks if t[3] == s and t not in done and all(done.get(d, time_step) < time_step for d in deps[t])]
            for task in ready:
                ready_since.setdefault(task, time_step)
            if ready:
                done[min(ready, key=lambda t: (ready_since[t], t))] = time_step
        time_step += 1
    return 1 - (len(tasks) / stages) / time_step


def analytic_bytes(stages, micro_batches, passes, windows, batch, window, hidden) -> int:
    transfers = windows * (stages - 1) + (windows - 1) * (passes - 1) * stages
    return 2 * micro_batches * transfers * batch * window * hidden * 4


class SentBytes:
    """Counts the payload of every point-to-point send (forward hiddens and backward gradients)."""

    def __init__(self):
        self.bytes, self._isend = 0, dist.isend

    def __enter__(self):
        def counted(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._isend(tensor, *args, **kwargs)
        dist.isend = counted
        return self

    def __exit__(self, *failure):
        dist.isend = self._isend


def measure(args, groups, lanes, micro_batches: int, passes: int) -> dict:
    stages = groups.pipeline.size()
    config = validate({
        "model": {"vocab_size": 64, "hidden_size": args.hidden, "pattern": "|".join(["GG"] * stages), "intermediate_size": 2 * args.hidden,
                  "gdn": {"num_heads": 4}},
        "sleep": {"window": args.window, "passes": passes, "checkpoint": "pass"},
        "train": {"steps": 1},
        "parallel": {"pipeline": stages},
    })
    stage = PipelineStage(build_model(config.model), config.model.stage_ranges, groups.pipeline, lanes)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (args.batch, args.window * args.windows), generator=generator) for _ in range(micro_batches)]

    def step() -> tuple[float, float, float, float]:
        """(forward seconds, forward idle seconds, backward seconds, backward idle seconds)"""
        stage.wait_seconds, start = 0.0, time.perf_counter()
        outs = stage.run_micro_batches([lambda ids=ids: sleep_forward(stage, ids, config.sleep, targets=ids, return_logits=False)
                                        for ids in batches])
        forward, forward_idle = time.perf_counter() - start, stage.wait_seconds
        stage.wait_seconds, start = 0.0, time.perf_counter()
        stage.backward_root(sum(out.loss for out in outs) / micro_batches).backward()
        stage.wait_for_sends()
        return forward, forward_idle, time.perf_counter() - start, stage.wait_seconds

    step()  # warm-up
    times, sent = [], SentBytes()
    for _ in range(args.steps):
        dist.barrier(group=groups.pipeline)
        with sent:
            times.append(step())
    forward, forward_idle, backward, backward_idle = (sum(column) for column in zip(*times))
    per_stage = [None] * stages
    dist.all_gather_object(per_stage, ((forward_idle + backward_idle) / (forward + backward), forward_idle / forward,
                                       backward_idle / backward, sent.bytes / args.steps, (forward + backward) / args.steps),
                           group=groups.pipeline)
    slices = (args.windows - 1) * passes + 1
    plan = make_plan(config.sleep, args.batch, args.window * args.windows, len(config.model.blocks), range(*config.model.loop_range))
    return {
        "P": stages, "M": micro_batches, "N": passes, "S": slices,
        "idle": statistics.mean(r[0] for r in per_stage), "idle_max": max(r[0] for r in per_stage),
        "forward_idle": statistics.mean(r[1] for r in per_stage), "backward_idle": statistics.mean(r[2] for r in per_stage),
        "analytic": analytic_idle(plan, config.model.stage_ranges, micro_batches),
        "bytes": sum(r[3] for r in per_stage), "step_ms": 1e3 * max(r[4] for r in per_stage),
        "bytes_formula": analytic_bytes(stages, micro_batches, passes, args.windows, args.batch, args.window, args.hidden),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    groups = init_parallel_groups(pipeline=dist.get_world_size())
    lanes = lane_groups(groups.pipeline, max(args.micro_batches))
    rows = [measure(args, groups, lanes, m, n) for m in args.micro_batches for n in args.passes]
    if dist.get_rank() == 0:
        print(f"{groups.pipeline.size()} stages x 2 GDN blocks, hidden {args.hidden}; micro-batch {args.batch} x {args.windows} "
              f"windows of {args.window}; {args.steps} steps; idle = blocked on another stage / step time")
        print("\n| P | M | N | S | step ms | idle (mean) | idle (max stage) | forward idle | backward idle | analytic | MB sent | formula |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['P']} | {r['M']} | {r['N']} | {r['S']} | {r['step_ms']:.0f} | {r['idle']:.3f} | {r['idle_max']:.3f} | {r['forward_idle']:.3f} "
                  f"| {r['backward_idle']:.3f} | {r['analytic']:.3f} "
                  f"| {r['bytes'] / 1e6:.3f} | {r['bytes_formula'] / 1e6:.3f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
