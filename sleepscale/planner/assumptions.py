"""What a plan assumes besides the config and the layout: the GPU (its memory, peak FLOP/s and links),
the share of the peak a step reaches, and the memory kept for what the model does not count.

The defaults are an H100 node's (`GPU`; its peak is `sleepscale.flops.PEAK_FLOPS`). This module
imports nothing heavy: `sleepscale plan`'s parser takes its defaults from here.
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GPU = "H100"  # the GPU the defaults describe
RESERVE_BYTES = 2 * 2**30  # CUDA context (~0.5 GB), allocator fragmentation, NCCL buffers, one op's temporaries
MFU = 0.4  # model FLOPs utilisation assumed unless told
TENSOR_BANDWIDTH = 450e9  # bytes/s per GPU between tensor-parallel ranks (NVLink of an H100 node, one way)
DATA_BANDWIDTH = 50e9  # bytes/s per GPU between data-parallel ranks (400 Gb/s InfiniBand)


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What an estimate assumes besides the config and the layout."""

    length: int  # tokens per training sequence
    gpu_memory: float  # bytes per GPU
    peak_flops: float  # dense peak per GPU, FLOP/s
    mfu: float  # the share of it a step reaches
    reserve: int = RESERVE_BYTES  # bytes kept for what the model does not count
    tensor_bandwidth: float = TENSOR_BANDWIDTH  # bytes/s per GPU between tensor-parallel ranks
    data_bandwidth: float = DATA_BANDWIDTH  # bytes/s per GPU between data-parallel ranks
