"""Backend choice for the gated delta rule: Triton kernels on CUDA, our PyTorch code on CPU.

`gated_delta_rule` takes a Gated DeltaNet's raw inputs (q and k before their L2 norm, the
projections a and b before the decay and beta gates, and the gate parameters A_log and dt_bias)
so that each backend computes the norms and gates where it is cheapest:

- `torch` (CPU; any device): the norms and gates in PyTorch (`gdn_inputs`), then the chunked rule
  of `delta_rule_torch.py`.
- `window` (CUDA): our Triton kernel for one window of at most 64 tokens (`sleepscale.kernels`),
  forward and backward each one launch, norms and gates inside.
- `fla` (CUDA): fla's kernels with their in-kernel L2 norm, gate and beta options: the chunked
  kernel, or its fused recurrent kernel for short calls without gradient (decoding).

`auto` takes `torch` on CPU; on CUDA `window` for a call that needs gradients over at most 64
tokens with head dimensions of at most 128, and `fla` otherwise. `model.backend: fla` forbids
our kernel; `window` forces it (and refuses longer calls). `delta_rule_kernel` is the one place
that decides. All backends share one state layout ([B, HV, d_k, d_v], fla's default), return a
float32 state, and are differentiable in every input including `initial_state`. fla and Triton
are imported only when used: importing fla costs ~10 s and its kernels need a GPU driver. Under
Triton's interpreter (TRITON_INTERPRET=1, the tests) the Triton backends also run on CPU tensors.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F

from sleepscale.config import WINDOW_MAX_HEAD_DIM, WINDOW_MAX_LENGTH
from sleepscale.ops.delta_rule_torch import chunk_gated_delta_rule_torch
from sleepscale.ops.fla import fla_delta_rule, fla_gated_delta_rule

Backend = Literal["auto", "torch", "fla", "window"]
BACKENDS = ("auto", "torch", "fla", "window")
Kernel = Literal["torch", "window", "fla_chunk", "fla_fused_recurrent"]


class BackendUnavailable(RuntimeError):
    """The requested delta-rule backend cannot run here."""


def triton_runs_on(device: torch.device) -> bool:
    """CUDA, or any device under Triton's CPU interpreter (how the tests run the Triton kernels)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def delta_rule_kernel(
    backend: Backend, device: torch.device, length: int, key_dim: int, value_dim: int, needs_grad: bool
) -> Kernel:
    """Which implementation runs a call over `length` tokens (see the module docstring)."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown delta-rule backend {backend!r} (allowed: {', '.join(BACKENDS)})")
    if backend == "torch" or (backend == "auto" and not triton_runs_on(device)):
        return "torch"
    if not triton_runs_on(device):
        raise BackendUnavailable(
            f"delta-rule backend {backend!r} needs CUDA tensors, got {device.type}; set model.backend=torch or auto"
        )
    fits_window = length <= WINDOW_MAX_LENGTH and max(key_dim, value_dim) <= WINDOW_MAX_HEAD_DIM
    if backend == "window":
        if not fits_window:
            raise BackendUnavailable(
                f"model.backend=window runs calls of at most {WINDOW_MAX_LENGTH} tokens with head dimensions of at "
                f"most {WINDOW_MAX_HEAD_DIM}, got {length} tokens, d_k {key_dim}, d_v {value_dim}; "
                "set model.backend=auto (fla's chunked kernel beyond)"
            )
        return "window"
    if backend == "auto" and needs_grad and fits_window:
        return "window"
    return "fla_" + fla_kernel_for(length, needs_grad)


FUSED_RECURRENT_MAX_LENGTH = 64  # fla's own layer takes its fused recurrent kernel up to this length at inference


def fla_kernel_for(length: int, needs_grad: bool) -> Literal["chunk", "fused_recurrent"]:
    """Which fla kernel runs a call over `length` tokens: the fused recurrent kernel when nothing
    needs a gradient (it has no backward) and the call is short (decoding one token; a short window
    read at inference), where the chunked kernel would pad to a 64-token chunk and launch ~5 kernels;
    the chunked kernel otherwise."""
    return "fused_recurrent" if not needs_grad and length <= FUSED_RECURRENT_MAX_LENGTH else "chunk"


def gdn_inputs(q, k, a, b, A_log, dt_bias) -> tuple[torch.Tensor, ...]:
    """The delta rule's inputs from a Gated DeltaNet's raw ones, in PyTorch: L2-normalised q and k
    (fla's l2norm, eps 1e-6), the log decay g = -exp(A_log) * softplus(a + dt_bias) and beta =
    sigmoid(b), all in at least float32. The Triton backends compute the same inside."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    beta = torch.sigmoid(b.to(dtype))
    g = -A_log.to(dtype).exp() * _ContiguousGrad.apply(F.softplus(a.to(dtype) + dt_bias.to(dtype)))
    return l2_normalize(q.to(dtype)), l2_normalize(k.to(dtype)), g, beta


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on its gradient contiguous. Under torch.compile, softplus's
    backward (`aten.softplus_backward`) is traced with a contiguous output (its meta kernel) but, given
    the transposed gradient the delta rule's chunking sends back, runs in eager with the gradient's
    strides, and the compiled backward's `view` of it fails (torch 2.13). Applied to softplus's output,
    it makes the gradient softplus's backward receives contiguous; values are unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's l2norm: x / sqrt(sum(x^2) + eps)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (before their L2 norm): [B, T, H, K]; v: [B, T, HV, V]; a, b (before the gates): [B, T, HV];
    A_log, dt_bias: [HV]; initial_state: [B, HV, K, V]. HV, a multiple of H, is the number of value
    heads; value head j reads q and k head j // (HV // H).
    Returns (output [B, T, HV, V], final_state [B, HV, K, V], float32)."""
    groups, remainder = divmod(v.shape[2], q.shape[2])
    if remainder:
        raise ValueError(f"value heads ({v.shape[2]}) must be a multiple of query/key heads ({q.shape[2]})")
    tensors = (q, k, v, a, b, A_log, dt_bias) + (() if initial_state is None else (initial_state,))
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    kernel = delta_rule_kernel(backend, q.device, q.shape[1], q.shape[3], v.shape[3], needs_grad)
    if kernel == "torch":
        # in float32 (or float64) throughout: under bf16 autocast its matmuls would otherwise run in bf16
        with torch.autocast(q.device.type, enabled=False):
            q, k, g, beta = gdn_inputs(q, k, a, b, A_log, dt_bias)
            if groups > 1:
                q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
            return chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=initial_state, scale=scale)
    q, k, v, a, b = (t.contiguous() for t in (q, k, v, a, b))
    if kernel == "window":
        from sleepscale.kernels.window_delta_rule import window_gated_delta_rule  # Triton, ~0.3 s: only here

        return window_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, initial_state=initial_state, scale=scale)
    # fla's kernels do grouped value attention natively (GVA: v [B, T, HV, V] with HV > H), so q and k go in
    # unrepeated, and compute the norms and gates in the kernel.
    if torch.compiler.is_compiling():  # fla's entry points would break the graph: its custom operator
        return fla_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, initial_state, scale, kernel.removeprefix("fla_"))
    return fla_delta_rule(kernel.removeprefix("fla_"), q, k, v, a, b, A_log, dt_bias, initial_state, scale)
