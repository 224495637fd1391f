"""Gated DeltaNet token mixer with fla's `GatedDeltaNet` parameter layout.

Same parameter names, shapes and maths as `fla.layers.GatedDeltaNet` (use_gate=True,
use_short_conv=True, conv_bias=False), so weights move between the two unchanged (see
`sleepscale.convert.families`). Differences, all needed by sleep: the recurrent state is an explicit
input and output with gradient through both, and the short-convolution tails are part of the state
so that sliding eviction can carry them across windows.

Grouped value heads (fla's num_v_heads, Qwen3.5's linear_num_value_heads): there are `num_v_heads`
value heads, a multiple of `num_heads`, each with its own value, output gate, decay, beta and
fast-weight state; consecutive value heads share a query/key head (value head j reads head
j // (num_v_heads // num_heads)), as in fla's kernels and transformers' Qwen3.5.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from sleepscale.model.state import MixerState
from sleepscale.ops import Backend, gated_delta_rule


@dataclasses.dataclass(frozen=True)
class GDNState(MixerState):
    fast_weights: torch.Tensor  # [batch, num_v_heads, head_k_dim, head_v_dim], float32
    conv_tails: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = (
        None  # q, k, v: [batch, channels, conv_size - 1]
    )

    def evicted(self) -> GDNState:
        return GDNState(self.fast_weights)

    def next_pass(self, window_start: GDNState) -> GDNState:
        return GDNState(self.fast_weights, window_start.conv_tails)

    def bounded(self, bound: float) -> GDNState:
        norms = self.fast_weights.flatten(2).norm(dim=-1)[..., None, None]  # per sequence and head
        return GDNState(self.fast_weights * (bound / norms.clamp(min=bound)), self.conv_tails)


class ShortConvolution(nn.Module):
    """Depthwise causal convolution followed by SiLU; the weight is laid out as fla's (an nn.Conv1d's).

    Computed as kernel_size shifted multiply-adds in [batch, time, channels] layout rather than with
    F.conv1d: on CPU the depthwise convolution's backward took 6 ms a call, 12% of a sleep step,
    against well under 1 ms for the same sum written out (and no transposes)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv1d's default

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, C]; tail: the previous [B, C, kernel_size - 1] inputs, None for zeros."""
        length, kernel_size = x.shape[1], self.weight.shape[-1]
        history = kernel_size - 1
        if tail is None:
            padded = F.pad(x, (0, 0, history, 0))
        else:
            padded = torch.cat([tail.to(x.dtype).transpose(1, 2), x], dim=1)
        weight = self.weight[:, 0].to(x.dtype)  # [C, kernel_size]
        y = padded[:, :length] * weight[:, 0]
        for shift in range(1, kernel_size):
            y = y + padded[:, shift : shift + length] * weight[:, shift]
        # the tail is copied: a view would keep the whole padded window alive as long as the state lives
        return F.silu(y), padded[:, padded.shape[1] - history :].clone().transpose(1, 2)


class GatedRMSNorm(nn.Module):
    """RMSNorm of the mixer output times SiLU(gate), in at least float32 (fla's FusedRMSNormGated, 'swish')."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        wide = x.to(dtype)
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(dtype)
        return (normed * F.silu(gate.to(dtype))).to(x.dtype)


def initial_decay_parameters(num_heads: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Mamba-2 style decay init, as fla: A ~ U(0, 16), dt log-uniform in [1e-3, 0.1] (float32, CPU)."""
    A = torch.empty(num_heads, device="cpu").uniform_(0, 16, generator=generator)
    dt = torch.exp(
        torch.rand(num_heads, generator=generator, device="cpu") * (math.log(0.1) - math.log(0.001)) + math.log(0.001)
    )
    dt = dt.clamp(min=1e-4)
    return {"A_log": A.log(), "dt_bias": dt + torch.log(-torch.expm1(-dt))}  # dt_bias: inverse softplus


class GatedDeltaNet(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        expand_v: float = 2.0,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        backend: Backend = "auto",
        num_v_heads: int | None = None,
    ):
        """`num_v_heads`: grouped value heads, a multiple of num_heads (default: num_heads)."""
        super().__init__()
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        if num_v_heads % num_heads:
            raise ValueError(f"num_v_heads ({num_v_heads}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads
        self.head_k_dim = head_dim
        self.head_v_dim = int(head_dim * expand_v)
        if self.head_v_dim != head_dim * expand_v:
            raise ValueError(f"head_dim * expand_v must be an integer, got {head_dim} * {expand_v}")
        self.key_dim = num_heads * self.head_k_dim
        self.value_dim = num_v_heads * self.head_v_dim
        self.backend = backend

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_v_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_v_heads))
        self.q_conv1d = ShortConvolution(self.key_dim, conv_size)
        self.k_conv1d = ShortConvolution(self.key_dim, conv_size)
        self.v_conv1d = ShortConvolution(self.value_dim, conv_size)
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        if not self.A_log.is_meta:  # a model built on meta is filled by its source (`load_weights`)
            self.reset_decay_parameters()

    @torch.no_grad()
    def reset_decay_parameters(self, generator: torch.Generator | None = None) -> None:
        initial = initial_decay_parameters(self.num_v_heads, generator)
        self.A_log.copy_(initial["A_log"])
        self.dt_bias.copy_(initial["dt_bias"])

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> GDNState:
        dtype = torch.promote_types(self.q_proj.weight.dtype, torch.float32)
        return GDNState(
            torch.zeros(batch_size, self.num_v_heads, self.head_k_dim, self.head_v_dim, device=device, dtype=dtype)
        )

    def forward(self, x: torch.Tensor, state: GDNState) -> tuple[torch.Tensor, GDNState]:
        q_tail, k_tail, v_tail = state.conv_tails or (None, None, None)
        q, q_tail = self.q_conv1d(self.q_proj(x), q_tail)
        k, k_tail = self.k_conv1d(self.k_proj(x), k_tail)
        v, v_tail = self.v_conv1d(self.v_proj(x), v_tail)
        q = q.unflatten(-1, (self.num_heads, self.head_k_dim))  # normalised, and the gates computed, in the op
        k = k.unflatten(-1, (self.num_heads, self.head_k_dim))
        v = v.unflatten(-1, (self.num_v_heads, self.head_v_dim))
        out, fast_weights = gated_delta_rule(
            q,
            k,
            v,
            self.a_proj(x),
            self.b_proj(x),
            self.A_log,
            self.dt_bias,
            initial_state=state.fast_weights,
            backend=self.backend,
        )
        gate = self.g_proj(x).unflatten(-1, (self.num_v_heads, self.head_v_dim))
        out = self.o_norm(out, gate).flatten(-2)
        return self.o_proj(out), GDNState(fast_weights, (q_tail, k_tail, v_tail))
