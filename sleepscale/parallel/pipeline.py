"""One pipelined step: the static schedule run on this rank's stage, with plain point-to-point
transfers and a backward per traversal.

Every rank of the pipeline group builds the same schedule from the micro-batches' sleep plans
(`sleepscale.parallel.pipeline_schedule`) and walks its own program: at each tick it posts that
tick's transfers as one `batch_isend_irecv` group on the pipeline group, then runs its op, first
waiting for any tensor the op needs that has not arrived. No thread, no polling, no collective: the
program alone decides what comes next, and both ends of every link post the same transfers in the
same order.

Backward per traversal. Each forward op runs on inputs cut from the autograd graph: the hidden it
received is a fresh leaf, and every tensor it takes from what the micro-batch carries on the stage
(states, the window's starting states, the loop output) becomes a leaf of its own. Its graph thus
ends at its inputs, and its backward op, once the gradients of everything it produced are known
(from the stages it sent hidden states to, from the later ops on this stage that used its states,
and the loss), runs autograd over that graph alone, then sends the gradient of its received hidden
back and hands its inputs' gradients to the ops that produced them. So the activations of a
micro-batch are freed op by op, and the schedule bounds how many micro-batches hold any
(`in_flight`), not M.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist

from sleepscale.data.sample import IGNORE_INDEX
from sleepscale.model.state import MixerState
from sleepscale.parallel.pipeline_schedule import Op, Schedule, Transfer, Traversal, build_schedule, traversals
from sleepscale.parallel.pipeline_stage import Carried, PipelineStage, finish, forward_op
from sleepscale.plan import SleepPlan
from sleepscale.sleep import SleepOutput

Backward = Callable[[list[torch.Tensor], list[torch.Tensor]], None]


@dataclasses.dataclass
class PipelinedOutput:
    loss: torch.Tensor | None  # mean over micro-batches of each one's mean token loss (last stage; zero elsewhere)
    logits: list[torch.Tensor] | None  # per micro-batch [batch, length, vocab] (last stage, when asked for)
    states: list[list[MixerState]]  # per micro-batch: this stage's states after its last window
    transfers: list[
        tuple[str, int, Transfer]
    ]  # every transfer this rank posted, in order ("send"/"recv", peer stage, what)
    sent_bytes: int  # payload this rank sent
    wait_seconds: float  # spent waiting for transfers to complete (blocked on another stage)


@dataclasses.dataclass
class _Record:
    """A forward op's graph ends: what its backward op needs."""

    leaves: list[tuple[torch.Tensor, torch.Tensor]]  # (input leaf, the carried tensor it was cut from)
    received: torch.Tensor | None  # the received hidden, as a leaf
    sends: dict[int, torch.Tensor]  # destination stage -> hidden sent there
    produced: list[torch.Tensor]  # carried tensors it made, whose gradients later ops hand back
    loss: torch.Tensor | None


def run_step(
    stage: PipelineStage,
    group: dist.ProcessGroup,
    plans: list[SleepPlan],
    input_ids: list[torch.Tensor],
    targets: list[torch.Tensor | None],
    span: int,
    in_flight: int,
    backward: Backward | None = None,
    want_logits: bool = False,
    op_costs: tuple[float, float] = (1.0, 2.0),
) -> PipelinedOutput:
    """Runs the micro-batches (their plans, inputs and targets) through the pipeline: forward only
    when autograd is off, else forward and backward (gradients accumulate into the stage's
    parameters through `backward(tensors, grads)`, default `torch.autograd.backward`; the loss
    differentiated is the mean over micro-batches). `span`: the attention window L. `op_costs`:
    the times of a forward and a backward op that the schedule is ordered for (`build_schedule`)."""
    training = torch.is_grad_enabled()
    backward = backward or (lambda tensors, grads: torch.autograd.backward(tensors, grads))
    walks = [traversals(plan, stage.stages) for plan in plans]
    schedule = _schedule(tuple(tuple(w) for w in walks), len(stage.stages), in_flight, training, tuple(op_costs))
    device, dtype = _device_and_dtype(stage)
    peers = [dist.get_global_rank(group, index) for index in range(len(stage.stages))]
    micro_batches = len(plans)
    carried = [None] * micro_batches
    records: dict[tuple[int, int, int], _Record] = {}  # (micro-batch, traversal, stage) of a forward op
    arriving: dict[Transfer, tuple[_Posted, torch.Tensor]] = {}  # posted receives: their group and buffer
    posted_groups: list[_Posted] = []
    outbox: dict[Transfer, torch.Tensor] = {}  # to send, by transfer
    pending: dict[int, torch.Tensor] = {}  # id(carried tensor) -> gradient handed back by later ops
    owners: dict[int, torch.Tensor] = {}  # id -> the carried tensor (kept alive while its gradient may come)
    sends_of = _sends_by_op(schedule)
    logits, posted_all, traffic = [[] for _ in plans], [], _Traffic()
    scale = [None] * micro_batches
    for m, target in enumerate(targets):
        if target is not None:  # d(step loss) / d(window loss): 1 / (M * the micro-batch's target tokens)
            scale[m] = 1.0 / (micro_batches * (target != IGNORE_INDEX).sum().clamp(min=1).to(torch.float64))
    window_losses = [[] for _ in plans]

    for posted, op in schedule.program(stage.index):
        if posted:
            posted_groups.append(
                _post(posted, outbox, arriving, peers, group, walks, plans, stage, device, dtype, traffic)
            )
            posted_all += posted
        if op is None:
            continue
        walk = walks[op.micro_batch][op.traversal]
        if op.kind == "F":
            m = op.micro_batch
            if carried[m] is None:
                start = stage.model.initial_states(plans[m].batch, span, device)
                carried[m] = Carried(start, start, start)
            received = _take(arriving, _input_transfer(op, walk), traffic)
            record = _Record([], None, {}, [], None)
            if training and received is not None:
                received = received.requires_grad_()
                record.received = received
            if training:
                carried[m] = _cut(carried[m], record)
            out = forward_op(stage, plans[m], walk, input_ids[m], targets[m], carried[m], received, want_logits)
            if training:
                carried[m] = _uncut(carried[m], record, owners)
                record.sends, record.loss = out.sends, out.loss
                if walk.grad:
                    records[op.micro_batch, op.traversal, op.stage] = record
            for transfer in sends_of.get(op, []):
                outbox[transfer] = out.sends[transfer.destination].detach()
            if out.loss is not None:
                window_losses[m].append(out.loss.detach())
            if out.logits is not None:
                logits[m].append(stage.model.cross_entropy.full_logits(out.logits).detach())
        else:
            record = records.pop((op.micro_batch, op.traversal, op.stage))
            tensors, grads = [], []
            for destination, tensor in record.sends.items():
                grad = _take(arriving, _gradient_transfer(op, destination, walks), traffic)
                if grad is not None and tensor.requires_grad:
                    tensors.append(tensor)
                    grads.append(grad)
            for tensor in record.produced:
                grad = pending.pop(id(tensor), None)
                owners.pop(id(tensor), None)
                if grad is not None:
                    tensors.append(tensor)
                    grads.append(grad)
            if record.loss is not None and record.loss.requires_grad:
                tensors.append(record.loss)
                grads.append(scale[op.micro_batch].to(record.loss.dtype))
            if tensors:
                backward(tensors, grads)
            for leaf, source in record.leaves:
                if leaf.grad is not None:
                    key = id(source)
                    pending[key] = leaf.grad if key not in pending else pending[key] + leaf.grad
            for transfer in sends_of.get(op, []):  # the received hidden's gradient goes back
                grad = record.received.grad if record.received is not None else None
                outbox[transfer] = grad if grad is not None else torch.zeros_like(record.received)

    for posted_group in posted_groups:  # the last sends
        posted_group.wait(traffic)
    loss = None
    if stage.is_last and targets[0] is not None:
        per_batch = [
            torch.stack(parts).sum() * (micro_batches * s).to(parts[0].dtype) for parts, s in zip(window_losses, scale)
        ]
        loss = torch.stack(per_batch).mean()
    elif targets[0] is not None:
        loss = torch.zeros((), device=device)
    states = [finish(stage, plan, c) for plan, c in zip(plans, carried)]
    return PipelinedOutput(
        loss,
        [torch.cat(parts, dim=1) for parts in logits] if want_logits and stage.is_last else None,
        states,
        posted_all,
        traffic.sent_bytes,
        traffic.wait_seconds,
    )


@torch.no_grad()
def evaluate_step(
    stage: PipelineStage,
    group: dist.ProcessGroup,
    plan: SleepPlan,
    input_ids: torch.Tensor,
    targets: torch.Tensor | None,
    span: int,
) -> SleepOutput:
    """One batch forward through the pipeline, as `sleep_forward` would return it on every stage:
    the logits (and loss) come from the last stage, broadcast over the pipeline group."""
    out = run_step(stage, group, [plan], [input_ids], [targets], span, in_flight=1, want_logits=True)
    device, dtype = _device_and_dtype(stage)
    logits = (
        out.logits[0].contiguous()
        if stage.is_last
        else torch.empty(*input_ids.shape, stage.model.config.vocab_size, device=device, dtype=dtype)
    )
    last = dist.get_global_rank(group, len(stage.stages) - 1)
    dist.broadcast(logits, last, group=group)
    loss = None
    if targets is not None:
        loss = out.loss.to(torch.float32).reshape(()) if stage.is_last else torch.zeros((), device=device)
        dist.broadcast(loss, last, group=group)
    return SleepOutput(logits=logits, loss=loss, passes=plan.passes_run(), states=out.states[0])


@functools.lru_cache(maxsize=64)
def _schedule(
    walks: tuple[tuple[Traversal, ...], ...], stages: int, in_flight: int, backward: bool, op_costs: tuple[float, float]
) -> Schedule:
    """The step's schedule; steps of the same shape (the usual case) reuse it."""
    return build_schedule(
        [list(w) for w in walks],
        stages,
        in_flight,
        backward=backward,
        forward_cost=op_costs[0],
        backward_cost=op_costs[1],
    )


def _device_and_dtype(stage: PipelineStage) -> tuple[torch.device, torch.dtype]:
    parameter = next(stage.model.layers[stage.held.start].parameters())
    return parameter.device, parameter.dtype


def _sends_by_op(schedule: Schedule) -> dict[Op, list[Transfer]]:
    found = defaultdict(list)
    for posted in schedule.transfers:
        for transfer in posted:
            found[transfer.produced_by].append(transfer)
    return found


def _input_transfer(op: Op, walk: Traversal) -> Transfer | None:
    """The transfer that brings forward op `op` its input hidden (None: embedding, or kept on the stage)."""
    if op.stage > walk.first:
        return Transfer(Op("F", op.micro_batch, op.traversal, op.stage - 1), op.stage - 1, op.stage)
    if walk.source is not None and walk.source[1] != op.stage:
        return Transfer(Op("F", op.micro_batch, *walk.source), walk.source[1], op.stage)
    return None


def _gradient_transfer(op: Op, destination: int, walks: list[list[Traversal]]) -> Transfer:
    """The transfer that brings backward op `op` the gradient of the hidden its forward sent to `destination`."""
    m, t, s = op.micro_batch, op.traversal, op.stage
    walk = walks[m][t]
    if destination == s + 1 and s < walk.last:
        return Transfer(Op("B", m, t, destination), destination, s)
    consumer = next(c for c, other in enumerate(walks[m]) if other.source == (t, s) and other.first == destination)
    return Transfer(Op("B", m, consumer, destination), destination, s)


@dataclasses.dataclass
class _Traffic:
    sent_bytes: int = 0
    wait_seconds: float = 0.0


class _Posted:
    """One tick's transfers, posted together; waited for when an op needs one of its receives (a
    coalescing backend such as NCCL completes the group as one), or at the end of the step."""

    def __init__(self, works):
        self.works, self.done = works, False

    def wait(self, traffic: _Traffic) -> None:
        if not self.done:
            started = time.perf_counter()
            for work in self.works:
                work.wait()
            traffic.wait_seconds += time.perf_counter() - started
            self.done = True


def _post(posted, outbox, arriving, peers, group, walks, plans, stage, device, dtype, traffic: _Traffic) -> _Posted:
    """Posts one tick's transfers as one group, in the program's order, without waiting: a rank
    blocks only when its next op needs a tensor that has not arrived. Every rank posts its groups in
    tick order and each tick's transfers in an order both ends share, so the transfers on every link
    pair up in order (what NCCL needs), and an op waits only for transfers of earlier ticks."""
    operations, buffers = [], []
    for kind, peer, transfer in posted:
        if kind == "send":
            tensor = outbox.pop(transfer).contiguous()
            traffic.sent_bytes += tensor.numel() * tensor.element_size()
            operations.append(dist.P2POp(dist.isend, tensor, peers[peer], group))
        else:
            producer = transfer.produced_by
            plan = plans[producer.micro_batch]
            window = plan.windows[walks[producer.micro_batch][producer.traversal].window]
            buffer = torch.empty(plan.batch, window.length, stage.model.config.hidden_size, device=device, dtype=dtype)
            operations.append(dist.P2POp(dist.irecv, buffer, peers[peer], group))
            buffers.append((transfer, buffer))
    handle = _Posted(dist.batch_isend_irecv(operations) or [])
    for transfer, buffer in buffers:
        arriving[transfer] = (handle, buffer)
    return handle


def _take(arriving, transfer: Transfer | None, traffic: _Traffic) -> torch.Tensor | None:
    """The received tensor of `transfer` once it has arrived (None: no such transfer)."""
    if transfer not in arriving:
        return None
    handle, buffer = arriving.pop(transfer)
    handle.wait(traffic)
    return buffer


def _cut(carried: Carried, record: _Record) -> Carried:
    """`carried` with every tensor that needs a gradient replaced by a leaf of its own (one per
    tensor, however often it appears), remembered in `record`."""
    leaves: dict[int, torch.Tensor] = {}

    def leaf(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.requires_grad:
            return tensor
        if id(tensor) not in leaves:
            leaves[id(tensor)] = tensor.detach().requires_grad_()
            record.leaves.append((leaves[id(tensor)], tensor))
        return leaves[id(tensor)]

    return _mapped(carried, leaf)


def _uncut(carried: Carried, record: _Record, owners: dict[int, torch.Tensor]) -> Carried:
    """After the op: leaves it passed through unchanged go back to the tensors they were cut from;
    the tensors it made are remembered as its products (their gradients come back to it)."""
    originals = {id(leaf): source for leaf, source in record.leaves}

    def restore(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) in originals:
            return originals[id(tensor)]
        if tensor.requires_grad and id(tensor) not in owners:
            owners[id(tensor)] = tensor
            record.produced.append(tensor)
        return tensor

    return _mapped(carried, restore)


def _mapped(carried: Carried, function) -> Carried:
    def states(values: list[MixerState]) -> list[MixerState]:
        return [state.mapped(function) for state in values]

    return Carried(
        states(carried.states),
        states(carried.window_start),
        states(carried.woke),
        None if carried.loop_output is None else function(carried.loop_output),
    )
