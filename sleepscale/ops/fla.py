"""fla's gated delta-rule kernels: imported on first use (~10 s, and they need a GPU driver or Triton's
interpreter), called with our options (`fla_delta_rule`), and as custom operators for `train.compile`.

fla marks its entry points `torch.compiler.disable`: under torch.compile with `fullgraph` each call
would be a graph break, an error. A custom operator is one opaque call in the graph instead, as our
window kernel is (`sleepscale.kernels.window_delta_rule`). Only compiled code calls these
(`sleepscale.ops.gated_delta_rule` checks `torch.compiler.is_compiling()`); eager code calls fla
directly.

The backward operator runs fla's forward again under autograd and differentiates it: fla keeps its
intermediate tensors (chunk matrices, normalised q and k, gates) inside its autograd function, whose
shapes and dtypes are fla's internals, which a fake implementation would have to copy. So a compiled
step pays fla's forward twice per GDN call (roughly a third more GDN kernel time) for graphs without
breaks; the chunked kernel is the one with a backward (the fused recurrent kernel runs only without
gradient, `fla_kernel_for`).
"""

from __future__ import annotations

import torch


def fla_kernel(name: str):
    """fla's `<name>_gated_delta_rule` (chunk, fused_recurrent)."""
    try:
        from fla.ops import gated_delta_rule as kernels  # ~10 s, and needs a GPU driver: only for fla's kernels
    except ImportError as error:  # no silent fallback to the slow path on a GPU
        raise ImportError(
            f"delta-rule backend 'fla' could not import fla ({error}); install flash-linear-attention and triton, "
            "or set model.backend=torch"
        ) from error
    return getattr(kernels, f"{name}_gated_delta_rule")


def fla_delta_rule(kernel: str, q, k, v, a, b, A_log, dt_bias, initial_state, scale):
    """fla's kernel `kernel` (chunk, fused_recurrent) with its in-kernel L2 norm, gate and beta."""
    return fla_kernel(kernel)(
        q,
        k,
        v,
        a,
        b,
        scale=scale,
        initial_state=initial_state,
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
        use_gate_in_kernel=True,
        A_log=A_log,
        dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=True,
    )


@torch.library.custom_op("sleepscale::fla_gated_delta_rule", mutates_args=())
def fla_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    initial_state: torch.Tensor | None,
    scale: float | None,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        output, final_state = fla_delta_rule(kernel, q, k, v, a, b, A_log, dt_bias, initial_state, scale)
    return output, final_state


@fla_gated_delta_rule.register_fake
def _(q, k, v, a, b, A_log, dt_bias, initial_state, scale, kernel):
    state = v.new_empty((q.shape[0], v.shape[2], q.shape[-1], v.shape[-1]), dtype=torch.float32)
    return torch.empty_like(v, dtype=q.dtype), state


@torch.library.custom_op("sleepscale::fla_gated_delta_rule_backward", mutates_args=())
def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    initial_state: torch.Tensor | None,
    d_output: torch.Tensor,
    d_final_state: torch.Tensor,
    scale: float | None,
    kernel: str,
) -> list[torch.Tensor]:
    """Gradients of q, k, v, a, b, A_log, dt_bias and (when given) the initial state."""
    inputs = [x.detach().requires_grad_() for x in (q, k, v, a, b, A_log, dt_bias)]
    if initial_state is not None:
        inputs.append(initial_state.detach().requires_grad_())
    with torch.enable_grad():
        output, final_state = fla_delta_rule(
            kernel, *inputs[:7], inputs[7] if initial_state is not None else None, scale
        )
        grads = torch.autograd.grad((output, final_state), inputs, (d_output, d_final_state), allow_unused=True)
    return [torch.zeros_like(x) if grad is None else grad for grad, x in zip(grads, inputs)]


@_backward.register_fake
def _(q, k, v, a, b, A_log, dt_bias, initial_state, d_output, d_final_state, scale, kernel):
    inputs = [q, k, v, a, b, A_log, dt_bias] + ([] if initial_state is None else [initial_state])
    return [torch.empty_like(x) for x in inputs]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, a, b, A_log, dt_bias, initial_state, scale, kernel = inputs
    ctx.save_for_backward(q, k, v, a, b, A_log, dt_bias, initial_state)
    ctx.scale, ctx.kernel, ctx.has_initial_state = scale, kernel, initial_state is not None
    ctx.state_shape, ctx.state_dtype = output[1].shape, output[1].dtype  # for a missing gradient


def _autograd_backward(ctx, d_output, d_final_state):
    q, k, v, a, b, A_log, dt_bias, initial_state = ctx.saved_tensors
    if d_output is None:
        d_output = torch.zeros_like(v, dtype=q.dtype)
    if d_final_state is None:
        d_final_state = v.new_zeros(ctx.state_shape, dtype=ctx.state_dtype)
    grads = _backward(
        q, k, v, a, b, A_log, dt_bias, initial_state if ctx.has_initial_state else None,
        d_output, d_final_state, ctx.scale, ctx.kernel,
    )  # fmt: skip
    return (*grads[:7], grads[7] if ctx.has_initial_state else None, None, None)


fla_gated_delta_rule.register_autograd(_autograd_backward, setup_context=_setup_context)
