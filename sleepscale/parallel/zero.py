"""DeepSpeed's ZeRO data parallelism for a run: its settings, and the engine over the rank's model.

The run's layout decides two of DeepSpeed's inputs: with pipelining one DeepSpeed micro-step runs all
micro-batches, and with model parallelism DeepSpeed reduces and partitions over the data-parallel
group only (`sleepscale.parallel.groups.DeepSpeedMpu`). ZeRO-3's partitioned construction
(`sleepscale.parallel.rank_model`) reads the same settings.
"""

from __future__ import annotations

import torch

from sleepscale.model.hybrid import HybridLM
from sleepscale.parallel.groups import DeepSpeedMpu, mark_stage_parameters_for_deepspeed


def deepspeed_config(config) -> dict:
    """DeepSpeed's settings for a run (`sleepscale.config.Config`): the engine's, and ZeRO-3's
    partitioned construction (`sleepscale.parallel.rank_model`) reads the same."""
    # With pipelining, one DeepSpeed micro-step runs all micro-batches (they fill the pipeline together).
    pipelined = config.parallel.pipeline > 1
    settings = {
        "train_micro_batch_size_per_gpu": config.train.micro_batch_size,
        "gradient_accumulation_steps": 1 if pipelined else config.train.grad_accumulation,
        "gradient_clipping": config.train.grad_clip,
        "zero_optimization": {"stage": config.deepspeed_zero_stage},
        # train.precision bf16 is autocast around the forward (`sleepscale.model.precision.precision_context`) over a
        # float32 engine, so that gradients of blocks reused N times sum in float32; DeepSpeed's bf16 mode would
        # cast the whole model to bf16.
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.train.zero_stage == 3:
        settings["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        # Sleep re-runs the loop blocks N times over each window. ZeRO-3 gathers a module's parameters
        # when it runs and, once it has recorded the step's module order (its "trace", from the second
        # forward-backward on), releases them afterwards unless they are used again within
        # `stage3_max_reuse_distance` parameter elements of the modules ahead. Between two passes of a
        # window that distance is the loop blocks' parameters, plus the coda and head between the wake
        # pass and the first sleep pass; per-pass activation checkpointing recomputes each pass inside
        # the backward, which puts up to twice that between two uses. So twice (loop + coda + head)
        # gathers the loop once per window (in practice once per step) instead of once per pass
        # (benchmarks/results/zero3_gather.md). The distance also bounds what stays gathered at once
        # (at most about that many elements, plus the module running): capped at DeepSpeed's own
        # default (1e9, what ran before), and `train.zero3_reuse_distance` sets it, lower when the loop
        # does not fit gathered on a device (it is then gathered once per pass, as before).
        reuse = config.train.zero3_reuse_distance
        settings["zero_optimization"]["stage3_max_reuse_distance"] = (
            min(loop_reuse_distance(config.model), DEEPSPEED_REUSE_DISTANCE) if reuse is None else reuse
        )
    return settings


DEEPSPEED_REUSE_DISTANCE = 10**9  # DeepSpeed's default stage3_max_reuse_distance


def loop_reuse_distance(model_config) -> int:
    """Parameter elements within which every loop parameter is used again while the passes of a window
    run, forward or recomputed in backward: twice the loop blocks, the coda after them, the final norm
    and the LM head (`deepspeed_config`)."""
    with torch.device("meta"):
        model = HybridLM(model_config)
    start, _ = model_config.loop_range
    blocks = sum(p.numel() for layer in model.layers[start:] for p in layer.parameters())
    head = sum(p.numel() for p in model.norm.parameters()) + model.lm_head.weight.numel()
    return 2 * (blocks + head)


def build_engine(model: torch.nn.Module, optimizer, scheduler, config, groups):
    """A DeepSpeed engine over `model` (the rank's `SleepingModel`) with `optimizer` and `scheduler`;
    `groups`: the ParallelGroups, or None without model parallelism."""
    import deepspeed  # ~5 s, and it sets up its accelerator on import: only where an engine is built

    mpu = None
    if groups is not None:
        mpu = DeepSpeedMpu(groups)
        mark_stage_parameters_for_deepspeed(model, groups)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config), mpu=mpu
    )
    return engine
