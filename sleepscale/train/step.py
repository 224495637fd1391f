"""The decision around one training step's update: apply it or skip it.

The loop calls `parallelism.forward_backward(engine, micro_batches, sleep, guard.before_backward)`
(`sleepscale.parallel.parallelism`), then `guard.decide()` and `engine.step()` once.

Nothing here reads a device value on the host except what is opt-in or unavoidable, each named where
it happens: the loss-spike guard (a host value per micro-batch), and the gradient check of our own
optimizers, which DeepSpeed runs at its stage 0 (AdamW at ZeRO-0, Muon at any stage; one per step;
DeepSpeed's ZeRO and bf16 optimizers make the same check inside their own step).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from sleepscale.config import TrainConfig
from sleepscale.parallel.parallelism import Parallelism
from sleepscale.train.spikes import SpikeGuard


@dataclasses.dataclass
class Decision:
    apply: bool
    grad_norm: float | None  # before clipping, where we compute it (our optimizers); None: DeepSpeed's
    loss_spike: bool
    grad_spike: bool


class UpdateGuard:
    """The one decision around the optimizer step: apply the update or skip it (no update, the LR
    schedule held, the step counted as skipped), for a non-finite loss or gradient or a spike.

    How a skip reaches the optimizer depends on who owns it. Our optimizers (AdamW at ZeRO-0, Muon at
    any stage: DeepSpeed runs both at its stage 0) skip when their `overflow` flag is set, the flag
    DeepSpeed's engine reads to count the skip and hold the schedule (`sleepscale.train.optim`).
    DeepSpeed's ZeRO and bf16 optimizers decide on overflow inside their own step from the gradients,
    and take no request: they skip non-finite gradients themselves, and for a loss spike the backward
    runs on a NaN loss, the one way to make them skip."""

    def __init__(self, train: TrainConfig, engine, parallelism: Parallelism, spikes: SpikeGuard):
        self.train, self.engine, self.parallelism, self.spikes = train, engine, parallelism, spikes
        self.ours = not (engine.zero_optimization() or engine.bfloat16_enabled())
        self.loss_spike = False

    def before_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate. With `train.loss_spike_ratio` this reads the loss (mean over
        ranks) on the host, one synchronisation per micro-batch; without it, nothing happens here."""
        if self.train.loss_spike_ratio is None:
            return loss
        self.loss_spike = self.loss_spike or self.spikes.is_loss_spike(self.parallelism.loss_on_host(loss))
        return loss * float("nan") if self.loss_spike and not self.ours else loss

    def decide(self) -> Decision:
        """Called after the step's last backward, before `engine.step()`."""
        loss_spike, self.loss_spike = self.loss_spike, False
        grad_norm = self._gradient_norm() if self.ours else None
        finite = grad_norm is None or math.isfinite(grad_norm)
        grad_spike = finite and grad_norm is not None and self.spikes.is_grad_spike(grad_norm)
        apply = finite and not loss_spike and not grad_spike
        if self.ours:
            self.engine.optimizer.overflow = not apply
        return Decision(apply, grad_norm, loss_spike, grad_spike)

    def _gradient_norm(self) -> float:
        """Norm of the gradients before clipping, over the whole model (averaged over data ranks).
        Read on the host: the decision to skip needs it (one synchronisation a step)."""
        optimizer = self.engine.optimizer
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return self.parallelism.gradient_norm(parameters).item()
