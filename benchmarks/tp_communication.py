"""Tensor-parallel communication per training step against N: bytes through the tensor-parallel
group, counted at every collective megatron-core and sleepscale issue, next to the formula.

    torchrun --nproc_per_node 2 benchmarks/tp_communication.py [--passes 1 2 4 8]

Counted is the payload handed to each collective (tensor bytes), not the bytes a ring algorithm
puts on the wire (about 2 (T-1)/T times that for an all-reduce), including collectives megatron-core
calls through its own module-level references (its `dist_all_gather_func`, e.g. the vocabulary
gather of full logits). The step is a training step: the loss only, no logits asked for
(`return_logits=False`, as `SleepingModel` runs it), so no vocabulary-sized gather appears and none
is in the formula. The formula is the planner's (`sleepscale.planner.communication.tensor_parallel_phases`,
whose docstring derives it): per window an all-reduce per row-parallel layer of every block run in
forward, one per mixer and MLP input gradient where backward runs, the embedding, head and
cross-entropy's, the per-head norms' gradient sums, and the recomputation's repeats. Sleep adds
(N-1) times the loop blocks' share per slept window: linear in N, and nothing for the recurrent
state, which never leaves its rank.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist

from sleepscale.config_loading import load_config
from sleepscale.model import build_model
from sleepscale.model.hybrid import HybridLM
from sleepscale.parallel.groups import init_parallel_groups
from sleepscale.parallel.tensor import parallelize_tensor
from sleepscale.planner.communication import tensor_parallel_phases
from sleepscale.sleep import plan_for, sleep_forward

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "_all_gather_base")


class ByteCounter:
    """Wraps torch.distributed's collectives; counts the payload of those on `group`."""

    def __init__(self, group):
        self.group, self.bytes = group, 0

    @contextlib.contextmanager
    def counting(self):
        originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        # megatron-core binds all_gather_into_tensor / reduce_scatter_tensor at import (`dist_all_gather_func`):
        # those references are replaced too, or its gathers would go uncounted.
        aliases = [
            (module, attribute, value)
            for name, module in list(sys.modules.items())
            if name.startswith("megatron.")
            for attribute, value in list(vars(module).items())
            if any(value is function for function in originals.values())
        ]
        by_function = {id(function): name for name, function in originals.items()}

        def wrap(name, function):
            # all_reduce(tensor, op, group), all_gather(outputs, input, group), *_into_tensor(output, input, group)
            def counted(first, *args, **kwargs):
                group = kwargs.get("group", args[1] if len(args) > 1 else None)
                payload = first if name == "all_reduce" else args[0]
                if group is self.group:
                    self.bytes += payload.numel() * payload.element_size()
                return function(first, *args, **kwargs)

            return counted

        wrapped = {name: wrap(name, function) for name, function in originals.items()}
        for name, function in wrapped.items():
            setattr(dist, name, function)
        for module, attribute, value in aliases:
            setattr(module, attribute, wrapped[by_function[id(value)]])
        try:
            yield
        finally:
            for name, function in originals.items():
                setattr(dist, name, function)
            for module, attribute, value in aliases:
                setattr(module, attribute, value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    tp = init_parallel_groups(tensor=dist.get_world_size()).tensor
    config = load_config(args.config)
    model = parallelize_tensor(build_model(config.model), tp)
    window = config.sleep.window
    tokens = torch.randint(
        0, config.model.vocab_size, (args.batch, window * args.windows), generator=torch.Generator().manual_seed(0)
    )
    counter = ByteCounter(tp)
    with torch.device("meta"):
        shapes = HybridLM(config.model)
    rows = []
    for checkpoint in ("none", "pass"):
        for n in args.passes:
            sleep = config.sleep.model_copy(update={"passes": n, "checkpoint": checkpoint})
            with counter.counting():
                counter.bytes = 0
                loss = sleep_forward(model, tokens, sleep, targets=tokens.roll(-1, dims=1), return_logits=False).loss
                forward = counter.bytes
                loss.backward()
                backward = counter.bytes - forward
            model.zero_grad(set_to_none=True)
            plan = plan_for(model, tokens, sleep)
            rows.append((checkpoint, n, forward, backward, *tensor_parallel_phases([plan], shapes, tp.size())))

    if dist.get_rank() == 0:
        print(
            f"command: torchrun --nproc_per_node {dist.get_world_size()} benchmarks/tp_communication.py "
            f"--passes {' '.join(map(str, args.passes))} --config "
            f"{args.config} --batch {args.batch} --windows {args.windows}"
        )
        print(
            f"tensor-parallel size {dist.get_world_size()}; {config.model.pattern}, hidden {config.model.hidden_size}, "
            f"batch {args.batch} x {args.windows} windows of {window}; payload MB per step (forward + backward)\n"
        )
        print("| checkpoint | N | forward MB | formula | backward MB | formula | total x N=1 |")
        print("|---|---|---|---|---|---|---|")
        base = {c: next(r[2] + r[3] for r in rows if r[0] == c and r[1] == args.passes[0]) for c in ("none", "pass")}
        for checkpoint, n, forward, backward, f_forward, f_backward in rows:
            print(
                f"| {checkpoint} | {n} | {forward / 1e6:.3f} | {f_forward / 1e6:.3f} | {backward / 1e6:.3f} | "
                f"{f_backward / 1e6:.3f} | {(forward + backward) / base[checkpoint]:.2f} |"
            )
        differ = [(r[0], r[1], r[2] - r[4], r[3] - r[5]) for r in rows if (r[2], r[3]) != (r[4], r[5])]
        print(
            "\nmeasured bytes equal the formula exactly in every row"
            if not differ
            else "\nmeasured - formula, bytes (checkpoint, N, forward, backward): " + "; ".join(map(str, differ))
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
