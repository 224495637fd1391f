"""Model FLOPs of a training step, counting every pass actually run.

Per token and block, a forward pass costs 2 FLOPs per weight of its linear layers, plus for
attention 4 * heads * head_dim * (keys seen) for scores and weighted values, plus for Gated
DeltaNet 6 * heads * d_k * d_v for reading the state, the delta correction and the state update.
Per window: the wake pass runs every block once and the head; each sleep pass runs the loop blocks
again. Backward costs twice the forward of the passes that carry gradient; activation
checkpointing recomputes the forward of what it covers once more; passes under `grad_passes` run
forward only. The count is analytic (it ignores norms, activations and the loss), as MFU is usually
reported.
"""

from __future__ import annotations

from torch import nn

from sleepscale.config import ModelConfig, SleepConfig
from sleepscale.model.attention import Attention
from sleepscale.model.gdn import GatedDeltaNet

# Dense bf16 tensor-core peak of the accelerators MFU is reported for (FLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def peak_flops(device) -> float | None:
    """The accelerator's dense bf16 peak, when it is one we know."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def block_forward_flops_per_token(block: nn.Module, keys_seen: float) -> float:
    flops = 2.0 * _linear_weights(block)
    mixer = block.attn
    if isinstance(mixer, Attention):
        flops += 4.0 * mixer.num_heads * mixer.head_dim * keys_seen
    elif isinstance(mixer, GatedDeltaNet):
        flops += 6.0 * mixer.num_heads * mixer.head_k_dim * mixer.head_v_dim
    return flops


def training_flops_per_token(model: nn.Module, config: ModelConfig, sleep: SleepConfig, sleep_passes: float) -> float:
    """FLOPs per token of one training step; `sleep_passes`: the sleep passes run per window, on
    average (the sleep engine's `passes` minus 1, averaged)."""
    window = sleep.window
    keys_seen = (window + 1) / 2 if sleep.eviction == "hard" else float(window)
    per_block = [block_forward_flops_per_token(block, keys_seen) for block in model.layers]
    loop = range(*config.loop_range)
    loop_pass = sum(per_block[i] for i in loop)
    wake = sum(per_block) + 2.0 * model.lm_head.weight.numel()
    grad_sleep_passes = sleep_passes
    if sleep.grad_passes is not None and sleep.passes > 1:
        grad_sleep_passes = sleep_passes * min(sleep.grad_passes, sleep.passes - 1) / (sleep.passes - 1)

    forward = wake + sleep_passes * loop_pass
    backward = 2.0 * (wake + grad_sleep_passes * loop_pass)
    recompute = 0.0
    if sleep.checkpointing == "pass":
        recompute = sum(per_block) + grad_sleep_passes * loop_pass  # the head and loss are not checkpointed
    elif sleep.checkpointing == "window":
        recompute = wake + sleep_passes * loop_pass  # the whole window is re-run, passes without gradient too
    return forward + backward + recompute
