"""ZeRO-3 parameter all-gather bytes per training step against N, on CPU with gloo.

    torchrun --nproc_per_node 2 benchmarks/zero3_gather.py [--passes 1 2 4] [--checkpoint none pass]

For each (checkpoint, N) the script builds the model and engine as the trainer does
(`build_rank_model`, which partitions the model under `deepspeed.zero.Init`, then `SleepingModel`
and `build_stage_engine`, whose DeepSpeed settings are `deepspeed_config`), and runs `--steps` training
steps as `_run_steps` runs them (`micro_batch`, the parallelism's `forward_backward`, the update guard,
`engine.step()`), on fixed random batches.

Counted: every all-gather DeepSpeed issues (its communication backend's `all_gather_into_tensor`,
`all_gather`, `all_gather_base`, `all_gather_coalesced`), as the bytes of the gathered output, i.e.
of the whole (padded) parameters made available on a rank; per step, split into the forward
(inside `engine(...)`), the backward (inside `engine.backward(...)`, which under `checkpoint: pass`
includes the recomputed forward) and the optimizer step (none expected: ZeRO-3's step updates the
partitions in place). Also reported: the most parameter elements gathered at once on a rank
(after each fetch), against the model's total, which is what keeping parameters gathered costs.

DeepSpeed's parameter coordinator records the order of modules over the first forward + backward
(a "trace"); from the second on it releases, after each module, only the parameters that are not
used again within `stage3_max_reuse_distance` elements of upcoming module parameters. So step 1
(recording) gathers each module's parameters at every use; the steady-state steps (the last is
printed) follow the trace. `--zero KEY=VALUE` overrides a `zero_optimization` setting, to try
others: e.g. `stage3_max_reuse_distance=1000000000` is what the trainer set before it tied the
distance to the loop, and `stage3_prefetch_bucket_size=0` switches off the prefetcher, which on a
model this small looks ahead over the whole step and so keeps every parameter gathered whatever the
reuse distance (its 5e7-element bucket is a fraction of one block of a real model); with it off,
only the reuse distance decides what stays gathered, as at scale.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
import torch.distributed as dist

from sleepscale.config import validate
from sleepscale.model.hybrid import HybridLM
from sleepscale.parallel import rank_model as rank_model_module
from sleepscale.parallel import zero as zero_module
from sleepscale.parallel.distributed import setup_distributed
from sleepscale.parallel.parallelism import Parallelism, micro_batch
from sleepscale.parallel.rank_model import build_rank_model
from sleepscale.sleep import IGNORE_INDEX
from sleepscale.train.spikes import SpikeGuard
from sleepscale.train.step import UpdateGuard
from sleepscale.train.trainer import TrainingStage, build_stage_engine

GATHERS = ("all_gather_into_tensor", "all_gather", "all_gather_base", "all_gather_coalesced")


class GatherCounter:
    """Counts the output bytes of DeepSpeed's all-gathers, by phase (set by `phase`)."""

    def __init__(self):
        import deepspeed.comm.comm as ds_comm

        self.backend = ds_comm.cdb
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.current = "other"
        self._depth = 0
        self._originals = {name: getattr(self.backend, name) for name in GATHERS if hasattr(self.backend, name)}

    def _wrap(self, name, function):
        def counted(*args, **kwargs):
            if self._depth == 0:
                outputs = kwargs.get("output_tensor", kwargs.get("output_tensors", kwargs.get("tensor_list")))
                if outputs is None:
                    outputs = args[0]
                tensors = outputs if isinstance(outputs, (list, tuple)) else [outputs]
                self.bytes[self.current] = self.bytes.get(self.current, 0) + sum(
                    t.numel() * t.element_size() for t in tensors
                )
                self.calls[self.current] = self.calls.get(self.current, 0) + 1
            self._depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    @contextlib.contextmanager
    def counting(self):
        for name, function in self._originals.items():
            setattr(self.backend, name, self._wrap(name, function))
        try:
            yield self
        finally:
            for name in self._originals:
                delattr(self.backend, name)  # the class's bound method again

    @contextlib.contextmanager
    def phase(self, name):
        before, self.current = self.current, name
        try:
            yield
        finally:
            self.current = before

    def take(self) -> dict[str, int]:
        taken, self.bytes, self.calls = self.bytes, {}, {}
        return taken


def build_config(args, passes: int, checkpoint: str):
    return validate(
        {
            "model": {
                "vocab_size": args.vocab,
                "hidden_size": args.hidden,
                "pattern": args.pattern,
                "intermediate_size": 2 * args.hidden,
                "attention": {"num_heads": 2},
                "gdn": {"num_heads": 2},
                "init_std": 0.02,
                **({"loop": args.loop} if args.loop else {}),
            },
            "sleep": {"window": args.window, "passes": passes, "checkpoint": checkpoint},
            "optimizer": {"name": "adamw", "lr": 1e-3},
            "train": {
                "steps": args.steps,
                "micro_batch_size": args.batch,
                "grad_accumulation": 1,
                "zero_stage": 3,
                "seed": 0,
            },
        }
    )


def overridden(settings: list[str]):
    """`deepspeed_config` with `--zero` overrides applied (for the trainer and the partitioned build)."""
    original = (
        zero_module.deepspeed_config.__wrapped__
        if hasattr(zero_module.deepspeed_config, "__wrapped__")
        else zero_module.deepspeed_config
    )

    def config_with_overrides(config):
        result = original(config)
        for setting in settings:
            key, value = setting.split("=", 1)
            result["zero_optimization"][key] = json.loads(value)
        return result

    config_with_overrides.__wrapped__ = original
    return config_with_overrides


def live_numel(model) -> int:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel for p in model.parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)


def measure(args, ctx, passes: int, checkpoint: str) -> dict:
    config = build_config(args, passes, checkpoint)
    with torch.device("meta"):
        shapes = HybridLM(config.model)
    loop = shapes.loop_range
    loop_numel = sum(p.numel() for i in loop for p in shapes.layers[i].parameters())
    deepspeed_config = overridden(args.zero)
    zero_module.deepspeed_config = rank_model_module.deepspeed_config = deepspeed_config  # engine; partitioned build
    torch.manual_seed(config.train.seed)
    parallelism = Parallelism(config, ctx, build_rank_model(config, None, ctx.device))
    engine, sleep = build_stage_engine(parallelism, config, TrainingStage(0, config.stage_list()[0], 0, args.steps))
    guard = UpdateGuard(config.train, engine, parallelism, SpikeGuard(config.train, [], []))
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()

    counter = GatherCounter()
    forward, backward = engine.forward, engine.backward

    def counted_forward(*a, **k):
        with counter.phase("forward"):
            return forward(*a, **k)

    def counted_backward(*a, **k):
        with counter.phase("backward"):
            return backward(*a, **k)

    engine.forward, engine.backward = counted_forward, counted_backward
    peak = {"forward": 0, "backward": 0}
    fetch = coordinator.fetch_sub_module

    def measured_fetch(submodule, forward):
        fetch(submodule, forward)
        key = "forward" if forward else "backward"
        peak[key] = max(peak[key], live_numel(engine.module))

    coordinator.fetch_sub_module = measured_fetch
    invalidations = [0]
    invalidate = coordinator._invalidate_trace

    def counted_invalidate():
        invalidations[0] += 1
        invalidate()

    coordinator._invalidate_trace = counted_invalidate

    generator = torch.Generator().manual_seed(1 + ctx.rank)
    length = args.window * args.windows
    steps = []
    with counter.counting():
        for _ in range(args.steps):
            ids = torch.randint(0, args.vocab, (args.batch, length), generator=generator)
            targets = ids.roll(-1, dims=1)
            targets[:, -1] = IGNORE_INDEX
            batches = [
                micro_batch(
                    {"input_ids": ids, "targets": targets, "num_samples": args.batch}, shapes, sleep, ctx.device
                )
            ]
            result = parallelism.forward_backward(engine, batches, sleep, guard.before_backward)
            guard.decide()
            with counter.phase("step"):
                engine.step()
            steps.append(
                {
                    **counter.take(),
                    "peak_forward": peak["forward"],
                    "peak_backward": peak["backward"],
                    "loss": result.loss.item(),
                    "complete_trace": coordinator.is_complete_trace(),
                }
            )
            peak.update(forward=0, backward=0)
    total = sum(p.ds_numel for p in engine.module.parameters())
    element = next(engine.module.parameters()).ds_tensor.element_size()
    out = {
        "passes": passes,
        "checkpoint": checkpoint,
        "steps": steps,
        "total_numel": total,
        "loop_numel": loop_numel,
        "element_size": element,
        "invalidations": invalidations[0],
        "zero": deepspeed_config(config)["zero_optimization"],
    }
    engine.destroy()
    return out


def row(result: dict, baseline: dict, step: int) -> str:
    values = result["steps"][step]
    base = baseline["steps"][step]
    forward, backward = values.get("forward", 0), values.get("backward", 0)
    total = forward + backward + values.get("step", 0)
    base_total = base.get("forward", 0) + base.get("backward", 0) + base.get("step", 0)
    model_bytes = result["total_numel"] * result["element_size"]
    return (
        f"| {result['checkpoint']} | {result['passes']} | {forward / 1e6:.3f} | {forward / model_bytes:.2f} | "
        f"{backward / 1e6:.3f} | {backward / model_bytes:.2f} | {total / 1e6:.3f} | {total / base_total:.2f} | "
        f"{values['peak_forward'] / result['total_numel']:.2f} / "
        f"{values['peak_backward'] / result['total_numel']:.2f} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--checkpoint", nargs="+", default=["none", "pass"], choices=["none", "pass"])
    parser.add_argument("--pattern", default="AGAG")
    parser.add_argument(
        "--loop", type=int, nargs=2, default=None, help="[start, end) of the loop blocks (default: all)"
    )
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--windows", type=int, default=3, help="windows per sequence; all but the last sleep")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--zero", nargs="*", default=[], metavar="KEY=VALUE", help="zero_optimization overrides")
    parser.add_argument("--json", default=None, help="also write every step's counts here (rank 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ctx = setup_distributed()
    results = [measure(args, ctx, passes, checkpoint) for checkpoint in args.checkpoint for passes in args.passes]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if ctx.is_main:

        def counts(rank_results):  # all but the loss (each rank reads its own batches)
            return json.dumps(
                [[{k: v for k, v in s.items() if k != "loss"} for s in r["steps"]] for r in rank_results],
                sort_keys=True,
            )

        same = all(counts(g) == counts(results) for g in gathered)
        first = results[0]
        command = "torchrun --nproc_per_node 2 benchmarks/zero3_gather.py " + " ".join(sys.argv[1:])
        print(f"command: {command}")
        print(
            f"ZeRO-3, {dist.get_world_size()} ranks (gloo, CPU); "
            f"pattern {args.pattern}, loop {first['loop_numel']:,} of "
            f"{first['total_numel']:,} parameters, hidden {args.hidden}, "
            f"vocab {args.vocab}; micro-batch {args.batch} x "
            f"{args.windows} windows of {args.window} tokens ({args.windows - 1} slept); fp32"
        )
        print(f"zero_optimization: {json.dumps(first['zero'])}")
        print(
            "MB all-gathered per step on a rank (whole parameters made available; x model: in model sizes); "
            "peak: most parameters gathered at once, as a fraction of the model (forward / backward)"
        )
        for label, step in (
            ("step 1 (DeepSpeed records its module trace)", 0),
            (f"step {args.steps} (trace in use)", -1),
        ):
            print(f"\n{label}\n")
            print(
                "| checkpoint | N | forward MB | x model | backward MB | x "
                f"model | step MB | x N={args.passes[0]} | peak fwd / bwd |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            for result in results:
                baseline = next(
                    r for r in results if r["checkpoint"] == result["checkpoint"] and r["passes"] == args.passes[0]
                )
                print(row(result, baseline, step))
        steady = all(
            {k: v for k, v in s.items() if k != "loss"} == {k: v for k, v in r["steps"][-1].items() if k != "loss"}
            for r in results
            for s in r["steps"][1:]
        )
        print(
            f"\nsteps 2..{args.steps} gather the same bytes: {steady}; trace invalidations: "
            f"{[r['invalidations'] for r in results]}; ranks agree: {same}; "
            f"gathers in engine.step(): {sum(s.get('step', 0) for r in results for s in r['steps'])} bytes"
        )
        if args.json:
            with open(args.json, "w") as out:
                json.dump(results, out, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
