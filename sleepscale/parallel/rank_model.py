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

The pipeline wrapper itself (`PipelineStage`) is applied by the trainer afterwards.
"""

from __future__ import annotations

import torch
from torch import nn

from sleepscale.config import Config
from sleepscale.model.hybrid import HybridLM
from sleepscale.model.seeded_weights import SeededWeights
from sleepscale.model.weights import SafetensorsFiles, load_weights


def build_rank_model(config: Config, groups, device: torch.device) -> HybridLM:
    """`groups`: the ParallelGroups, or None without model parallelism. A resumed run reads
    `model.init_from` again (its checkpoint then replaces the weights): the directory must stay."""
    tensor_group = groups.tensor if groups is not None and config.parallel.tensor > 1 else None
    from sleepscale.parallel.tensor import parallelize_tensor, shard_slice

    source = config.model.init_from or SeededWeights(config.model)
    if config.train.zero_stage == 3:
        return _zero3_model(config, source, device)
    with torch.device("meta"):
        model = HybridLM(config.model)
        if config.parallel.pipeline > 1:
            _keep_stage(model, config.model.stage_ranges, groups.pipeline.rank())
        if tensor_group is not None:
            parallelize_tensor(model, tensor_group)
    shard = None if tensor_group is None else lambda parameter: shard_slice(parameter, tensor_group)
    load_weights(model, source, shard=shard, device=device)
    return model


def _keep_stage(model: HybridLM, stages: list[range], index: int) -> None:
    """Drops what pipeline stage `index` does not hold (`PipelineStage` keeps the same parts)."""
    for block in range(len(model.layers)):
        if block not in stages[index]:
            model.layers[block] = nn.Identity()
    if index != 0:
        model.embeddings = None
    if index != len(stages) - 1:
        model.norm = model.lm_head = None


def _zero3_model(config: Config, source, device: torch.device) -> HybridLM:
    """Partitioned as it is built (DeepSpeed's `zero.Init`), then filled one parameter at a time:
    each is gathered whole for a moment, rank 0 copies the stored (or seeded) tensor in, and DeepSpeed
    repartitions it. A rank holds its partition plus about two whole parameters (the gathered one and,
    on rank 0, the one read). (ZeRO-3 excludes tensor
    and pipeline parallelism, so every rank is a data-parallel rank.)"""
    import deepspeed
    import torch.distributed as dist

    from sleepscale.train.distributed import deepspeed_config

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
