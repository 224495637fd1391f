"""Run by test_compile.py in a subprocess with TRITON_INTERPRET=1 set before Triton is imported: our
Triton window kernel under torch.compile, on the CPU through Triton's interpreter. Prints one JSON
line: the graph breaks seen, and the largest difference between compiled and eager outputs and
gradients (the operator itself, then a whole model on `model.backend: window`)."""

import copy
import json
import sys

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from conftest import make_config  # noqa: E402

from sleepscale.kernels.window_delta_rule import window_gated_delta_rule  # noqa: E402
from sleepscale.model import build_model  # noqa: E402
from sleepscale.parallel.compile import compile_blocks  # noqa: E402
from sleepscale.sleep import sleep_forward  # noqa: E402


def op_outputs_and_grads(fn, inputs):
    leaves = {key: x.detach().requires_grad_() for key, x in inputs.items()}
    output, final_state = fn(**leaves)
    loss = (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum() + final_state.square().sum()
    return [output, final_state, *torch.autograd.grad(loss, list(leaves.values()))]


def model_outputs_and_grads(model, ids, sleep):
    out = sleep_forward(model, ids, sleep, targets=ids.roll(-1, 1))
    out.loss.backward()
    return [out.logits, out.loss, *(p.grad for p in model.parameters())]


def largest_difference(got, want) -> float:
    return max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-30) for a, b in zip(got, want))


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    batch, length, heads, value_heads, dim = 2, 7, 1, 2, 8
    inputs = {
        "q": torch.randn(batch, length, heads, dim, generator=generator),
        "k": torch.randn(batch, length, heads, dim, generator=generator),
        "v": torch.randn(batch, length, value_heads, dim, generator=generator),
        "a": torch.randn(batch, length, value_heads, generator=generator),
        "b": torch.randn(batch, length, value_heads, generator=generator),
        "A_log": torch.randn(value_heads, generator=generator) * 0.1,
        "dt_bias": torch.randn(value_heads, generator=generator) * 0.1,
        "initial_state": torch.randn(batch, value_heads, dim, dim, generator=generator),
    }
    eager = op_outputs_and_grads(window_gated_delta_rule, inputs)
    compiled_op = torch.compile(window_gated_delta_rule, fullgraph=True, backend="aot_eager")
    op_difference = largest_difference(op_outputs_and_grads(compiled_op, inputs), eager)

    config = make_config(hidden_size=32, passes=3, checkpoint="pass", model={"backend": "window"})
    model = build_model(config.model)
    compiled_model = compile_blocks(copy.deepcopy(model), torch.device("cpu"), backend="aot_eager")
    ids = torch.randint(0, 40, (2, 20), generator=generator)
    model_difference = largest_difference(
        model_outputs_and_grads(compiled_model, ids, config.sleep), model_outputs_and_grads(model, ids, config.sleep)
    )
    print(
        json.dumps(
            {
                "graph_breaks": sum(counters["graph_break"].values()),
                "op": op_difference,
                "model": model_difference,
            }
        )
    )


if __name__ == "__main__":
    main()
