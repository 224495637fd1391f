"""Grouped-query attention with rotary embeddings over a window, plus an optional retained tail.

Ours rather than fla's: fla's attention layer requires flash-attn, which is CUDA-only. Parameter
names follow fla's `Attention` (q_proj, k_proj, v_proj, o_proj).

Every query sees at most `span` keys: itself and the `span - 1` before it. Under hard eviction the
state holds no tail and a window is never longer than `span`, so this is plain causal attention
inside the window. Under sliding eviction the state retains the last `span - 1` keys and values,
making the same code a sliding-window attention across windows. Keys are retained before rotation
and rotated on use: rotary scores depend only on relative positions, so the tail's positions simply
precede the window's.

Options that pretrained Llama / Qwen2 / Qwen3 / Qwen3.5 checkpoints need, all off by default and
laid out as transformers lays them out so that their weights load unchanged: biases on q/k/v
(`qkv_bias`) and on o_proj (`output_bias`); `q_norm` and `k_norm`, an RMSNorm over each head's
query and key before rotary (`qk_norm`; retained keys are normed, being the keys, but not rotated);
partial rotary (only each head's first `rotary_dim` dimensions rotate); Llama 3's RoPE scaling; and
Qwen3.5's output gate (`output_gate`): q_proj yields per head [query, gate], and the attention output
is multiplied by sigmoid(gate) before o_proj.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from sleepscale.config import RopeScalingConfig
from sleepscale.model.norm import RMSNorm
from sleepscale.model.state import MixerState


@dataclasses.dataclass(frozen=True)
class AttentionState(MixerState):
    span: int  # keys a query may see, itself included
    keys: torch.Tensor | None = None  # [batch, kv_heads, tail, head_dim], after k_norm, before rotation
    values: torch.Tensor | None = None
    # [batch, tail] or None (all valid): which tail slots hold a key. Streams of a batch that have
    # read different numbers of tokens (inference) keep their keys right-aligned, padded on the left,
    # so the distance between a query and each real key is the same as without padding.
    valid: torch.Tensor | None = None

    def evicted(self) -> AttentionState:
        return AttentionState(self.span)

    def next_pass(self, window_start: AttentionState) -> AttentionState:
        return window_start

    @property
    def tail(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def where(self, mask: torch.Tensor, other: AttentionState) -> AttentionState:
        """Per sequence: this state where `mask` [batch] is True, else `other`; tails of different
        lengths are left-padded to the longer (padding marked invalid)."""
        length = max(self.tail, other.tail)
        if length == 0:
            return AttentionState(self.span)
        if self.tail == other.tail and self.valid is None and other.valid is None:
            return super().where(mask, other)  # the training path (partial sleep): no padding needed
        like = self if self.tail else other
        a, b = self._left_padded(length, like), other._left_padded(length, like)
        selected = mask.view(-1, 1, 1, 1)
        return AttentionState(
            self.span,
            torch.where(selected, a.keys, b.keys),
            torch.where(selected, a.values, b.values),
            torch.where(mask[:, None], a.valid, b.valid),
        )

    def _left_padded(self, length: int, like: AttentionState) -> AttentionState:
        batch, heads, _, head_dim = like.keys.shape
        pad = length - self.tail
        keys = like.keys.new_zeros(batch, heads, pad, head_dim)
        values = like.values.new_zeros(batch, heads, pad, like.values.shape[-1])
        valid = torch.zeros(batch, pad, dtype=torch.bool, device=like.keys.device)
        if self.tail:
            own_valid = self.valid if self.valid is not None else valid.new_ones(batch, self.tail)
            keys, values = torch.cat([keys, self.keys], dim=2), torch.cat([values, self.values], dim=2)
            valid = torch.cat([valid, own_valid], dim=1)
        return AttentionState(self.span, keys, values, valid)


def inverse_frequencies(
    rotary_dim: int, theta: float, scaling: RopeScalingConfig | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """RoPE's rotary_dim / 2 inverse frequencies theta^(-2i / rotary_dim), Llama-3-scaled if asked."""
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, device=device, dtype=dtype) / rotary_dim)
    return inv_freq if scaling is None else llama3_scaled(inv_freq, scaling)


def llama3_scaled(inv_freq: torch.Tensor, scaling: RopeScalingConfig) -> torch.Tensor:
    """Llama 3's RoPE scaling (transformers' rope_type 'llama3'), which stretches the context by
    `factor` without touching what short-range attention relies on. With r the number of periods a
    frequency completes over the original context: r >= high_freq_factor keeps the frequency,
    r <= low_freq_factor divides it by `factor`, and in between the two mix linearly in r."""
    wavelength = 2 * math.pi / inv_freq
    periods = scaling.original_max_position_embeddings / wavelength
    kept = ((periods - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)).clamp(0, 1)
    return (1 - kept) * inv_freq / scaling.factor + kept * inv_freq


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of x [batch, heads, time, head_dim] with cos and sin
    [time, rotary_dim / 2]: the first rotary_dim dimensions rotate, the rest pass unchanged."""
    half = cos.shape[-1]
    wide = x.to(cos.dtype)
    x1, x2 = wide[..., :half], wide[..., half : 2 * half]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, wide[..., 2 * half :]], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope_theta: float = 10000.0,
        *,
        rotary_dim: int | None = None,
        rope_scaling: RopeScalingConfig | None = None,
        qkv_bias: bool = False,
        output_bias: bool = False,
        qk_norm: bool = False,
        output_gate: bool = False,
        norm_eps: float = 1e-6,
        zero_centered_norms: bool = False,
    ):
        """`rotary_dim`: the rotated dimensions of each head (default: all); `norm_eps` and
        `zero_centered_norms` configure q_norm and k_norm."""
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"the rotary dimensions must be even and at most head_dim {head_dim}, got {rotary_dim}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.rotary_dim = rotary_dim
        self.rope_scaling = rope_scaling
        self.output_gate = output_gate
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim * (2 if output_gate else 1), bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=output_bias)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, norm_eps, zero_centered_norms)
            self.k_norm = RMSNorm(head_dim, norm_eps, zero_centered_norms)
        else:
            self.q_norm = self.k_norm = None

    def initial_state(self, batch_size: int, span: int) -> AttentionState:
        return AttentionState(span)

    def forward(self, x: torch.Tensor, state: AttentionState) -> tuple[torch.Tensor, AttentionState]:
        length = x.shape[1]
        q = self.q_proj(x).unflatten(-1, (self.num_heads, -1))  # per head: the query, then the gate if any
        if self.output_gate:
            q, gate = q.chunk(2, dim=-1)
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if state.keys is not None:  # kept in float32 between inference calls: back to the compute dtype
            k = torch.cat([state.keys.to(k.dtype), k], dim=2)
            v = torch.cat([state.values.to(v.dtype), v], dim=2)
        tail = k.shape[2] - length
        key_valid = None  # [batch, keys] when the tail holds padding (inference over uneven streams)
        if state.valid is not None:
            key_valid = torch.cat([state.valid, state.valid.new_ones(x.shape[0], length)], dim=1)
        key_positions = torch.arange(k.shape[2], device=x.device)
        query_positions = key_positions[tail:]

        dtype = torch.promote_types(x.dtype, torch.float32)
        inv_freq = inverse_frequencies(self.rotary_dim, self.rope_theta, self.rope_scaling, dtype, x.device)
        angles = key_positions.to(dtype)[:, None] * inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()

        distance = query_positions[:, None] - key_positions[None, :]
        if key_valid is None and tail == 0 and length <= state.span:
            mask, is_causal = None, True
        else:
            mask, is_causal = (distance >= 0) & (distance < state.span), False
            if key_valid is not None:
                mask = mask & key_valid[:, None, None, :]  # [batch, heads (broadcast), queries, keys]
        out = (
            F.scaled_dot_product_attention(
                rotate(q, cos[tail:], sin[tail:]),
                rotate(k, cos, sin),
                v,
                attn_mask=mask,
                is_causal=is_causal,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )
            .transpose(1, 2)
            .flatten(-2)
        )
        if self.output_gate:
            out = out * torch.sigmoid(gate.flatten(-2))
        first_kept = max(0, k.shape[2] - (state.span - 1))  # the last span - 1 keys, or all when there are fewer
        # copies: views would keep every key and value of the call alive as long as the state lives
        new_state = AttentionState(
            state.span,
            k[:, :, first_kept:].clone(),
            v[:, :, first_kept:].clone(),
            None if key_valid is None else key_valid[:, first_kept:],
        )
        return self.o_proj(out), new_state
