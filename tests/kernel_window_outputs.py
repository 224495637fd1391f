"""Runs our window gated-delta-rule Triton kernel (sleepscale/kernels/window_delta_rule.py) under
Triton's CPU interpreter on every case of test_kernel_window.py, and saves each case's inputs, the
gradients fed to its outputs, and the kernel's outputs and input gradients.

A separate process because TRITON_INTERPRET=1 must be set before Triton is imported, which the rest
of the test suite must not see. Usage: python tests/kernel_window_outputs.py OUT.pt
"""

import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

_patched = set()


def _device_call(self, *args, **kwargs):
    """The interpreter re-patches triton.language (~2 ms) on every call of a jitted helper, tl.sum's
    included, most of the run time here; the patches a helper's first call makes are never undone
    and the kernel's own are in place around it, so once per helper is enough."""
    if self.fn not in _patched:
        interpreter._patch_lang(self.fn)
        _patched.add(self.fn)
    try:
        return self.rewrite()(*args, **kwargs)
    except Exception as error:
        raise interpreter.InterpreterError(repr(error)) from error


interpreter.InterpretedFunction.__call__ = _device_call

from sleepscale.kernels.window_delta_rule import window_gated_delta_rule  # noqa: E402

# name: (B, T, H, HV, K, V, with initial state, dtype, which outputs get a gradient, scale)
CASES = {
    "T1_h0": (2, 1, 1, 1, 16, 16, True, torch.float32, "both", None),
    "T1": (2, 1, 1, 1, 16, 16, False, torch.float32, "both", None),
    "T7_h0": (2, 7, 1, 1, 16, 16, True, torch.float32, "both", None),
    "T7": (2, 7, 1, 1, 16, 16, False, torch.float32, "both", None),
    "T24_h0_extreme_gates": (2, 24, 1, 1, 16, 16, True, torch.float32, "both", None),
    "T24": (2, 24, 1, 1, 16, 16, False, torch.float32, "both", None),
    "T64_h0": (2, 64, 1, 1, 16, 16, True, torch.float32, "both", None),
    "T64": (2, 64, 1, 1, 16, 16, False, torch.float32, "both", None),
    "grouped_H1_HV2": (2, 24, 1, 2, 16, 16, True, torch.float32, "both", None),
    "K12_V20_scale": (2, 7, 2, 2, 12, 20, True, torch.float32, "both", 0.3),
    "output_grad_only": (2, 7, 1, 1, 16, 16, True, torch.float32, "output", None),
    "state_grad_only": (1, 7, 1, 2, 16, 16, True, torch.float32, "state", None),
    "float64_grouped_K12_V20": (1, 24, 1, 2, 12, 20, True, torch.float64, "both", None),
    "bfloat16": (2, 24, 1, 1, 16, 16, True, torch.bfloat16, "both", None),
}


def make_case(name, batch, length, heads, value_heads, key_dim, value_dim, with_state, dtype, graded, scale):
    generator = torch.Generator().manual_seed(sum(map(ord, name)))

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    a = randn(batch, length, value_heads)
    if "extreme_gates" in name:  # both of softplus's far ends: its linear branch (> 20) and a tiny log1p
        a[:, ::5] = 30.0
        a[:, 2::5] = -30.0
    inputs = {
        "q": randn(batch, length, heads, key_dim) * 2,
        "k": randn(batch, length, heads, key_dim) * 2,
        "v": randn(batch, length, value_heads, value_dim),
        "a": a,
        "b": randn(batch, length, value_heads) * 2,
        "A_log": torch.empty(value_heads, dtype=torch.float64).uniform_(0, 2.5, generator=generator),  # A in 1 .. 12
        "dt_bias": torch.empty(value_heads, dtype=torch.float64).uniform_(-5, 0, generator=generator),
        "initial_state": randn(batch, value_heads, key_dim, value_dim) if with_state else None,
    }
    # bfloat16: the activations in bfloat16; the parameters and the state stay float32, as in training
    inputs = {
        key: None if x is None else x.to(dtype if key in "qkvab" or dtype == torch.float64 else torch.float32)
        for key, x in inputs.items()
    }
    d_output = randn(batch, length, value_heads, value_dim).to(dtype) if graded in ("both", "output") else None
    d_state = randn(batch, value_heads, key_dim, value_dim) if graded in ("both", "state") else None
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return inputs, d_output, None if d_state is None else d_state.to(state_dtype), scale


def run_case(inputs, d_output, d_state, scale):
    leaves = {key: x.clone().requires_grad_() for key, x in inputs.items() if x is not None}
    output, final_state = window_gated_delta_rule(**{**inputs, **leaves}, scale=scale)  # initial_state may be None
    pairs = [(x, d) for x, d in ((output, d_output), (final_state, d_state)) if d is not None]
    grads = torch.autograd.grad([x for x, _ in pairs], list(leaves.values()), [d for _, d in pairs])
    return {
        "output": output.detach(),
        "final_state": final_state.detach(),
        **{f"d_{key}": grad for key, grad in zip(leaves, grads)},
    }


def main(path):
    results = {}
    for name, spec in CASES.items():
        inputs, d_output, d_state, scale = make_case(name, *spec)
        start = time.perf_counter()
        kernel = run_case(inputs, d_output, d_state, scale)
        results[name] = {
            "inputs": inputs,
            "d_output": d_output,
            "d_state": d_state,
            "scale": scale,
            "kernel": kernel,
            "seconds": time.perf_counter() - start,
        }
    torch.save(results, path)


if __name__ == "__main__":
    main(sys.argv[1])
