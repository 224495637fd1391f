"""Run under torchrun: our Muon's collectives in one optimizer step, measured, next to what
`sleepscale.planner.communication.muon_sent_bytes` predicts; rank 0 writes per case, per rank
(measured, predicted) as JSON.

    torchrun --nproc_per_node 2 tests/planner_optimizer_ranks.py OUT.json   # DP2, TP2
    torchrun --nproc_per_node 4 tests/planner_optimizer_ranks.py OUT.json   # TP2 x DP2

(On two ranks tests/planner_communication_ranks.py runs it too, after its own report: one start-up.)

Each layout (tensor x data ranks over the world, megatron's groups as the trainer makes them) at
`train.zero_stage` 0 and 1: the model is built and tensor-parallelised as the trainer does
(`build_model`, `parallelize_tensor`) and the optimizer by `build_optimizer` over the trainer's
`MuonLayout`; one step from random gradients. Measured on each rank: `Muon.sent_bytes`, and
independently the bytes it hands to the collectives that `sleepscale.train.muon` calls (its module's
`dist`, wrapped), counted as what goes to other ranks (a gather's input from each rank but the root, a
scatter's pieces but the root's own, a broadcast's tensor from its root once per other rank); by
group (tensor, data). Also the state elements the optimizer holds after the step, whether the
planner's description of the rank's parameters (`_stage_optimized`: shapes, whole shapes, Muon or
not, in order) is the optimizer's own, and the most bytes each phase of the step holds beyond the
weights, gradients and state (`StepCensus`), next to `_muon_step_phases`' prediction.
"""

import gc
import json
import sys
import time
import types

import torch
import torch.distributed as dist
from conftest import make_config
from megatron.core import parallel_state

from sleepscale.model import build_model
from sleepscale.parallel.groups import init_parallel_groups
from sleepscale.parallel.tensor import parallelize_tensor
from sleepscale.planner.communication import muon_sent_bytes
from sleepscale.planner.estimate import _stage_optimized
from sleepscale.planner.model_states import FLOAT32, Parameter, _muon_step_phases, muon_assignment, muon_owners
from sleepscale.train import muon
from sleepscale.train.optim import build_optimizer, is_hidden_matrix


class StepCensus:
    """The most bytes each phase of Muon's step ("gathers", "newton_schulz", "scatters") holds beyond the
    weights, gradients and state: at each point where one can peak, while `Muon._muon_step` is on the
    stack, every live tensor made since the step began (`gc.get_objects()`, which also finds those only a
    comprehension's stack holds, as the gathered wholes are; what was there before is frozen out of its
    sight) and what the probed call returns, deduplicated by storage, less what was live before the step
    and the optimizer's parameters, their gradients and its state. The points: the entry
    to `_gather_whole`, to its gather and the return of its `torch.cat`; the return of `newton_schulz`;
    the entry to `_scatter_update` and to its scatter or broadcast (`Sent` calls `take` for the
    collectives)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.peaks = {"gathers": 0, "newton_schulz": 0, "scatters": 0}
        self.before = set()

    @staticmethod
    def live() -> list[torch.Tensor]:
        tensors = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]
        return tensors + [t.grad for t in tensors if t.is_leaf and t.grad is not None]

    @staticmethod
    def storages(tensors) -> dict[int, int]:
        return {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in tensors
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes()
        }

    def take(self, phase: str, *returned: torch.Tensor) -> None:
        frame, in_step = sys._getframe(), False
        while frame is not None and not in_step:
            in_step = frame.f_code.co_filename == muon.__file__ and frame.f_code.co_name == "_muon_step"
            frame = frame.f_back
        if not in_step:
            return
        optimizer = self.optimizer
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        state = [t for values in optimizer.state.values() for t in values.values()]
        known = self.before | set(self.storages([*parameters, *(p.grad for p in parameters), *state]))
        held = self.storages([*self.live(), *returned])
        self.peaks[phase] = max(self.peaks[phase], sum(size for ptr, size in held.items() if ptr not in known))

    def probing(self) -> None:
        """Wraps the optimizer's `_gather_whole` and `_scatter_update`, and `newton_schulz` and `torch.cat`
        as `sleepscale.train.muon` calls them, and freezes what is live (undone by `done`)."""
        optimizer = self.optimizer
        gc.collect()
        self.before = set(self.storages(self.live()))
        gc.freeze()  # the censuses look at what the step makes only: far fewer objects
        for name, phase in (("_gather_whole", "gathers"), ("_scatter_update", "scatters")):
            method = getattr(optimizer, name)

            def entered(*args, method=method, phase=phase):
                self.take(phase, *args)
                return method(*args)

            setattr(optimizer, name, entered)

        def orthogonalised(*args):
            update = muon_newton_schulz(*args)
            self.take("newton_schulz", update)
            return update

        def cat(*args, **kwargs):
            whole = torch.cat(*args, **kwargs)
            self.take("gathers", whole)
            return whole

        muon.newton_schulz, muon.torch = orthogonalised, types.SimpleNamespace(**{**vars(torch), "cat": cat})

    @staticmethod
    def done() -> None:
        muon.newton_schulz, muon.torch = muon_newton_schulz, torch
        gc.unfreeze()


muon_newton_schulz = muon.newton_schulz


def released(tensors: list[torch.Tensor], collective, *args, **kwargs):
    """`collective(*args, **kwargs)`, returned once nothing but what held `tensors` before holds them."""
    before = [t._use_count() for t in tensors]
    result = collective(*args, **kwargs)
    deadline = time.monotonic() + 30
    while any(t._use_count() > count for t, count in zip(tensors, before)) and time.monotonic() < deadline:
        time.sleep(0.001)
    return result


class Sent:
    """Wraps the collectives `sleepscale.train.muon` calls while `counting`; `bytes[group]`: what this
    rank sent to other ranks. `census`: takes its census on entry to each, and each returns once gloo's
    worker thread has let go of its tensors (it drops them just after the call returns: a census then
    would count what Muon has freed)."""

    def __init__(self, census: StepCensus | None = None):
        self.bytes = {}
        self.census = census

    def counting(self):
        wrapped = types.SimpleNamespace(**vars(dist))

        def add(group, size):
            self.bytes[group] = self.bytes.get(group, 0) + size

        def gather(tensor, gather_list=None, dst=0, group=None):
            self.take("gathers")
            if dist.get_rank() != dst:
                add(group, tensor.numel() * tensor.element_size())
            return released([tensor, *(gather_list or [])], dist.gather, tensor, gather_list, dst=dst, group=group)

        def scatter(tensor, scatter_list=None, src=0, group=None):
            self.take("scatters")
            if dist.get_rank() == src:
                add(
                    group,
                    sum(t.numel() * t.element_size() for t in scatter_list) - tensor.numel() * tensor.element_size(),
                )
            return released([tensor, *(scatter_list or [])], dist.scatter, tensor, scatter_list, src=src, group=group)

        def broadcast(tensor, src, group=None):
            self.take("scatters")  # in the step: a replicated matrix's update (the shares are not counted)
            if dist.get_rank() == src:
                add(group, tensor.numel() * tensor.element_size() * (group.size() - 1))
            return released([tensor], dist.broadcast, tensor, src, group=group)

        wrapped.gather, wrapped.scatter, wrapped.broadcast = gather, scatter, broadcast
        muon.dist = wrapped

    def take(self, phase: str) -> None:
        if self.census is not None:
            self.census.take(phase)


def layouts(world: int) -> list[tuple[int, int]]:
    """(tensor, data) layouts of the world: DP and TP alone on 2 ranks, TP2 x DP2 on 4."""
    return [(2, 2)] if world == 4 else [(1, world), (world, 1)]


def case(tensor: int, data: int, zero_stage: int) -> dict:
    started = time.perf_counter()
    config = make_config(  # an MLP-less last block: data ranks own different bytes
        pattern="AGa",
        vocab_size=39,
        hidden_size=32,
        model={
            "intermediate_size": 48,
            "attention": {"num_heads": 4, "num_kv_heads": 2},
            "gdn": {"num_heads": 4, "expand_v": 1.5},
        },
    )
    config = config.model_copy(
        update={
            "optimizer": config.optimizer.model_copy(update={"name": "muon"}),
            "train": config.train.model_copy(update={"zero_stage": zero_stage}),
            "parallel": config.parallel.model_copy(update={"tensor": tensor}),
        }
    )
    groups = init_parallel_groups(tensor=tensor)
    torch.manual_seed(0)
    model = build_model(config.model)
    if tensor > 1:
        parallelize_tensor(model, groups.tensor)
    layout = muon.MuonLayout(  # as the trainer's `_muon_layout`
        data=dist.group.WORLD if tensor == 1 else groups.data,
        tensor=None if tensor == 1 else groups.tensor,
        shard_state=zero_stage > 0,
    )
    optimizer = build_optimizer(model, config.optimizer, skips_on_overflow=True, layout=layout)
    generator = torch.Generator().manual_seed(dist.get_rank())
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    census = StepCensus(optimizer)
    census.probing()
    sent = Sent(census)
    sent.counting()
    optimizer.step()
    muon.dist = dist
    census.done()

    def describe(name, p):
        return Parameter(tuple(p.shape), muon.whole_shape(p, tensor), is_hidden_matrix(name, p))

    named = list(model.named_parameters())
    described = list(_stage_optimized(config.model, tensor, (range(len(config.model.blocks)),), 0))
    names = {id(p): name for name, p in named}
    groups_described = [[describe(names[id(p)], p) for p in group["params"]] for group in optimizer.param_groups]
    owners = [optimizer.ns_owner[p] if p in optimizer.ns_owner else (optimizer.data_owner[p], None) for _, p in named]
    rank = (layout.data_rank, layout.tensor_rank)
    predicted = muon_sent_bytes(described, zero_stage, data, tensor)[rank]
    phases = _muon_step_phases(described, muon_owners(described, data, tensor), *rank, tensor)
    state = sum(t.numel() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    every = sum(p.elements * (1 if p.muon else 2) for p in described)
    result = {
        "rank": rank,
        "sent_bytes": optimizer.sent_bytes,
        "counted": [sent.bytes.get(layout.tensor, 0), sent.bytes.get(layout.data, 0)],
        "predicted": list(predicted),
        "state_elements": state,
        "predicted_state_elements": muon_assignment(described, data, tensor).state[rank[0]] if zero_stage else every,
        # the planner's parameters (module order) are the model's, and in each group the optimizer's, with its owners
        "description_is_the_planners": described == [describe(name, p) for name, p in named]
        and groups_described == [[p for p in described if p.muon], [p for p in described if not p.muon]]
        and muon_owners(described, data, tensor) == owners,
        "step_bytes": census.peaks,
        "predicted_step_bytes": {phase: FLOAT32 * elements for phase, elements in phases.items()},
        "newton_schulz_runs": optimizer.newton_schulz_runs,
        "matrices": sum(p.muon for p in described),
        "seconds": time.perf_counter() - started,
    }
    parallel_state.destroy_model_parallel()
    return result


def muon_report() -> dict:
    """Every layout of the world at ZeRO 0 and 1, by case; needs the process group and no megatron groups."""
    torch.set_num_threads(1)
    report = {}
    for tensor, data in layouts(dist.get_world_size()):
        for zero_stage in (0, 1):
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, case(tensor, data, zero_stage))
            report[f"TP{tensor}xDP{data}-zero{zero_stage}"] = ranks
    return report


def main():
    dist.init_process_group("gloo")
    report = muon_report()
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as out:
            json.dump(report, out, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
