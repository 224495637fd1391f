# FROZEN: sleepscale/sleep.py as of commit 278da2f, before the sleep plan. tests/test_sleep_plan.py holds
# the plan-driven engine to it bit for bit. Do not edit; it is the reference, not a second engine.
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

N = 1 is exactly the plain hybrid. Activation checkpointing (`checkpoint: pass | window`, always
non-reentrant so that blocks reused N times work under ZeRO-2/3) changes memory and time, never
values or gradients.
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


@dataclasses.dataclass
class SleepOutput:
    logits: torch.Tensor | None  # [batch, length, vocab] from the wake passes; None unless asked for
    loss: torch.Tensor | None  # mean cross-entropy over target tokens; None without targets
    passes: torch.Tensor  # [batch, windows]: passes of the loop blocks run over each window
    states: list[MixerState]  # per-block states after the last window
    pass_state_norms: torch.Tensor | None = None  # [N]: loop GDN state norm after each pass, mean over slept windows


def window_bounds(length: int, window: int) -> list[tuple[int, int]]:
    return [(start, min(start + window, length)) for start in range(0, length, window)]


def sleep_forward(
    model: HybridLM,
    input_ids: torch.Tensor,
    sleep: SleepConfig,
    targets: torch.Tensor | None = None,
    return_logits: bool = True,
    states: list[MixerState] | None = None,
    sequence_continues: bool = False,
) -> SleepOutput:
    """Runs `model` over `input_ids` [batch, length] under `sleep`; `targets` [batch, length] hold
    the token to predict at each position, or IGNORE_INDEX where no loss applies.

    A long stream can be fed in segments: pass the previous call's `states` and, for every segment
    but the last, `sequence_continues=True`, which makes the final window evicted (and slept on)
    too. Such a segment must then be a whole number of windows."""
    batch, length = input_ids.shape
    if sequence_continues and length % sleep.window:
        raise ValueError(
            f"a segment followed by more of the sequence must be whole windows: length {length} "
            f"is not a multiple of sleep.window={sleep.window}"
        )
    if states is None:
        states = model.initial_states(batch, sleep.window, input_ids.device)
    bounds = window_bounds(length, sleep.window)
    logits, passes, pass_norms = [], [], []
    loss_sum = input_ids.new_zeros((), dtype=torch.float32)
    for index, (start, end) in enumerate(bounds):
        window_targets = None if targets is None else targets[:, start:end]
        evicted = sequence_continues or index < len(bounds) - 1
        sleeps = _sleeps_on_window(sleep, window_targets, batch, evicted, input_ids.device)
        window_logits, window_loss, states, norms = _maybe_checkpoint(
            sleep.checkpointing == "window",
            _run_window,
            model,
            sleep,
            input_ids[:, start:end],
            window_targets,
            states,
            sleeps,
        )
        if evicted and sleep.eviction == "hard":
            states = [state.evicted() for state in states]
        if sleep.detach_every is not None and (index + 1) % sleep.detach_every == 0:
            states = [state.detached() for state in states]
        if len(norms) > 1:
            pass_norms.append(norms)
        if window_loss is not None:
            loss_sum = loss_sum + window_loss
        passes.append(1 + (sleep.passes - 1) * sleeps.long())
        if return_logits:
            logits.append(model.cross_entropy.full_logits(window_logits))

    loss = None
    if targets is not None:
        loss = loss_sum / (targets != IGNORE_INDEX).sum().clamp(min=1)
    return SleepOutput(
        logits=torch.cat(logits, dim=1) if return_logits else None,
        loss=loss,
        passes=torch.stack(passes, dim=1),
        states=states,
        pass_state_norms=torch.stack(pass_norms).mean(0) if pass_norms else None,
    )


def _sleeps_on_window(
    sleep: SleepConfig, targets: torch.Tensor | None, batch: int, evicted: bool, device: torch.device
) -> torch.Tensor:
    """[batch] bool: which sequences sleep on this window."""
    if not evicted or sleep.passes == 1:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    if sleep.sleep_on == "context" and targets is not None:
        return (targets == IGNORE_INDEX).all(dim=1)
    return torch.ones(batch, dtype=torch.bool, device=device)


def _run_window(
    model: HybridLM,
    sleep: SleepConfig,
    window_ids: torch.Tensor,
    window_targets: torch.Tensor | None,
    states: list[MixerState],
    sleeps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, list[MixerState], torch.Tensor]:
    """Wake pass and sleep passes over one window. Returns (logits, summed loss or None without
    targets, states after it, the loop blocks' mean GDN state norm after each pass)."""
    loop = model.loop_range
    prelude, coda = range(0, loop.start), range(loop.stop, len(model.layers))
    per_pass = sleep.checkpointing == "pass"
    window_start = states

    hidden = model.embed(window_ids)
    hidden, states = model.run_blocks(hidden, states, prelude, checkpoint=per_pass)
    hidden, states = model.run_blocks(hidden, states, loop, checkpoint=per_pass)
    coda_hidden, states = model.run_blocks(hidden, states, coda, checkpoint=per_pass)
    logits = model.head(coda_hidden)
    loss = None if window_targets is None else model.cross_entropy(logits, window_targets)

    pass_norms = [_loop_state_norm(states, loop)]
    if sleeps.any():
        slept = states
        for pass_number in range(2, sleep.passes + 1):
            # Truncated backprop: the first N - k passes run without autograd, cutting the graph there.
            carries_grad = sleep.grad_passes is None or pass_number > sleep.passes - min(
                sleep.grad_passes, sleep.passes
            )
            with torch.set_grad_enabled(torch.is_grad_enabled() and carries_grad):
                slept = [slept[i].next_pass(window_start[i]) if i in loop else slept[i] for i in range(len(slept))]
                hidden, slept = model.run_blocks(hidden, slept, loop, checkpoint=per_pass)
                if sleep.state_norm_bound is not None:
                    slept = [
                        slept[i].bounded(sleep.state_norm_bound) if i in loop else slept[i] for i in range(len(slept))
                    ]
            pass_norms.append(_loop_state_norm(slept, loop))
        if not sleeps.all():
            slept = [slept[i].where(sleeps, states[i]) if i in loop else states[i] for i in range(len(states))]
        states = slept
    return logits, loss, states, torch.stack(pass_norms)


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
