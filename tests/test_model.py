"""The hybrid model: deterministic init, the pattern alphabet, tying, the state dtype contract, and
the options pretrained checkpoints need (each against a plain reference written here)."""

import math

import pytest
import torch
from conftest import make_config
from torch import nn

from sleepscale.config import RopeScalingConfig
from sleepscale.model import build_model
from sleepscale.model.attention import Attention, AttentionState, inverse_frequencies, rotate
from sleepscale.model.gdn import GatedDeltaNet, GDNState
from sleepscale.model.norm import RMSNorm
from sleepscale.sleep import sleep_forward


def test_init_depends_on_the_seed_alone():
    config = make_config("AGag")
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = build_model(config.model)
    assert torch.equal(torch.rand(3), before), "building a model must not consume the caller's RNG"
    second = build_model(config.model)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    other = build_model(config.model.model_copy(update={"seed": 1}))
    assert not torch.equal(first.layers[1].attn.q_proj.weight, other.layers[1].attn.q_proj.weight)


def test_pattern_letters_choose_mixer_and_mlp():
    model = build_model(make_config("AGag").model)
    assert [type(block.attn) for block in model.layers] == [Attention, GatedDeltaNet, Attention, GatedDeltaNet]
    assert [block.mlp is not None for block in model.layers] == [True, True, False, False]


def test_tied_embeddings_share_one_tensor():
    model = build_model(make_config("AG", model={"tie_embeddings": True}).model)
    assert model.lm_head.weight is model.embeddings.weight


def test_fast_weights_stay_float32_in_a_bfloat16_model(tokens):
    config = make_config("AG", passes=2)
    model = build_model(config.model).to(torch.bfloat16)
    out = sleep_forward(model, tokens, config.sleep, targets=tokens)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(s.fast_weights.dtype == torch.float32 for s in out.states if isinstance(s, GDNState))
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_cpu_path_never_imports_fla():
    """fla's import costs ~10 s and needs Triton drivers; the CPU path must not pay it."""
    import subprocess
    import sys

    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); from conftest import make_config; "
        "from sleepscale.model import build_model; from sleepscale.sleep import sleep_forward; "
        "c = make_config(passes=2); sleep_forward(build_model(c.model), "
        "torch.zeros(1, 20, dtype=torch.long), c.sleep); "
        "assert not any(m == 'fla' or m.startswith('fla.') for m in sys.modules), 'fla was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# Every option pretrained Llama / Qwen2 / Qwen3 / Qwen3.5 checkpoints need, on (see sleepscale.config):
# half of each head rotary, Llama 3 scaling whose original context (16) puts one of the two
# frequencies in the interpolated band and the other in the divided one.
ALL_FEATURES = {
    "attention": {
        "num_heads": 2,
        "num_kv_heads": 1,
        "head_dim": 8,
        "rotary_fraction": 0.5,
        "qkv_bias": True,
        "output_bias": True,
        "qk_norm": True,
        "output_gate": True,
        "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 16},
    },
    "gdn": {"num_heads": 2, "num_v_heads": 4, "expand_v": 1.5},
    "zero_centered_norms": True,
}


def reference_rms_norm(x, scale, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def reference_rotary(x, positions, inv_freq):
    """Rotates each pair (i, i + rotary_dim / 2) of x [..., time, head_dim] as the complex number
    x_i + j x_(i + rotary_dim / 2) times exp(j position inv_freq_i); the dimensions after rotary_dim stay."""
    half = inv_freq.numel()
    angles = positions.to(x.dtype)[:, None] * inv_freq
    z = torch.complex(x[..., :half], x[..., half : 2 * half]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag, x[..., 2 * half :]], dim=-1)


def reference_attention(attention, x, inv_freq):
    """Causal attention over one window x [batch, time, hidden], every option written out: per head
    the q_proj rows are [query, gate]; q/k norms (zero-centred) before rotary; key/value head h
    serves query heads h * group ... (h + 1) * group - 1."""
    batch, length, _ = x.shape
    heads, dim = attention.num_heads, attention.head_dim
    rows = attention.q_proj(x).view(batch, length, heads, 2, dim)
    q = reference_rms_norm(rows[..., 0, :], 1 + attention.q_norm.weight)
    gate = rows[..., 1, :]
    k = reference_rms_norm(attention.k_proj(x).view(batch, length, -1, dim), 1 + attention.k_norm.weight)
    v = attention.v_proj(x).view(batch, length, -1, dim)
    positions = torch.arange(length)
    q, k = (
        reference_rotary(q.transpose(1, 2), positions, inv_freq),
        reference_rotary(k.transpose(1, 2), positions, inv_freq),
    )
    group = heads // attention.num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) / dim**0.5
    scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2)
    return attention.o_proj((out * torch.sigmoid(gate)).flatten(2))


def all_features_attention():
    config = make_config("A", model=ALL_FEATURES).model
    attention = build_model(config).layers[0].attn.double()
    with torch.no_grad():  # non-zero norm weights and biases, so that (1 + weight) and the biases matter
        for name, parameter in attention.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(len(name))))
    return attention


def test_parameter_names_are_unchanged_with_every_option_off():
    names = [name for name, _ in build_model(make_config("AGag").model).named_parameters()]
    attention = [
        "attn_norm.weight",
        "attn.q_proj.weight",
        "attn.k_proj.weight",
        "attn.v_proj.weight",
        "attn.o_proj.weight",
    ]
    gdn = [
        "attn_norm.weight",
        "attn.A_log",
        "attn.dt_bias",
        "attn.q_proj.weight",
        "attn.k_proj.weight",
        "attn.v_proj.weight",
        "attn.a_proj.weight",
        "attn.b_proj.weight",
        "attn.q_conv1d.weight",
        "attn.k_conv1d.weight",
        "attn.v_conv1d.weight",
        "attn.g_proj.weight",
        "attn.o_norm.weight",
        "attn.o_proj.weight",
    ]
    mlp = ["mlp_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    blocks = [attention + mlp, gdn + mlp, attention, gdn]
    expected = [
        "embeddings.weight",
        *[f"layers.{i}.{name}" for i, block in enumerate(blocks) for name in block],
        "norm.weight",
        "lm_head.weight",
    ]
    assert names == expected


def test_parameter_layout_with_every_option_on():
    """The interface checkpoint converters rely on: transformers' / fla's names and shapes."""
    model = build_model(make_config("AG", model=ALL_FEATURES).model)
    shapes = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
    hidden, heads, dim, v_heads, v_dim = 16, 2, 8, 4, 12
    assert {
        name.removeprefix("layers.0.attn."): shape
        for name, shape in shapes.items()
        if name.startswith("layers.0.attn.")
    } == {
        "q_proj.weight": (heads * dim * 2, hidden),
        "q_proj.bias": (heads * dim * 2,),
        "k_proj.weight": (dim, hidden),
        "k_proj.bias": (dim,),
        "v_proj.weight": (dim, hidden),
        "v_proj.bias": (dim,),
        "o_proj.weight": (hidden, heads * dim),
        "o_proj.bias": (hidden,),
        "q_norm.weight": (dim,),
        "k_norm.weight": (dim,),
    }
    assert {
        name.removeprefix("layers.1.attn."): shape
        for name, shape in shapes.items()
        if name.startswith("layers.1.attn.")
    } == {
        "q_proj.weight": (heads * dim, hidden),
        "k_proj.weight": (heads * dim, hidden),
        "v_proj.weight": (v_heads * v_dim, hidden),
        "g_proj.weight": (v_heads * v_dim, hidden),
        "a_proj.weight": (v_heads, hidden),
        "b_proj.weight": (v_heads, hidden),
        "A_log": (v_heads,),
        "dt_bias": (v_heads,),
        "q_conv1d.weight": (heads * dim, 1, 4),
        "k_conv1d.weight": (heads * dim, 1, 4),
        "v_conv1d.weight": (v_heads * v_dim, 1, 4),
        "o_norm.weight": (v_dim,),
        "o_proj.weight": (hidden, v_heads * v_dim),
    }
    assert model.layers[1].attn.initial_state(3).fast_weights.shape == (3, v_heads, dim, v_dim)


def test_zero_centred_rms_norm_scales_by_one_plus_its_weight():
    norm, plain = RMSNorm(8, 1e-6, zero_centered=True), nn.RMSNorm(8, eps=1e-6)
    assert torch.equal(norm.weight, torch.zeros(8)), "a zero-centred norm starts as the identity scale"
    with torch.no_grad():
        norm.weight.normal_()
        plain.weight.copy_(1 + norm.weight)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(norm.double()(x), plain.double()(x))
    low = x.to(torch.bfloat16)  # computed in float32, returned in the input's dtype
    assert torch.equal(norm.float()(low), plain.float()(low.float()).to(torch.bfloat16))
    assert torch.equal(RMSNorm(8, 1e-6)(x.float()), nn.RMSNorm(8, eps=1e-6)(x.float()))


def test_fresh_model_has_zero_centred_norms_at_zero_and_zero_biases():
    model = build_model(make_config("AG", model=ALL_FEATURES).model)
    norms = [name for name, module in model.named_modules() if isinstance(module, RMSNorm)]
    assert norms == [
        "layers.0.attn_norm",
        "layers.0.attn.q_norm",
        "layers.0.attn.k_norm",
        "layers.0.mlp_norm",
        "layers.1.attn_norm",
        "layers.1.mlp_norm",
        "norm",
    ]
    assert all(not model.get_submodule(name).weight.any() for name in norms)
    assert torch.equal(model.layers[1].attn.o_norm.weight, torch.ones(12)), (
        "the GDN gated output norm is never zero-centred"
    )
    assert all(not parameter.any() for name, parameter in model.named_parameters() if name.endswith("proj.bias"))


def test_partial_rotary_rotates_the_first_dimensions_by_relative_position():
    head_dim, rotary_dim, theta = 8, 4, 10000.0
    inv_freq = inverse_frequencies(rotary_dim, theta, None, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(inv_freq, theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    q, k = torch.randn(2, 1, 2, 6, head_dim, dtype=torch.float64).unbind(0)

    def rotated(x, positions):
        angles = positions.to(torch.float64)[:, None] * inv_freq
        return rotate(x, angles.cos(), angles.sin())

    positions = torch.arange(6)
    out = rotated(q, positions)
    torch.testing.assert_close(out, reference_rotary(q, positions, inv_freq))
    assert torch.equal(out[..., rotary_dim:], q[..., rotary_dim:])
    assert not torch.allclose(out[..., 1:, :rotary_dim], q[..., 1:, :rotary_dim])
    scores = rotated(q, positions) @ rotated(k, positions).transpose(-1, -2)
    shifted = rotated(q, positions + 100) @ rotated(k, positions + 100).transpose(-1, -2)
    torch.testing.assert_close(shifted, scores)  # only relative positions count


def test_llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones():
    scaling = RopeScalingConfig(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    args = (128, 500000.0)  # Llama 3.1's head_dim and theta
    plain = inverse_frequencies(*args, None, torch.float64, torch.device("cpu"))
    scaled = inverse_frequencies(*args, scaling, torch.float64, torch.device("cpu"))
    wavelength = 2 * math.pi / plain
    high, low = wavelength < 8192 / 4, wavelength > 8192 / 1
    middle = ~high & ~low
    assert high.sum() > 0 and low.sum() > 0 and middle.sum() > 0
    assert torch.equal(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8, rtol=1e-15, atol=0)
    assert ((scaled[middle] > plain[middle] / 8) & (scaled[middle] < plain[middle])).all()
    assert (scaled.diff() < 0).all(), "frequencies still fall with the dimension"


def test_attention_with_every_option_equals_a_plain_reference():
    attention = all_features_attention()
    assert attention.rotary_dim == 4 and attention.rope_scaling is not None
    inv_freq = inverse_frequencies(4, attention.rope_theta, attention.rope_scaling, torch.float64, torch.device("cpu"))
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    out, _ = attention(x, AttentionState(span=8))
    torch.testing.assert_close(out, reference_attention(attention, x, inv_freq))


def test_output_gate_multiplies_by_the_sigmoid_of_each_heads_gate_rows():
    heads, dim = 2, 8
    gated = Attention(16, heads, 1, dim, output_gate=True).double()
    plain = Attention(16, heads, 1, dim).double()
    rows = gated.q_proj.weight.detach().view(heads, 2, dim, 16)  # per head: query rows, then gate rows
    with torch.no_grad():
        plain.q_proj.weight.copy_(rows[:, 0].flatten(0, 1))
        for name in ("k_proj", "v_proj", "o_proj"):
            getattr(plain, name).weight.copy_(getattr(gated, name).weight)
        for layer in (gated, plain):
            layer.o_proj.weight.copy_(torch.eye(16))  # so that the outputs are the gated heads themselves
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    out, _ = gated(x, AttentionState(span=8))
    expected, _ = plain(x, AttentionState(span=8))
    torch.testing.assert_close(out, expected * torch.sigmoid(x @ rows[:, 1].flatten(0, 1).T))


def test_sliding_attention_retains_normed_unrotated_keys():
    """Two windows in two calls equal one call over both: the retained keys are k_norm's output,
    rotated on use like the window's own."""
    attention = all_features_attention()
    x = torch.randn(2, 14, 16, dtype=torch.float64)
    whole, _ = attention(x, AttentionState(span=6))
    first, state = attention(x[:, :8], AttentionState(span=6))
    second, _ = attention(x[:, 8:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    keys = attention.k_norm(attention.k_proj(x[:, 3:8]).unflatten(-1, (1, 8))).transpose(1, 2)
    torch.testing.assert_close(state.keys, keys)


def test_grouped_value_heads_equal_key_heads_repeated_per_value_head():
    """num_v_heads = 2 * num_heads is the ungrouped layer whose query/key projections (and their
    convolutions) hold each key head twice, once per value head it serves, in consecutive order."""
    torch.manual_seed(0)
    grouped = GatedDeltaNet(16, num_heads=2, head_dim=4, expand_v=1.5, num_v_heads=4).double()
    plain = GatedDeltaNet(16, num_heads=4, head_dim=4, expand_v=1.5).double()
    weights = dict(grouped.state_dict())
    for name in ("q_proj.weight", "k_proj.weight", "q_conv1d.weight", "k_conv1d.weight"):
        weights[name] = weights[name].unflatten(0, (2, 4)).repeat_interleave(2, dim=0).flatten(0, 1)
    plain.load_state_dict(weights)

    x = torch.randn(2, 13, 16, dtype=torch.float64)
    outputs = []
    for layer in (grouped, plain):
        first, state = layer(x[:, :9], layer.initial_state(2))
        second, state = layer(x[:, 9:], state)  # the carried fast weights and convolution tails
        outputs.append((torch.cat([first, second], 1), state.fast_weights))
        torch.cat([first, second], 1).pow(2).sum().backward()
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=1e-10, atol=1e-12)
    summed = plain.q_proj.weight.grad.unflatten(0, (2, 2, 4)).sum(1).flatten(0, 1)  # a key head's two copies
    torch.testing.assert_close(grouped.q_proj.weight.grad, summed, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grouped.v_proj.weight.grad, plain.v_proj.weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_sleep_runs_a_model_with_every_option(tokens, eviction):
    config = make_config("AGag", passes=3, eviction=eviction, model=ALL_FEATURES)
    model = build_model(config.model)
    out = sleep_forward(model, tokens, config.sleep, targets=tokens.roll(-1, 1))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(s.fast_weights.shape[1] == 4 for s in out.states if isinstance(s, GDNState))
