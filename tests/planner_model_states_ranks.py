"""Run under torchrun: for AdamW at ZeRO 0, 1, 2 and 3 and our Muon at `train.zero_stage` 0, 1 and 2
over the data-parallel ranks (every rank a data rank), the bytes of model states a rank holds,
counted by a census of live tensors, next to `model_state_bytes`' (`muon_state_bytes`') prediction;
rank 0 writes them as JSON.

    torchrun --nproc_per_node 2 tests/planner_model_states_ranks.py OUT.json [CASE ...]

CASE: adamw0 ... adamw3, muon0 ... muon2 (default: all but adamw3 on one rank, all on more).

Each stage builds the model and engine the way the trainer does (`build_rank_model`, then
`_build_engine`: the stage's optimizer and `deepspeed_config`) and runs two training steps. The
second is measured (optimizer states exist, and ZeRO-3 has recorded its module trace): a census is
taken between the calls of the step and on entry to and return from the methods where a category
peaks (the ZeRO optimizer's in `PROBES` and `HOOK`, ZeRO-0's `allreduce_bucket`, the base
optimizer's `step`; in Muon's step, the return of each `newton_schulz` (where its tensors peak), the
first scatter of an update, when every update is computed, and its collectives, `MUON_COLLECTIVES`).
Each category's largest value over those points is reported, and the largest sum of the four at one
point, for every rank (partitions differ between ranks); and the census after the step, when no
activation is left. With Muon, also the most its step held (`muon_step`: its frames' tensors and the
probed calls' results, less weights, gradients and state), next to `_muon_step_elements`' prediction
for the rank.

A census is every live tensor that Python can see (`gc.get_objects()`, plus the `.grad` a leaf
holds on the C++ side), deduplicated by storage. A storage goes to the first category in
`CLAIM_ORDER` that claims it:

- weights: the module parameters' storages (ZeRO-1/2: the flat buffer they view), under ZeRO-3
  their partitions (`ds_tensor`);
- optimizer: the base optimizer's state tensors and the tensors it updates, and ZeRO's float32
  master partitions;
- buffers: DeepSpeed's reduce buckets (`ipg_buckets`; gradients waiting there are buffers), the
  flattened gradients ZeRO-0's `allreduce_bucket` returns, under ZeRO-3 the gathered parameters,
  and in Muon's step the tensors its frames hold (Nesterov inputs, gathered matrices, updates, the
  flat buffers of updated weights), but for what another category claims (`momentum`, `grad`);
- gradients: `.grad` of the parameters and of the tensors the optimizer updates, and DeepSpeed's
  gradient holders (`averaged_gradients`, ZeRO-1/2's `grads_in_partition`, ZeRO-3's
  `grad_partitions_flat_buffer`);
- the rest, less what was live before the model was built, is "other" (activations, the batch, the
  loss): not a model state.
"""

import gc
import json
import sys
import types

import torch
import torch.distributed as dist
from conftest import make_config

from sleepscale.parallel.distributed import setup_distributed
from sleepscale.parallel.parallelism import Parallelism
from sleepscale.parallel.rank_model import build_rank_model
from sleepscale.parallel.zero import deepspeed_config
from sleepscale.planner.model_states import (
    FLOAT32,
    Parameter,
    _muon_step_elements,
    model_state_bytes,
    muon_assignment,
    muon_owners,
    muon_state_bytes,
)
from sleepscale.train import muon
from sleepscale.train.muon import newton_schulz
from sleepscale.train.optim import is_hidden_matrix
from sleepscale.train.trainer import TrainingStage, build_stage_engine

CATEGORIES = ("weights", "gradients", "optimizer", "buffers")
CLAIM_ORDER = ("weights", "optimizer", "buffers", "gradients")  # gradients wait in the reduce bucket: buffers
# Methods of the ZeRO optimizers (where present) around which a census is taken: where gradients
# are reduced, flattened into this rank's partition and freed, and where the optimizer steps.
# The gradient hook runs once a parameter: probed at its first call only.
PROBES = (
    "reduce_gradients",
    "reduce_ipg_grads",
    "independent_gradient_partition_epilogue",
    "free_grad_in_param_list",
    "_optimizer_step",
    "step",
)
HOOK = "reduce_ready_partitions_and_remove_grads"
MUON_COLLECTIVES = ("gather", "scatter", "broadcast")  # probed at entry, as `sleepscale.train.muon` calls them
CASES = {
    **{f"adamw{stage}": ("adamw", stage) for stage in (0, 1, 2, 3)},
    **{f"muon{stage}": ("muon", stage) for stage in (0, 1, 2)},
}


def storages(tensors) -> dict[int, int]:
    """Bytes by storage address, for the tensors with a non-empty storage."""
    found = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            if storage.nbytes() and storage.data_ptr():
                found[storage.data_ptr()] = storage.nbytes()
    return found


def live_tensors() -> list[torch.Tensor]:
    tensors = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]
    return tensors + [t.grad for t in tensors if t.is_leaf and t.grad is not None]


def bucket_tensors(zero) -> list[torch.Tensor]:
    found = []
    for bucket in getattr(zero, "ipg_buckets", {}).values():
        found += bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]
    return found


def tensors_in(value) -> list[torch.Tensor]:
    """The tensors a variable holds: itself, or a dict's values, a list's or tuple's items."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for t in value if isinstance(t, torch.Tensor)]
    return []


def muon_step_tensors() -> tuple[list[torch.Tensor], bool]:
    """The tensors the frames of `sleepscale.train.muon` on the stack hold (in Muon's step), and whether
    `Muon._muon_step` is on the stack (rather than the sharing of updated weights, or no step at all)."""
    found, frame, in_step = [], sys._getframe(), False
    while frame is not None:
        if frame.f_code.co_filename == muon.__file__:
            in_step |= frame.f_code.co_name == "_muon_step"
            for value in frame.f_locals.values():
                found += tensors_in(value)
        frame = frame.f_back
    return found, in_step


def gradient_holders(zero) -> list[torch.Tensor]:
    found = [getattr(zero, name, None) for name in ("grads_in_partition", "grad_partitions_flat_buffer")]
    for group in getattr(zero, "averaged_gradients", {}).values():
        found += list(group or [])
    return found


class Census:
    """Takes censuses of one engine's tensors and keeps each category's largest value."""

    def __init__(self, engine, zero_stage: int, baseline: dict[int, int]):
        self.engine, self.zero_stage, self.baseline = engine, zero_stage, baseline
        self.peaks = dict.fromkeys(CATEGORIES, 0)
        self.peak_total = 0
        self.where = {}
        self.flat_copies = []  # what a probed method returned that is a DeepSpeed buffer (or Muon's)
        self.muon_step = 0  # the most bytes `Muon._muon_step` held beyond weights, gradients and state

    def take(self, where: str) -> None:
        engine, basic = self.engine, self.engine.basic_optimizer
        zero = engine.optimizer if engine.optimizer is not basic else None
        parameters = list(engine.module.parameters())
        optimized = [p for group in basic.param_groups for p in group["params"]]
        # ZeRO's float32 master partitions (ZeRO-3 takes them out of the param groups between steps)
        masters = [
            t
            for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
            for t in getattr(zero, name, [])
        ]
        if self.zero_stage == 3:
            weights, gathered = [p.ds_tensor for p in parameters], [p.data for p in parameters]
        else:
            weights, gathered = [p.data for p in parameters], []
        claims = {
            "weights": weights,
            "optimizer": [t for state in basic.state.values() for t in state.values()] + optimized + masters,
            "gradients": [p.grad for p in parameters + optimized] + (gradient_holders(zero) if zero else []),
            "buffers": (bucket_tensors(zero) if zero else []) + gathered + self.flat_copies,
        }
        seen, measured, states = set(), {}, set()
        for category in CLAIM_ORDER:
            found = {ptr: size for ptr, size in storages(claims[category]).items() if ptr not in seen}
            seen |= found.keys()
            measured[category] = sum(found.values())
            states |= found.keys() if category != "buffers" else set()
        # Muon's step's own tensors, but for the gradients and state its frames also hold
        held, in_step = muon_step_tensors()
        found = {ptr: size for ptr, size in storages(held).items() if ptr not in seen}
        seen |= found.keys()
        measured["buffers"] += sum(found.values())
        if in_step:  # what the step holds, the probed calls' results included: `_muon_step_elements`
            step = storages(held + self.flat_copies)
            self.muon_step = max(self.muon_step, sum(size for ptr, size in step.items() if ptr not in states))
        everything = storages(live_tensors())
        measured["other"] = sum(
            size for ptr, size in everything.items() if ptr not in seen and ptr not in self.baseline
        )
        measured["claimed_not_in_gc"] = len(seen - everything.keys())  # 0 unless the census misses tensors
        for category in CATEGORIES:
            if measured[category] > self.peaks[category]:
                self.peaks[category], self.where[category] = measured[category], where
        total = sum(measured[c] for c in CATEGORIES)
        if total > self.peak_total:
            self.peak_total, self.where["total"] = total, where
        self.last = measured

    def probe(
        self, owner, name: str, first_only: bool = False, returns_buffer: bool = False, entry: bool = True
    ) -> None:
        """Takes a census when `owner.name` is entered (unless not `entry`) and when it returns
        (`first_only`: at its first call only). `returns_buffer`: what it returns is a DeepSpeed buffer
        (or Muon's)."""
        method = getattr(owner, name)
        calls = []

        def probed(*args, **kwargs):
            calls.append(name)
            if first_only and len(calls) > 1:
                return method(*args, **kwargs)
            if entry:
                self.take(f"{name} (entry)")
            result = method(*args, **kwargs)
            if returns_buffer:
                self.flat_copies.append(result)
            self.take(f"{name} (exit)")
            self.flat_copies.clear()
            return result

        setattr(owner, name, probed)

    def probe_muon_collectives(self) -> None:
        """A census on entry to each collective Muon's step calls: its module's `dist`, wrapped."""
        wrapped = types.SimpleNamespace(**vars(dist))

        def probed(name):
            def call(*args, **kwargs):
                self.take(f"muon {name} (entry)")
                return getattr(dist, name)(*args, **kwargs)

            return call

        for name in MUON_COLLECTIVES:
            setattr(wrapped, name, probed(name))
        muon.dist = wrapped


def rank_parameters(model) -> list[Parameter]:
    """This rank's trainable parameters as the planner describes them, from the model itself."""
    return [
        Parameter(tuple(p.shape), muon.whole_shape(p, 1), is_hidden_matrix(name, p))
        for name, p in model.named_parameters()
        if p.requires_grad
    ]


def state_elements(optimizer) -> int:
    return sum(t.numel() for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))


def run_stage(optimizer: str, zero_stage: int, ctx) -> dict:
    """A model of ~0.9 M parameters (hidden size 128, four blocks): its states are megabytes,
    beside DeepSpeed's fixed-size buffers."""
    config = make_config(
        pattern="AGAG",
        vocab_size=64,
        hidden_size=128,
        window=8,
        passes=2,
        model={
            "intermediate_size": 384,
            "attention": {"num_heads": 4, "num_kv_heads": 2},
            "gdn": {"num_heads": 4, "expand_v": 1.0},
            "init_std": 0.02,
        },
    )
    config = config.model_copy(
        update={
            "train": config.train.model_copy(update={"zero_stage": zero_stage}),
            "optimizer": config.optimizer.model_copy(update={"name": optimizer}),
        }
    )
    gc.collect()
    baseline = storages(live_tensors())
    parallelism = Parallelism(config, ctx, build_rank_model(config, None, ctx.device))
    model = parallelism.model
    engine, sleep = build_stage_engine(parallelism, config, TrainingStage(0, config.stage_list()[0], 0, 2))
    sizes = [getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad]
    census = Census(engine, zero_stage, baseline)
    generator = torch.Generator().manual_seed(ctx.rank)
    for step in range(2):
        if step == 1:  # the measured step
            zero = engine.optimizer if engine.optimizer is not engine.basic_optimizer else None
            if zero is None:  # ZeRO-0: the engine's flattened copy of the gradients it all-reduces
                census.probe(engine, "allreduce_bucket", returns_buffer=True)
            else:
                for name in PROBES:
                    if hasattr(zero, name):
                        census.probe(zero, name)
                census.probe(zero, HOOK, first_only=True)
            census.probe(engine.basic_optimizer, "step")
            if optimizer == "muon":
                # each update as it is made (the step's peak: the inputs and updates of the matrices, one
                # of each, and one more matrix's); every update made, none applied yet; the collectives
                census.probe(muon, "newton_schulz", returns_buffer=True, entry=False)
                census.probe(engine.basic_optimizer, "_scatter_update", first_only=True, returns_buffer=True)
                census.probe_muon_collectives()
        ids = torch.randint(0, 64, (2, 24), generator=generator)
        loss = engine(ids, ids.roll(-1, dims=1), sleep).loss
        if step == 1:
            census.take("after forward")
        engine.backward(loss)
        if step == 1:
            census.take("after backward")
        engine.step()
        del loss
        gc.collect()
    muon.dist, muon.newton_schulz = dist, newton_schulz
    census.take("after step")
    after_step = dict(census.last)
    result = {}
    if optimizer == "muon":
        parameters = rank_parameters(model)
        predicted = muon_state_bytes(parameters, zero_stage, ctx.world_size, 1, deepspeed_config(config))
        every = sum(p.elements * (1 if p.muon else 2) for p in parameters)
        result["state_elements"] = {  # this rank's: held by the optimizer, and from the planner's assignment
            "measured": state_elements(engine.basic_optimizer),
            "predicted": muon_assignment(parameters, ctx.world_size, 1).state[ctx.rank] if zero_stage else every,
        }
        owners = muon_owners(parameters, ctx.world_size, 1)
        result["muon_step"] = {  # this rank's largest in Muon's step (beside DeepSpeed's buffers, in "buffers")
            "measured": census.muon_step,
            "predicted": FLOAT32 * _muon_step_elements(parameters, owners, ctx.rank, 0, 1),
        }
    else:
        predicted = model_state_bytes(sizes, zero_stage, ctx.world_size, deepspeed_config(config))
    result |= {
        "parameters": sum(sizes),
        "measured": {**census.peaks, "total": census.peak_total},
        "where": census.where,
        "after_step": after_step,
        "predicted": {**{c: getattr(predicted, c) for c in CATEGORIES}, "total": predicted.total},
    }
    engine.destroy()
    return result


def main(out: str, cases: list[str]) -> None:
    ctx = setup_distributed()
    report = {}
    for case in cases or [c for c in CASES if ctx.world_size > 1 or c != "adamw3"]:
        ranks = [None] * ctx.world_size
        dist.all_gather_object(ranks, run_stage(*CASES[case], ctx))
        report[case] = ranks
        gc.collect()
    if ctx.rank == 0:
        with open(out, "w") as file:
            json.dump(report, file, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
