"""What one training layout of a config costs per GPU: memory, communication, FLOPs and time.

A *layout* is how a run spreads over its GPUs (tensor x pipeline x data ranks, ZeRO stage, the
recomputation form `sleep.checkpoint`, micro-batch size and accumulation, and with pipelining the
micro-batches in flight, `parallel.pipeline_in_flight`). `estimate` predicts, for the most loaded
pipeline stage, the bytes a GPU holds at the peak of a step:

- model states (`model_states`): weights, gradients, optimizer state and DeepSpeed's buffers of the
  parameters this rank holds (its tensor-parallel shard of its stage's blocks);
- activations (`activations`): what one micro-batch's forward saves for backward and the states its
  checkpoints hold, times the micro-batches in flight on the stage (1 without pipelining, where
  each micro-batch's backward ends before the next forward; `parallel.pipeline_in_flight` with it),
  plus, under checkpointing, one unit's recomputed activations during backward;
- a fixed reserve for what neither counts (the CUDA context, the allocator's fragmentation,
  communication buffers of NCCL, temporaries of a single op), `Assumptions.reserve` (`assumptions`).

Communication per step (`communication`): the tensor-parallel all-reduces, the pipeline's sends and
the data-parallel gradient reduction; with `optimizer.name: muon`, DeepSpeed's stage-0 all-reduce
(Muon runs DeepSpeed at its stage 0 at every `train.zero_stage`) and Muon's own collectives in its
step (the gathers and scatters of its matrices over the tensor ranks, the broadcasts of the updated
weights over the data ranks: `muon_sent_bytes`; its model states are `muon_state_bytes`). FLOPs per
step are the trainer's own count
(`sleepscale.flops.plan_flops`); compute time is FLOPs over (MFU x peak) per GPU, stretched by the
pipeline's idle fraction (`sleepscale.parallel.pipeline_schedule.simulate` on the step's schedule).
The tensor-parallel all-reduces run inside the forward and backward, and DeepSpeed reduces gradients
after the backward (`overlap_comm` is off): both add their ring's wire bytes over the link's
bandwidth to the step. Muon's collectives run in its step, after both: they add the busiest rank's
sent bytes over each link's bandwidth (a ring broadcast relays about as many bytes per rank as the
average root sends). Newton-Schulz's FLOPs are not counted. Pipeline transfers overlap with compute
(`run_step` posts them ahead).

A layout whose model states and reserve alone exceed the GPU memory cannot fit whatever its
activations: they are not traced (`Estimate.traced`). `search` estimates every `candidate_layouts`
layout (tensor and pipeline ranks, ZeRO stage, every checkpointing form, in-flight counts from the
pipeline's depth, half of it and 1), fitting ones first, fastest first; a schedule longer than
`SEARCH_SIMULATED_OPS` to simulate gets a lower bound of its idle time (the speed an upper bound),
and is listed after those simulated. Layouts share their expensive parts,
each evaluated once per distinct argument: activation traces (cached in `activations`, by shard
shapes, sleep settings and micro-batch), FLOPs and tensor-parallel bytes (by the micro-batch's plan
and the shard's shapes: not by ZeRO, data ranks or accumulation), pipeline bytes (plan and stages)
and the pipeline's idle fraction (traversals, stages, micro-batches and in-flight count: not the
checkpointing form). `largest_passes` looks up to N = `LARGEST_PASSES`.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from sleepscale.config import Config, ModelConfig, SleepConfig
from sleepscale.flops import plan_flops
from sleepscale.model.hybrid import HybridLM
from sleepscale.model.recompute import FORMS
from sleepscale.parallel.pipeline_schedule import Traversal, idle_fraction, idle_lower_bound, traversals
from sleepscale.parallel.zero import deepspeed_config
from sleepscale.plan import make_plan
from sleepscale.planner.activations import micro_batch_activations, tensor_parallel_shapes
from sleepscale.planner.assumptions import GB, Assumptions
from sleepscale.planner.communication import (
    all_reduce_wire_factor,
    data_parallel_bytes,
    data_parallel_wire_bytes,
    muon_sent_bytes,
    pipeline_bytes,
    tensor_parallel_bytes,
)
from sleepscale.planner.model_states import Parameter, model_state_bytes, muon_state_bytes
from sleepscale.train.optim import is_hidden_matrix


@dataclasses.dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    data: int
    zero_stage: int  # `train.zero_stage` (with Muon, DeepSpeed runs its stage 0 and 1/2 shard Muon's state)
    checkpoint: str  # `sleep.checkpoint` in effect: one of CHECKPOINT_FORMS
    micro_batch: int
    grad_accumulation: int
    in_flight: int  # micro-batches holding activations on a stage at once (pipelining; 1 without)

    @property
    def gpus(self) -> int:
        return self.tensor * self.pipeline * self.data

    def describe(self) -> str:
        in_flight = f", {self.in_flight} in flight" if self.pipeline > 1 else ""
        return (
            f"TP{self.tensor} x PP{self.pipeline} x DP{self.data}, "
            f"ZeRO-{self.zero_stage}, checkpoint {self.checkpoint}, "
            f"micro-batch {self.micro_batch} x {self.grad_accumulation}{in_flight}"
        )

    def overrides(self) -> str:
        """The config overrides that run this layout (the data ranks follow from the GPUs given)."""
        found = [
            f"parallel.tensor={self.tensor}",
            f"parallel.pipeline={self.pipeline}",
            f"train.zero_stage={self.zero_stage}",
            f"sleep.checkpoint={self.checkpoint}",
            f"train.micro_batch_size={self.micro_batch}",
            f"train.grad_accumulation={self.grad_accumulation}",
        ]
        return " ".join(found + ([f"parallel.pipeline_in_flight={self.in_flight}"] if self.pipeline > 1 else []))


@dataclasses.dataclass(frozen=True)
class Estimate:
    layout: Layout
    passes: int  # N the memory is for (the random-N maximum)
    stage: int  # the pipeline stage the memory is for (the most loaded)
    weights: int
    gradients: int
    optimizer: int
    buffers: int  # DeepSpeed's, or Muon's step's where larger
    activations: int  # saved for backward, all micro-batches in flight
    held_states: int  # recurrent states kept by checkpoints, all micro-batches in flight
    final_states: int  # the recurrent states each micro-batch in flight ends its sequence with
    recompute: int  # one checkpointed unit's activations while backward recomputes it
    reserve: int
    tensor_bytes: int  # communication per GPU per step
    pipeline_bytes: int
    data_bytes: int  # DeepSpeed's gradient reduction (and parameter gathers)
    optimizer_bytes: int  # Muon's collectives in its step, sent by the busiest rank (0 with AdamW)
    flops: float  # per step, the whole run (all GPUs)
    pipeline_idle: float
    compute_seconds: float  # FLOPs at the assumed MFU, stretched by the pipeline's idle time
    communication_seconds: float  # tensor- and data-parallel collectives on the wire, not overlapped
    step_seconds: float
    tokens_per_second: float
    gpu_memory: int
    traced: bool = True  # False: model states and reserve alone exceed the GPU memory, activations left out
    idle_simulated: bool = True  # False: the schedule was over the simulation's budget, `pipeline_idle` a lower bound

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.buffers
            + self.activations
            + self.held_states
            + self.final_states
            + self.recompute
            + self.reserve
        )

    @property
    def fits(self) -> bool:
        return self.traced and self.total <= self.gpu_memory

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("DeepSpeed buffers, optimizer temporaries", self.buffers),
            ("activations saved for backward", self.activations),
            ("states held by checkpoints", self.held_states),
            ("recurrent states at the sequence's end", self.final_states),
            ("recomputed unit in backward", self.recompute),
            ("reserve (context, fragmentation, NCCL)", self.reserve),
        ]


def passes_for_memory(sleep: SleepConfig) -> int:
    """The N whose activations a step may need: `sleep.passes`, or the random-N distribution's maximum."""
    distribution = sleep.random_passes
    if distribution is None:
        return sleep.passes
    return distribution.high if distribution.kind == "uniform" else distribution.max


def config_layout(config: Config, gpus: int) -> Layout:
    """The layout `config` asks for on `gpus` GPUs."""
    model_parallel = config.parallel.tensor * config.parallel.pipeline
    if gpus % model_parallel:
        raise ValueError(f"--gpus {gpus} is not a multiple of parallel.tensor x parallel.pipeline = {model_parallel}")
    return Layout(
        config.parallel.tensor,
        config.parallel.pipeline,
        gpus // model_parallel,
        config.train.zero_stage,
        config.sleep.checkpointing,
        config.train.micro_batch_size,
        config.train.grad_accumulation,
        _in_flight(config.parallel.pipeline_in_flight or config.parallel.pipeline, config.parallel.pipeline),
    )


def _in_flight(asked: int, pipeline: int) -> int:
    """Micro-batches in flight on a stage: without pipelining each micro-batch's backward ends before the
    next forward (1)."""
    return asked if pipeline > 1 else 1


def stage_ranges(model: ModelConfig, pipeline: int) -> list[range]:
    """The pattern's stages when its '|' marks make `pipeline` of them, else blocks split evenly."""
    if model.pattern.count("|") == pipeline - 1:
        return model.stage_ranges
    depth = len(model.blocks)
    bounds = [round(depth * i / pipeline) for i in range(pipeline + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(pipeline)]


def estimate(
    config: Config,
    layout: Layout,
    assumed: Assumptions,
    passes: int | None = None,
    budget: int | None = None,
    trace: bool = True,
) -> Estimate:
    """The estimate for `config` under `layout` at N = `passes` (default: `passes_for_memory`). A layout
    whose model states and reserve alone exceed the GPU memory cannot fit: its activations are not
    traced (`Estimate.traced` False, counted as 0); nor are they with `trace` False (its speed, which
    no activation changes, for the price of no trace). `budget`: the most ops the pipeline's
    simulation may take (`_pipeline_idle`; None: no limit, as the trainer)."""
    passes = passes or passes_for_memory(config.sleep)
    length = assumed.length
    sleep = config.sleep.model_copy(
        update={
            "passes": passes,
            "random_passes": None,
            "checkpoint": layout.checkpoint,
            "grad_passes": None if config.sleep.grad_passes is None else min(config.sleep.grad_passes, passes),
        }
    )
    stages = tuple(stage_ranges(config.model, layout.pipeline))
    precision = config.train.precision
    activation_bytes = 2 if precision == "bf16" else 4
    in_flight = min(layout.in_flight, layout.grad_accumulation) if layout.pipeline > 1 else 1
    run_config = config.model_copy(
        update={
            "train": config.train.model_copy(
                update={
                    "zero_stage": layout.zero_stage,
                    "micro_batch_size": layout.micro_batch,
                    "grad_accumulation": layout.grad_accumulation,
                }
            ),
            "parallel": config.parallel.model_copy(update={"tensor": layout.tensor, "pipeline": layout.pipeline}),
        }
    )
    settings = deepspeed_config(run_config)
    deepspeed_stage = settings["zero_optimization"]["stage"]  # 0 with Muon
    muon = config.optimizer.name == "muon"
    ns_steps = config.optimizer.muon_ns_steps
    states_per_stage = [
        muon_state_bytes(
            list(_stage_optimized(config.model, layout.tensor, stages, index)),
            layout.zero_stage,
            layout.data,
            layout.tensor,
            settings,
            ns_steps,
        )
        if muon
        else model_state_bytes(
            list(_stage_parameters(config.model, layout.tensor, stages, index)),
            layout.zero_stage,
            layout.data,
            settings,
        )
        for index in range(layout.pipeline)
    ]
    traced = trace and max(states.total for states in states_per_stage) + assumed.reserve <= assumed.gpu_memory
    if traced:
        activations = micro_batch_activations(
            tensor_parallel_shapes(config.model, layout.tensor),
            sleep,
            layout.micro_batch,
            length,
            list(stages),
            precision,
        )  # traces are cached in `activations`
        parts = (activations.saved, activations.held, activations.states)
        largest_unit = activations.largest_unit
    else:  # it cannot fit: no trace
        parts, largest_unit = ([0] * layout.pipeline,) * 3, 0
    per_stage = [
        (states.total + sum(in_flight * part[index] for part in parts), index)
        for index, states in enumerate(states_per_stage)
    ]
    _, stage = max(per_stage)
    states = states_per_stage[stage]
    saved, held, final = (in_flight * part[stage] for part in parts)

    plan = make_plan(sleep, layout.micro_batch, length, len(config.model.blocks), range(*config.model.loop_range))
    # A stage's tensor-parallel ranks reduce only for its own blocks: the whole model's bytes over the stages (the
    # splits hold about equal blocks; the embedding's and head's reductions, a small part, fall on the end stages).
    tensor = (
        _tensor_parallel_bytes(plan, config.model, layout.tensor, activation_bytes)
        * layout.grad_accumulation
        // layout.pipeline
    )
    pipeline = (
        max(_pipeline_bytes(plan, stages, config.model.hidden_size)) * layout.grad_accumulation
        if layout.pipeline > 1
        else 0
    )
    parameters = sum(_stage_parameters(config.model, layout.tensor, stages, stage))
    data = data_parallel_bytes(parameters, deepspeed_stage, layout.data) if layout.data > 1 else 0
    # Muon's collectives: each rank's (tensor, data) sent bytes; the busiest rank's sum, and its time
    sent = (
        muon_sent_bytes(
            list(_stage_optimized(config.model, layout.tensor, stages, stage)),
            layout.zero_stage,
            layout.data,
            layout.tensor,
            ns_steps,
        ).values()
        if muon
        else []
    )
    optimizer = max((sum(rank) for rank in sent), default=0)
    optimizer_seconds = max(
        (t / assumed.tensor_bandwidth + d / assumed.data_bandwidth for t, d in sent),
        default=0.0,
    )

    flops = _plan_flops(plan, config.model, sleep.window) * layout.grad_accumulation * layout.data
    idle, idle_simulated = (
        _pipeline_idle(
            tuple(traversals(plan, list(stages))), layout.pipeline, layout.grad_accumulation, in_flight, budget
        )
        if layout.pipeline > 1
        else (0.0, True)
    )
    compute = flops / layout.gpus / (assumed.mfu * assumed.peak_flops) / (1 - idle)
    communication = (
        tensor * all_reduce_wire_factor(layout.tensor) / assumed.tensor_bandwidth
        + data_parallel_wire_bytes(parameters, deepspeed_stage, layout.data) / assumed.data_bandwidth
        + optimizer_seconds
    )
    seconds = compute + communication
    tokens = layout.data * layout.grad_accumulation * layout.micro_batch * length
    return Estimate(
        layout,
        passes,
        stage,
        states.weights,
        states.gradients,
        states.optimizer,
        states.buffers,
        saved,
        held,
        final,
        largest_unit,
        assumed.reserve,
        tensor,
        pipeline,
        data,
        optimizer,
        flops,
        idle,
        compute,
        communication,
        seconds,
        tokens / seconds,
        int(assumed.gpu_memory),
        traced,
        idle_simulated,
    )


# What a search shares between layouts, each evaluated once per distinct argument: FLOPs and tensor-parallel bytes
# depend on the micro-batch's plan and the shard's shapes (not on ZeRO, the data ranks or the accumulation: a step's
# are its micro-batches' sum); the pipeline's bytes on the plan and the stages; its idle fraction on the traversals
# (not on the checkpointing form), the stages, micro-batches and in-flight count.
@functools.lru_cache(maxsize=256)
def _plan_flops(plan, model: ModelConfig, window: int) -> float:
    return plan_flops(plan, _meta_model(model), window)


@functools.lru_cache(maxsize=256)
def _tensor_parallel_bytes(plan, model: ModelConfig, tensor: int, activation_bytes: int) -> int:
    return tensor_parallel_bytes([plan], _meta_model(model), tensor, activation_bytes) if tensor > 1 else 0


@functools.lru_cache(maxsize=256)
def _pipeline_bytes(plan, stages: tuple[range, ...], hidden_size: int) -> list[int]:
    return pipeline_bytes([plan], list(stages), hidden_size, 4)


@functools.lru_cache(maxsize=16)
def _meta_model(model: ModelConfig):
    with torch.device("meta"):
        return HybridLM(model)


@functools.lru_cache(maxsize=256)
def _stage_parameters(model: ModelConfig, tensor: int, stages: tuple[range, ...], index: int) -> tuple[int, ...]:
    """Elements of each parameter the ranks of pipeline stage `index` hold, one tensor-parallel shard each."""
    return tuple(p.elements for p in _stage_optimized(model, tensor, stages, index))


@functools.lru_cache(maxsize=256)
def _stage_optimized(model: ModelConfig, tensor: int, stages: tuple[range, ...], index: int) -> tuple[Parameter, ...]:
    """The parameters the ranks of pipeline stage `index` hold, in module order (the optimizer's), as one
    tensor-parallel rank holds them: its shard's shape, the whole weight's (a dimension the shard cuts
    is T times the shard's) and whether Muon updates it (`is_hidden_matrix`, on the model's names)."""
    shard = _meta_model(tensor_parallel_shapes(model, tensor))
    whole = dict(_meta_model(model).named_parameters())
    modules = [(f"layers.{i}", shard.layers[i]) for i in stages[index]]
    if index == 0:
        modules.insert(0, ("embeddings", shard.embeddings))
    if index == len(stages) - 1:
        modules += [("norm", shard.norm)] + (
            [] if model.tie_embeddings and index == 0 else [("lm_head", shard.lm_head)]
        )
    found = []
    for prefix, module in modules:
        for name, p in module.named_parameters(prefix=prefix):
            shape = tuple(p.shape)
            cut = tuple(n * tensor if n != w else n for n, w in zip(shape, whole[name].shape))
            found.append(Parameter(shape, cut, is_hidden_matrix(name, p)))
    return tuple(found)


SEARCH_SIMULATED_OPS = 20_000  # the most ops one list schedule may start for a layout of a search (~0.1 s)


@functools.lru_cache(maxsize=256)
def _pipeline_idle(
    walks: tuple[Traversal, ...], stages: int, micro_batches: int, in_flight: int, budget: int | None
) -> tuple[float, bool]:
    """The idle fraction of the trainer's schedule of `micro_batches` micro-batches of `walks`
    (`simulate(build_schedule(...))`, computed exactly by `pipeline_schedule.idle_fraction`), and
    True; or, for a step too long to simulate within `budget` ops (deep pipelines with many
    micro-batches in flight: the trainer takes minutes to build such a schedule too), a lower
    bound (`idle_lower_bound`) and False."""
    found = idle_fraction(list(walks), micro_batches, stages, in_flight, budget=budget)
    if found is None:
        return idle_lower_bound(list(walks), micro_batches, stages), False
    return found, True


CHECKPOINT_FORMS = (*FORMS, "window")  # the `sleep.checkpoint` settings a search tries


def candidate_layouts(config: Config, gpus: int) -> list[Layout]:
    """Every layout of `gpus` GPUs that keeps the config's global batch (micro-batch x accumulation x
    data ranks, the data ranks being those of the config's own layout on `gpus`): tensor ranks that
    divide the heads (at most 8, one node), pipeline stages up to the depth, ZeRO 0-3 (3 without
    model parallelism, and not with Muon), each checkpointing form the layout allows (`window` not
    with pipelining) and, with pipelining, each count of micro-batches in flight of `in_flight_choices`."""
    model_parallel = config.parallel.tensor * config.parallel.pipeline
    global_batch = config.train.micro_batch_size * config.train.grad_accumulation * max(gpus // model_parallel, 1)
    found = []
    for tensor in _divisors(gpus):
        if tensor > 8 or config.model.tensor_parallel_problem(tensor):
            continue
        for pipeline in _divisors(gpus // tensor):
            if pipeline > len(config.model.blocks) or (pipeline > 1 and config.model.tie_embeddings):
                continue
            data = gpus // (tensor * pipeline)
            per_rank = global_batch // data
            if per_rank * data != global_batch or per_rank == 0:
                continue
            micro = min(config.train.micro_batch_size, per_rank)
            if per_rank % micro:
                continue
            accumulation = per_rank // micro
            for zero in (0, 1, 2, 3):
                if zero == 3 and (tensor > 1 or pipeline > 1 or config.optimizer.name == "muon"):
                    continue
                for checkpoint in CHECKPOINT_FORMS:
                    if checkpoint == "window" and pipeline > 1:
                        continue
                    for in_flight in in_flight_choices(config, pipeline, accumulation):
                        found.append(Layout(tensor, pipeline, data, zero, checkpoint, micro, accumulation, in_flight))
    return found


def in_flight_choices(config: Config, pipeline: int, micro_batches: int) -> list[int]:
    """Micro-batches in flight a search tries, most first: the pipeline's depth (the trainer's default), the
    config's `parallel.pipeline_in_flight`, half the depth and 1 (less activation memory, more idle time);
    none above the micro-batches of a step (the same schedule). 1 without pipelining."""
    if pipeline == 1:
        return [1]
    asked = {pipeline, pipeline // 2, 1, config.parallel.pipeline_in_flight or pipeline}
    return sorted({min(count, micro_batches) for count in asked}, reverse=True)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(config: Config, gpus: int, assumed: Assumptions) -> list[Estimate]:
    """Every candidate layout's estimate, those that fit first, fastest first, then least memory
    (those whose model states alone do not fit, untraced, last; those whose speed is only a bound,
    `Estimate.idle_simulated` False, after those with a simulated one)."""
    found = [
        estimate(config, layout, assumed, budget=SEARCH_SIMULATED_OPS) for layout in candidate_layouts(config, gpus)
    ]
    return sorted(found, key=lambda e: (not e.fits, not e.traced, not e.idle_simulated, -e.tokens_per_second, e.total))


LARGEST_PASSES = 128  # how far `largest_passes` looks (each N is a trace of N passes)


def largest_passes(config: Config, layout: Layout, assumed: Assumptions, limit: int = LARGEST_PASSES) -> int:
    """The largest N whose step fits under `layout` (0: not even N = 1; `limit` if that fits)."""
    fits = lambda n: estimate(config, layout, assumed, passes=n).fits  # noqa: E731
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    if high > limit:
        return limit if fits(limit) else _bisect(fits, low, limit)
    return _bisect(fits, low, high)


def _bisect(fits, low: int, high: int) -> int:
    """The largest n in [low, high) that fits, given fits(low) and not fits(high)."""
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


SMALLEST_GPUS = 4096  # how far `smallest_gpus` looks


def smallest_gpus(config: Config, assumed: Assumptions, limit: int = SMALLEST_GPUS) -> Estimate | None:
    """The fastest fitting layout at the smallest GPU count (powers of two) that has one."""
    gpus = 1
    while gpus <= limit:
        found = search(config, gpus, assumed)
        if found and found[0].fits:
            return found[0]
        gpus *= 2
    return None


def advice(config: Config, best: Estimate, assumed: Assumptions) -> str:
    """One line for a layout that does not fit: by how much, and which single change makes it fit (the
    fastest of those that do): another checkpointing form, fewer micro-batches in flight, truncated
    backpropagation, a smaller micro-batch or more ZeRO sharding."""
    over = best.total - best.gpu_memory
    layout = best.layout
    levers = [
        (f"sleep.checkpoint={form}", dataclasses.replace(layout, checkpoint=form), config)
        for form in CHECKPOINT_FORMS
        if form != layout.checkpoint and not (form == "window" and layout.pipeline > 1)
    ]
    levers += [
        (f"parallel.pipeline_in_flight={count}", dataclasses.replace(layout, in_flight=count), config)
        for count in in_flight_choices(config, layout.pipeline, layout.grad_accumulation)
        if count < min(layout.in_flight, layout.grad_accumulation)
    ]
    if best.passes > 1 and config.sleep.grad_passes is None:
        levers.append(
            (
                "sleep.grad_passes=1",
                layout,
                config.model_copy(update={"sleep": config.sleep.model_copy(update={"grad_passes": 1})}),
            )
        )
    if layout.micro_batch > 1:
        half = layout.micro_batch // 2
        levers.append(
            (
                f"train.micro_batch_size={half} "
                f"(grad_accumulation={layout.grad_accumulation * layout.micro_batch // half})",
                dataclasses.replace(
                    layout, micro_batch=half, grad_accumulation=layout.grad_accumulation * layout.micro_batch // half
                ),
                config,
            )
        )
    if layout.data > 1:
        no_zero3 = layout.tensor * layout.pipeline > 1 or config.optimizer.name == "muon"
        for zero in range(layout.zero_stage + 1, 3 if no_zero3 else 4):
            levers.append((f"train.zero_stage={zero}", dataclasses.replace(layout, zero_stage=zero), config))
    # Fastest first (speed needs no trace): the first lever that fits is the answer, and the slower ones
    # are not traced. Only when none fits are they all traced, to name the one that saves the most. (Not
    # under Muon, whose collectives' time is the most loaded stage's, which the activations choose.)
    levers.sort(key=lambda lever: -estimate(lever[2], lever[1], assumed, trace=False).tokens_per_second)
    first_fit_is_fastest = config.optimizer.name != "muon"
    tried = []
    for name, candidate, changed in levers:
        found = estimate(changed, candidate, assumed)
        if found.traced:  # an untraced total leaves out the activations: no measure of what the lever saves
            tried.append((not found.fits, -found.tokens_per_second, found.total, name))
            if found.fits and first_fit_is_fastest:
                break
    fitting = sorted(t for t in tried if not t[0])
    where = f" (pipeline stage {best.stage})" if layout.pipeline > 1 else ""
    needs = "" if best.traced else "for model states and reserve alone "
    head = (
        f"does not fit: {layout.describe()} at N={best.passes} needs {needs}{best.total / GB:.1f} GB per GPU{where}, "
        f"{over / GB:.1f} GB more than {best.gpu_memory / GB:.0f} GB"
    )
    if fitting:
        _, speed, total, name = fitting[0]
        return f"{head}; {name} makes it fit ({total / GB:.1f} GB, {-speed:,.0f} tokens/s)"
    if tried:
        _, _, total, name = min(tried, key=lambda t: t[2])
        return (
            f"{head}; no single setting makes it fit (the most memory is saved by {name}: {total / GB:.1f} GB); "
            f"add GPUs for more tensor, pipeline or ZeRO sharding (sleepscale plan --search, --smallest-gpus)"
        )
    return f"{head}; add GPUs for more tensor, pipeline or ZeRO sharding (sleepscale plan --search, --smallest-gpus)"
