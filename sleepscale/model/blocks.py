"""Pre-norm residual blocks, with fla's block parameter names (attn_norm, attn, mlp_norm, mlp).

A block is one letter of the model's layer pattern (`sleepscale.config.BLOCK_LETTERS`):

    A  attention + SwiGLU MLP          a  attention only
    G  Gated DeltaNet + SwiGLU MLP     g  Gated DeltaNet only (like Ouro's inserted fast-weight layers)
"""

from __future__ import annotations

import torch
from torch import nn

from sleepscale.model.attention import Attention
from sleepscale.model.mlp import SwiGLU
from sleepscale.model.norm import RMSNorm
from sleepscale.model.state import MixerState


class Block(nn.Module):
    def __init__(
        self,
        mixer: nn.Module,
        hidden_size: int,
        intermediate_size: int | None,
        norm_eps: float,
        zero_centered_norms: bool = False,
    ):
        super().__init__()
        self.attn_norm = RMSNorm(hidden_size, norm_eps, zero_centered_norms)
        self.attn = mixer
        if intermediate_size is None:
            self.mlp_norm = self.mlp = None
        else:
            self.mlp_norm = RMSNorm(hidden_size, norm_eps, zero_centered_norms)
            self.mlp = SwiGLU(hidden_size, intermediate_size)

    def initial_state(self, batch_size: int, span: int, device: torch.device | None = None) -> MixerState:
        """The mixer's state for new sequences; `span` is the attention window L."""
        if isinstance(self.attn, Attention):
            return self.attn.initial_state(batch_size, span)
        return self.attn.initial_state(batch_size, device)

    def forward(self, x: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        mixed, state = self.attn(self.attn_norm(x), state)
        x = x + mixed
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, state
