"""Fault injection for testing the trainer's guards, switched on by environment variables only:

    SLEEPSCALE_FAULT_NAN_LOSS_STEPS=3,4     the loss of those (0-based) steps becomes NaN
    SLEEPSCALE_FAULT_SPIKE_LOSS_STEPS=12    the loss of those (0-based) steps is multiplied by 1000
    SLEEPSCALE_FAULT_SIGTERM_AT_STEP=10     the process sends itself SIGTERM after that step
    SLEEPSCALE_FAULT_KILL_DURING_SAVE=20    SIGKILL while the checkpoint of that step is half written
"""

from __future__ import annotations

import os
import signal

import torch


def _steps(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip()}


def corrupt_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    if step in _steps("SLEEPSCALE_FAULT_NAN_LOSS_STEPS"):
        return loss * float("nan")
    if step in _steps("SLEEPSCALE_FAULT_SPIKE_LOSS_STEPS"):
        return loss * 1000.0
    return loss


def after_step(step: int) -> None:
    if step in _steps("SLEEPSCALE_FAULT_SIGTERM_AT_STEP"):
        os.kill(os.getpid(), signal.SIGTERM)


def during_save(step: int) -> None:
    if step in _steps("SLEEPSCALE_FAULT_KILL_DURING_SAVE"):
        os.kill(os.getpid(), signal.SIGKILL)
