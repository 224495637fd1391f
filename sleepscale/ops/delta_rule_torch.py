"""Chunked gated delta rule in plain PyTorch: the CPU backend of `sleepscale.ops.gated_delta_rule`.

Why our own and not fla's: fla's GPU kernels are Triton (no CPU driver), and its pure-PyTorch
reference (`fla/ops/gated_delta_rule/naive.py`) inverts each chunk's triangular system row by row in
a Python loop. Here the same chunked (WY) algorithm solves that system with one batched
`torch.linalg.solve_triangular`, so it is autograd-friendly (gradients reach `initial_state`) and
fast enough to train small models on a CPU. The tests hold it to fla's references in float64.

The recurrence, per head, with the state S laid out [d_k, d_v] as in fla:

    S_t = exp(g_t) * S_{t-1} + k_t e_t^T,   e_t = beta_t * (v_t - (exp(g_t) * S_{t-1})^T k_t)
    o_t = S_t^T (scale * q_t)

Within a chunk of C tokens that starts from S_0, with gamma_t = g_1 + ... + g_t (log decay from the
chunk start to t), the new values E = [e_1 .. e_C] satisfy a unit lower-triangular system

    (I + L) E = beta * V - (beta * exp(gamma) * K) S_0,   L_tj = beta_t (k_t . k_j) exp(gamma_t - gamma_j), j < t

so E = U - W S_0 with U, W from one triangular solve that does not depend on S_0. Only the cheap
S_0-dependent part is sequential over chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64  # the longest chunk; sequences are split into equal chunks no longer than this


def fitted_chunk_size(length: int, longest: int = CHUNK_SIZE) -> int:
    """The chunk length for a sequence of `length` tokens: as few chunks as `longest` allows, of
    equal size, so that a short sleep window (24 tokens) is one 24-token chunk rather than a chunk
    of 64 that is mostly padding (the triangular solve, masks and decays are quadratic in it)."""
    chunks = max(1, -(-length // longest))
    return -(-length // chunks)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 stays float64 (parity tests); everything else accumulates in float32.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _to_chunks(x: torch.Tensor, pad: int, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, ...] -> [B, H, num_chunks, chunk_size, ...], zero-padded at the end of T."""
    x = x.to(dtype).transpose(1, 2)
    if pad:
        x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
    return x.unflatten(2, (-1, chunk_size))


def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, T, H, K]; v: [B, T, H, V]; g (log decay, <= 0), beta: [B, T, H];
    initial_state: [B, H, K, V] or None (zeros). Returns (o [B, T, H, V] in v's dtype,
    final_state [B, H, K, V] in float32, or float64 for float64 inputs). `chunk_size` defaults to
    `fitted_chunk_size(T)`."""
    batch, length, heads, key_dim = q.shape
    chunk_size = fitted_chunk_size(length) if chunk_size is None else chunk_size
    value_dim, out_dtype = v.shape[-1], v.dtype
    scale = key_dim**-0.5 if scale is None else scale
    dtype = _compute_dtype(q)
    # Zero padding is inert: g = 0 keeps the state, k = 0 and beta = 0 write nothing into it.
    pad = (-length) % chunk_size
    q, k, v = (_to_chunks(x, pad, chunk_size, dtype) for x in (q, k, v))
    g, beta = (_to_chunks(x, pad, chunk_size, dtype) for x in (g, beta))
    q = q * scale

    gamma = g.cumsum(-1)  # [B, H, N, C]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # exp(gamma_t - gamma_j) for j <= t; masked before exp so that j > t cannot overflow.
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    k_beta = k * beta[..., None]
    strictly_lower = ((k_beta @ k.transpose(-1, -2)) * decay).tril(-1)
    # solve_triangular with unitriangular=True reads only the strict lower part and assumes a unit diagonal.
    w = torch.linalg.solve_triangular(strictly_lower, k_beta * gamma.exp()[..., None], upper=False, unitriangular=True)
    u = torch.linalg.solve_triangular(strictly_lower, v * beta[..., None], upper=False, unitriangular=True)
    intra = (q @ k.transpose(-1, -2)) * decay  # causal, diagonal included
    q_decayed = q * gamma.exp()[..., None]
    k_to_end = k * (gamma[..., -1:] - gamma).exp()[..., None]  # decay from token to chunk end
    chunk_decay = gamma[..., -1].exp()[..., None, None]

    state = q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for n in range(q.shape[2]):
        new_values = u[:, :, n] - w[:, :, n] @ state
        outputs.append(q_decayed[:, :, n] @ state + intra[:, :, n] @ new_values)
        state = state * chunk_decay[:, :, n] + k_to_end[:, :, n].transpose(-1, -2) @ new_values
    out = torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :length].transpose(1, 2)
    return out.to(out_dtype), state
