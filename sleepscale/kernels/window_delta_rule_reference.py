"""Plain-PyTorch reference for `window_delta_rule.window_gated_delta_rule`: the same signature and
maths, one token at a time in a Python loop, differentiable by autograd. The ground truth of the
kernel's tests; not meant to be fast.

Per value head, with q and k read from head j // (HV // H):

    q^ = scale * q / sqrt(|q|^2 + 1e-6),  k^ = k / sqrt(|k|^2 + 1e-6)
    beta_t = sigmoid(b_t),  g_t = -exp(A_log) * softplus(a_t + dt_bias)
    S_t = exp(g_t) S_{t-1} + k^_t e_t^T,  e_t = beta_t (v_t - (exp(g_t) S_{t-1})^T k^_t),  o_t = S_t^T q^_t
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

L2_EPS = 1e-6


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_EPS)


def window_gated_delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: raw [B, T, H, K]; v: [B, T, HV, V]; a, b: raw gate projections [B, T, HV]; A_log,
    dt_bias: [HV]; initial_state: [B, HV, K, V] or None (zeros). Computes in float64 when any of
    q, k, v is float64, else in float32. Returns (o [B, T, HV, V] in v's dtype, final state
    [B, HV, K, V] in the compute dtype)."""
    batch, length, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    groups = value_heads // heads
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    scale = key_dim**-0.5 if scale is None else scale

    q = (_l2_normalize(q.to(dtype)) * scale).repeat_interleave(groups, dim=2)
    k = _l2_normalize(k.to(dtype)).repeat_interleave(groups, dim=2)
    values = v.to(dtype)
    beta = torch.sigmoid(b.to(dtype))
    g = -A_log.to(dtype).exp() * F.softplus(a.to(dtype) + dt_bias.to(dtype))

    if initial_state is None:
        state = values.new_zeros(batch, value_heads, key_dim, value_dim)
    else:
        state = initial_state.to(dtype)
    outputs = []
    for t in range(length):
        state = state * g[:, t].exp()[..., None, None]
        predicted = torch.einsum("bhk,bhkv->bhv", k[:, t], state)
        new_value = beta[:, t, :, None] * (values[:, t] - predicted)
        state = state + k[:, t, :, :, None] * new_value[:, :, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1).to(v.dtype), state
