"""Loss and gradient spike detection: a step is skipped, like a NaN step, when its loss (mean over
ranks) or its gradient norm (before clipping) exceeds `ratio` times the median of the last `window`
accepted steps.

A median of recent accepted steps, not a running mean: one spike must not raise the bar for the
next, and the bar must follow the falling loss of early training. Detection starts once `window`
steps have been accepted (in the current stage: a stage changes N or eviction, and with them the
loss level). The history lives in the trainer's `Progress`, so a resumed run makes the same calls.
"""

from __future__ import annotations

import statistics

from sleepscale.config import TrainConfig


class SpikeGuard:
    def __init__(self, train: TrainConfig, loss_history: list[float], grad_norm_history: list[float]):
        self.loss_ratio, self.grad_ratio, self.window = (
            train.loss_spike_ratio,
            train.grad_spike_ratio,
            train.spike_window,
        )
        self.loss_history, self.grad_norm_history = loss_history, grad_norm_history

    def is_loss_spike(self, loss: float) -> bool:
        return self._exceeds(self.loss_history, loss, self.loss_ratio)

    def is_grad_spike(self, grad_norm: float) -> bool:
        return self._exceeds(self.grad_norm_history, grad_norm, self.grad_ratio)

    def accept(self, loss: float | None, grad_norm: float | None) -> None:
        """Record a step whose update was applied (None: not watched)."""
        if loss is not None:
            self._append(self.loss_history, loss)
        if grad_norm is not None:
            self._append(self.grad_norm_history, grad_norm)

    def restart(self) -> None:
        """A new stage: forget the old loss level."""
        self.loss_history.clear()
        self.grad_norm_history.clear()

    def _exceeds(self, history: list[float], value: float, ratio: float | None) -> bool:
        return ratio is not None and len(history) >= self.window and value > ratio * statistics.median(history)

    def _append(self, history: list[float], value: float) -> None:
        history.append(value)
        del history[: -self.window]
