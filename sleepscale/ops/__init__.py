"""Backend choice for the gated delta rule: fla's Triton kernels on CUDA, our PyTorch code on CPU.

Both backends share one signature and one state layout ([B, HV, d_k, d_v], fla's default), and both
are differentiable in every input including `initial_state`. fla is imported only when the fla
backend is actually used: importing it costs ~10 s and needs a GPU driver for its kernels.
"""

from __future__ import annotations

from typing import Literal

import torch

from sleepscale.ops.delta_rule_torch import chunk_gated_delta_rule_torch

Backend = Literal["auto", "torch", "fla"]
BACKENDS = ("auto", "torch", "fla")


class BackendUnavailable(RuntimeError):
    """The requested delta-rule backend cannot run here."""


def resolve_backend(backend: Backend, device: torch.device) -> Literal["torch", "fla"]:
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown delta-rule backend {backend!r} (allowed: {', '.join(BACKENDS)})")
    if backend == "auto":
        return "fla" if device.type == "cuda" else "torch"
    if backend == "fla" and device.type != "cuda":
        raise BackendUnavailable(
            f"delta-rule backend 'fla' needs CUDA tensors, got {device.type}; set model.backend=torch or auto"
        )
    return backend


FUSED_RECURRENT_MAX_LENGTH = 64  # fla's own layer takes its fused recurrent kernel up to this length at inference


def fla_kernel_for(length: int, needs_grad: bool) -> Literal["chunk", "fused_recurrent"]:
    """Which fla kernel runs a call over `length` tokens: the fused recurrent kernel when nothing
    needs a gradient (it has no backward) and the call is short (decoding one token; a short window
    read at inference), where the chunked kernel would pad to a 64-token chunk and launch ~5 kernels;
    the chunked kernel otherwise."""
    return "fused_recurrent" if not needs_grad and length <= FUSED_RECURRENT_MAX_LENGTH else "chunk"


def _fla_kernel(name: str):
    try:
        from fla.ops import gated_delta_rule as kernels
    except ImportError as error:  # no silent fallback to the slow path on a GPU
        raise BackendUnavailable(
            f"delta-rule backend 'fla' could not import fla ({error}); install flash-linear-attention and triton, "
            "or set model.backend=torch"
        ) from error
    return getattr(kernels, f"{name}_gated_delta_rule")


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, T, H, K]; v: [B, T, HV, V]; g (log decay), beta: [B, T, HV]; initial_state: [B, HV, K, V].
    HV, a multiple of H, is the number of value heads; value head j reads q and k head j // (HV // H).
    Returns (output [B, T, HV, V], final_state [B, HV, K, V], float32)."""
    groups, remainder = divmod(v.shape[2], q.shape[2])
    if remainder:
        raise ValueError(f"value heads ({v.shape[2]}) must be a multiple of query/key heads ({q.shape[2]})")
    if resolve_backend(backend, q.device) == "torch":
        if groups > 1:
            q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=initial_state, scale=scale)
    # fla's kernels do grouped value attention natively (GVA: v [B, T, HV, V] with HV > H), so q and k go in unrepeated.
    tensors = (q, k, v, g, beta) if initial_state is None else (q, k, v, g, beta, initial_state)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    kernel = _fla_kernel(fla_kernel_for(q.shape[1], needs_grad))
    return kernel(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True)
