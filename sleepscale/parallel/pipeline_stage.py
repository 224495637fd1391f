"""A pipeline stage: the part of the model one rank holds, and what it runs for one traversal.

`PipelineStage(model, stages, index)` is the model cut to the blocks of `stages[index]`
(`sleepscale.model.hybrid.cut_to_blocks`: the other blocks are placeholders, so parameter names are
the whole model's and the stages' state dicts together are the model's; the embedding stays on the
first stage, the final norm and head on the last), and where that stage sits in the pipeline.

`forward_op` runs one traversal (one pass over one window, `sleepscale.parallel.pipeline_schedule`) of a
micro-batch on the stage through the sleep engine's own pass interpreter (`sleepscale.sleep.run_pass`),
which runs the blocks this stage holds. What a micro-batch leaves on the stage between its traversals
(its blocks' states, the states its window started from and those after the wake pass, and the loop
output when the next sleep pass starts on this stage) is `Carried`; hidden states that continue on
another stage are returned, by destination stage.
"""

from __future__ import annotations

import dataclasses

import torch

from sleepscale.model.hybrid import HybridLM, cut_to_blocks
from sleepscale.model.state import MixerState
from sleepscale.parallel.pipeline_schedule import Traversal
from sleepscale.plan import SleepPlan
from sleepscale.sleep import end_window, run_pass


@dataclasses.dataclass
class Carried:
    """What a micro-batch leaves on a stage between its traversals."""

    states: list[MixerState]  # per block of the model; NotHeld for other stages' blocks
    window_start: list[MixerState]  # the states the current window started from
    woke: list[MixerState]  # the states after the current window's wake pass
    loop_output: torch.Tensor | None = None  # kept for the next sleep pass when it starts on this stage


@dataclasses.dataclass
class OpOutput:
    sends: dict[int, torch.Tensor]  # destination stage -> the hidden states it continues from
    loss: torch.Tensor | None  # the window's summed loss (the last stage's wake pass, with targets)
    logits: torch.Tensor | None  # the window's logits (the last stage's wake pass, when asked for)


class PipelineStage:
    """Pipeline stage `index` of `model`, whose blocks `stages` (ranges, in order) split. `model` is
    cut to the stage's blocks here unless it already is (`build_rank_model` builds it cut)."""

    def __init__(self, model: HybridLM, stages: list[range], index: int):
        self.model = model if model.held == stages[index] else cut_to_blocks(model, stages[index])
        self.stages, self.index, self.held = stages, index, stages[index]
        self.is_first, self.is_last = index == 0, index == len(stages) - 1
        stage_of = {block: stage for stage, blocks in enumerate(stages) for block in blocks}
        loop = model.loop_range
        self.loop_first, self.loop_last = stage_of[loop.start], stage_of[loop.stop - 1]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self) -> str:
        return f"PipelineStage({self.index} of {len(self.stages)}: blocks {self.held.start}..{self.held.stop - 1})"


def forward_op(
    stage: PipelineStage,
    plan: SleepPlan,
    walk: Traversal,
    input_ids: torch.Tensor | None,
    targets: torch.Tensor | None,
    carried: Carried,
    received: torch.Tensor | None,
    want_logits: bool = False,
) -> OpOutput:
    """Runs traversal `walk` of a micro-batch on `stage`, updating `carried`. `input_ids` (the first
    stage) and `targets` (the last) are the micro-batch's; `received` is the traversal's input
    hidden when another stage produced it."""
    window = plan.windows[walk.window]
    planned = window.passes[walk.pass_number - 1]
    here, loop = stage.index, stage.model.loop_range
    if planned.number == 1:
        if walk.window > 0:  # the previous window ends here, as the engine ends it
            previous = plan.windows[walk.window - 1]
            carried.states = end_window(previous, carried.states, carried.woke, loop, stage.device)
        carried.window_start, hidden = carried.states, received
    else:
        hidden = received if received is not None else carried.loop_output
    window_ids = input_ids[:, window.start : window.end] if stage.is_first else None
    window_targets = None if targets is None or not stage.is_last else targets[:, window.start : window.end]
    out = run_pass(
        stage.model,
        window,
        planned,
        hidden,
        carried.states,
        carried.window_start,
        window_ids,
        window_targets,
        want_logits,
    )
    carried.states = out.states
    if out.woke is not None:
        carried.woke = out.woke
    sends = {}
    if here == stage.loop_last and walk.pass_number < len(window.passes):  # another sleep pass follows
        _hand_on(out.hidden, stage, carried, sends)
    if planned.number == 1 and not stage.is_last:  # the loop output, or past the loop its coda branch
        sends[here + 1] = out.readout if here >= stage.loop_last else out.hidden
    elif planned.number > 1 and here < stage.loop_last:
        sends[here + 1] = out.hidden
    return OpOutput(sends, out.loss, out.logits)


def finish(stage: PipelineStage, plan: SleepPlan, carried: Carried) -> list[MixerState]:
    """The states after the micro-batch's last window, as the engine returns them."""
    return end_window(plan.windows[-1], carried.states, carried.woke, stage.model.loop_range, stage.device)


def _hand_on(loop_output: torch.Tensor, stage: PipelineStage, carried: Carried, sends: dict[int, torch.Tensor]) -> None:
    """The loop output goes to the next sleep pass: kept here when the loop starts on this stage."""
    if stage.loop_first == stage.index:
        carried.loop_output = loop_output
    else:
        sends[stage.loop_first] = loop_output
