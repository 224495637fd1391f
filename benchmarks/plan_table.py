"""The README's planning table: 1B, 8B and 70B hybrids (configs/plan/) at N = 1, 8, 64 on 80 GB GPUs,
under each recomputation form (`sleep.checkpoint`: none, pass, block, nested, selective), per-pass
with `grad_passes: 2`, and nested with 2 micro-batches in flight (fewer activations held on a
pipeline stage, more idle time), each under its config's layout; then the largest N (up to 128) per
model and setting. `sleepscale plan` predicts every cell.

    python benchmarks/plan_table.py [--out benchmarks/results/plan_table.md]
"""

import argparse
import time
from pathlib import Path

from sleepscale.config_loading import load_config
from sleepscale.flops import PEAK_FLOPS
from sleepscale.planner.assumptions import GB, GPU, MFU, Assumptions
from sleepscale.planner.estimate import LARGEST_PASSES, config_layout, estimate, largest_passes

MODELS = {
    "1B": ("configs/plan/hybrid-1b.yaml", 1),
    "8B": ("configs/plan/hybrid-8b.yaml", 8),
    "70B": ("configs/plan/hybrid-70b.yaml", 64),
}
SETTINGS = {
    "none": ["sleep.checkpoint=none"],
    "pass": ["sleep.checkpoint=pass"],
    "block": ["sleep.checkpoint=block"],
    "nested": ["sleep.checkpoint=nested"],
    "selective": ["sleep.checkpoint=selective"],
    "pass, grad_passes 2": ["sleep.checkpoint=pass", "sleep.grad_passes=2"],
    "nested, 2 in flight": ["sleep.checkpoint=nested", "parallel.pipeline_in_flight=2"],
}
PASSES = (1, 8, 64)
LENGTH, MEMORY, PEAK = 8192, 80 * GB, PEAK_FLOPS[GPU]  # the configs train in bf16
ASSUMED = Assumptions(LENGTH, MEMORY, PEAK, MFU)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/plan_table.md")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = ["| model | GPUs, layout | N | " + " | ".join(SETTINGS) + " |", "|---|---|---|" + "---|" * len(SETTINGS)]
    largest = []
    for name, (path, gpus) in MODELS.items():
        for passes in PASSES:
            cells = []
            for setting, overrides in SETTINGS.items():
                if passes == 1 and "sleep.grad_passes=2" in overrides:
                    cells.append("(as pass)")
                    continue
                if "parallel.pipeline_in_flight=2" in overrides and load_config(path).parallel.pipeline == 1:
                    cells.append("(no pipeline)")
                    continue
                config = load_config(path, [*overrides, f"sleep.passes={passes}"])
                layout = config_layout(config, gpus)
                found = estimate(config, layout, ASSUMED)
                cells.append(
                    f"{found.total / GB:.0f} GB{'' if found.fits else ' (no fit)'}, "
                    f"{found.tokens_per_second / 1e3:.1f}k tok/s"
                )
                print(name, passes, setting, found.total / GB, found.fits, flush=True)
            layout_text = f"{gpus}: TP{layout.tensor} PP{layout.pipeline} DP{layout.data} ZeRO-{layout.zero_stage}"
            rows.append(f"| {name} | {layout_text} | {passes} | " + " | ".join(cells) + " |")
        found = []
        for setting, overrides in SETTINGS.items():
            config = load_config(path, overrides)
            if "parallel.pipeline_in_flight=2" in overrides and config.parallel.pipeline == 1:
                found.append("-")
                continue
            n = largest_passes(config, config_layout(config, gpus), ASSUMED, limit=LARGEST_PASSES)
            found.append(f"{n}+" if n == LARGEST_PASSES else str(n))
            print(name, "largest N", setting, n, flush=True)
        largest.append(f"| {name} | " + " | ".join(found) + " |")
    text = "\n".join(
        [
            "# Planned memory and speed per GPU (`sleepscale plan`)",
            "",
            "Command: `python benchmarks/plan_table.py` "
            f"({time.perf_counter() - started:.0f} s on the 2-core CPU machine). "
            f"Sequences of {LENGTH} tokens in windows of 2048 (three "
            "slept on), micro-batch 1, bf16 autocast over float32 "
            "weights, GPU kernels (fla's chunked delta rule at this "
            f"window), 80 GB GPUs, MFU {MFU} of {PEAK / 1e12:.0f} TFLOP/s. "
            "Each cell: predicted peak per GPU on the most loaded "
            "pipeline stage (weights, gradients, optimizer, DeepSpeed "
            "buffers, activations of the micro-batches in flight, "
            "states held by checkpoints, one recomputed unit, 2 GiB "
            "reserve) and tokens/s of the whole run. Nothing here ran on a GPU: these are predictions.",
            "",
            *rows,
            "",
            f"Largest N that fits each model's layout (looked up to {LARGEST_PASSES}; 0: not even N=1):",
            "",
            "| model | " + " | ".join(SETTINGS) + " |",
            "|---|" + "---|" * len(SETTINGS),
            *largest,
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
