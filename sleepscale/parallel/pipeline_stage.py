"""A pipeline stage: the part of the model one rank holds, and what it runs for one traversal.

`PipelineStage(model, stages, index)` keeps the blocks of `stages[index]` (the others become `nn.Identity`
placeholders, so parameter names are the whole model's: the stages' state dicts together are the
model's), the embedding on the first stage and the final norm and head on the last.

`forward_op` runs one traversal (one pass over one window, `sleepscale.parallel.pipeline_schedule`) of a
micro-batch on the stage, as the sleep engine runs that pass on the whole model: the same plan,
and the same state operations (`sleepscale.sleep.before_pass` and the others), applied to the
blocks this stage owns. What a micro-batch leaves on the stage between its traversals (its blocks'
states, the states its window started from and those after the wake pass, and the loop output when
the next sleep pass starts on this stage) is `Carried`; hidden states that continue on another
stage are returned, by destination stage.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from sleepscale.model.hybrid import HybridLM
from sleepscale.model.state import MixerState
from sleepscale.parallel.pipeline_schedule import Traversal
from sleepscale.plan import SleepPlan
from sleepscale.sleep import after_pass, after_sleep, after_window, before_pass, head_and_loss


@dataclasses.dataclass(frozen=True)
class NotOwned(MixerState):
    """The state of a block that another stage owns: every state operation leaves it as it is."""

    def evicted(self) -> NotOwned:
        return self

    def next_pass(self, window_start: NotOwned) -> NotOwned:
        return self

    def where(self, mask: torch.Tensor, other: NotOwned) -> NotOwned:
        return self


@dataclasses.dataclass
class Carried:
    """What a micro-batch leaves on a stage between its traversals."""

    states: list[MixerState]  # per block of the model; NotOwned for other stages' blocks
    window_start: list[MixerState]  # the states the current window started from
    woke: list[MixerState]  # the states after the current window's wake pass
    loop_output: torch.Tensor | None = None  # kept for the next sleep pass when it starts on this stage


@dataclasses.dataclass
class OpOutput:
    sends: dict[int, torch.Tensor]  # destination stage -> the hidden states it continues from
    loss: torch.Tensor | None  # the window's summed loss (the last stage's wake pass, with targets)
    logits: torch.Tensor | None  # the window's logits (the last stage's wake pass, when asked for)


class PipelineStage(nn.Module):
    """Pipeline stage `index` of `model`, whose blocks `stages` (ranges, in order) split."""

    def __init__(self, model: HybridLM, stages: list[range], index: int):
        super().__init__()
        self.config, self.loop_range, self.stages, self.index = model.config, model.loop_range, stages, index
        self.owned = stages[index]
        self.is_first, self.is_last = index == 0, index == len(stages) - 1
        self.embeddings = model.embeddings if self.is_first else None
        self.layers = nn.ModuleList(block if i in self.owned else nn.Identity() for i, block in enumerate(model.layers))
        self.norm = model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        self.cross_entropy = model.cross_entropy if self.is_last else None
        stage_of = {block: stage for stage, blocks in enumerate(stages) for block in blocks}
        self.loop_first, self.loop_last = stage_of[self.loop_range.start], stage_of[self.loop_range.stop - 1]

    def initial_states(self, batch_size: int, span: int, device: torch.device | None = None) -> list[MixerState]:
        return [block.initial_state(batch_size, span, device) if i in self.owned else NotOwned()
                for i, block in enumerate(self.layers)]

    def run_blocks(self, hidden: torch.Tensor, states: list[MixerState], blocks: range,
                   checkpoint: bool = False) -> tuple[torch.Tensor, list[MixerState]]:
        """The blocks of `blocks` this stage owns (a contiguous part of them, possibly none)."""
        part = range(max(blocks.start, self.owned.start), min(blocks.stop, self.owned.stop))
        if not len(part):
            return hidden, states
        return HybridLM.run_blocks(self, hidden, states, part, checkpoint)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def extra_repr(self) -> str:
        return f"stage {self.index} of {len(self.stages)}: blocks {self.owned.start}..{self.owned.stop - 1}"


def forward_op(stage: PipelineStage, plan: SleepPlan, walk: Traversal, input_ids: torch.Tensor | None,
               targets: torch.Tensor | None, carried: Carried, received: torch.Tensor | None,
               want_logits: bool = False) -> OpOutput:
    """Runs traversal `walk` of a micro-batch on `stage`, updating `carried`. `input_ids` (the first
    stage) and `targets` (the last) are the micro-batch's; `received` is the traversal's input
    hidden when another stage produced it."""
    window = plan.windows[walk.window]
    planned = window.passes[walk.pass_number - 1]
    loop, here, per_pass = stage.loop_range, stage.index, window.checkpoint == "pass"
    more_sleep = walk.pass_number < len(window.passes)  # another sleep pass follows on the loop stages
    sends, loss, logits = {}, None, None
    with torch.set_grad_enabled(torch.is_grad_enabled() and planned.grad):
        if planned.number == 1:
            if walk.window > 0:  # the previous window ends here, as the engine ends it
                previous = plan.windows[walk.window - 1]
                device = next(iter(stage.parameters())).device
                carried.states = after_window(previous, after_sleep(previous, carried.states, carried.woke, loop, device))
            carried.window_start = states = carried.states
            hidden = stage.embeddings(input_ids[:, window.start : window.end]) if stage.is_first else received
            readout = hidden if here > stage.loop_last else None
            if here <= stage.loop_last:  # the prelude and the loop blocks
                for blocks in planned.blocks:
                    hidden, states = stage.run_blocks(hidden, states, blocks, per_pass)
                if here == stage.loop_last:
                    readout = hidden
                    if more_sleep:
                        _hand_on(hidden, stage, carried, sends)
            if planned.readout:  # the coda, on a branch of the loop output
                readout, states = stage.run_blocks(readout, states, planned.readout, per_pass)
            if stage.is_last:
                window_targets = None if targets is None else targets[:, window.start : window.end]
                logits, loss = head_and_loss(stage, readout, window_targets, want_logits)
            elif here >= stage.loop_last:
                sends[here + 1] = readout
            else:
                sends[here + 1] = hidden
            carried.woke = states
            carried.states = after_pass(planned, states, loop)
        else:
            hidden = received if received is not None else carried.loop_output
            states = before_pass(planned, carried.states, carried.window_start, loop)
            for blocks in planned.blocks:
                hidden, states = stage.run_blocks(hidden, states, blocks, per_pass)
            carried.states = after_pass(planned, states, loop)
            if here < stage.loop_last:
                sends[here + 1] = hidden
            elif more_sleep:
                _hand_on(hidden, stage, carried, sends)
    return OpOutput(sends, loss, logits)


def finish(stage: PipelineStage, plan: SleepPlan, carried: Carried) -> list[MixerState]:
    """The states after the micro-batch's last window, as the engine returns them."""
    last = plan.windows[-1]
    device = next(iter(stage.parameters())).device
    return after_window(last, after_sleep(last, carried.states, carried.woke, stage.loop_range, device))


def _hand_on(loop_output: torch.Tensor, stage: PipelineStage, carried: Carried, sends: dict[int, torch.Tensor]) -> None:
    """The loop output goes to the next sleep pass: kept here when the loop starts on this stage."""
    if stage.loop_first == stage.index:
        carried.loop_output = loop_output
    else:
        sends[stage.loop_first] = loop_output
