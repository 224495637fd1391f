"""Measures what `sleep_forward` saves for backward with the GPU's delta-rule kernels (our window
kernel, fla's chunked kernel), run under Triton's CPU interpreter, for test_planner_activations.py.

A separate process because it patches Triton and imports fla. Usage: python tests/planner_kernel_saved.py OUT.json
"""

import json
import sys

import torch
import triton_cpu_interpreter  # noqa: F401  (before fla)
from conftest import make_config

from sleepscale.model import build_model
from sleepscale.planner.activations import saved_bytes

# (window, passes, checkpoint): windows of at most 64 tokens run our window kernel, longer ones fla's chunked one
CASES = [(16, 2, "none"), (16, 3, "pass"), (80, 2, "none")]


def main():
    found = {}
    for window, passes, checkpoint in CASES:
        config = make_config(
            pattern="GA", window=window, passes=passes, checkpoint=checkpoint, hidden_size=32, vocab_size=64
        )
        ids = torch.randint(0, 64, (2, 2 * window + 5), generator=torch.Generator().manual_seed(0))
        found[f"{window}-{passes}-{checkpoint}"] = saved_bytes(
            build_model(config.model), ids, ids.roll(-1, 1), config.sleep
        )
    with open(sys.argv[1], "w") as out:
        json.dump(found, out)


if __name__ == "__main__":
    main()
