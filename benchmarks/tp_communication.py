"""Tensor-parallel communication per training step against N: bytes through the tensor-parallel
group, counted at every collective megatron-core and sleepscale issue, next to the formula.

    torchrun --nproc_per_node 2 benchmarks/tp_communication.py [--passes 1 2 4 8]

Counted is the payload handed to each collective (tensor bytes), not the bytes a ring algorithm
puts on the wire (about 2 (T-1)/T times that for an all-reduce), including collectives megatron-core
calls through its own module-level references (its `dist_all_gather_func`, e.g. the vocabulary
gather of full logits). The step is a training step: the loss only, no logits asked for
(`return_logits=False`, as `SleepingModel` runs it), so no vocabulary-sized gather appears and none
is in the formula. The formula, per step, with
A = bytes of one [batch, window, hidden] activation, W windows of which W-1 sleep, per block r row-
parallel all-reduces in forward (mixer out, MLP down) and c column-parallel gradient all-reduces in
backward (q/k/v for attention, q/k/v/g/a/b for GDN, gate/up for the MLP):

    forward  = W (A (1 + sum r) + 3 L_ce) + (W-1)(N-1) A sum_loop r        (1: embedding; L_ce: the
    backward = W A (1 + sum c) + (W-1)(N-1) A sum_loop c + G              cross-entropy's three
             - [N > 1] (W-1) A u                                           [B, L] reductions)
             + [checkpoint=pass] (the block part of forward) - S A

where the backward's 1 is the LM head's input gradient, G the GDN output-norm gradients (one
all-reduce of head_v_dim floats per GDN block), u the output-only projections of the last loop
block (its last sleep pass's output is dropped, so they get no gradient: q and g of a GDN block,
gate and up of its MLP), and S the checkpointed segments recomputed (torch's non-reentrant
checkpoint stops before each segment's final all-reduce, whose result backward does not need). Sleep adds (N-1) times the loop blocks' share, per
slept window: linear in N, and nothing for the recurrent state, which never leaves its rank.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch
import torch.distributed as dist

from sleepscale.config import load_config
from sleepscale.model import build_model
from sleepscale.model.attention import Attention
from sleepscale.parallel.groups import init_parallel_groups
from sleepscale.parallel.tensor import parallelize_tensor
from sleepscale.sleep import sleep_forward

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
        aliases = [(module, attribute, value) for name, module in list(sys.modules.items()) if name.startswith("megatron.")
                   for attribute, value in list(vars(module).items())
                   if any(value is function for function in originals.values())]
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


def formula(model, sleep, batch: int, windows: int) -> tuple[int, int]:
    hidden, window, passes = model.config.hidden_size, sleep.window, sleep.passes
    activation = 4 * batch * window * hidden
    row = [1 + (block.mlp is not None) for block in model.layers]
    column = [(3 if isinstance(block.attn, Attention) else 6) + 2 * (block.mlp is not None) for block in model.layers]
    loop = model.loop_range
    slept = (windows - 1) * (passes - 1)
    block_forward = windows * activation * sum(row) + slept * activation * sum(row[i] for i in loop)
    forward = windows * (activation + 3 * 4 * batch * window) + block_forward
    gdn_norms = sum(4 * block.attn.head_v_dim for block in model.layers if not isinstance(block.attn, Attention))
    backward = windows * activation * (1 + sum(column)) + slept * activation * sum(column[i] for i in loop) + gdn_norms
    if passes > 1:  # the last sleep pass's output is dropped: its last block's output-only projections get no gradient
        backward -= (windows - 1) * activation * _output_only_projections(model.layers[loop[-1]], sleep.eviction)
    if sleep.checkpointing == "pass":
        # Recomputation repeats the blocks' forward all-reduces, except each segment's last one:
        # torch's non-reentrant checkpoint stops once the tensors backward needs are back.
        segments = windows * sum(1 for part in (range(0, loop.start), loop, range(loop.stop, len(model.layers))) if part) + slept
        backward += block_forward - segments * activation
    return forward, backward


def _output_only_projections(block, eviction: str) -> int:
    """Column-parallel layers whose results reach only the block's output, not the carried state."""
    if isinstance(block.attn, Attention):
        mixer = 3 if eviction == "hard" else 1  # sliding keeps k and v for the next window
    else:
        mixer = 2  # q and the output gate g; k, v, a, b shape the fast weights
    return mixer + 2 * (block.mlp is not None)


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
    tokens = torch.randint(0, config.model.vocab_size, (args.batch, window * args.windows), generator=torch.Generator().manual_seed(0))
    counter = ByteCounter(tp)
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
            rows.append((checkpoint, n, forward, backward, *formula(model, sleep, args.batch, args.windows)))

    if dist.get_rank() == 0:
        print(f"command: torchrun --nproc_per_node {dist.get_world_size()} benchmarks/tp_communication.py "
              f"--passes {' '.join(map(str, args.passes))} --config {args.config} --batch {args.batch} --windows {args.windows}")
        print(f"tensor-parallel size {dist.get_world_size()}; {config.model.pattern}, hidden {config.model.hidden_size}, "
              f"batch {args.batch} x {args.windows} windows of {window}; payload MB per step (forward + backward)\n")
        print("| checkpoint | N | forward MB | formula | backward MB | formula | total x N=1 |")
        print("|---|---|---|---|---|---|---|")
        base = {c: next(r[2] + r[3] for r in rows if r[0] == c and r[1] == args.passes[0]) for c in ("none", "pass")}
        for checkpoint, n, forward, backward, f_forward, f_backward in rows:
            print(f"| {checkpoint} | {n} | {forward / 1e6:.3f} | {f_forward / 1e6:.3f} | {backward / 1e6:.3f} | "
                  f"{f_backward / 1e6:.3f} | {(forward + backward) / base[checkpoint]:.2f} |")
        differ = [(r[0], r[1], r[2] - r[4], r[3] - r[5]) for r in rows if (r[2], r[3]) != (r[4], r[5])]
        print("\nmeasured bytes equal the formula exactly in every row" if not differ else
              "\nmeasured - formula, bytes (checkpoint, N, forward, backward): " + "; ".join(map(str, differ)))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
