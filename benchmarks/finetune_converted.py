"""Sleep fine-tuning of a converted model, end to end: a tiny random Qwen3.5 (GDN with grouped
value heads + gated attention, built and saved by transformers), `sleepscale convert`, then
`sleepscale sweep` at N = 1 and 3 starting from it (`model.init_from`), with the sweep's report.

    python benchmarks/finetune_converted.py [--out runs/finetune-converted] [--steps 150]

The task is the main job's with t = 1 by default (Rule 110, two strings; the main job's model,
trained from our initialisation, learns t = 2 in 150 steps, this one does not). Prints the report.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import yaml


def tiny_qwen3_5(out: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3_5TextConfig(
        vocab_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        layer_types=["full_attention", "linear_attention"] * 2,
        max_position_embeddings=256,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    # transformers draws a random Qwen3.5's GDN decays with dt_bias = 1 and A up to 16, a per-token
    # decay down to e^-21: the state forgets within a token, so nothing crosses a window and N cannot
    # matter (measured: N = 1 and N = 3 had identical losses, both at chance). A pretrained Qwen3.5 has
    # learnt its decays; this stand-in gets fla's initialisation (dt log-uniform in [1e-3, 0.1]) instead.
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer, "linear_attn"):
                dt = torch.exp(
                    torch.rand_like(layer.linear_attn.dt_bias) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)
                )
                layer.linear_attn.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    model.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/finetune-converted")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--t", type=int, nargs="+", default=[1], help="Rule 110 steps (default: 1)")
    parser.add_argument("--data", default="runs/data/rule110-t1-two-strings")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source, converted = out / "qwen3_5-tiny", out / "qwen3_5-tiny-sleepscale"
    if not source.exists():
        tiny_qwen3_5(source)
    if not converted.exists():
        subprocess.run([sys.executable, "-m", "sleepscale.cli", "convert", str(source), str(converted)], check=True)
    quickstart = yaml.safe_load(Path("configs/quickstart.yaml").read_text())
    data = {**quickstart["data"], "path": args.data}
    data["generate"] = {**data["generate"], "args": {"t_values": args.t, "strings": 2}}
    config = {
        **{key: quickstart[key] for key in ("sleep", "optimizer", "schedule", "checkpoint", "eval")},
        "data": data,
        "model": {"init_from": str(converted.resolve())},
        "train": {**quickstart["train"], "steps": args.steps, "run_dir": str(out / "run")},
    }
    config_path = out / "finetune.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sleepscale.cli",
            "sweep",
            str(config_path),
            "sleep.passes=1,3",
            "--out",
            str(out / "sweep"),
        ],
        check=True,
    )


if __name__ == "__main__":
    main()
