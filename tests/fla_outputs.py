"""Runs fla's own GatedDeltaNet layer (plain and with grouped value heads) and GatedDeltaNetForCausalLM
(through its Triton kernels, interpreted on the CPU, float32) and saves weights, inputs and outputs
for test_fla_parity.py.

A separate process because it patches Triton and imports fla (~10 s), which the rest of the test
suite must not see. Usage: python tests/fla_outputs.py OUT.pt
"""

import sys
from pathlib import Path

import torch
import triton_cpu_interpreter  # noqa: F401  (before fla)
from fla.layers import GatedDeltaNet
from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM


def randomize(module, generator):
    """Non-default values everywhere (norm weights too), so that no parameter goes untested."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(
                torch.randn(parameter.shape, generator=generator) * 0.3 + (1.0 if parameter.dim() == 1 else 0.0)
            )


def windows_with_hard_eviction(model, input_ids, window: int):
    """fla's model over one window after another, its cache carrying each layer's recurrent state and
    its short-convolution states zeroed between windows: sleepscale's hard eviction at N = 1."""
    logits, cache = [], None
    for start in range(0, input_ids.shape[1], window):
        out = model(input_ids=input_ids[:, start : start + window], past_key_values=cache, use_cache=True)
        logits.append(out.logits)
        cache = out.past_key_values
        for layer in range(len(cache)):
            cache[layer]["conv_state"] = tuple(torch.zeros_like(state) for state in cache[layer]["conv_state"])
    return torch.cat(logits, dim=1)


def one_token_with_grouped_value_heads(generator):
    """fla's chunk kernel and its fused recurrent kernel (what our fla backend calls to decode) on a
    single token, with two value heads per key head and a carried state, from raw q, k and gate
    inputs with fla's in-kernel L2 norm, gate and beta options (as our fla backend calls them)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    inputs = {
        "q": torch.randn(2, 1, 2, 8, generator=generator),
        "k": torch.randn(2, 1, 2, 8, generator=generator),
        "v": torch.randn(2, 1, 4, 12, generator=generator),
        "a": torch.randn(2, 1, 4, generator=generator),
        "b": torch.randn(2, 1, 4, generator=generator),
        "A_log": torch.rand(4, generator=generator) * 2,
        "dt_bias": torch.randn(4, generator=generator),
        "initial_state": torch.randn(2, 4, 8, 12, generator=generator),
    }
    options = {
        "output_final_state": True,
        "use_qk_l2norm_in_kernel": True,
        "use_gate_in_kernel": True,
        "use_beta_sigmoid_in_kernel": True,
        "A_log": inputs["A_log"],
        "dt_bias": inputs["dt_bias"],
    }
    raw = [inputs[name] for name in ("q", "k", "v", "a", "b")]
    output, state = chunk_gated_delta_rule(*raw, initial_state=inputs["initial_state"], **options)
    fused_output, fused_state = fused_recurrent_gated_delta_rule(
        *raw[:3], g=raw[3], beta=raw[4], initial_state=inputs["initial_state"], **options
    )
    return {
        "inputs": inputs,
        "output": output,
        "state": state,
        "fused_output": fused_output,
        "fused_state": fused_state,
    }


def our_layer_on_each_backend(generator):
    """Our GatedDeltaNet layer over one 24-token window from a carried state, on each delta-rule
    backend (the Triton ones interpreted): output, final state, and the gradients of the input, the
    initial state and every parameter, for random output gradients."""
    from sleepscale.model.gdn import GatedDeltaNet as OurGatedDeltaNet
    from sleepscale.model.gdn import GDNState

    layer = OurGatedDeltaNet(hidden_size=32, num_heads=2, head_dim=8, expand_v=1.5, num_v_heads=4)
    randomize(layer, generator)
    x = torch.randn(2, 24, 32, generator=generator)
    fast_weights = torch.randn(2, 4, 8, 12, generator=generator) * 0.3
    d_out, d_state = torch.randn(2, 24, 32, generator=generator), torch.randn(2, 4, 8, 12, generator=generator)
    results = {}
    for backend in ("torch", "window", "fla"):
        layer.backend = backend
        layer.zero_grad()
        inputs = [x.clone().requires_grad_(), fast_weights.clone().requires_grad_()]
        out, state = layer(inputs[0], GDNState(inputs[1]))
        torch.autograd.backward([out, state.fast_weights], [d_out, d_state])
        results[backend] = {
            "output": out.detach(),
            "state": state.fast_weights.detach(),
            "d_x": inputs[0].grad,
            "d_initial_state": inputs[1].grad,
            **{f"d_{name}": p.grad.clone() for name, p in layer.named_parameters()},
        }
    return results


def main(path):
    generator = torch.Generator().manual_seed(0)
    layer = GatedDeltaNet(hidden_size=32, head_dim=8, num_heads=4, expand_v=1.5, conv_size=4, norm_eps=1e-5)
    randomize(layer, generator)
    layer_input = torch.randn(2, 70, 32, generator=generator)  # 70: not a multiple of fla's chunk of 64
    grouped = GatedDeltaNet(
        hidden_size=32, head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.5, conv_size=4, norm_eps=1e-5
    )
    randomize(grouped, generator)
    with torch.no_grad():
        layer_output, grouped_output = layer(layer_input)[0], grouped(layer_input)[0]

    config = GatedDeltaNetConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=2,
        head_dim=16,
        expand_v=1.0,
        vocab_size=50,
        intermediate_size=48,
        fuse_norm=False,
        fuse_swiglu=False,
        fuse_cross_entropy=False,
    )
    model = GatedDeltaNetForCausalLM(config)
    randomize(model, generator)
    input_ids = torch.randint(0, 50, (2, 40), generator=generator)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        window_logits = windows_with_hard_eviction(model, input_ids, window=8)
    model.save_pretrained(Path(path).parent / "fla_model")  # what `sleepscale convert` reads
    decode_step = one_token_with_grouped_value_heads(generator)
    backends = our_layer_on_each_backend(generator)
    torch.save(
        {
            "layer_state": layer.state_dict(),
            "layer_input": layer_input,
            "layer_output": layer_output,
            "grouped_state": grouped.state_dict(),
            "grouped_output": grouped_output,
            "input_ids": input_ids,
            "logits": logits,
            "window_logits": window_logits,
            "decode_step": decode_step,
            "backends": backends,
        },
        path,
    )


if __name__ == "__main__":
    main(sys.argv[1])
