"""This rank's part of the model, built without ever holding the whole model.

The model is built on the meta device (no memory), cut to this rank's pipeline stage (the other
stages' blocks, and the embedding or head a stage does not hold, are dropped), tensor-parallelised
on the meta device, and only then are its remaining parameters materialised one at a time, each
filled with this rank's shard alone (`load_weights`) from its source:

- a model directory (`model.init_from`, fresh or resumed): read from the directory's files;
- a seed (`model.seed`): drawn from the parameter's own RNG stream (`SeededWeights`), so the values
  do not depend on the layout: a stage equals the same blocks of the single-process model.

A rank's peak is about its share of the weights plus one whole parameter. Under ZeRO-3 the model is
partitioned as it is built (`_zero3_model`).

The rank's place in the pipeline (`PipelineStage`) is added by `sleepscale.parallel.parallelize`.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from sleepscale.config import Config
from sleepscale.model.hybrid import HybridLM, cut_to_blocks
from sleepscale.model.seeded_weights import SeededWeights
from sleepscale.model.weights import SafetensorsFiles, load_weights
from sleepscale.parallel.zero import deepspeed_config


def build_rank_model(config: Config, groups, device: torch.device) -> HybridLM:
    """`groups`: the ParallelGroups, or None without model parallelism. A resumed run reads
    `model.init_from` again (its checkpoint then replaces the weights): the directory must stay."""
    tensor_group = groups.tensor if groups is not None and config.parallel.tensor > 1 else None
    source = config.model.init_from or SeededWeights(config.model)
    if config.train.zero_stage == 3:
        return _zero3_model(config, source, device)
    with torch.device("meta"):
        model = HybridLM(config.model)
        if config.parallel.pipeline > 1:
            cut_to_blocks(model, config.model.stage_ranges[groups.pipeline.rank()])
    shard = None
    if tensor_group is not None:
        from sleepscale.parallel.tensor import parallelize_tensor, shard_slice  # megatron-core (~6 s): TP only

        with torch.device("meta"):
            parallelize_tensor(model, tensor_group)
        shard = functools.partial(shard_slice, group=tensor_group)
    load_weights(model, source, shard=shard, device=device)
    return model


def _zero3_model(config: Config, source, device: torch.device) -> HybridLM:
    """Partitioned as it is built (DeepSpeed's `zero.Init`), then filled one parameter at a time:
    each is gathered whole for a moment, rank 0 copies the stored (or seeded) tensor in, and DeepSpeed
    repartitions it. A rank holds its partition plus about two whole parameters (the gathered one and,
    on rank 0, the one read). (ZeRO-3 excludes tensor
    and pipeline parallelism, so every rank is a data-parallel rank.)"""
    import deepspeed  # ~5 s: only under ZeRO-3

    # Partitions go to DeepSpeed's accelerator device (this rank's GPU, which setup_distributed
    # selects; the CPU without one), i.e. `device`.
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(config)):
        model = HybridLM(config.model)
    files = SafetensorsFiles(source) if isinstance(source, str) else source
    for name, parameter in model.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0), torch.no_grad():
            if dist.get_rank() == 0:
                parameter.copy_(files.get(name))
    return model
