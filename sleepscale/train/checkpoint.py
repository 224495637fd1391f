"""Atomic, rotating checkpoints: a DeepSpeed checkpoint plus the trainer's own state.

Layout under `<run_dir>/checkpoints/`:

    step-000200/            DeepSpeed files, trainer.json (rank 0), trainer-rank00000.pt (each rank:
                            data-loader position, RNG states; with Muon its optimizer state, which
                            ZeRO-1/2 shard over data ranks), and with tensor parallelism at ZeRO-0
                            unsharded.pt (weights and optimizer state in unsharded form, by name)
    latest                  the tag of the newest complete checkpoint

A checkpoint is written into `.partial/<tag>/` and moved into place only when every rank has
finished; `latest` is replaced atomically after that. A crash at any point leaves `latest` naming
a complete checkpoint (the `.partial` leftovers are cleared by the next save).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sleepscale.config import validate
from sleepscale.model import build_model
from sleepscale.parallel.distributed import Distributed
from sleepscale.train import faults

LATEST = "latest"
PARTIAL = ".partial"
UNSHARDED = "unsharded.pt"  # the training state in tensor-parallel-independent form


def rng_states() -> dict[str, Any]:
    """This rank's RNG states: its own GPU's only (a rank uses one), so that a run resumes with
    another number of GPUs per node."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()  # the current device's
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, ctx: Distributed):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.ctx = keep, ctx

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / "trainer.json").exists():
            raise RuntimeError(f"{pointer} names {path.name}, which is incomplete; remove {pointer} to start over")
        return path

    def save(
        self,
        engine,
        step: int,
        trainer_state: dict[str, Any],
        rank_state: dict[str, Any],
        shared_files: dict[str, Any] | None = None,
    ) -> Path:
        """`shared_files`: name -> object, the same on every rank, written once by rank 0."""
        tag = f"step-{step:06d}"
        partial = self.root / PARTIAL
        if self.ctx.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        dist.barrier()
        engine.save_checkpoint(str(partial), tag=tag, save_latest=False)
        torch.save(rank_state, partial / tag / f"trainer-rank{self.ctx.rank:05d}.pt")
        if self.ctx.is_main:
            for name, content in (shared_files or {}).items():
                torch.save(content, partial / tag / name)
            _write_atomically(partial / tag / "trainer.json", json.dumps(trainer_state, indent=2))
        dist.barrier()
        faults.during_save(step)
        final = self.root / tag
        if self.ctx.is_main:
            shutil.rmtree(final, ignore_errors=True)  # a stale copy of the same step, from before a resume
            os.replace(partial / tag, final)
            _write_atomically(self.root / LATEST, tag)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in steps[: -self.keep]:
            shutil.rmtree(old)

    def load(self, engine, path: Path, optimizer: bool = True) -> None:
        """Loads model, optimizer (unless not `optimizer`: an optimizer whose state each rank saves
        itself) and scheduler into `engine`, from a checkpoint of the same layout."""
        loaded, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=optimizer, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")

    def rank_state(self, path: Path, rank: int) -> dict[str, Any]:
        """What `rank` saved (data-loader position, RNG states)."""
        rank_file = path / f"trainer-rank{rank:05d}.pt"
        if not rank_file.exists():
            raise RuntimeError(f"{path} has no state for rank {rank}: it was written by a different world size")
        return torch.load(rank_file, map_location="cpu", weights_only=False)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (then its latest checkpoint)."""
    path = Path(path)
    if (path / "checkpoints" / LATEST).exists():
        path = path / "checkpoints"
    if (path / LATEST).exists():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "trainer.json").exists():
        raise FileNotFoundError(f"{path}: not a sleepscale checkpoint or run directory (no trainer.json)")
    return path


def load_model_from_checkpoint(path: str | Path):
    """(model in float32 on CPU, Config) from a checkpoint written by the trainer, any ZeRO stage."""
    path = resolve_checkpoint(path)
    config = validate(json.loads((path / "trainer.json").read_text())["config"])
    if (path / UNSHARDED).exists():  # tensor parallel: DeepSpeed's files hold shards
        state = torch.load(path / UNSHARDED, map_location="cpu", weights_only=False)["weights"]
    elif list(path.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):  # ZeRO-3: weights are sharded
        # DeepSpeed, ~5 s and it sets up its accelerator: only for a ZeRO-3 checkpoint (convert, eval, generate)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    else:
        state = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model = build_model(config.model)
    model.load_state_dict({name.removeprefix("model."): tensor.float() for name, tensor in state.items()})
    return model, config
