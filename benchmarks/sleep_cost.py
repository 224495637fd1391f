"""What sleep costs in training, and what the levers save: memory and time per step against N.

    python benchmarks/sleep_cost.py [--passes 1 2 4 8] [--width 256] [--steps 3]

For N in --passes and modes: none (full backprop, no checkpointing), pass and window (activation
checkpointing), k=1 and k=2 (truncated backprop, no checkpointing), each configuration runs in a
fresh process: build the model, one warm-up step, then --steps timed steps. Columns: bytes autograd
saved for backward (saved_tensors_hooks), peak resident memory above the process's level before the
first step, median step time, model FLOPs per token, and each ratio to N=1 without checkpointing.
The model (AGAG, width --width, windows of 64 tokens, 4 windows, batch 8) is large enough on a
CPU that the matrix work dominates Python overhead.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

MODES = {
    "none": {},
    "pass": {"checkpoint": "pass"},
    "window": {"checkpoint": "window"},
    "k=1": {"grad_passes": 1},
    "k=2": {"grad_passes": 2},
}


def measure(passes: int, mode: str, width: int, steps: int) -> dict:
    import torch

    from sleepscale.config import validate
    from sleepscale.flops import training_flops_per_token
    from sleepscale.model import build_model
    from sleepscale.sleep import plan_for, sleep_forward

    if MODES[mode].get("grad_passes", 0) > passes:
        return {}  # k > N: not a configuration
    config = validate(
        {
            "model": {
                "vocab_size": 512,
                "hidden_size": width,
                "pattern": "AGAG",
                "attention": {"num_heads": 4},
                "gdn": {"num_heads": 4},
            },
            "sleep": {"window": 64, "passes": passes, **MODES[mode]},
            "train": {"steps": 1},
        }
    )
    model = build_model(config.model)
    tokens = torch.randint(0, 512, (8, 256), generator=torch.Generator().manual_seed(0))
    targets = tokens.roll(-1, 1)

    def step():
        out = sleep_forward(model, tokens, config.sleep, targets=targets, return_logits=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return out

    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    flops = training_flops_per_token([plan_for(model, tokens, config.sleep, targets)], model, config.sleep.window)
    return {
        "saved_mb": saved / 2**20,
        "peak_mb": peak / 1024,
        "step_s": statistics.median(times),
        "gflops_per_token": flops / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1], args.width, args.steps)))
        return

    results = {}
    for n in args.passes:
        for mode in MODES:
            output = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    str(n),
                    mode,
                    "--width",
                    str(args.width),
                    "--steps",
                    str(args.steps),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[(n, mode)] = json.loads(output.strip().splitlines()[-1])
            print(f"N={n} {mode}: {results[(n, mode)]}", file=sys.stderr, flush=True)
    base = results[(args.passes[0], "none")]
    print(
        f"machine: {platform.machine()} CPU; width {args.width}, batch 8 x 256 tokens, windows of 64; "
        f"ratios to N={args.passes[0]} without checkpointing\n"
    )
    print("| N | mode | saved for backward (MB) | x | peak RSS (MB) | x | step (s) | x | GFLOPs/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (n, mode), r in results.items():
        if not r:
            continue
        print(
            f"| {n} | {mode} | {r['saved_mb']:.1f} | {r['saved_mb'] / base['saved_mb']:.2f} | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] / base['peak_mb']:.2f} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} | "
            f"{r['gflops_per_token']:.3f} |"
        )


if __name__ == "__main__":
    main()
