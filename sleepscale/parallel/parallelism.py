"""The run's parallelism, applied from outside the model (as torchtitan's `ParallelDims` plus
`parallelize`) and asked by the trainer for everything that depends on the layout.

`parallelize(config, ctx)` builds this rank's part of the model (`build_rank_model`: the whole model or
one pipeline stage's blocks, tensor-parallel shards, ZeRO-3 partitions) and returns a `Parallelism`,
or a `PipelineParallelism` with `parallel.pipeline > 1`. It owns:

- `model`: what DeepSpeed wraps, the rank's model run by the sleep engine (`SleepingModel`), and
  `build_engine`, the DeepSpeed engine over it (ZeRO over the data-parallel group);
- `forward_backward`: one step's micro-batches, forward and backward, chosen once for the run (as
  megatron-core's `get_forward_backward_func`): each micro-batch forward then backward, or the
  micro-batches through the stages on the static pipeline schedule;
- `evaluation_forward`: a batch's logits, as `sleep_forward` returns them, on every rank;
- the reductions of metrics over the model-parallel ranks: `loss_on_host`, `gradient_norm`,
  `state_norms`;
- the whole-model state a checkpoint writes (`whole_model_state`, `load_whole_model_state`), and the
  layout it records and a resume must match (`layout`, `check_resumable`).

The step makes no host synchronisation here except where a method says it reads the device.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from sleepscale.config import Config, ConfigError, SleepConfig
from sleepscale.model.gdn import GDNState
from sleepscale.model.hybrid import HybridLM
from sleepscale.parallel.compile import compile_blocks
from sleepscale.parallel.distributed import Distributed
from sleepscale.parallel.pipeline import evaluate_step, run_step
from sleepscale.parallel.pipeline_stage import PipelineStage
from sleepscale.parallel.rank_model import build_rank_model
from sleepscale.parallel.zero import build_engine
from sleepscale.plan import SleepPlan
from sleepscale.sleep import SleepOutput, plan_for, sleep_forward

log = logging.getLogger("sleepscale.parallel")

BeforeBackward = Callable[[torch.Tensor], torch.Tensor]  # the loss to back-propagate, from the step's loss


class SleepingModel(nn.Module):
    """What DeepSpeed wraps: the rank's hybrid model run by the sleep engine (ZeRO-3 hooks need an nn.Module)."""

    def __init__(self, model: HybridLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, targets, sleep, plan=None, return_logits=False):
        """Training asks for the loss only: no logits are gathered or kept (evaluation asks for them). The
        trainer reads the states the sequence ends with but never differentiates through them: returned
        detached, their graph (the last window's state updates) is freed with the forward rather than
        kept, and recomputed, through backward (`sleepscale.planner.activations` counts it so)."""
        out = sleep_forward(self.model, input_ids, sleep, targets=targets, plan=plan, return_logits=return_logits)
        out.states = [state.detached() for state in out.states]
        return out


@dataclasses.dataclass
class MicroBatch:
    input_ids: torch.Tensor  # on the rank's device
    targets: torch.Tensor
    plan: SleepPlan  # made on the host from the CPU targets
    tokens: int  # tokens of real samples (padding rows excluded)


def micro_batch(batch: dict, shapes: HybridLM, sleep: SleepConfig, device: torch.device) -> MicroBatch:
    """A loader batch as the step needs it. `shapes`: the model (or its meta-device twin) whose block
    count and loop range the plan follows."""
    plan = plan_for(shapes, batch["input_ids"], sleep, batch["targets"])
    return MicroBatch(
        batch["input_ids"].to(device, non_blocking=True),
        batch["targets"].to(device, non_blocking=True),
        plan,
        batch["num_samples"] * batch["input_ids"].shape[1],
    )


@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor  # mean over the micro-batches, on the device (a zero on pipeline stages without the head)
    last: SleepOutput  # the last micro-batch's output (states and per-pass norms, for metrics)


def parallelize(config: Config, ctx: Distributed) -> Parallelism:
    """This rank's part of the model, in the run's layout."""
    model = build_rank_model(config, ctx.groups, ctx.device)
    if config.train.compile:
        compile_blocks(model, ctx.device)
    if config.parallel.pipeline > 1:
        return PipelineParallelism(config, ctx, model)
    return Parallelism(config, ctx, model)


class Parallelism:
    """Data parallelism, with tensor parallelism when `ctx.groups` holds its group: every rank runs
    every block (or its shard of each), and the engine runs the sleep engine per micro-batch."""

    def __init__(self, config: Config, ctx: Distributed, model: HybridLM):
        self.config, self.ctx = config, ctx
        self.model = SleepingModel(model)

    def describe(self) -> str:
        parallel = self.config.parallel
        return (
            f"world size {self.ctx.world_size} (tensor {parallel.tensor} x pipeline {parallel.pipeline} x data "
            f"{self.ctx.data_size})"
        )

    def build_engine(self, optimizer, scheduler):
        return build_engine(self.model, optimizer, scheduler, self.config, self.ctx.groups)

    def forward_backward(
        self, engine, micro_batches: list[MicroBatch], sleep: SleepConfig, before_backward: BeforeBackward
    ) -> StepResult:
        """Each micro-batch forward then backward, freeing its activations before the next; DeepSpeed
        sees one accumulation boundary, on the last backward."""
        loss_sum = None
        for index, batch in enumerate(micro_batches):
            engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            out = engine(batch.input_ids, batch.targets, sleep, batch.plan)
            engine.backward(before_backward(out.loss))  # DeepSpeed divides by the micro-batch count
            loss_sum = out.loss.detach() if loss_sum is None else loss_sum + out.loss.detach()
        return StepResult(loss_sum / len(micro_batches), out)

    def evaluation_forward(
        self, engine, input_ids: torch.Tensor, targets: torch.Tensor | None, sleep: SleepConfig
    ) -> SleepOutput:
        return engine(input_ids, targets, sleep, return_logits=True)

    def loss_on_host(self, loss: torch.Tensor) -> float:
        """The loss, mean over data ranks. Reads the device: for logging steps and the opt-in
        loss-spike guard only."""
        loss = loss.detach().to(torch.float64)
        dist.all_reduce(loss)
        return loss.item() / dist.get_world_size()

    def gradient_norm(self, parameters: list[nn.Parameter]) -> torch.Tensor:
        """Norm of the whole model's gradients, from this rank's `parameters` (their gradients are
        averaged over data ranks already): under tensor parallelism each shard counts once and
        replicated weights once. A device scalar: reading it is the caller's synchronisation."""
        return self._model_parallel_sum(self._squared_gradients(parameters)).sqrt()

    def _squared_gradients(self, parameters: list[nn.Parameter]) -> torch.Tensor:
        groups = self.ctx.groups
        if groups is not None and groups.tensor.rank() != 0:
            parameters = [p for p in parameters if getattr(p, "tensor_model_parallel", False)]
        return sum((p.grad.float().pow(2).sum() for p in parameters), torch.zeros((), device=self.ctx.device))

    def _model_parallel_sum(self, squares: torch.Tensor) -> torch.Tensor:
        if self.ctx.groups is not None:
            dist.all_reduce(squares, group=self.ctx.groups.tensor)
        return squares

    def state_norms(self, output: SleepOutput) -> tuple[dict[int, float], list[float] | None]:
        """(Norm of each GDN block's fast weights after the step's last micro-batch, by block; the loop
        blocks' mean GDN state norm after each pass, or None). Reads the device: logging steps only."""
        norms = {
            i: s.fast_weights.detach().float().norm().item()
            for i, s in enumerate(output.states)
            if isinstance(s, GDNState)
        }
        return norms, None if output.pass_state_norms is None else output.pass_state_norms.tolist()

    def whole_model_state(self, engine) -> dict | None:
        """The unsharded training state a checkpoint writes besides DeepSpeed's files (weights, and at
        ZeRO-0 the optimizer state, by whole-model parameter name), so that a run resumes at another
        tensor-parallel size; None without model parallelism (DeepSpeed's files are then whole)."""
        if self.ctx.groups is None:
            return None
        from sleepscale.parallel.tensor import unsharded_training_state  # megatron-core (~6 s): model parallel only

        # ZeRO-1/2 keep optimizer state flat and partitioned: only their weights are written unsharded.
        optimizer = engine.optimizer if self.config.train.zero_stage == 0 else None
        return unsharded_training_state(self.model.model, optimizer, self.ctx.groups.tensor)

    def load_whole_model_state(self, engine, state: dict) -> None:
        """Loads `whole_model_state`'s weights and optimizer state into this rank's shards."""
        from sleepscale.parallel.tensor import load_unsharded_training_state  # megatron-core (~6 s)

        group = self.ctx.groups.tensor if self.ctx.groups is not None else None
        load_unsharded_training_state(self.model.model, engine.optimizer, state, group)

    def layout(self) -> dict[str, int]:
        """What a checkpoint records of the layout."""
        return {
            "world_size": self.ctx.world_size,
            "data_size": self.ctx.data_size,
            "tensor": self.config.parallel.tensor,
            "pipeline": self.config.parallel.pipeline,
        }

    def check_resumable(self, saved: dict, num_workers: int) -> None:
        """One-line error unless a checkpoint with this `layout` (and `num_workers` data workers) can
        resume in this one."""
        config, data_size = self.config, self.ctx.data_size
        saved_data_size, saved_tensor = saved.get("data_size", saved["world_size"]), saved.get("tensor", 1)
        if saved.get("pipeline", 1) != config.parallel.pipeline:
            raise ConfigError(
                f"parallel.pipeline: the checkpoint was written with {saved.get('pipeline', 1)} pipeline "
                f"stage(s); resume with the same (now {config.parallel.pipeline})"
            )
        if saved_data_size != data_size or saved["num_workers"] != num_workers:
            raise ConfigError(
                f"train.run_dir: the checkpoint was written by {saved_data_size} data-parallel rank(s) with "
                f"{saved['num_workers']} data worker(s); resume with the same (now {data_size} and {num_workers})"
            )
        if saved_tensor != config.parallel.tensor and config.train.zero_stage != 0:
            raise ConfigError(
                f"parallel.tensor: the checkpoint was written at tensor-parallel size {saved_tensor} with optimizer "
                f"state sharded over data ranks (ZeRO-{config.train.zero_stage}); resume at that size "
                "(train.zero_stage 0 runs resume at any size)"
            )


class PipelineParallelism(Parallelism):
    """Pipeline parallelism (with data and tensor parallelism): this rank holds one stage's blocks
    (`PipelineStage`), the micro-batches go through the stages on the static schedule
    (`sleepscale.parallel.pipeline`), the loss lives on the last stage and metrics are gathered
    over the pipeline group."""

    def __init__(self, config: Config, ctx: Distributed, model: HybridLM):
        super().__init__(config, ctx, model)
        self.group = ctx.groups.pipeline
        self.stage = PipelineStage(model, config.model.stage_ranges, self.group.rank())
        self.in_flight = config.parallel.pipeline_in_flight or self.group.size()
        if config.train.grad_accumulation < config.parallel.pipeline:
            log.warning(
                "parallel.pipeline %d with train.grad_accumulation %d: fewer micro-batches than stages leave "
                "stages idle; set grad_accumulation >= %d",
                config.parallel.pipeline,
                config.train.grad_accumulation,
                config.parallel.pipeline,
            )

    def forward_backward(
        self, engine, micro_batches: list[MicroBatch], sleep: SleepConfig, before_backward: BeforeBackward
    ) -> StepResult:
        """The micro-batches on the static pipeline schedule (at most `in_flight` of them holding
        activations at once). Each backward op goes through DeepSpeed as the surrogate sum(output * its
        gradient), whose gradient is that op's vector-Jacobian product; DeepSpeed runs with one
        accumulation step and sees its boundary on a last, zero backward after the step's loss is
        known, which `before_backward` turns into NaN gradients on a loss spike (how DeepSpeed's own
        optimizers are made to skip)."""
        engine.set_gradient_accumulation_boundary(False)

        def backward(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
            engine.backward(sum((tensor * grad).sum() for tensor, grad in zip(tensors, grads)))

        out = run_step(
            self.stage,
            self.group,
            [b.plan for b in micro_batches],
            [b.input_ids for b in micro_batches],
            [b.targets for b in micro_batches],
            sleep.window,
            in_flight=self.in_flight,
            backward=backward,
        )
        poison = before_backward(out.loss) * 0 + 1  # 1, or NaN to make the step skip
        engine.set_gradient_accumulation_boundary(True)
        trainable = [p for p in self.stage.model.parameters() if p.requires_grad]
        engine.backward(sum((p * 0).sum() for p in trainable) * poison)
        last = SleepOutput(
            logits=None, loss=out.loss, passes=micro_batches[-1].plan.passes_run(), states=out.states[-1]
        )
        return StepResult(out.loss, last)

    def evaluation_forward(
        self, engine, input_ids: torch.Tensor, targets: torch.Tensor | None, sleep: SleepConfig
    ) -> SleepOutput:
        plan = plan_for(self.stage.model, input_ids, sleep, targets)
        return evaluate_step(self.stage, self.group, plan, input_ids, targets, sleep.window)

    def loss_on_host(self, loss: torch.Tensor) -> float:
        """The loss, mean over data ranks, as the last stage has it (the loss lives there)."""
        loss = loss.detach().to(torch.float64)
        dist.broadcast(loss, dist.get_global_rank(self.group, self.group.size() - 1), group=self.group)
        return super().loss_on_host(loss)

    def _model_parallel_sum(self, squares: torch.Tensor) -> torch.Tensor:
        """Stages hold disjoint parameters: their squares add up."""
        squares = super()._model_parallel_sum(squares)
        dist.all_reduce(squares, group=self.group)
        return squares

    def state_norms(self, output: SleepOutput) -> tuple[dict[int, float], list[float] | None]:
        """Per-block GDN norms from every stage, and the per-pass loop norm averaged over the stages
        that have loop GDN blocks."""
        gathered = [None] * self.group.size()
        dist.all_gather_object(gathered, super().state_norms(output), group=self.group)
        merged = {block: value for stage_norms, _ in gathered for block, value in stage_norms.items()}
        per_pass = [values for _, values in gathered if values is not None and any(values)]
        return merged, torch.tensor(per_pass).mean(0).tolist() if per_pass else None

    def whole_model_state(self, engine) -> dict | None:
        """The stages' parts merged (names are the whole model's), gathered through CPU memory: a
        pickled CUDA tensor would unpickle onto the sender's device index."""
        state = super().whole_model_state(engine)
        parts = [None] * self.group.size()
        dist.all_gather_object(parts, _on_cpu(state), group=self.group)
        merged = {"weights": {name: value for part in parts for name, value in part["weights"].items()}}
        if state["optimizer"] is None:
            return {**merged, "optimizer": None}
        return {
            **merged,
            "optimizer": {name: value for part in parts for name, value in part["optimizer"].items()},
            "param_groups": state["param_groups"],
        }


def _on_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value
