"""Recomputation forms: how a run of blocks keeps, or recomputes, its activations for backward.

The sleep plan (`sleepscale.plan`) says which block ranges of which passes are checkpointed, and in
which form (`sleep.checkpoint`); `HybridLM.run_blocks` runs a range in that form through `run`.
Every form is non-reentrant checkpointing (blocks reused N times then work under ZeRO-2/3) and
changes memory and time, never values or gradients:

- `pass`: the range is one unit. Forward keeps its input (hidden states, and the recurrent states
  it starts from); backward recomputes the whole range at once, so one range's activations exist
  together (the recomputation floor).
- `block`: every block is its own unit. Forward keeps every block's input; backward recomputes one
  block at a time. More kept than `pass` (one hidden state per block, not per range), a floor of
  one block.
- `nested`: the range is one unit whose recomputation runs its blocks as `block` units. Forward
  keeps only the range's input, as `pass`; backward recomputes the range keeping each block's
  input, then each block once more as backward reaches it: the floor of `block` at the forward
  memory of `pass`, for about one more forward of the range.
- `selective`: every block is its own unit under torch's selective activation checkpointing: the
  outputs of its matrix products (linear layers, attention and the delta rule's chunk products) are
  kept, the element-wise and normalisation work between them is recomputed. Its recomputation adds
  no matrix products, only memory-bound element-wise work, and under tensor parallelism no
  all-reduce (`_KEPT`).

Chosen by measurement (`benchmarks/recompute_forms.py`: an AGAGAGAG model of width 256, N=4, fp32,
one CPU thread, alternating steps in one process; `benchmarks/results/recompute_cost.md`): kept for
backward, `none` 375 MB, `pass` and `nested` 2.2 MB, `block` 11 MB, `selective` 167 MB; steps 1.48x
(`pass`), 1.36x (`block`), 1.71x (`nested`), 1.96x (`selective`) `none`'s. Keeping only the linear
layers' products and recomputing the attention and delta-rule cores kept 129 MB at about the same
CPU step (1.89x; 2.91x against 2.74x in another run): not adopted, since on a GPU those cores are
the FLOPs a recomputation pays, which keeping every product avoids. On a CPU `selective` is the
slowest form: torch's selective checkpointing dispatches every op of the unit through a Python
mode, twice; its use is the memory between `none` and `block` at small N, at `none`'s FLOPs.

Why ours, not torch's `checkpoint_sequential` or Megatron's `recompute_granularity`: the units must
thread per-block recurrent states through the passes and be chosen per pass by the plan (a pass
without gradient is not checkpointed at all), which neither offers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

Form = Literal["none", "pass", "block", "nested", "selective"]
FORMS: tuple[str, ...] = ("none", "pass", "block", "nested", "selective")

# What `selective` keeps (the outputs), by the ops CPU and CUDA dispatch them as: the matrix products,
# and tensor parallelism's all-reduce.
#
# The all-reduce is kept for correctness. A row-parallel layer (`sleepscale.parallel.tensor`) reduces
# its matmul's output with megatron's `torch.distributed.all_reduce`, the in-place `c10d.allreduce_`,
# summing the very tensor kept as the matmul's output. Were the all-reduce recomputed, recomputation
# would get that kept tensor, already summed, from the cache and sum it again (T times the sum over
# T ranks). Kept, recomputation returns it from the cache too: it runs no collective (no bytes, no
# rank waiting for another), and keeping it costs no memory, its output being the matmul's kept
# tensor itself. c10d's schema does not declare the mutation (no version-counter bump), so SAC's
# check that kept tensors are not mutated (`allow_cache_entry_mutation`) neither saw the double sum
# nor fires now. It is tensor parallelism's only collective in a block's forward: the column-parallel
# layers' is in backward, which recomputation does not run; the embedding's and the loss's are outside
# the blocks; megatron's functional collectives (`_c10d_functional`) and sequence parallelism's
# all-gathers and reduce-scatters are not used.
_KEPT = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.c10d.allreduce_.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts():
    """The forward and recomputation contexts of a `selective` unit (torch's selective checkpointing)."""
    return create_selective_checkpoint_contexts(_keep_matmuls)


def run(run_blocks: Callable, hidden, states, blocks: range, form: Form):
    """`run_blocks(hidden, states, blocks, form)` in recomputation form `form` (the module docstring).
    `run_blocks` runs the range plainly under "none", and as `block` units under "block" (the inside
    of a `nested` unit)."""
    if form == "none" or not torch.is_grad_enabled():
        return run_blocks(hidden, states, blocks, "none")
    if form == "pass":
        return checkpoint(run_blocks, hidden, states, blocks, "none", use_reentrant=False)
    if form == "nested":
        return checkpoint(run_blocks, hidden, states, blocks, "block", use_reentrant=False)
    if form not in ("block", "selective"):
        raise ValueError(f"recomputation form {form!r}: use one of {', '.join(FORMS)}")
    context = selective_contexts if form == "selective" else noop_context_fn
    for i in blocks:
        hidden, states = checkpoint(
            run_blocks, hidden, states, range(i, i + 1), "none", use_reentrant=False, context_fn=context
        )
    return hidden, states
