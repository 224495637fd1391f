"""Where a training step's forward runs: the mixed-precision policy (`train.precision`)."""

from __future__ import annotations

import contextlib

import torch


def precision_context(precision: str, device: torch.device):
    """Where a training step's forward runs. bf16 is mixed precision in the manner of torchtitan's
    FSDP policy (bf16 compute, float32 parameters and gradients), through autocast: parameters,
    gradients and optimizer state stay float32, and the matmuls of the forward (and so of its
    backward) run in bf16. Gradients therefore sum in float32, over micro-steps and over the N
    passes that reuse a block's weights: each use casts its weight afresh (`cache_enabled=False`),
    so that a pass's gradient becomes float32 before it is added to the others' (with autocast's
    cache the passes would share one bf16 copy, whose gradient autograd sums in bf16). The GDN
    decay parameters `A_log` and `dt_bias`, and every recurrent state, stay float32; the delta rule
    itself computes in float32. (DeepSpeed's own bf16 mode instead casts the model to bf16, so a
    block's gradient would sum over its N uses in bf16.)"""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
