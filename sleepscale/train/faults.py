"""Fault injection for testing the trainer's guards, switched on by environment variables only.
`install` is called once at start-up: without any SLEEPSCALE_FAULT_* variable it changes nothing
and the training step runs no fault code at all.

    SLEEPSCALE_FAULT_NAN_LOSS_STEPS=3,4     the loss of those (0-based) steps becomes NaN
    SLEEPSCALE_FAULT_SPIKE_LOSS_STEPS=12    the loss of those (0-based) steps is multiplied by 1000
    SLEEPSCALE_FAULT_SIGTERM_AT_STEP=10     the process sends itself SIGTERM after that step
    SLEEPSCALE_FAULT_KILL_DURING_SAVE=20    SIGKILL while the checkpoint of that step is half written
    SLEEPSCALE_FAULT_EXIT_AT_STEP=1:5       rank 1 dies (exit code 13, no clean-up) after step 5; RANK:STEP,...
    SLEEPSCALE_FAULT_PAUSE_AT_STEP=5        after that step, wait for a stop signal (SIGTERM/SIGUSR1) before going
                                            on, so a test can signal a run at a known step without racing it
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch


def _steps(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(name, "").split(",") if s.strip()}


def install(model: torch.nn.Module, progress, stop) -> list:
    """Switches on the faults the environment asks for: a forward hook on `model` (the module the
    trainer calls per micro-batch) for loss faults, and the after-step callables it returns.
    `progress.step` is the step being run; `stop` is the trainer's StopSignal."""
    nan_steps, spike_steps = _steps("SLEEPSCALE_FAULT_NAN_LOSS_STEPS"), _steps("SLEEPSCALE_FAULT_SPIKE_LOSS_STEPS")
    if nan_steps or spike_steps:

        def corrupt_loss(module, inputs, output):
            if module.training and output.loss is not None:
                if progress.step in nan_steps:
                    output.loss = output.loss * float("nan")
                elif progress.step in spike_steps:
                    output.loss = output.loss * 1000.0
            return output

        model.register_forward_hook(corrupt_loss)
    after_step_variables = (
        "SLEEPSCALE_FAULT_SIGTERM_AT_STEP",
        "SLEEPSCALE_FAULT_EXIT_AT_STEP",
        "SLEEPSCALE_FAULT_PAUSE_AT_STEP",
    )
    if any(os.environ.get(name) for name in after_step_variables):
        return [lambda step: after_step(step, stop)]
    return []


EXIT_CODE_DYING_RANK = 13


def after_step(step: int, stop=None) -> None:
    """`stop` is the trainer's StopSignal (its `received` is set by SIGTERM/SIGUSR1)."""
    if step in _steps("SLEEPSCALE_FAULT_SIGTERM_AT_STEP"):
        os.kill(os.getpid(), signal.SIGTERM)
    rank = int(os.environ.get("RANK", "0"))
    for entry in os.environ.get("SLEEPSCALE_FAULT_EXIT_AT_STEP", "").split(","):
        if entry.strip() and tuple(int(part) for part in entry.split(":")) == (rank, step):
            os._exit(EXIT_CODE_DYING_RANK)
    if stop is not None and step in _steps("SLEEPSCALE_FAULT_PAUSE_AT_STEP"):
        # Said once a rank is past the previous step's stop check: a signal sent after this line
        # is certain to stop the run at this step.
        print(
            f"fault injection: rank {rank} paused after step {step} until SIGTERM/SIGUSR1", file=sys.stderr, flush=True
        )
        while stop.received is None:
            time.sleep(0.05)


def during_save(step: int) -> None:
    if step in _steps("SLEEPSCALE_FAULT_KILL_DURING_SAVE"):
        os.kill(os.getpid(), signal.SIGKILL)
