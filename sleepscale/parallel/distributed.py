"""Process set-up for single-process and torchrun runs, on CPU (gloo) or GPU (NCCL): the default process
group, the rank's device, logging per rank, and the model-parallel groups when asked for."""

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


def setup_processes(parallel) -> Distributed:
    """The default process group, then the model-parallel groups that `parallel` (the config's
    `ParallelConfig`) asks for."""
    return setup_model_parallel(setup_distributed(), parallel.tensor, parallel.pipeline)


def setup_model_parallel(ctx: Distributed, tensor: int, pipeline: int = 1) -> Distributed:
    """Model-parallel process groups, when asked for."""
    if tensor == pipeline == 1:
        return ctx
    from sleepscale.parallel.groups import init_parallel_groups  # imports megatron-core (~6 s): only when asked for

    return dataclasses.replace(ctx, groups=init_parallel_groups(tensor=tensor, pipeline=pipeline))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def setup_distributed() -> Distributed:
    """Initialises torch.distributed through DeepSpeed. Without torchrun it is a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Imported here: DeepSpeed picks its accelerator on import, from DS_ACCELERATOR set just above.
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
        "rank %d of %d (local rank %d) on %s, %s",
        rank,
        world_size,
        local_rank,
        socket.gethostname(),
        "cuda" if cuda else "cpu",
    )
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
