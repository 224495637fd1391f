"""Our window gated-delta-rule Triton kernel (sleepscale/kernels/window_delta_rule.py), run under
Triton's CPU interpreter in a subprocess (kernel_window_outputs.py), against its plain-PyTorch
reference and against our op (`sleepscale.ops.gated_delta_rule`, torch backend, fed with q, k
normalised and the gates computed as GatedDeltaNet does): outputs, final state and the gradients of
every input, through gradients on the output, the final state, or both.

The ground truth is the reference in float64 on the very same inputs; errors are relative to its
largest magnitude. float32 results of the kernel and of the reference must be within 1e-5 of it (our op, a chunked
form, within 5e-5), float64 ones within 1e-12, and with bfloat16 activations the kernel within
2e-2 of the reference run in float32 on the same values.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sleepscale.kernels.window_delta_rule_reference import window_gated_delta_rule_reference
from sleepscale.ops import gated_delta_rule

TESTS = Path(__file__).parent
CASES = [  # those of kernel_window_outputs.py
    "T1_h0",
    "T1",
    "T7_h0",
    "T7",
    "T24_h0_extreme_gates",
    "T24",
    "T64_h0",
    "T64",
    "grouped_H1_HV2",
    "K12_V20_scale",
    "output_grad_only",
    "state_grad_only",
    "float64_grouped_K12_V20",
    "bfloat16",
]
NAMES = ["output", "final_state", "d_q", "d_k", "d_v", "d_a", "d_b", "d_A_log", "d_dt_bias", "d_initial_state"]


@pytest.fixture(scope="module")
def kernel_outputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernel_window") / "outputs.pt"
    subprocess.run(
        [sys.executable, str(TESTS / "kernel_window_outputs.py"), str(path)],
        cwd=TESTS,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return torch.load(path)


def ours_through_the_op(q, k, v, a, b, A_log, dt_bias, initial_state=None, scale=None):
    """Our gated_delta_rule on the PyTorch backend: norms and gates in PyTorch, then the chunked rule."""
    return gated_delta_rule(q, k, v, a, b, A_log, dt_bias, initial_state, scale, backend="torch")


def outputs_and_grads(fn, inputs, d_output, d_state, scale, dtype=None):
    """fn's outputs and input gradients for the given output gradients (None: that output unused);
    inputs cast to `dtype` first if given."""
    leaves = {
        key: (x if dtype is None else x.to(dtype)).detach().requires_grad_()
        for key, x in inputs.items()
        if x is not None
    }
    output, final_state = fn(**{**inputs, **leaves}, scale=scale)
    pairs = [(x, d.to(x.dtype)) for x, d in ((output, d_output), (final_state, d_state)) if d is not None]
    grads = torch.autograd.grad(
        [x for x, _ in pairs], list(leaves.values()), [d for _, d in pairs], allow_unused=True, materialize_grads=True
    )  # q has no say in the final state
    return {"output": output, "final_state": final_state, **{f"d_{key}": grad for key, grad in zip(leaves, grads)}}


def relative_errors(actual, expected):
    """Per quantity: max |actual - expected| / max |expected| (the absolute error where all of expected is 0)."""
    assert actual.keys() == expected.keys()
    return {
        name: (
            (actual[name].double() - expected[name].double()).abs().max()
            / expected[name].double().abs().max().clamp(min=1e-300).where(expected[name].any(), 1.0)
        ).item()
        for name in expected
    }


def assert_within(errors, tolerance, what):
    worst = max(errors, key=errors.get)
    assert errors[worst] < tolerance, f"{what}: {worst} off by {errors[worst]:.2e} (relative), over {tolerance:g}"


def test_every_case_ran(kernel_outputs):
    assert list(kernel_outputs) == CASES


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_and_our_op(kernel_outputs, case):
    result = kernel_outputs[case]
    inputs, kernel = result["inputs"], result["kernel"]
    args = (inputs, result["d_output"], result["d_state"], result["scale"])
    assert list(kernel) == [name for name in NAMES if name != "d_initial_state" or inputs["initial_state"] is not None]
    assert kernel["output"].dtype == inputs["v"].dtype
    assert kernel["final_state"].dtype == (torch.float64 if inputs["q"].dtype == torch.float64 else torch.float32)
    assert all(kernel[f"d_{key}"].dtype == x.dtype for key, x in inputs.items() if x is not None)

    if inputs["q"].dtype == torch.bfloat16:  # against the float32 reference on the same bfloat16 values
        reference = outputs_and_grads(window_gated_delta_rule_reference, *args, dtype=torch.float32)
        errors = relative_errors(kernel, reference)
        print(f"\n{case} ({result['seconds']:.1f} s) kernel vs float32 reference: max {max(errors.values()):.1e}")
        assert_within(errors, 2e-2, "kernel (bfloat16)")
        return

    truth = outputs_and_grads(window_gated_delta_rule_reference, *args, dtype=torch.float64)
    tolerances = {"kernel": 1e-5, "reference": 1e-5, "our op": 5e-5}  # the op's chunked (WY) form, up to 1.7e-5 here
    if inputs["q"].dtype == torch.float64:
        tolerances = dict.fromkeys(tolerances, 1e-12)
    errors = {
        "kernel": relative_errors(kernel, truth),
        "reference": relative_errors(outputs_and_grads(window_gated_delta_rule_reference, *args), truth),
        "our op": relative_errors(outputs_and_grads(ours_through_the_op, *args), truth),
    }
    print(
        f"\n{case} ({result['seconds']:.1f} s) vs float64 reference: "
        + ", ".join(f"{what} max {max(e.values()):.1e}" for what, e in errors.items())
    )
    for what, error in errors.items():
        assert_within(error, tolerances[what], what)


@pytest.mark.parametrize(
    "shape",
    [(2, 24, 2, 2, 16, 16), (2, 7, 1, 3, 12, 20), (1, 64, 1, 1, 8, 8), (2, 1, 2, 4, 8, 12)],
    ids=lambda s: "B{}T{}H{}HV{}K{}V{}".format(*s),
)
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no_h0"])
def test_reference_matches_our_op_in_float64(shape, with_state):
    """Fast, no Triton: the reference against the op that GatedDeltaNet uses, to 1e-10."""
    batch, length, heads, value_heads, key_dim, value_dim = shape
    generator = torch.Generator().manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=generator, dtype=torch.float64)

    inputs = {
        "q": randn(batch, length, heads, key_dim),
        "k": randn(batch, length, heads, key_dim),
        "v": randn(batch, length, value_heads, value_dim),
        "a": randn(batch, length, value_heads) * 3,
        "b": randn(batch, length, value_heads),
        "A_log": randn(value_heads),
        "dt_bias": randn(value_heads) - 3,
        "initial_state": randn(batch, value_heads, key_dim, value_dim) if with_state else None,
    }
    args = (inputs, randn(batch, length, value_heads, value_dim), randn(batch, value_heads, key_dim, value_dim), None)
    errors = relative_errors(
        outputs_and_grads(window_gated_delta_rule_reference, *args), outputs_and_grads(ours_through_the_op, *args)
    )
    assert_within(errors, 1e-10, "reference vs our op")


@pytest.mark.parametrize(
    "length,key_dim,value_dim,limit",
    [(65, 16, 16, "1 to 64"), (0, 16, 16, "1 to 64"), (8, 256, 16, "up to 128"), (8, 16, 200, "up to 128")],
)
def test_sizes_beyond_the_kernel_are_refused_in_one_line(length, key_dim, value_dim, limit):
    from sleepscale.kernels.window_delta_rule import window_gated_delta_rule

    q = torch.randn(1, length, 1, key_dim)
    gates = torch.randn(1, length, 1)
    with pytest.raises(ValueError, match=limit) as error:
        window_gated_delta_rule(
            q, q, torch.randn(1, length, 1, value_dim), gates, gates, torch.zeros(1), torch.zeros(1)
        )
    assert "\n" not in str(error.value)
