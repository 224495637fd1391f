"""A tiny training setup for the trainer tests, run as real `sleepscale train` processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

TINY = {
    "model": {
        "vocab_size": 8,
        "hidden_size": 16,
        "pattern": "AGAG",
        "intermediate_size": 32,
        "attention": {"num_heads": 2},
        "gdn": {"num_heads": 2},
        "init_std": 0.1,
    },
    "sleep": {"window": 8, "passes": 2, "checkpoint": "none"},
    "data": {
        "path": None,
        "generate": {
            "task": "rule110",
            "args": {"t_values": [0, 1], "bits": 8},
            "train_samples": 320,
            "validation_samples": 32,
            "samples_per_shard": 40,
        },
    },
    "optimizer": {"name": "adamw", "lr": 0.01},
    "schedule": {"kind": "cosine", "warmup_steps": 3},
    "train": {"run_dir": None, "steps": 20, "micro_batch_size": 8, "log_every": 1},
    "checkpoint": {"every": 10, "keep": 5},
    "eval": {"passes": [1, 2], "batch_size": 16},
}


def write_config(tmp: Path, data: Path, run: Path, **sections) -> Path:
    config = json.loads(json.dumps(TINY))
    config["data"]["path"], config["train"]["run_dir"] = str(data), str(run)
    for section, values in sections.items():
        config[section] = values if not isinstance(values, dict) else {**config.get(section, {}), **values}
    path = tmp / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_command(ranks: int, *target: str) -> list[str]:
    """`torch.distributed.run` with `ranks` local processes on a free port, running `target` (a script
    and its arguments, or "-m", a module and its arguments)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(ranks),
        "--master_port",
        str(free_port()),
        *target,
    ]


def train(
    config: Path, *overrides: str, env: dict | None = None, ranks: int = 1, check: bool = True, timeout: int = 300
):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if ranks == 1:
        command = [sys.executable, "-m", "sleepscale.cli", "train", str(config), *overrides]
    else:
        command = torchrun_command(
            ranks,
            "-m",
            "sleepscale.cli",
            "train",
            str(config),
            *overrides,
        )
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def losses(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


def metric(run: Path, name: str) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line[name] for line in lines if name in line}


def changed_parameters(run: Path, step: int, initial: dict) -> set[str]:
    """The parameters whose values in the run's checkpoint at `step` differ from `initial` (a state dict)."""
    from sleepscale.train.checkpoint import load_model_from_checkpoint

    model, _ = load_model_from_checkpoint(run / "checkpoints" / f"step-{step:06d}")
    return {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, initial[name])}
