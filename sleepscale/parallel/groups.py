"""Tensor x pipeline x data parallel process groups, from megatron-core's `parallel_state`.

Ranks are laid out as megatron does (tensor fastest, then data, then pipeline), so the processes of
one tensor-parallel group sit on one node. Gloo on CPU, NCCL on GPU: the groups inherit the backend
of the default process group, which `sleepscale.parallel.distributed` picks.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from sleepscale.config import ConfigError
from sleepscale.parallel.cpu_shim import patch_megatron_for_cpu


@dataclasses.dataclass(frozen=True)
class ParallelGroups:
    tensor: dist.ProcessGroup
    pipeline: dist.ProcessGroup
    data: dist.ProcessGroup

    @property
    def sizes(self) -> tuple[int, int, int]:
        return self.tensor.size(), self.pipeline.size(), self.data.size()


def check_layout(world_size: int, tensor: int, pipeline: int) -> int:
    """The data-parallel size, or a one-line error."""
    if world_size % (tensor * pipeline):
        raise ConfigError(
            f"parallel: world size {world_size} is not a multiple of tensor {tensor} x pipeline {pipeline}; "
            f"launch a multiple of {tensor * pipeline} processes or change parallel.tensor / parallel.pipeline"
        )
    return world_size // (tensor * pipeline)


def init_parallel_groups(tensor: int = 1, pipeline: int = 1) -> ParallelGroups:
    """Needs an initialised default process group. Idempotent for the same layout."""
    from megatron.core import parallel_state  # ~3 s: only when the groups are made (the planner loads this module)

    check_layout(dist.get_world_size(), tensor, pipeline)
    patch_megatron_for_cpu()
    if parallel_state.model_parallel_is_initialized():
        existing = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        if existing != (tensor, pipeline):
            raise RuntimeError(
                f"parallel groups already set up for tensor x pipeline {existing}, asked for {(tensor, pipeline)}"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline, create_gloo_process_groups=False
        )
    return ParallelGroups(
        tensor=parallel_state.get_tensor_model_parallel_group(),
        pipeline=parallel_state.get_pipeline_model_parallel_group(),
        data=parallel_state.get_data_parallel_group(),
    )


class DeepSpeedMpu:
    """The model-parallel unit DeepSpeed asks for (`deepspeed.initialize(mpu=...)`): it all-reduces
    gradients and partitions ZeRO state over the data group only, and counts tensor-parallel shards
    once in the gradient norm."""

    def __init__(self, groups: ParallelGroups):
        from megatron.core import parallel_state  # ~3 s: only for a DeepSpeed engine

        self.groups, self._model_group = groups, parallel_state.get_model_parallel_group()

    def get_model_parallel_group(self):
        return self._model_group

    def get_model_parallel_rank(self) -> int:
        return self._model_group.rank()

    def get_model_parallel_world_size(self) -> int:
        return self._model_group.size()

    def get_tensor_model_parallel_group(self):
        return self.groups.tensor

    def get_tensor_model_parallel_rank(self) -> int:
        return self.groups.tensor.rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.groups.tensor.size()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.groups.pipeline.size()

    def get_data_parallel_group(self):
        return self.groups.data

    def get_data_parallel_rank(self) -> int:
        return self.groups.data.rank()

    def get_data_parallel_world_size(self) -> int:
        return self.groups.data.size()


def mark_stage_parameters_for_deepspeed(model, groups: ParallelGroups) -> None:
    """DeepSpeed counts a parameter in the gradient norm (for clipping) on the first rank of the
    model-parallel group, or anywhere it is marked `model_parallel`. Under pipeline parallelism each
    stage holds its own parameters, so on each stage's first tensor rank all of them must count;
    replicated ones still count once per stage, split ones on every tensor rank."""
    if groups.pipeline.size() > 1 and groups.tensor.rank() == 0:
        for parameter in model.parameters():
            parameter.model_parallel = True
