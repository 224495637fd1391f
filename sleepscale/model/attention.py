"""Grouped-query attention with rotary embeddings over a window, plus an optional retained tail.

Ours rather than fla's: fla's attention layer requires flash-attn, which is CUDA-only. Parameter
names follow fla's `Attention` (q_proj, k_proj, v_proj, o_proj).

Every query sees at most `span` keys: itself and the `span - 1` before it. Under hard eviction the
state holds no tail and a window is never longer than `span`, so this is plain causal attention
inside the window. Under sliding eviction the state retains the last `span - 1` keys and values,
making the same code a sliding-window attention across windows. Keys are retained before rotation
and rotated on use: rotary scores depend only on relative positions, so the tail's positions simply
precede the window's.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from sleepscale.model.state import MixerState


@dataclasses.dataclass(frozen=True)
class AttentionState(MixerState):
    span: int  # keys a query may see, itself included
    keys: torch.Tensor | None = None  # [batch, kv_heads, tail, head_dim], before rotation
    values: torch.Tensor | None = None

    def evicted(self) -> AttentionState:
        return AttentionState(self.span)

    def next_pass(self, window_start: AttentionState) -> AttentionState:
        return window_start


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of x [batch, heads, time, head_dim] at integer positions [time]."""
    half = x.shape[-1] // 2
    dtype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(half, device=x.device, dtype=dtype) / half)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.to(dtype)[..., :half], x.to(dtype)[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, rope_theta: float = 10000.0):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def initial_state(self, batch_size: int, span: int) -> AttentionState:
        return AttentionState(span)

    def forward(self, x: torch.Tensor, state: AttentionState) -> tuple[torch.Tensor, AttentionState]:
        batch, length, _ = x.shape
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        if state.keys is not None:
            k = torch.cat([state.keys, k], dim=2)
            v = torch.cat([state.values, v], dim=2)
        tail = k.shape[2] - length
        key_positions = torch.arange(k.shape[2], device=x.device)
        query_positions = key_positions[tail:]

        distance = query_positions[:, None] - key_positions[None, :]
        if tail == 0 and length <= state.span:
            mask, is_causal = None, True
        else:
            mask, is_causal = (distance >= 0) & (distance < state.span), False
        out = F.scaled_dot_product_attention(
            rotate(q, query_positions, self.rope_theta),
            rotate(k, key_positions, self.rope_theta),
            v,
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        keep = state.span - 1
        new_state = AttentionState(state.span, k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :])
        return self.o_proj(out.transpose(1, 2).flatten(-2)), new_state
