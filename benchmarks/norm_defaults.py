"""How much the RMSNorm epsilon matters: the mean square of what each norm normalises at
initialisation against the epsilon, across widths, and (optionally) steps to a fixed accuracy.

    python benchmarks/norm_defaults.py init [--widths 64 128 256 512 1024] [--init-std 0.02]
    python benchmarks/norm_defaults.py train --config configs/quickstart.yaml --eps 1e-5 1e-6 [--widths 64]
        [--threshold 0.5] [--steps 300] [key=value ...]

`init` builds the AGAG hybrid at each width (fla's rule for the MLP width, head dim 16) with
normal(0, init_std) weights, runs random Rule 110 tokens through it and records, per kind of norm,
the mean square of its input: the block norms (`attn_norm`, `mlp_norm`) and the GDN gated output
norm (`o_norm`, applied to the delta rule's output before the SiLU gate). A norm divides by
sqrt(mean square + eps): where the mean square is near eps, eps shrinks the output instead of
normalising it. `train` runs `sleepscale train CONFIG` once per (width, eps) with periodic
evaluation and prints the first step at which every difficulty reaches `threshold` at the trained N.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch


def init_statistics(widths: list[int], init_std: float) -> None:
    from sleepscale.config import validate
    from sleepscale.model import build_model

    print(f"init: normal(0, {init_std}); AGAG; random tokens of a vocabulary of 8; batch 16 x 100 tokens")
    print(
        "| width | block norm input, mean square | GDN o_norm "
        "input, mean square | o_norm: 1e-5 / ms | o_norm: 1e-6 / ms |"
    )
    print("|---|---|---|---|---|")
    for width in widths:
        config = validate(
            {
                "model": {
                    "vocab_size": 8,
                    "hidden_size": width,
                    "pattern": "AGAG",
                    "init_std": init_std,
                    "attention": {"num_heads": width // 16},
                    "gdn": {"num_heads": width // 16},
                },
                "sleep": {"window": 24},
                "train": {"steps": 1},
            }
        )
        torch.manual_seed(0)
        model = build_model(config.model)
        squares: dict[str, list[float]] = {"block": [], "o_norm": []}

        def record(kind):
            return lambda module, inputs: squares[kind].append(inputs[0].double().pow(2).mean().item())

        for name, module in model.named_modules():
            if name.endswith(("attn_norm", "mlp_norm")):
                module.register_forward_pre_hook(record("block"))
            elif name.endswith("o_norm"):
                module.register_forward_pre_hook(record("o_norm"))
        from sleepscale.sleep import sleep_forward

        with torch.no_grad():
            sleep_forward(model, torch.randint(0, 8, (16, 100)), config.sleep)
        block, gated = (sum(values) / len(values) for values in (squares["block"], squares["o_norm"]))
        print(f"| {width} | {block:.3g} | {gated:.3g} | {1e-5 / gated:.2f} | {1e-6 / gated:.3f} |")


def train_steps_to(
    config: str,
    widths: list[int],
    eps_values: list[float],
    threshold: float,
    steps: int,
    overrides: list[str],
    out: Path,
) -> None:
    from sleepscale.eval import evaluations

    print(
        f"command: python benchmarks/norm_defaults.py train --config {config} --widths {' '.join(map(str, widths))} "
        f"--eps {' '.join(map(str, eps_values))} --threshold {threshold} --steps {steps} {' '.join(overrides)}"
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    print(f"| width | eps | first step with every difficulty >= {threshold} | final accuracy |")
    print("|---|---|---|---|")
    for width in widths:
        for eps in eps_values:
            run = out / f"w{width}-eps{eps:g}"
            command = [
                sys.executable,
                "-m",
                "sleepscale.cli",
                "train",
                config,
                f"model.hidden_size={width}",
                f"model.norm_eps={eps}",
                f"train.steps={steps}",
                f"train.run_dir={run}",
                "checkpoint.every=100000",
                *overrides,
            ]
            subprocess.run(command, check=True, capture_output=True)
            history = evaluations(run / "metrics.jsonl")
            first = next(
                (record["step"] for record, rows in history if min(row["accuracy"] for row in rows) >= threshold), None
            )
            final = " ".join(
                f"{row['difficulty']}={row['value']} N={row['passes']}: {row['accuracy']:.3f}" for row in history[-1][1]
            )
            print(f"| {width} | {eps:g} | {first if first is not None else f'not by {steps}'} | {final} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["init", "train"])
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--init-std", type=float, default=0.02)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-5, 1e-6])
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/norm-defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args()
    if args.part == "init":
        init_statistics(args.widths or [64, 128, 256, 512, 1024], args.init_std)
    else:
        train_steps_to(
            args.config, args.widths or [64], args.eps, args.threshold, args.steps, args.overrides, Path(args.out)
        )


if __name__ == "__main__":
    main()
