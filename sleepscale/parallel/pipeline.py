"""Pipeline parallelism for sleeping models, applied from outside the model: `PipelineStage(model,
stages, ...)` keeps this rank's blocks (as `model.pattern`'s '|' marks assign them) and offers the
sleep engine the model interface it drives (`embed`, `run_blocks`, `head`, `cross_entropy`), so the
engine runs unchanged, the same program on every stage.

Hidden states are the only thing that travels. Each is owned by the stage that computed it; when a
block range owned by another stage needs it, the owner sends it there (`_move`). A sleep pass thus
loops back from the last loop stage to the first, and a hidden read twice (the wake pass's loop
output feeds the coda and the next sleep pass) is sent twice. GDN fast weights, convolution tails
and attention keys/values never leave the stage that owns their block.

Filling the pipe. The micro-batches of a step run as coroutines (greenlets) in one thread. A
micro-batch that waits for a hidden lets the others run, and the one whose hidden arrived first
goes next, so while micro-batch m is in pass j on stage s, micro-batch m+1 is in pass j on stage
s-1. With M >= P micro-batches the N passes over W windows keep the P stages busy but for the
fill and drain: an idle fraction of (P-1)/(M*S+P-1), S = (W-1)*N+1 stage passes per micro-batch
(benchmarks/pipeline.py measures it against the ideal schedule).
Each micro-batch sends on its own process group ("lane"), so sends and receives pair up in program
order even where the backend ignores tags (NCCL). With tensor parallelism the ranks of a stage
must also run micro-batches in the same order (their collectives pair up in order): the first rank
of the tensor group picks and tells the others.

Backward. One autograd call per stage runs over all micro-batches. Every send and receive is an
autograd node (the receive's backward sends the gradient back; the send's backward receives it),
and the autograd engine runs a graph's nodes in reverse creation order, which is one thread's
real-time order here, so the backward is the forward's communication run backwards: it pairs up
and cannot deadlock. Every transfer made with gradients enabled is tied into the backward root with
a zero value, so even a hidden whose gradient is zero (a last pass that feeds nothing) sends it.

Tested on gloo (CPU) only: on NCCL the arrival of a receive is polled with `is_completed()` and the
same backward order applies, but no GPU run has checked it yet.

Why our own schedule and not `torch.distributed.pipelining` or Megatron's/DeepSpeed's schedules:
they run each micro-batch once through a fixed chain of stages, carrying one activation and no
state. Sleep re-enters the same stages N times per window with recurrent state that must stay on
its stage, and N may change per step; unrolling passes into virtual stages would duplicate the
state threading. Activation checkpointing wraps a stage's local blocks only: recomputing a region
that contains a send or receive would communicate again.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.distributed as dist
from greenlet import getcurrent, greenlet
from torch import nn

from sleepscale.model.hybrid import HybridLM
from sleepscale.model.state import MixerState


@dataclasses.dataclass(frozen=True)
class _NotHere(MixerState):
    """The state of a block that another stage owns."""

    def evicted(self):
        return self

    def next_pass(self, window_start):
        return self

    def where(self, mask, other):
        return self


@dataclasses.dataclass(frozen=True)
class StageHidden:
    """A hidden state [batch, length, width] as every stage sees it: `tensor` only on its owner."""

    owner: int
    shape: tuple[int, ...]
    tensor: torch.Tensor | None = None


def lane_groups(pipeline_group: dist.ProcessGroup, lanes: int) -> list[dist.ProcessGroup]:
    """`lanes` process groups over the ranks of `pipeline_group`, one per concurrent micro-batch.
    Collective over the world: every rank creates every pipeline group's lanes, in one order."""
    mine = dist.get_process_group_ranks(pipeline_group)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    created = []
    for _ in range(lanes):
        for ranks in sorted({tuple(r) for r in everyone}):
            group = dist.new_group(list(ranks))
            if list(ranks) == mine:
                created.append(group)
    return created


class PipelineStage(nn.Module):
    """This rank's stage of `model`. Parameter and state-dict names are the unsplit model's
    (`layers.5.attn.q_proj.weight`), so the stages' state dicts together are the whole model's."""

    def __init__(self, model: HybridLM, stages: list[range], pipeline_group: dist.ProcessGroup,
                 lanes: list[dist.ProcessGroup], tensor_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.config, self.loop_range = model.config, model.loop_range
        self.stages, self.index, self.last = stages, pipeline_group.rank(), len(stages) - 1
        if pipeline_group.size() != len(stages):
            raise ValueError(f"{len(stages)} stages in the pattern but {pipeline_group.size()} pipeline ranks")
        self.owned = stages[self.index]
        self.embeddings = model.embeddings if self.index == 0 else None
        self.layers = nn.ModuleList(block if i in self.owned else nn.Identity() for i, block in enumerate(model.layers))
        self.norm = model.norm if self.index == self.last else None
        self.lm_head = model.lm_head if self.index == self.last else None
        self.cross_entropy = _StageCrossEntropy(model.cross_entropy, self)
        self._peers = [dist.get_global_rank(pipeline_group, stage) for stage in range(len(stages))]
        self._lanes, self._tensor_group = lanes, tensor_group
        # Every transfer's autograd node hangs off this leaf, so that it is in the graph whatever the
        # hidden's own requires_grad is: both ends of a transfer then agree on whether a gradient comes back.
        self._anchor = torch.zeros((), device=self._device(), requires_grad=True)
        self._transfer_roots: list[torch.Tensor] = []
        self._pending_sends: list = []
        self.wait_seconds = 0.0  # blocked waiting for another stage (forward and backward), for bubble measurements

    # The model interface the sleep engine drives.

    def initial_states(self, batch_size: int, span: int, device: torch.device | None = None) -> list[MixerState]:
        return [block.initial_state(batch_size, span, device) if i in self.owned else _NotHere()
                for i, block in enumerate(self.layers)]

    def embed(self, input_ids: torch.Tensor) -> StageHidden:
        shape = (*input_ids.shape, self.config.hidden_size)
        return StageHidden(0, shape, HybridLM.embed(self, input_ids) if self.index == 0 else None)

    def run_blocks(self, hidden: StageHidden, states: list[MixerState], blocks: range,
                   checkpoint: bool = False) -> tuple[StageHidden, list[MixerState]]:
        for stage, part in self._split_by_stage(blocks):
            hidden = self._move(hidden, stage)
            if stage == self.index:
                tensor, states = HybridLM.run_blocks(self, hidden.tensor, states, part, checkpoint)
                hidden = StageHidden(stage, hidden.shape, tensor)
        return hidden, states

    def head(self, hidden: StageHidden) -> StageHidden:
        hidden = self._move(hidden, self.last)
        shape = (*hidden.shape[:-1], self.config.vocab_size)
        return StageHidden(self.last, shape, HybridLM.head(self, hidden.tensor) if self.index == self.last else None)

    # Micro-batches and backward.

    def run_micro_batches(self, forwards: list[Callable[[], object]]) -> list:
        """Runs each `forwards[m]()` (a sleep forward over micro-batch m through this stage) as a
        coroutine on lane m, interleaving them so that they fill the pipeline; returns their results.
        Every forward through the stage goes through here (evaluation too, with one micro-batch):
        it completes the forward's sends."""
        if len(forwards) > len(self._lanes):
            raise ValueError(f"{len(forwards)} micro-batches but only {len(self._lanes)} pipeline lanes were created")
        results, started = [None] * len(forwards), 0
        scheduler = getcurrent()
        coroutines = [greenlet(_lane_body(forward, m, results), parent=scheduler) for m, forward in enumerate(forwards)]
        grad_mode = torch.is_grad_enabled()
        with _Arrivals(dist.get_backend(self._lanes[0]) == "gloo", len(forwards)) as arrivals:
            while started < len(coroutines) or arrivals.waiting:
                if started < len(coroutines):
                    lane = started
                    started += 1
                else:
                    waiting_since = time.perf_counter()
                    lane = self._next_ready(arrivals)
                    self.wait_seconds += time.perf_counter() - waiting_since
                work = coroutines[lane].switch()
                torch.set_grad_enabled(grad_mode)
                if work is not None:
                    arrivals.watch(lane, work)
        self.wait_for_sends()
        return results

    def backward_root(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` plus a zero that ties every transfer made since the last call into the backward.
        Call backward (or DeepSpeed's engine.backward) on it, then `wait_for_sends`."""
        roots, self._transfer_roots = self._transfer_roots, []
        if not roots:
            return loss
        return loss + _ZeroTie.apply(*roots)

    def wait_for_sends(self) -> None:
        for work in self._pending_sends:
            work.wait()
        self._pending_sends.clear()

    # Transfers.

    def _split_by_stage(self, blocks: range) -> list[tuple[int, range]]:
        parts = []
        for stage, owned in enumerate(self.stages):
            part = range(max(blocks.start, owned.start), min(blocks.stop, owned.stop))
            if len(part):
                parts.append((stage, part))
        return parts

    def _move(self, hidden: StageHidden, destination: int) -> StageHidden:
        if hidden.owner == destination:
            return hidden
        group = self._lane_group()
        moved = StageHidden(destination, hidden.shape)
        if self.index == hidden.owner:
            peer = self._peers[destination]
            if torch.is_grad_enabled():
                self._transfer_roots.append(_Send.apply(hidden.tensor, self._anchor, peer, group, self))
            else:
                self._pending_sends.append(dist.isend(hidden.tensor.contiguous(), peer, group=group))
        elif self.index == destination:
            buffer = torch.empty(hidden.shape, dtype=self._dtype(), device=self._device())
            self._wait(dist.irecv(buffer, self._peers[hidden.owner], group=group))
            if torch.is_grad_enabled():
                buffer = _Received.apply(buffer, self._anchor, self._peers[hidden.owner], group, self)
                self._transfer_roots.append(buffer)
            moved = StageHidden(destination, hidden.shape, buffer)
        return moved

    def _wait(self, work) -> None:
        """Hands the thread to the other lanes until `work` completes."""
        grad_mode = torch.is_grad_enabled()
        getcurrent().parent.switch(work)
        torch.set_grad_enabled(grad_mode)  # lanes share the thread's autograd mode

    def _blocking_wait(self, work) -> None:
        waiting_since = time.perf_counter()
        work.wait()
        self.wait_seconds += time.perf_counter() - waiting_since

    def _lane_group(self) -> dist.ProcessGroup:
        lane = getattr(getcurrent(), "lane", None)
        if lane is None:
            raise RuntimeError("a forward through a pipeline stage must run inside PipelineStage.run_micro_batches")
        return self._lanes[lane]

    def _dtype(self) -> torch.dtype:
        return next(self.layers[self.owned.start].parameters()).dtype

    def _device(self) -> torch.device:
        return next(self.layers[self.owned.start].parameters()).device

    def _next_ready(self, arrivals: _Arrivals) -> int:
        """The lane to resume: the one whose receive arrived first, as the tensor group's first rank
        saw it (all ranks of a stage must interleave micro-batches alike). First come, first served
        keeps the lanes offset by one stage, which fills the pipe (lowest lane first does not: see
        benchmarks/pipeline.py)."""
        tensor_group = self._tensor_group if self._tensor_group is not None and self._tensor_group.size() > 1 else None
        choice = torch.zeros((), dtype=torch.int64, device=self._device())  # NCCL broadcasts device tensors
        if tensor_group is None or tensor_group.rank() == 0:
            choice.fill_(arrivals.first())
        if tensor_group is not None:
            dist.broadcast(choice, dist.get_global_rank(tensor_group, 0), group=tensor_group)
        arrivals.take(int(choice))
        return int(choice)

    def extra_repr(self) -> str:
        return f"stage {self.index} of {len(self.stages)}: blocks {self.owned.start}..{self.owned.stop - 1}"


def _lane_body(forward, lane: int, results: list):
    def body():
        getcurrent().lane = lane
        results[lane] = forward()
    return body


class _Arrivals:
    """Which lanes' pending receives have arrived. Gloo tells only through a blocking `wait()`, which
    may be called once, so a helper thread per receive makes it; elsewhere (NCCL) `is_completed()`
    polls the device, and `wait()` then orders the compute stream after the receive."""

    def __init__(self, gloo: bool, lanes: int):
        self.gloo, self.waiting, self.arrived = gloo, {}, []  # arrived: in order of arrival
        self._events: queue.Queue[int] = queue.Queue()
        self._threads = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="pipeline-recv") if gloo else None

    def watch(self, lane: int, work) -> None:
        self.waiting[lane] = work
        if self.gloo:
            self._threads.submit(lambda: (work.wait(), self._events.put(lane)))

    def first(self) -> int:
        """The lane whose receive arrived first (blocks until one has)."""
        while not self.arrived:
            self._collect(block=True)
        return self.arrived[0]

    def take(self, lane: int) -> None:
        """Blocks until `lane`'s receive has arrived, and forgets it."""
        while lane not in self.arrived:
            self._collect(block=True)
        self.arrived.remove(lane)
        work = self.waiting.pop(lane)
        if not self.gloo:
            work.wait()

    def _collect(self, block: bool) -> None:
        if self.gloo:
            self.arrived.append(self._events.get(block=block))
            while not self._events.empty():
                self.arrived.append(self._events.get())
        else:
            self.arrived += [lane for lane, work in self.waiting.items() if lane not in self.arrived and work.is_completed()]
            if block and not self.arrived:
                time.sleep(1e-5)

    def __enter__(self):
        return self

    def __exit__(self, *failure):
        if self._threads is not None:
            self._threads.shutdown(wait=not any(failure), cancel_futures=True)




class _Send(torch.autograd.Function):
    """Sends `tensor` to `peer`; returns a zero whose backward receives the tensor's gradient."""

    @staticmethod
    def forward(ctx, tensor, anchor, peer, group, stage):
        ctx.peer, ctx.group, ctx.stage, ctx.shape, ctx.dtype = peer, group, stage, tensor.shape, tensor.dtype
        ctx.needs_grad = tensor.requires_grad
        stage._pending_sends.append(dist.isend(tensor.contiguous(), peer, group=group))
        return anchor.new_zeros(())

    @staticmethod
    def backward(ctx, zero):
        grad = torch.empty(ctx.shape, dtype=ctx.dtype, device=zero.device)
        ctx.stage._blocking_wait(dist.irecv(grad, ctx.peer, group=ctx.group))
        return (grad if ctx.needs_grad else None), None, None, None, None


class _Received(torch.autograd.Function):
    """A received tensor; its backward sends the gradient back to the sender."""

    @staticmethod
    def forward(ctx, buffer, anchor, peer, group, stage):
        ctx.peer, ctx.group, ctx.stage = peer, group, stage
        return buffer.view_as(buffer)

    @staticmethod
    def backward(ctx, grad):
        ctx.stage._pending_sends.append(dist.isend(grad.contiguous(), ctx.peer, group=ctx.group))
        return None, None, None, None, None


class _ZeroTie(torch.autograd.Function):
    """A zero that depends on every transfer: sends get gradient 1 (ignored), receives gradient 0."""

    @staticmethod
    def forward(ctx, *tensors):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in tensors]
        return torch.zeros((), dtype=torch.float32, device=tensors[0].device)

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes)


class _StageCrossEntropy(nn.Module):
    """The model's loss on the last stage; zero elsewhere (the engine adds window losses on every stage)."""

    def __init__(self, inner: nn.Module, stage: PipelineStage):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_stage", stage)  # not a submodule: the stage owns this module

    def forward(self, logits: StageHidden, targets: torch.Tensor) -> torch.Tensor:
        if logits.tensor is None:
            return torch.zeros((), dtype=torch.float32, device=targets.device)
        return self.inner(logits.tensor, targets)

    def full_logits(self, logits: StageHidden) -> torch.Tensor:
        """Logits over the whole vocabulary on every stage: broadcast from the last one."""
        stage = self._stage
        if logits.tensor is not None:
            full = self.inner.full_logits(logits.tensor).contiguous()
        else:
            full = torch.empty(logits.shape, dtype=stage._dtype(), device=stage._device())
        dist.broadcast(full, stage._peers[stage.last], group=stage._lane_group())
        return full
