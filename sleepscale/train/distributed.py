"""Process-group set-up for single-process and torchrun runs, on CPU (gloo) or GPU (NCCL)."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sleepscale.parallel.groups import ParallelGroups


@dataclasses.dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    groups: ParallelGroups | None = None  # with model parallelism: tensor, pipeline and data groups

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Ranks of one model-parallel group read the same batches; data ranks read different ones."""
        return self.rank if self.groups is None else self.groups.data.rank()

    @property
    def data_size(self) -> int:
        return self.world_size if self.groups is None else self.groups.data.size()

    @property
    def data_group(self):
        """None: the whole world."""
        return None if self.groups is None else self.groups.data


def deepspeed_config(config) -> dict:
    """DeepSpeed's settings for a run (`sleepscale.config.Config`): the engine's, and ZeRO-3's
    partitioned construction (`sleepscale.parallel.rank_model`) reads the same."""
    # With pipelining, one DeepSpeed micro-step runs all micro-batches (they fill the pipeline together).
    pipelined = config.parallel.pipeline > 1
    settings = {
        "train_micro_batch_size_per_gpu": config.train.micro_batch_size,
        "gradient_accumulation_steps": 1 if pipelined else config.train.grad_accumulation,
        "gradient_clipping": config.train.grad_clip,
        "zero_optimization": {"stage": config.train.zero_stage},
        # train.precision bf16 is autocast around the forward (`sleepscale.train.step.precision_context`) over a
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
            min(loop_reuse_distance(config.model), DEEPSPEED_REUSE_DISTANCE) if reuse is None else reuse)
    return settings


DEEPSPEED_REUSE_DISTANCE = 10**9  # DeepSpeed's default stage3_max_reuse_distance


def loop_reuse_distance(model_config) -> int:
    """Parameter elements within which every loop parameter is used again while the passes of a window
    run, forward or recomputed in backward: twice the loop blocks, the coda after them, the final norm
    and the LM head (`deepspeed_config`)."""
    from sleepscale.model.hybrid import HybridLM

    with torch.device("meta"):
        model = HybridLM(model_config)
    start, _ = model_config.loop_range
    blocks = sum(p.numel() for layer in model.layers[start:] for p in layer.parameters())
    head = sum(p.numel() for p in model.norm.parameters()) + model.lm_head.weight.numel()
    return 2 * (blocks + head)


def setup_model_parallel(ctx: Distributed, tensor: int, pipeline: int = 1) -> Distributed:
    """Model-parallel process groups, when asked for (megatron-core's import costs ~6 s)."""
    if tensor == pipeline == 1:
        return ctx
    from sleepscale.parallel.groups import init_parallel_groups

    return dataclasses.replace(ctx, groups=init_parallel_groups(tensor=tensor, pipeline=pipeline))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def setup_distributed() -> Distributed:
    """Initialises torch.distributed through DeepSpeed. Without torchrun it is a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the submodule, patched below)

    if not cuda:
        # DeepSpeed JIT-compiles a shared-memory collective on first CPU use (~45 s); gloo needs none.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _configure_logging(rank)
    # One line from every rank (others log only warnings), so a job's output shows who ran where.
    logging.getLogger("sleepscale.distributed").info(
        "rank %d of %d (local rank %d) on %s, %s", rank, world_size, local_rank, socket.gethostname(), "cuda" if cuda else "cpu")
    return Distributed(rank, world_size, local_rank, torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def _configure_logging(rank: int) -> None:
    """Rank 0 logs plainly; other ranks prefix their lines with their rank and log warnings only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    root = logging.getLogger("sleepscale")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    logging.getLogger("sleepscale.distributed").setLevel(logging.INFO)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
