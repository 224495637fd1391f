"""The sleep plan: what the engine runs over a batch of sequences, written out as data.

`make_plan` turns the sleep settings, the sequence length, the step's N and which sequences carry
loss in which window into an ordered list of windows, each with its passes and the state
operations between them. It is the one place that decides

- which windows are slept on (every evicted window, or under `sleep_on: context` only those
  without loss tokens, per sequence);
- which block ranges each pass runs: the wake pass runs the prelude and the loop blocks, then the
  coda and the head on a branch (`readout`); each sleep pass runs the loop blocks again, starting
  from the previous pass's loop output;
- which passes carry gradient (`grad_passes`: only the last k of the N passes);
- the checkpoint units (`pass` and `nested`: each block range of a pass with gradient, `block` and
  `selective`: each block of those, `PassPlan.checkpoint_units`; `window`: the whole window,
  `WindowPlan.is_checkpoint_unit`; the forms: `sleepscale.model.recompute`);
- the state operations: before a sleep pass the loop blocks restart their context (`next_pass`),
  after it their GDN states may be bounded; after the window the sleepers keep their slept states,
  then hard eviction and `detach_every` apply; so which windows' states reach a later window with
  their gradient (`WindowPlan.carries_states`, `WindowPlan.starts_with_carried_states`).

What follows from these decisions is a property of the plan too, for every reader to take from here
rather than derive again: the block ranges a pass runs (`PassPlan.block_ranges`), its checkpoint
units, and whether a window's forward ends on a matrix product (`WindowPlan.ends_on_matmul`).

The sleep engine (`sleepscale.sleep.sleep_forward`) interprets a plan, `sleepscale.flops` counts a
plan's FLOPs, `sleepscale.planner.communication` its communication, and the pipeline schedule
(`sleepscale.parallel.pipeline_schedule`) derives its traversals from a plan. Everything here is
decided on the host from host data, so running a plan needs no device-to-host synchronisation.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from sleepscale.config import SleepConfig
from sleepscale.data.sample import IGNORE_INDEX
from sleepscale.model.recompute import Form

# `sleep.checkpoint` in effect: "window", or the recomputation form of each pass's block ranges
Checkpointing = Literal["none", "pass", "window", "block", "nested", "selective"]


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """One pass over a window. Pass 1 is the wake pass; passes 2..N are sleep passes."""

    number: int
    blocks: tuple[range, ...]  # run in order on the pass's hidden states
    readout: range | None  # wake pass only: blocks run on a branch of the loop output before the head (the coda)
    grad: bool  # recorded by autograd (False: truncated backprop runs the pass without it)
    next_pass: bool  # before the pass, loop blocks restart from the window's starting context
    bound: float | None  # after the pass, loop GDN states are rescaled to at most this norm
    # the recomputation form of its block ranges (`sleepscale.model.recompute`): `sleep.checkpoint` on a pass
    # with gradient under pass, block, nested or selective; "none" otherwise
    checkpoint: Form

    @property
    def block_ranges(self) -> tuple[range, ...]:
        """The block ranges the pass runs, in order: its `blocks`, then its `readout` (the coda) when
        it has one. Each is one `run_blocks` call of the engine."""
        return (*self.blocks, *([self.readout] if self.readout else []))

    @property
    def checkpoint_units(self) -> tuple[range, ...]:
        """The block ranges that are each recomputed as one unit in backward (non-reentrant
        checkpointing keeps only a unit's inputs), in order: under `pass` and `nested`, every block
        range of a pass with gradient, the coda too (not the head; a `nested` unit's recomputation
        runs its blocks as units of their own); under `block` and `selective`, every block of those
        ranges; none otherwise (a pass without gradient runs without autograd, so nothing of it is
        checkpointed; under `window` the unit is the whole window, `WindowPlan.is_checkpoint_unit`). A
        unit is recomputed only when backward reaches it."""
        if self.checkpoint in ("pass", "nested"):
            return self.block_ranges
        if self.checkpoint in ("block", "selective"):
            return tuple(range(i, i + 1) for blocks in self.block_ranges for i in blocks)
        return ()


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    index: int
    start: int  # token positions [start, end) of the window
    end: int
    passes: tuple[PassPlan, ...]  # the wake pass, then the sleep passes (none if nobody sleeps)
    sleepers: tuple[bool, ...] | None  # when only some sequences sleep: which (the others keep their wake states)
    checkpoint: Checkpointing
    evict: bool  # hard eviction after the window: only GDN fast weights go on
    detach: bool  # after the window, the carried states are cut from the autograd graph
    # The states the window ends with reach a later window with their gradient (backward runs from
    # that window's loss into this one): it is not the plan's last window and no detach follows it.
    carries_states: bool
    # The states the window starts from require grad: they are the previous window's, which
    # `carries_states` (False for the first window, whose states come from outside the plan: fresh
    # ones in training, and after a detach).
    starts_with_carried_states: bool

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def sleep_passes(self) -> tuple[PassPlan, ...]:
        return self.passes[1:]

    @property
    def is_checkpoint_unit(self) -> bool:
        """The whole window is recomputed as one unit in backward (`checkpoint: window`): its
        embedding, every pass (those without gradient too), the head and the loss."""
        return self.checkpoint == "window"

    @property
    def ends_on_matmul(self) -> bool:
        """The window's forward ends on a matrix product: the last block's last matmul (its MLP's
        down_proj, or the mixer's o_proj without MLP) of a sleep pass, with neither a state bound
        after that pass nor a per-sequence choice of sleepers (each saves tensors for backward). A
        window without sleep passes ends on the head and the loss instead.

        It matters when the window is a checkpoint unit (`is_checkpoint_unit`): non-reentrant
        checkpointing's early stop re-runs a unit only up to the last tensor its forward saved for
        backward, and autograd saves a matmul's inputs before computing it, so when nothing after the
        last matmul saves a tensor, that matmul (and a tensor-parallel all-reduce of its output) is
        not re-run."""
        return len(self.passes) > 1 and self.passes[-1].bound is None and self.sleepers is None


@dataclasses.dataclass(frozen=True)
class SleepPlan:
    batch: int
    loop: range  # the loop blocks
    num_blocks: int
    windows: tuple[WindowPlan, ...]

    def passes_run(self) -> torch.Tensor:
        """[batch, windows] int64 on the host: loop passes run over each window, per sequence."""
        rows = [
            [1 + len(w.sleep_passes) if w.sleepers is None or w.sleepers[b] else 1 for w in self.windows]
            for b in range(self.batch)
        ]
        return torch.tensor(rows, dtype=torch.long).reshape(self.batch, len(self.windows))


def window_bounds(length: int, window: int) -> list[tuple[int, int]]:
    return [(start, min(start + window, length)) for start in range(0, length, window)]


def loss_windows(targets: torch.Tensor, window: int) -> list[list[bool]]:
    """Per sequence and window, whether any token carries loss. Reads `targets` on the host: pass CPU
    targets (a training batch before it moves to the device), or pay one device-to-host copy."""
    carries = targets.detach().cpu() != IGNORE_INDEX
    carries = torch.nn.functional.pad(carries, (0, -carries.shape[1] % window))  # padding carries no loss
    return carries.unflatten(1, (-1, window)).any(-1).tolist()


def make_plan(
    sleep: SleepConfig,
    batch: int,
    length: int,
    num_blocks: int,
    loop: range,
    carries_loss: list[list[bool]] | None = None,
    sequence_continues: bool = False,
) -> SleepPlan:
    """The plan for `batch` sequences of `length` tokens through `num_blocks` blocks of which `loop`
    are looped, at N = `sleep.passes`. `carries_loss[b][w]`: whether window w of sequence b has loss
    tokens (`loss_windows`), needed only for `sleep_on: context`; without it every evicted window is
    slept on. `sequence_continues`: the final window is evicted too (more of the sequence follows)."""
    bounds = window_bounds(length, sleep.window)
    checkpoint = sleep.checkpointing
    grad_passes = sleep.passes if sleep.grad_passes is None else min(sleep.grad_passes, sleep.passes)
    prelude, coda = range(0, loop.start), range(loop.stop, num_blocks)
    wake = PassPlan(
        1,
        tuple(blocks for blocks in (prelude, loop) if blocks),
        coda,
        grad=True,
        next_pass=False,
        bound=None,
        checkpoint=_pass_form(checkpoint, grad=True),
    )
    grads = {number: number > sleep.passes - grad_passes for number in range(2, sleep.passes + 1)}
    sleep_passes = tuple(
        PassPlan(
            number,
            (loop,),
            None,
            grad=grad,
            next_pass=True,
            bound=sleep.state_norm_bound,
            checkpoint=_pass_form(checkpoint, grad),
        )
        for number, grad in grads.items()
    )
    windows, carried_in = [], False  # the first window starts from fresh states
    for index, (start, end) in enumerate(bounds):
        evicted = sequence_continues or index < len(bounds) - 1
        sleepers = _sleepers(
            sleep, batch, evicted, None if carries_loss is None else [row[index] for row in carries_loss]
        )
        passes = (wake,) if not any(sleepers) else (wake, *sleep_passes)
        detach = sleep.detach_every is not None and (index + 1) % sleep.detach_every == 0
        # the final pass carries gradient (grad_passes >= 1), and so do the states it ends the window with
        carries_states = index < len(bounds) - 1 and not detach
        windows.append(
            WindowPlan(
                index,
                start,
                end,
                passes,
                None if all(sleepers) or not any(sleepers) else tuple(sleepers),
                checkpoint,
                evict=evicted and sleep.eviction == "hard",
                detach=detach,
                carries_states=carries_states,
                starts_with_carried_states=carried_in,
            )
        )
        carried_in = carries_states
    return SleepPlan(batch, loop, num_blocks, tuple(windows))


def _pass_form(checkpoint: Checkpointing, grad: bool) -> Form:
    """A pass's recomputation form: none without gradient, or under `none` and `window`."""
    return checkpoint if grad and checkpoint not in ("none", "window") else "none"


def _sleepers(sleep: SleepConfig, batch: int, evicted: bool, window_carries_loss: list[bool] | None) -> list[bool]:
    if not evicted or sleep.passes == 1:
        return [False] * batch
    if sleep.sleep_on == "context" and window_carries_loss is not None:
        return [not carries for carries in window_carries_loss]
    return [True] * batch
