"""Run by test_compile.py in a subprocess, fla's Triton kernels on the CPU through Triton's interpreter
(`triton_cpu_interpreter`, imported before fla): a model on `model.backend: fla` with its blocks
compiled (fla's kernels as the custom operators of `sleepscale.ops.fla`) against the same
model eager. Prints one JSON line: the graph breaks, the graphs compiled, and the largest relative
difference of logits, loss and gradients."""

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
import triton_cpu_interpreter  # noqa: E402, F401  (before fla)
from conftest import make_config  # noqa: E402
from kernel_window_compiled import largest_difference, model_outputs_and_grads  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from sleepscale.model import build_model  # noqa: E402
from sleepscale.parallel.compile import compile_blocks  # noqa: E402


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    config = make_config(hidden_size=32, passes=2, window=8, model={"backend": "fla"})
    model = build_model(config.model)
    compiled_model = compile_blocks(copy.deepcopy(model), torch.device("cpu"), backend="aot_eager")
    ids = torch.randint(0, 40, (2, 20), generator=generator)
    difference = largest_difference(
        model_outputs_and_grads(compiled_model, ids, config.sleep), model_outputs_and_grads(model, ids, config.sleep)
    )
    print(
        json.dumps(
            {
                "graph_breaks": sum(counters["graph_break"].values()),
                "graphs": counters["stats"]["unique_graphs"],
                "model": difference,
            }
        )
    )


if __name__ == "__main__":
    main()
