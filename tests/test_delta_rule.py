"""The CPU delta-rule op against fla's pure-PyTorch references, in float64."""

import pytest
import torch
import torch.nn.functional as F

from sleepscale.ops import BackendUnavailable, delta_rule_kernel, gated_delta_rule
from sleepscale.ops.delta_rule_torch import chunk_gated_delta_rule_torch, fitted_chunk_size
from sleepscale.ops.references import chunk_reference, recurrent_reference


def make_inputs(batch, length, heads, key_dim, value_dim, with_state, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q = F.normalize(randn(batch, length, heads, key_dim), dim=-1)
    k = F.normalize(randn(batch, length, heads, key_dim), dim=-1)
    v = randn(batch, length, heads, value_dim)
    g = F.logsigmoid(randn(batch, length, heads))
    beta = torch.sigmoid(randn(batch, length, heads))
    state = randn(batch, heads, key_dim, value_dim) if with_state else None
    inputs = [q, k, v, g, beta] + ([state] if with_state else [])
    return [x.requires_grad_() for x in inputs]


def outputs_and_grads(fn, inputs, seed=1):
    q, k, v, g, beta, *state = inputs
    out, final = fn(q, k, v, g, beta, state[0] if state else None)
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum() + (
        final * torch.randn(final.shape, generator=gen, dtype=final.dtype)
    ).sum()
    grads = torch.autograd.grad(loss, inputs)
    return [out, final, *grads]


def assert_close_relative(actual, expected, rtol, names):
    for name, a, e in zip(names, actual, expected):
        scale = e.double().norm()
        error = (a.double() - e.double()).norm() / (scale if scale > 0 else 1)  # e.g. dg of one token from a zero state
        assert error < rtol, f"{name}: relative error {error:.2e}"


NAMES = ["output", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state"]


@pytest.mark.parametrize("reference", [recurrent_reference, chunk_reference], ids=["recurrent", "chunk"])
@pytest.mark.parametrize(
    "shape",
    [(2, 64, 2, 16, 16), (1, 100, 3, 16, 8), (2, 150, 2, 32, 24), (1, 7, 1, 8, 8), (2, 24, 2, 16, 16), (1, 1, 1, 8, 8)],
    ids=lambda s: "B{}T{}H{}K{}V{}".format(*s),
)
@pytest.mark.parametrize("with_state", [True, False], ids=["h0", "no_h0"])
def test_matches_fla_references_in_float64(reference, shape, with_state):
    inputs = make_inputs(*shape, with_state=with_state)
    ours = outputs_and_grads(chunk_gated_delta_rule_torch, inputs)
    theirs = outputs_and_grads(reference, inputs)
    assert ours[0].dtype == torch.float64 and ours[1].dtype == torch.float64
    assert_close_relative(ours, theirs, 1e-8, NAMES[: len(ours)])


@pytest.mark.parametrize("length,chunk", [(1, 1), (24, 24), (64, 64), (65, 33), (100, 50), (129, 43)])
def test_chunks_fit_the_sequence(length, chunk):
    """A short sleep window is one chunk of its own length, not a padded 64-token chunk."""
    assert fitted_chunk_size(length) == chunk


def test_gradcheck_tiny():
    inputs = make_inputs(1, 5, 1, 3, 2, with_state=True)

    def op(q, k, v, g, beta, state):
        return chunk_gated_delta_rule_torch(q, k, v, g, beta, state, chunk_size=2)

    assert torch.autograd.gradcheck(op, inputs)


@pytest.mark.parametrize("pieces", [[64, 64], [30, 50, 48], [1, 127]], ids=str)
def test_state_threading_equals_one_call(pieces):
    """T tokens in k calls with the state carried equals one call of T tokens, gradients included."""
    inputs = make_inputs(2, sum(pieces), 2, 16, 8, with_state=True)

    def threaded(q, k, v, g, beta, state):
        outs, start = [], 0
        for size in pieces:
            part = slice(start, start + size)
            out, state = chunk_gated_delta_rule_torch(
                q[:, part], k[:, part], v[:, part], g[:, part], beta[:, part], state
            )
            outs.append(out)
            start += size
        return torch.cat(outs, dim=1), state

    one = outputs_and_grads(chunk_gated_delta_rule_torch, inputs)
    many = outputs_and_grads(threaded, inputs)
    assert_close_relative(many, one, 1e-12, NAMES)


def raw_inputs(batch, length, heads, key_dim, value_dim, dtype):
    """A Gated DeltaNet's raw inputs to `gated_delta_rule`: q, k before their norms, a, b before the gates."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(batch, length, heads, key_dim, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(batch, length, heads, value_dim, generator=gen).to(dtype)
    a, b = (torch.randn(batch, length, heads, generator=gen).to(dtype) for _ in range(2))
    return q, k, v, a, b, torch.rand(heads, generator=gen), torch.randn(heads, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_output_keeps_the_input_dtype_and_the_state_is_float32(dtype):
    inputs = raw_inputs(1, 70, 2, 8, 8, dtype)
    out, final = gated_delta_rule(*inputs, torch.randn(1, 2, 8, 8))
    assert out.dtype == dtype and final.dtype == torch.float32


def test_the_op_computes_the_norms_and_gates_it_is_given_raw():
    """gated_delta_rule on raw inputs equals the chunked rule on L2-normalised q, k and the gates
    -exp(A_log) * softplus(a + dt_bias) and sigmoid(b)."""
    q, k, v, a, b, A_log, dt_bias = raw_inputs(2, 10, 2, 4, 6, torch.float64)
    out, final = gated_delta_rule(q, k, v, a, b, A_log, dt_bias)
    g = -A_log.exp() * F.softplus(a + dt_bias)
    expected = chunk_gated_delta_rule_torch(
        F.normalize(q, dim=-1, eps=0), F.normalize(k, dim=-1, eps=0), v, g, torch.sigmoid(b)
    )
    torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-6)  # fla's norm adds eps 1e-6 under the root
    torch.testing.assert_close(final, expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["fla", "window"])
def test_triton_backends_refuse_cpu_tensors(backend):
    with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
        gated_delta_rule(*raw_inputs(1, 4, 1, 4, 4, torch.float32), backend=backend)


def test_the_dispatcher_picks_our_window_kernel_for_short_trained_calls_and_fla_otherwise():
    cuda = torch.device("cuda")
    assert delta_rule_kernel("auto", torch.device("cpu"), 24, 128, 128, needs_grad=True) == "torch"
    assert delta_rule_kernel("auto", cuda, 24, 128, 128, needs_grad=True) == "window"
    assert delta_rule_kernel("auto", cuda, 65, 128, 128, needs_grad=True) == "fla_chunk"
    assert delta_rule_kernel("auto", cuda, 24, 256, 128, needs_grad=True) == "fla_chunk"  # wider than our kernel
    assert delta_rule_kernel("auto", cuda, 1, 128, 128, needs_grad=False) == "fla_fused_recurrent"  # decoding
    assert delta_rule_kernel("fla", cuda, 24, 128, 128, needs_grad=True) == "fla_chunk"  # fla forbids ours
    assert delta_rule_kernel("window", cuda, 1, 128, 128, needs_grad=False) == "window"
    with pytest.raises(BackendUnavailable, match="model.backend=window runs calls of at most 64 tokens"):
        delta_rule_kernel("window", cuda, 75, 128, 128, needs_grad=True)
