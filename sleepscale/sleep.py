"""The sleep engine: read a sequence window by window, and sleep on each window before evicting it.

For every window of L tokens (the last may be shorter):

1. Wake pass. The prelude blocks, pass 1 of the loop blocks, then the coda blocks and the head.
   All logits and all loss come from this pass, so answering costs one pass whatever N is.
2. Sleep. If the window will be evicted before the sequence ends, the loop blocks run passes
   2..N over it. Each pass starts from the previous pass's hidden states and GDN fast weights;
   its short-convolution and attention context is the context the window started with.
   `sleep_on: context` sleeps only on windows that carry no loss tokens (the paper's Algorithm 1).
3. Evict. The hidden states are dropped. Under hard eviction only the GDN fast weights reach the
   next window. Under sliding eviction the attention keeps the last L-1 keys/values and the short
   convolutions their last inputs, all from the final pass over the window.

N = 1 is exactly the plain hybrid. Activation checkpointing (`checkpoint: window`, or a form of
recomputation of each pass's blocks, `pass | block | nested | selective`: `sleepscale.model.recompute`;
always non-reentrant so that blocks reused N times work under ZeRO-2/3) changes memory and time,
never values or gradients.

Which windows sleep, which passes carry gradient, what is checkpointed and which state operations
run between passes is decided up front, on the host, by `sleepscale.plan.make_plan`; this file only
runs that plan. So the engine never asks the device a question (no host synchronisation).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.checkpoint import checkpoint

from sleepscale.config import SleepConfig
from sleepscale.data.sample import IGNORE_INDEX
from sleepscale.model.gdn import GDNState
from sleepscale.model.hybrid import HybridLM
from sleepscale.model.state import MixerState
from sleepscale.plan import PassPlan, SleepPlan, WindowPlan, loss_windows, make_plan, window_bounds

__all__ = ["IGNORE_INDEX", "SleepOutput", "sleep_forward", "plan_for", "window_bounds"]


@dataclasses.dataclass
class SleepOutput:
    logits: torch.Tensor | None  # [batch, length, vocab] from the wake passes; None unless asked for
    loss: torch.Tensor | None  # mean cross-entropy over target tokens; None without targets
    passes: torch.Tensor  # [batch, windows] on the host: passes of the loop blocks run over each window
    states: list[MixerState]  # per-block states after the last window
    pass_state_norms: torch.Tensor | None = None  # [N]: loop GDN state norm after each pass, mean over slept windows


def plan_for(
    model: HybridLM,
    input_ids: torch.Tensor,
    sleep: SleepConfig,
    targets: torch.Tensor | None = None,
    sequence_continues: bool = False,
) -> SleepPlan:
    """The plan `sleep_forward` runs for these inputs. Under `sleep_on: context` it reads `targets`
    on the host: build it from CPU targets (before they move to the device) to keep the step free
    of host synchronisation."""
    batch, length = input_ids.shape
    carries_loss = None
    if sleep.sleep_on == "context" and sleep.passes > 1 and targets is not None:
        carries_loss = loss_windows(targets, sleep.window)
    return make_plan(sleep, batch, length, len(model.layers), model.loop_range, carries_loss, sequence_continues)


def sleep_forward(
    model: HybridLM,
    input_ids: torch.Tensor,
    sleep: SleepConfig,
    targets: torch.Tensor | None = None,
    return_logits: bool = True,
    states: list[MixerState] | None = None,
    sequence_continues: bool = False,
    plan: SleepPlan | None = None,
) -> SleepOutput:
    """Runs `model` over `input_ids` [batch, length] under `sleep`; `targets` [batch, length] hold
    the token to predict at each position, or IGNORE_INDEX where no loss applies. `plan` (from
    `plan_for`) defaults to the plan for these inputs.

    A long stream can be fed in segments: pass the previous call's `states` and, for every segment
    but the last, `sequence_continues=True`, which makes the final window evicted (and slept on)
    too. Such a segment must then be a whole number of windows."""
    batch, length = input_ids.shape
    if sequence_continues and length % sleep.window:
        raise ValueError(
            f"a segment followed by more of the sequence must be whole windows: length {length} "
            f"is not a multiple of sleep.window={sleep.window}"
        )
    if plan is None:
        plan = plan_for(model, input_ids, sleep, targets, sequence_continues)
    elif (plan.batch, plan.windows[-1].end) != (batch, length):
        raise ValueError(
            f"the sleep plan is for {plan.batch} sequences of {plan.windows[-1].end} tokens, "
            f"the input is {batch} of {length}"
        )
    if states is None:
        states = model.initial_states(batch, sleep.window, input_ids.device)
    logits, pass_norms = [], []
    loss_sum = input_ids.new_zeros((), dtype=torch.float32)
    for window in plan.windows:
        window_targets = None if targets is None else targets[:, window.start : window.end]
        window_logits, window_loss, states, norms = _maybe_checkpoint(
            window.is_checkpoint_unit,
            _run_window,
            model,
            window,
            input_ids[:, window.start : window.end],
            window_targets,
            states,
            return_logits,
        )
        states = after_window(window, states)
        if len(norms) > 1:
            pass_norms.append(norms)
        if window_loss is not None:
            loss_sum = loss_sum + window_loss
        if return_logits:
            logits.append(model.cross_entropy.full_logits(window_logits))

    loss = None
    if targets is not None:
        loss = loss_sum / (targets != IGNORE_INDEX).sum().clamp(min=1)
    return SleepOutput(
        logits=torch.cat(logits, dim=1) if return_logits else None,
        loss=loss,
        passes=plan.passes_run(),
        states=states,
        pass_state_norms=torch.stack(pass_norms).mean(0) if pass_norms else None,
    )


def _run_window(
    model: HybridLM,
    window: WindowPlan,
    window_ids: torch.Tensor,
    window_targets: torch.Tensor | None,
    states: list[MixerState],
    want_logits: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[MixerState], torch.Tensor]:
    """The passes of one window, as planned. Returns (logits, or None when not wanted and not
    needed; summed loss, or None without targets; states after it; the loop blocks' mean GDN state
    norm after each pass)."""
    window_start, hidden, pass_norms = states, None, []
    for planned in window.passes:
        out = run_pass(model, window, planned, hidden, states, window_start, window_ids, window_targets, want_logits)
        hidden, states = out.hidden, out.states
        if out.woke is not None:
            logits, loss, woke = out.logits, out.loss, out.woke
        pass_norms.append(_loop_state_norm(states, model.loop_range))
    states = after_sleep(window, states, woke, model.loop_range, window_ids.device)
    return logits, loss, states, torch.stack(pass_norms)


@dataclasses.dataclass
class PassOutput:
    hidden: torch.Tensor | None  # the pass's output on the main line of blocks (the loop output once the loop has run)
    states: list[MixerState]  # after the pass, bounded as planned
    readout: torch.Tensor | None = (
        None  # wake pass: the coda's output on a branch of the loop output (the head's input)
    )
    woke: list[MixerState] | None = None  # wake pass: the states after it, before any bound
    logits: torch.Tensor | None = None  # wake pass on the blocks that end with the head
    loss: torch.Tensor | None = None


def run_pass(
    model: HybridLM,
    window: WindowPlan,
    planned: PassPlan,
    hidden: torch.Tensor | None,
    states: list[MixerState],
    window_start: list[MixerState],
    window_ids: torch.Tensor | None = None,
    window_targets: torch.Tensor | None = None,
    want_logits: bool = True,
) -> PassOutput:
    """One pass over one window, on the blocks `model` holds, with the state operations around it:
    the one place a pass is written. `model` is the whole model (`sleep_forward`) or a pipeline
    stage's (`sleepscale.parallel.pipeline_stage`): blocks it does not hold pass `hidden` through
    untouched, and their states are `NotHeld` placeholders that the state operations leave alone.

    `hidden` is the pass's input: the previous pass's loop output for a sleep pass, or the hidden
    states another stage handed on (None where this model embeds `window_ids`). On the wake pass
    the coda runs on a branch of the loop output, then the head where this model holds it; a
    stage after the loop receives the branch itself as `hidden`, which its (empty) part of the main
    line passes on to its part of the coda. `window_start`: the states the window started from
    (each sleep pass restarts the loop blocks' context from them)."""
    loop, form = model.loop_range, planned.checkpoint
    out = PassOutput(hidden, states)
    with torch.set_grad_enabled(torch.is_grad_enabled() and planned.grad):
        if planned.number == 1 and model.holds_embedding:
            hidden = model.embed(window_ids)
        states = before_pass(planned, states, window_start, loop)
        for blocks in planned.blocks:
            hidden, states = model.run_blocks(hidden, states, blocks, checkpoint=form)
        if planned.readout is not None:  # the wake pass: coda and head on a branch, the loop output goes on
            out.readout = hidden
            if planned.readout:
                out.readout, states = model.run_blocks(hidden, states, planned.readout, checkpoint=form)
            if model.holds_head:
                out.logits, out.loss = head_and_loss(model, out.readout, window_targets, want_logits)
            out.woke = states
        out.hidden, out.states = hidden, after_pass(planned, states, loop)
    return out


# The state operations around passes and windows. Every interpreter of a plan applies them through
# these functions (`run_pass`, and what ends a window here and on a pipeline stage: `states` may then
# hold `NotHeld` placeholders for other stages' blocks, which these operations leave alone).


def before_pass(
    planned: PassPlan, states: list[MixerState], window_start: list[MixerState], loop: range
) -> list[MixerState]:
    """A sleep pass's loop blocks restart from the context the window started with."""
    if not planned.next_pass:
        return states
    return [states[i].next_pass(window_start[i]) if i in loop else states[i] for i in range(len(states))]


def after_pass(planned: PassPlan, states: list[MixerState], loop: range) -> list[MixerState]:
    """The loop blocks' GDN states rescaled to the pass's bound, if it has one."""
    if planned.bound is None:
        return states
    return [states[i].bounded(planned.bound) if i in loop else states[i] for i in range(len(states))]


def after_sleep(
    window: WindowPlan, states: list[MixerState], woke: list[MixerState], loop: range, device: torch.device
) -> list[MixerState]:
    """When only some sequences slept on the window, the others keep their states after the wake pass."""
    if window.sleepers is None:
        return states
    sleepers = torch.tensor(window.sleepers, device=device)
    return [states[i].where(sleepers, woke[i]) if i in loop else woke[i] for i in range(len(states))]


def end_window(
    window: WindowPlan, states: list[MixerState], woke: list[MixerState], loop: range, device: torch.device
) -> list[MixerState]:
    """The states the next window starts from: `after_sleep`, then `after_window`."""
    return after_window(window, after_sleep(window, states, woke, loop, device))


def after_window(window: WindowPlan, states: list[MixerState]) -> list[MixerState]:
    """Hard eviction (only GDN fast weights go on) and the `detach_every` cut, as planned."""
    if window.evict:
        states = [state.evicted() for state in states]
    if window.detach:
        states = [state.detached() for state in states]
    return states


# Logits of at most this many elements are computed at once when only the loss is wanted (2^26: 256 MB
# in float32); a window whose [batch, length, vocab] logits are larger gets its loss in token chunks.
LOSS_CHUNK_ELEMENTS = 2**26


def loss_chunk_length(batch: int, length: int, vocab_size: int) -> int | None:
    """Tokens per chunk when a training window's loss is computed in chunks (`head_and_loss`), or None."""
    chunk = max(1, LOSS_CHUNK_ELEMENTS // (batch * vocab_size))
    return None if chunk >= length else chunk


def head_and_loss(model: HybridLM, hidden, targets: torch.Tensor | None, want_logits: bool):
    """(logits or None, summed loss or None) of the head over `hidden`. When only the loss is wanted
    and the window's logits would be large (long windows, large vocabularies), the loss is computed
    over chunks of tokens, each chunk's head and cross-entropy checkpointed: only one chunk's logits
    exist at a time, in forward and in backward."""
    if want_logits or targets is None or not isinstance(hidden, torch.Tensor):
        logits = model.head(hidden)
        return logits, None if targets is None else model.cross_entropy(logits, targets)
    batch, length = targets.shape
    chunk = loss_chunk_length(batch, length, model.config.vocab_size)
    if chunk is None:
        return None, model.cross_entropy(model.head(hidden), targets)
    loss = None
    for start in range(0, length, chunk):
        part = _maybe_checkpoint(
            True, _chunk_loss, model, hidden[:, start : start + chunk], targets[:, start : start + chunk]
        )
        loss = part if loss is None else loss + part
    return None, loss


def _chunk_loss(model: HybridLM, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model.cross_entropy(model.head(hidden), targets)


def _loop_state_norm(states: list[MixerState], loop: range) -> torch.Tensor:
    """Mean norm of the loop blocks' GDN fast weights (0 without GDN blocks), for monitoring."""
    norms = [
        states[i].fast_weights.detach().float().flatten(2).norm(dim=-1).mean()
        for i in loop
        if isinstance(states[i], GDNState)
    ]
    return torch.stack(norms).mean() if norms else torch.zeros(())


def _maybe_checkpoint(enabled: bool, function, *args):
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)
