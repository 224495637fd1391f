"""Optimizers and learning-rate schedules.

AdamW: weight decay on matrices only. Muon (the paper's recipe): Muon for the 2-D hidden weight
matrices, AdamW for embeddings, head, norms, gate projections, convolutions and biases, each with
its own learning rate (`sleepscale.train.muon`: sharded over data ranks, whole matrices under tensor
parallelism).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from sleepscale.config import ConfigError, OptimizerConfig, ScheduleConfig
from sleepscale.train.muon import Muon, MuonLayout, SkipsOnOverflow

# Small per-head gate projections: decay (a_proj) and write strength (b_proj).
_GATE_PROJECTIONS = ("a_proj.", "b_proj.")


class AdamW(SkipsOnOverflow, torch.optim.AdamW):
    pass


def is_hidden_matrix(name: str, parameter: nn.Parameter) -> bool:
    """A 2-D weight inside the block stack that is not a gate projection."""
    return parameter.dim() == 2 and ".layers." in f".{name}" and not any(g in name for g in _GATE_PROJECTIONS)


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, skips_on_overflow: bool, layout: MuonLayout | None = None
) -> torch.optim.Optimizer:
    """`skips_on_overflow`: for AdamW at ZeRO-0, where the trainer's guard sets `overflow` itself.
    DeepSpeed's ZeRO optimizers have their own guard and accept only the exact optimizer types DeepSpeed
    tested. Muon always skips on `overflow` (DeepSpeed runs it at its stage 0); `layout`: the ranks it
    shares its work and state with (default: one rank)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("no parameter is trainable in this stage; check the stage's `train` patterns")
    if config.name == "adamw":
        decay = [p for _, p in named if p.dim() >= 2]
        no_decay = [p for _, p in named if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        adamw = AdamW if skips_on_overflow else torch.optim.AdamW
        return adamw([g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.eps)

    muon = [p for name, p in named if is_hidden_matrix(name, p)]
    adam = [p for name, p in named if not is_hidden_matrix(name, p)]
    return Muon(muon, adam, config, layout or MuonLayout())


def lr_factor(schedule: ScheduleConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of every group's base learning rate at a step of the stage."""

    def factor(step: int) -> float:
        if step < schedule.warmup_steps:
            return (step + 1) / schedule.warmup_steps
        if schedule.kind == "constant":
            return 1.0
        progress = min(1.0, (step - schedule.warmup_steps) / max(1, total_steps - schedule.warmup_steps))
        return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
