"""One training step's forward-backward, and the decision to apply or skip its update.

The train loop calls `forward_backward(engine, micro_batches, sleep, guard)`, a function chosen once
for the run by `get_forward_backward_func` (as megatron-core's `get_forward_backward_func`): without
pipelining each micro-batch runs forward then backward, freeing its activations before the next;
with pipelining the micro-batches go through the stages on the static schedule
(`sleepscale.parallel.pipeline`), one backward per traversal of a stage. Either way DeepSpeed sees
one accumulation boundary, on the last backward, and the loop then calls `guard.decide` and
`engine.step()` once.

Nothing here reads a device value on the host: the loss stays a device tensor, the plan of each
micro-batch was made on the host from its CPU targets (`sleepscale.plan`), and tokens are counted
from the loader's sample counts. The exceptions are opt-in or unavoidable, and each is named where it
happens: the loss-spike guard (a host value per micro-batch), and the gradient check of our own
ZeRO-0 fp32 optimizer (one per step; DeepSpeed's ZeRO and bf16 optimizers make the same check inside
their own step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from sleepscale.config import SleepConfig, TrainConfig
from sleepscale.plan import SleepPlan
from sleepscale.sleep import SleepOutput, plan_for
from sleepscale.train.distributed import Distributed
from sleepscale.train.spikes import SpikeGuard

if TYPE_CHECKING:
    from sleepscale.parallel.pipeline_stage import PipelineStage


def precision_context(precision: str, device: torch.device):
    """Where a training step's forward runs. bf16 is mixed precision in the manner of torchtitan's
    FSDP policy (bf16 compute, float32 parameters and gradients), through autocast: parameters,
    gradients and optimizer state stay float32, and the matmuls of the forward (and so of its
    backward) run in bf16. Gradients therefore sum in float32, over micro-steps and over the N
    passes that reuse a block's weights: each use casts its weight afresh (`cache_enabled=False`),
    so that a pass's gradient becomes float32 before it is added to the others' (with autocast's
    cache the passes would share one bf16 copy, whose gradient autograd sums in bf16). The GDN
    decay parameters `A_log` and `dt_bias`, and every recurrent state, stay float32; the delta rule
    itself computes in float32. (DeepSpeed's own bf16 mode instead casts the model to bf16, so a
    block's gradient would sum over its N uses in bf16.)"""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


@dataclasses.dataclass
class MicroBatch:
    input_ids: torch.Tensor  # on the rank's device
    targets: torch.Tensor
    plan: SleepPlan  # made on the host from the CPU targets
    tokens: int  # tokens of real samples (padding rows excluded)


def micro_batch(batch: dict, shapes, sleep: SleepConfig, device: torch.device) -> MicroBatch:
    """A loader batch as the step needs it. `shapes`: the model (or its meta-device twin) whose block
    count and loop range the plan follows."""
    plan = plan_for(shapes, batch["input_ids"], sleep, batch["targets"])
    return MicroBatch(batch["input_ids"].to(device, non_blocking=True), batch["targets"].to(device, non_blocking=True),
                      plan, batch["num_samples"] * batch["input_ids"].shape[1])


@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor  # mean over the micro-batches, on the device (a zero on pipeline stages without the head)
    last: SleepOutput  # the last micro-batch's output (states and per-pass norms, for metrics)


def get_forward_backward_func(pipeline: PipelineStage | None, group: dist.ProcessGroup | None = None,
                              in_flight: int | None = None) -> Callable[..., StepResult]:
    """`pipeline`: this rank's stage with pipeline parallelism, `group` the pipeline group, and
    `in_flight` the most micro-batches holding activations at once (default: the number of stages)."""
    if pipeline is None:
        return forward_backward_no_pipelining
    return functools.partial(forward_backward_pipelining, pipeline, group, in_flight or group.size())


def forward_backward_no_pipelining(engine, micro_batches: list[MicroBatch], sleep: SleepConfig, guard: UpdateGuard) -> StepResult:
    loss_sum = None
    for index, batch in enumerate(micro_batches):
        engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
        out = engine(batch.input_ids, batch.targets, sleep, batch.plan)
        engine.backward(guard.before_backward(out.loss))  # DeepSpeed divides by the micro-batch count
        loss_sum = out.loss.detach() if loss_sum is None else loss_sum + out.loss.detach()
    return StepResult(loss_sum / len(micro_batches), out)


def forward_backward_pipelining(stage: PipelineStage, group: dist.ProcessGroup, in_flight: int, engine,
                                micro_batches: list[MicroBatch], sleep: SleepConfig, guard: UpdateGuard) -> StepResult:
    """The micro-batches on the static pipeline schedule (at most `in_flight` of them holding
    activations at once). Each backward op goes through DeepSpeed as the surrogate sum(output * its gradient), whose
    gradient is that op's vector-Jacobian product; DeepSpeed runs with one accumulation step and
    sees its boundary on a last, zero backward after the step's loss is known, which the update
    guard turns into NaN gradients on a loss spike (how DeepSpeed's own optimizers are made to skip)."""
    from sleepscale.parallel.pipeline import run_step

    engine.set_gradient_accumulation_boundary(False)

    def backward(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        engine.backward(sum((tensor * grad).sum() for tensor, grad in zip(tensors, grads)))

    out = run_step(stage, group, [b.plan for b in micro_batches], [b.input_ids for b in micro_batches],
                   [b.targets for b in micro_batches], sleep.window, in_flight=in_flight, backward=backward)
    poison = guard.before_backward(out.loss) * 0 + 1  # 1, or NaN to make the step skip
    engine.set_gradient_accumulation_boundary(True)
    trainable = [p for p in stage.parameters() if p.requires_grad]
    engine.backward(sum((p * 0).sum() for p in trainable) * poison)
    last = SleepOutput(logits=None, loss=out.loss, passes=micro_batches[-1].plan.passes_run(), states=out.states[-1])
    return StepResult(out.loss, last)


def loss_on_host(ctx: Distributed, loss: torch.Tensor) -> float:
    """The loss, mean over data ranks, as the pipeline's last stage has it (the loss lives there).
    Reads the device: for logging steps and the opt-in loss-spike guard only."""
    loss = loss.detach().to(torch.float64)
    if ctx.groups is not None and ctx.groups.pipeline.size() > 1:
        dist.broadcast(loss, dist.get_global_rank(ctx.groups.pipeline, ctx.groups.pipeline.size() - 1), group=ctx.groups.pipeline)
    dist.all_reduce(loss)
    return loss.item() / dist.get_world_size()


@dataclasses.dataclass
class Decision:
    apply: bool
    grad_norm: float | None  # before clipping, where we compute it (ZeRO-0 fp32); None: DeepSpeed's
    loss_spike: bool
    grad_spike: bool


class UpdateGuard:
    """The one decision around the optimizer step: apply the update or skip it (no update, the LR
    schedule held, the step counted as skipped), for a non-finite loss or gradient or a spike.

    How a skip reaches the optimizer depends on who owns it. Our ZeRO-0 fp32 optimizer skips when its
    `overflow` flag is set, the flag DeepSpeed's engine reads to count the skip and hold the schedule
    (`sleepscale.train.optim`). DeepSpeed's ZeRO and bf16 optimizers decide on overflow inside their
    own step from the gradients, and take no request: they skip non-finite gradients themselves, and
    for a loss spike the backward runs on a NaN loss, the one way to make them skip."""

    def __init__(self, train: TrainConfig, engine, ctx: Distributed, spikes: SpikeGuard):
        self.train, self.engine, self.ctx, self.spikes = train, engine, ctx, spikes
        self.ours = not (engine.zero_optimization() or engine.bfloat16_enabled())
        self.loss_spike = False

    def before_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate. With `train.loss_spike_ratio` this reads the loss (mean over
        ranks) on the host, one synchronisation per micro-batch; without it, nothing happens here."""
        if self.train.loss_spike_ratio is None:
            return loss
        self.loss_spike = self.loss_spike or self.spikes.is_loss_spike(loss_on_host(self.ctx, loss))
        return loss * float("nan") if self.loss_spike and not self.ours else loss

    def decide(self) -> Decision:
        """Called after the step's last backward, before `engine.step()`."""
        loss_spike, self.loss_spike = self.loss_spike, False
        grad_norm = self._gradient_norm() if self.ours else None
        finite = grad_norm is None or math.isfinite(grad_norm)
        grad_spike = finite and grad_norm is not None and self.spikes.is_grad_spike(grad_norm)
        apply = finite and not loss_spike and not grad_spike
        if self.ours:
            self.engine.optimizer.overflow = not apply
        return Decision(apply, grad_norm, loss_spike, grad_spike)

    def _gradient_norm(self) -> float:
        """Norm of the gradients before clipping (averaged over data ranks; under tensor parallelism
        each shard counts once and replicated weights once; pipeline stages hold disjoint
        parameters). Read on the host: the decision to skip needs it (one synchronisation a step)."""
        ctx, optimizer = self.ctx, self.engine.optimizer
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if ctx.groups is not None and ctx.groups.tensor.rank() != 0:
            parameters = [p for p in parameters if getattr(p, "tensor_model_parallel", False)]
        squares = sum((p.grad.float().pow(2).sum() for p in parameters), torch.zeros((), device=ctx.device))
        if ctx.groups is not None:
            dist.all_reduce(squares, group=ctx.groups.tensor)
            dist.all_reduce(squares, group=ctx.groups.pipeline)
        return squares.sqrt().item()
