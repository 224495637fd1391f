"""The README's planning table: 1B, 8B and 70B hybrids (configs/plan/) at N = 1, 4, 8 on 80 GB GPUs,
without checkpointing, with per-pass checkpointing, and with per-pass checkpointing and
`grad_passes: 2`, each under its config's layout; `sleepscale plan` predicts every cell.

    python benchmarks/plan_table.py [--out benchmarks/results/plan_table.md]
"""

import argparse
import time
from pathlib import Path

from sleepscale.config_loading import load_config
from sleepscale.flops import PEAK_FLOPS
from sleepscale.planner.assumptions import GB, GPU, MFU, Assumptions
from sleepscale.planner.estimate import config_layout, estimate, largest_passes

MODELS = {
    "1B": ("configs/plan/hybrid-1b.yaml", 1),
    "8B": ("configs/plan/hybrid-8b.yaml", 8),
    "70B": ("configs/plan/hybrid-70b.yaml", 64),
}
SETTINGS = {
    "no checkpointing": ["sleep.checkpoint=none"],
    "per-pass checkpointing": ["sleep.checkpoint=pass"],
    "per-pass, grad_passes 2": ["sleep.checkpoint=pass", "sleep.grad_passes=2"],
}
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
        for passes in (1, 4, 8):
            cells = []
            for setting, overrides in SETTINGS.items():
                if passes == 1 and "sleep.grad_passes=2" in overrides:
                    cells.append("(as per-pass)")
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
        for setting, overrides in SETTINGS.items():
            config = load_config(path, overrides)
            largest.append(
                f"| {name} | {setting} | {largest_passes(config, config_layout(config, gpus), ASSUMED, limit=64)} |"
            )
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
            "Largest N that fits each model's layout (up to 64):",
            "",
            "| model | setting | largest N |",
            "|---|---|---|",
            *largest,
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
