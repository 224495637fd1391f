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
- the checkpoint unit (`pass`: each block range of a pass; `window`: the whole window);
- the state operations: before a sleep pass the loop blocks restart their context (`next_pass`),
  after it their GDN states may be bounded; after the window the sleepers keep their slept states,
  then hard eviction and `detach_every` apply.

The sleep engine (`sleepscale.sleep.sleep_forward`) interprets a plan, `sleepscale.flops` counts a
plan's FLOPs, and the pipeline schedule (`sleepscale.parallel.pipeline_schedule`) derives its traversals from a plan. Everything here is
decided on the host from host data, so running a plan needs no device-to-host synchronisation.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from sleepscale.config import SleepConfig
from sleepscale.data.sample import IGNORE_INDEX

Checkpointing = Literal["none", "pass", "window"]


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """One pass over a window. Pass 1 is the wake pass; passes 2..N are sleep passes."""

    number: int
    blocks: tuple[range, ...]  # run in order on the pass's hidden states; each is one checkpoint unit under `pass`
    readout: range | None  # wake pass only: blocks run on a branch of the loop output before the head (the coda)
    grad: bool  # recorded by autograd (False: truncated backprop runs the pass without it)
    next_pass: bool  # before the pass, loop blocks restart from the window's starting context
    bound: float | None  # after the pass, loop GDN states are rescaled to at most this norm


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

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def sleep_passes(self) -> tuple[PassPlan, ...]:
        return self.passes[1:]


@dataclasses.dataclass(frozen=True)
class SleepPlan:
    batch: int
    loop: range  # the loop blocks
    num_blocks: int
    windows: tuple[WindowPlan, ...]

    def passes_run(self) -> torch.Tensor:
        """[batch, windows] int64 on the host: loop passes run over each window, per sequence."""
        rows = [[1 + len(w.sleep_passes) if w.sleepers is None or w.sleepers[b] else 1 for w in self.windows]
                for b in range(self.batch)]
        return torch.tensor(rows, dtype=torch.long).reshape(self.batch, len(self.windows))


def window_bounds(length: int, window: int) -> list[tuple[int, int]]:
    return [(start, min(start + window, length)) for start in range(0, length, window)]


def loss_windows(targets: torch.Tensor, window: int) -> list[list[bool]]:
    """Per sequence and window, whether any token carries loss. Reads `targets` on the host: pass CPU
    targets (a training batch before it moves to the device), or pay one device-to-host copy."""
    carries = (targets.detach().cpu() != IGNORE_INDEX)
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
    wake = PassPlan(1, tuple(blocks for blocks in (prelude, loop) if blocks), coda, grad=True, next_pass=False, bound=None)
    sleep_passes = tuple(
        PassPlan(number, (loop,), None, grad=number > sleep.passes - grad_passes, next_pass=True, bound=sleep.state_norm_bound)
        for number in range(2, sleep.passes + 1)
    )
    windows = []
    for index, (start, end) in enumerate(bounds):
        evicted = sequence_continues or index < len(bounds) - 1
        sleepers = _sleepers(sleep, batch, evicted, None if carries_loss is None else [row[index] for row in carries_loss])
        passes = (wake,) if not any(sleepers) else (wake, *sleep_passes)
        windows.append(WindowPlan(
            index, start, end, passes, None if all(sleepers) or not any(sleepers) else tuple(sleepers), checkpoint,
            evict=evicted and sleep.eviction == "hard",
            detach=sleep.detach_every is not None and (index + 1) % sleep.detach_every == 0,
        ))
    return SleepPlan(batch, loop, num_blocks, tuple(windows))


def _sleepers(sleep: SleepConfig, batch: int, evicted: bool, window_carries_loss: list[bool] | None) -> list[bool]:
    if not evicted or sleep.passes == 1:
        return [False] * batch
    if sleep.sleep_on == "context" and window_carries_loss is not None:
        return [not carries for carries in window_carries_loss]
    return [True] * batch
