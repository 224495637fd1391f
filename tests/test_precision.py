"""Training precision: bf16 is autocast over float32 parameters (`sleepscale.train.step.precision_context`)."""

import torch
from conftest import make_config

from sleepscale.model import build_model
from sleepscale.model.gdn import GDNState
from sleepscale.model.precision import precision_context
from sleepscale.sleep import sleep_forward


def accumulated_gradients(
    precision: str, config, batches, model_dtype=torch.float32
) -> tuple[dict, list, torch.nn.Module]:
    """Gradients summed over the micro-steps, as DeepSpeed accumulates them, and the last states."""
    model = build_model(config.model).to(model_dtype)
    for ids in batches:
        with precision_context(precision, torch.device("cpu")):
            out = sleep_forward(model, ids, config.sleep, targets=ids.roll(-1, 1))
        (out.loss / len(batches)).backward()
    return {name: p.grad for name, p in model.named_parameters()}, out.states, model


def relative(got: dict, expected: dict) -> float:
    """Of all gradients together: |got - expected| / |expected|."""
    difference = sum((got[n].double() - expected[n].double()).pow(2).sum() for n in expected)
    return (difference / sum(e.double().pow(2).sum() for e in expected.values())).sqrt().item()


def test_bf16_gradients_over_4_passes_and_4_micro_steps_are_float32_and_close_to_fp32():
    """N = 4 (the block's weights used four times per window, three windows) and 4 micro-steps: the
    bf16 run's gradients are float32 and within 1e-2 of the fp32 run's, closer than those of the
    model cast to bf16 (DeepSpeed's bf16 mode, where the passes' gradients sum in bf16); A_log,
    dt_bias and the GDN states stay float32. (norm_eps 1e-3: at this toy width and init the GDN
    output norm's input has a mean square near 1e-6, where the gradient amplifies fp32 rounding
    alone 1000-fold at N = 4, and bf16's to O(1).)"""
    config = make_config(
        pattern="G",
        passes=4,
        hidden_size=64,
        model={"init_std": 0.02, "norm_eps": 1e-3, "gdn": {"num_heads": 4, "expand_v": 1.0}},
    )
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 40, (2, 24), generator=generator) for _ in range(4)]
    expected, _, _ = accumulated_gradients("fp32", config, batches)
    got, states, model = accumulated_gradients("bf16", config, batches)
    cast, _, _ = accumulated_gradients("fp32", config, batches, model_dtype=torch.bfloat16)
    assert all(grad.dtype == torch.float32 for grad in got.values())
    assert relative(got, expected) < 1e-2
    assert relative(got, expected) < relative(cast, expected)
    gdn = model.layers[0].attn
    assert gdn.A_log.dtype == gdn.dt_bias.dtype == torch.float32
    gdn_states = [s for s in states if isinstance(s, GDNState)]
    assert gdn_states and all(s.fast_weights.dtype == torch.float32 for s in gdn_states)


def test_bf16_runs_its_matmuls_in_bf16_and_fp32_does_not():
    linear = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with precision_context("bf16", torch.device("cpu")):
        assert linear(x).dtype == torch.bfloat16
    with precision_context("fp32", torch.device("cpu")):
        assert linear(x).dtype == torch.float32
