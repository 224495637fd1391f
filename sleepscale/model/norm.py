"""RMSNorm, optionally zero-centred as Qwen3-Next and Qwen3.5 store theirs (`Qwen3_5RMSNorm`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm, or with `zero_centered` a norm whose scale is (1 + weight) and whose weight starts
    at zero, so that weight decay pulls the scale towards 1 rather than 0 and those checkpoints load
    unchanged. Zero-centred, it computes in at least float32, as the original does."""

    def __init__(self, size: int, eps: float, zero_centered: bool = False):
        self.zero_centered = zero_centered  # before nn.RMSNorm's __init__, which calls reset_parameters
        super().__init__(size, eps=eps)

    def reset_parameters(self) -> None:
        if self.zero_centered:
            nn.init.zeros_(self.weight)
        else:
            super().reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.zero_centered:
            return super().forward(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(dtype), self.normalized_shape, 1 + self.weight.to(dtype), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", zero_centered=True" if self.zero_centered else "")
