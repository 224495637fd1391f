"""Model-state memory of one rank under DeepSpeed: weights, gradients, optimizer states and
DeepSpeed's own buffers, at ZeRO stage 0, 1, 2 or 3, from the parameter sizes and the run's
DeepSpeed settings (`sleepscale.parallel.zero.deepspeed_config`).

Every tensor is float32 (4 bytes an element): the project trains float32 weights, gradients and
AdamW state whatever `train.precision` (bf16 is autocast over a float32 engine; DeepSpeed's bf16 is
off), so DeepSpeed's "bit16" tensors are float32 too, and its gradient-accumulation and
communication dtypes are float32. The optimizer is torch's AdamW (`sleepscale.train.optim`), two
states per element (exp_avg, exp_avg_sq), or our Muon (below).

Each field is that category's largest size during a training step (from the second on, when the
optimizer states exist); `total`, their sum, bounds what model states take at any one moment. The
peaks coincide at ZeRO-0 and 1 (in the gradients' reduction at the end of backward); at ZeRO-2 and 3
gradients peak in the optimizer step, once the reduce bucket is freed (2) or the gathered parameters
released (3), so the bound is loose by those gradients. `tests/test_planner_model_states.py` checks
every field against a census of a real engine's tensors. What DeepSpeed allocates, per stage (paths
under `deepspeed/runtime/`):

ZeRO-0 (`engine.py`, no ZeRO optimizer: the engine steps the torch optimizer itself)
  weights    the module's parameters, 4 N.
  gradients  `param.grad` of every parameter, 4 N, from backward until the step's zero_grad.
  optimizer  exp_avg and exp_avg_sq, 8 N (`torch.optim.AdamW`, created at the first step).
  buffers    `DeepSpeedEngine.allreduce_gradients` -> `buffered_allreduce_fallback` ->
             `allreduce_no_retain` flattens the gradients into one contiguous copy per bucket
             (`allreduce_bucket`: `flatten`) to all-reduce them; a bucket is closed once it passes
             MEMORY_OPT_ALLREDUCE_SIZE (5e8) elements, so the copy is min(N, 5e8 + a parameter).

ZeRO-1 and 2 (`zero/stage_1_and_2.py`, `DeepSpeedZeroOptimizer`)
  weights    `__init__` flattens each optimizer param group into `bit16_groups_flat`
             (`flatten_dense_tensors_aligned`), padded to a multiple of
             nccl_start_alignment_factor (2) x data_parallel elements, and points the parameters
             at slices of it (`_update_model_bit16_weights`): 4 A, A = N rounded up to 2 dp.
  optimizer  `single_partition_of_fp32_groups`: a float32 clone of this rank's partition (the
             master weights: `.detach().clone().to(...)`, a copy even when the weights are float32),
             which the torch optimizer updates, plus its exp_avg and exp_avg_sq:
             4 A/dp + 8 A/dp.
  gradients  `reduce_independent_p_g_buckets_and_remove_grads` moves each reduced gradient into
             the bucket, and `copy_grads_in_partition` copies those of the parameters that overlap
             this rank's partition, whole, into `grads_in_partition` (4 x their sizes, G);
             `step` then flattens this rank's slice into a new flat partition
             (`flatten(averaged_gradients)`, 4 A/dp) before `grads_in_partition` is released
             (`free_grad_in_param_list`): 4 G + 4 A/dp. ZeRO-1 reduces only once backward is
             over (`reduce_gradients`, from the engine's `allreduce_gradients`), so before that
             every parameter holds its whole gradient: max(4 N, 4 G + 4 A/dp).
  buffers    the reduce bucket (`setup_buckets`, at the first gradient hook of each backward, when
             contiguous_gradients): reduce_bucket_size elements, two with overlap_comm, freed by
             `_release_ipg_buffers` at the end of backward. DeepSpeed's default reduce_bucket_size
             is 5e8 elements: 2 GB in float32, whatever the model's size.

ZeRO-3 (`zero/stage3.py`, `DeepSpeedZeroOptimizer_Stage3`; `zero/partition_parameters.py`)
  weights    `zero.Init` partitions each parameter over the data-parallel ranks, padded to a multiple
             of dp (`_padding_size`): P = sum ceil(n / dp); `_create_fp16_partitions_with_defragmentation`
             moves the partitions into one flat `lp_param_buffer`: 4 P.
  optimizer  `_create_fp32_partitions`: a float32 master copy of the partitions (`.clone()`), 4 P,
             and exp_avg and exp_avg_sq, 8 P. It means to share `lp_param_buffer` when that is
             float32 on the optimizer's device already, but compares a torch.device with the device
             name, a string (`tensor.device == self.device`), which is never equal: it always copies.
  gradients  `_setup_for_real_optimizer` allocates `grad_partitions_flat_buffer`, 4 P, that the
             reduce-scattered gradients accumulate into (`partition_grads`), for the whole run;
             `_prepare_fp32_grad_for_sub_group` flattens them again into the float32 gradient the
             optimizer reads, 4 P, during the step: 8 P.
  buffers    the reduce bucket (`_setup_for_real_optimizer`, when contiguous_gradients): one
             reduce_bucket_size elements (ZeRO-3 does not double it for overlap_comm), allocated once
             and kept; plus the gathered parameters (`partitioned_param_coordinator.py`): a module's
             parameters are all-gathered whole before it runs and released after, unless used again
             within stage3_max_reuse_distance elements, and up to stage3_prefetch_bucket_size
             elements are gathered ahead: at most min(N, reuse distance + prefetch bucket + the
             largest parameter) elements at once.

Muon (`optimizer.name: muon`, `sleepscale.train.muon`; `muon_state_bytes`): DeepSpeed runs at its
stage 0 whatever `train.zero_stage` says, so weights, gradients and the all-reduce's flat copy are
ZeRO-0's above, at every data-parallel size. The optimizer is our `Muon`, with no master copy:
  optimizer  one float32 momentum (`momentum_buffer`) per element of each Muon matrix (the 2-D hidden
             matrices, `sleepscale.train.optim.is_hidden_matrix`; under tensor parallelism each rank's
             momentum is shaped like its shard) and exp_avg and exp_avg_sq (2 per element) of every
             other parameter (AdamW's; its `step` is a Python int). At `train.zero_stage` 0 every
             data rank holds all of it: 4 (M + 2 A), M the Muon and A the AdamW elements of the rank.
             At 1 and 2 (the same for Muon: DeepSpeed reduces whole gradients either way) a data rank
             holds the state of the parameters it owns only, from the optimizer's own balanced
             assignment (`sleepscale.train.muon.assign`, from shapes alone, so exactly the trainer's
             owners): 4 x the largest data rank's elements, about 4 (M + 2 A) / D.
  buffers    besides the all-reduce's flat copy (freed before the step), the step's own tensors,
             which never coexist with it: the largest of its three phases (`_muon_step_phases`). On
             data rank d, tensor rank t (`Muon._muon_step`) every momentum held is updated in place,
             and only d's own matrices ("mine", in the optimizer's order) get a Nesterov input: this
             rank's shard, s elements (s = W, the whole matrix's, unless it is split over T > 1 tensor
             ranks), which goes whole to the matrix's Newton-Schulz owner t_p. H: the W of each of
             mine that t owns (its whole input, then its update: one of the two at a time, but for
             the matrix being orthogonalised).
             - gathers, matrix by matrix: the wholes gathered on t so far plus, on t_p of a split
               matrix, its shard, the T gathered pieces and their `torch.cat` (s + 2 W, as the cat
               returns); otherwise the input (s: kept as the whole on t_p, freed once sent elsewhere).
             - Newton-Schulz, on t_p, as `newton_schulz` returns: H + W (the matrix's whole input,
               still referenced, and its update); at most H + the largest W that t owns.
             - scatters, matrix by matrix: the updates not yet applied (the one scattered among them),
               the previous matrix's update (s: the loop's variable keeps it while the next
               arrives) and, under T > 1, the arriving shard (s) plus, on t_p of a matrix split along
               its columns, the contiguous copies of the update's pieces (W; a split by rows scatters
               views of the update).
             Then each data rank's updated weights are broadcast one flat buffer after the other
             (`Muon._share_updated`): every rank flattens each buffer while the previous one is still
             held (by the views it was copied out of), so two consecutive owners' buffers at once.
             Exact for the tensors Python holds (by census, per rank: `tests/test_planner_model_states.py`
             at T = 1, and per phase `tests/test_planner_communication.py` at TP2, DP2 and TP2 x DP2);
             left out: Newton-Schulz's working tensors (a few of one matrix and of its short side
             squared, in `optimizer.muon_ns_dtype`) and AdamW's per-parameter temporaries.

Left out: a 4-byte `step` tensor per optimized tensor; bookkeeping tensors of a few bytes (the
overflow flag, norms); the straddling of partitions by optimizer param groups (ZeRO-1/2 flatten the
weight-decay and no-decay groups separately, each padded, which shifts partition boundaries by a few
parameters: the formula flattens all parameters as one group in the order given); torch's foreach
AdamW on a GPU, which allocates temporaries of the size of the tensors it steps (on the CPU it steps
one tensor at a time); ZeRO-1/2's all-gather of the updated partitions, which writes into the flat
weights; the allocator's rounding and fragmentation; and every CPU/NVMe offload option.
"""

from __future__ import annotations

import dataclasses
import math

from sleepscale.train.muon import Assignment, assign

FLOAT32 = 4
MUON_NS_STEPS = 5  # `optimizer.muon_ns_steps`' default (it scales every cost alike: no owner depends on it)
# DeepSpeed's defaults for what `deepspeed_config` leaves unset (deepspeed/runtime/zero/config.py
# and, for ZeRO-0's all-reduce bucket, engine.py's MEMORY_OPT_ALLREDUCE_SIZE).
REDUCE_BUCKET_SIZE = 500_000_000
PREFETCH_BUCKET_SIZE = 50_000_000
MAX_REUSE_DISTANCE = 1_000_000_000
ALLREDUCE_BUCKET_SIZE = 500_000_000
NCCL_START_ALIGNMENT_FACTOR = 2


@dataclasses.dataclass(frozen=True)
class ModelStateBytes:
    """Bytes one rank holds, each category at its largest during a step (see the module's docstring)."""

    weights: int  # the parameters as this rank keeps them (ZeRO-3: its partitions)
    gradients: int
    optimizer: int  # AdamW's exp_avg and exp_avg_sq (and Muon's momentum), plus DeepSpeed's master partition if any
    buffers: int  # DeepSpeed's reduce buckets and flattened copies; ZeRO-3's gathered parameters; Muon's step's

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.buffers


def model_state_bytes(
    parameter_sizes: list[int], zero_stage: int, data_parallel: int, settings: dict
) -> ModelStateBytes:
    """`parameter_sizes`: the numel of every trainable parameter this rank's model holds before ZeRO
    (after tensor or pipeline cuts), in module order; `settings`: the run's DeepSpeed settings
    (`deepspeed_config`), whose zero_optimization options, or DeepSpeed's defaults, size the buffers."""
    zero = settings.get("zero_optimization", {})
    if zero.get("stage", zero_stage) != zero_stage:
        raise ValueError(f"zero_stage {zero_stage} but the settings say {zero['stage']}")
    total = sum(parameter_sizes)
    bucket = int(zero.get("reduce_bucket_size", REDUCE_BUCKET_SIZE))
    contiguous = zero.get("contiguous_gradients", True)
    if zero_stage == 0:
        return ModelStateBytes(
            weights=FLOAT32 * total,
            gradients=FLOAT32 * total,
            optimizer=2 * FLOAT32 * total,
            buffers=FLOAT32 * _largest_allreduce_bucket(parameter_sizes),
        )
    if zero_stage in (1, 2):
        overlap = zero.get("overlap_comm", False)  # DeepSpeed's default is on at ZeRO-3 only
        flat = _round_up(total, NCCL_START_ALIGNMENT_FACTOR * data_parallel)
        partition = flat // data_parallel
        overlapping = _largest_overlapping(parameter_sizes, partition, data_parallel)
        gradients = overlapping + partition
        if zero_stage == 1:
            gradients = max(total, gradients)
        return ModelStateBytes(
            weights=FLOAT32 * flat,
            gradients=FLOAT32 * gradients,
            optimizer=3 * FLOAT32 * partition,
            buffers=FLOAT32 * bucket * (2 if overlap else 1) if contiguous else 0,
        )
    if zero_stage == 3:
        partition = sum(math.ceil(size / data_parallel) for size in parameter_sizes)
        reach = (
            int(zero.get("stage3_max_reuse_distance", MAX_REUSE_DISTANCE))
            + int(zero.get("stage3_prefetch_bucket_size", PREFETCH_BUCKET_SIZE))
            + max(parameter_sizes, default=0)
        )
        gathered = min(total, reach)
        return ModelStateBytes(
            weights=FLOAT32 * partition,
            gradients=2 * FLOAT32 * partition,
            optimizer=3 * FLOAT32 * partition,
            buffers=FLOAT32 * ((bucket if contiguous else 0) + gathered),
        )
    raise ValueError(f"zero_stage must be 0, 1, 2 or 3, not {zero_stage}")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _largest_allreduce_bucket(parameter_sizes: list[int]) -> int:
    """The largest flat copy ZeRO-0's all-reduce makes: `allreduce_no_retain` closes a bucket once
    its elements pass the bucket size."""
    largest = elements = 0
    for size in parameter_sizes:
        elements += size
        if elements > ALLREDUCE_BUCKET_SIZE:
            largest, elements = max(largest, elements), 0
    return max(largest, elements)


def _largest_overlapping(parameter_sizes: list[int], partition: int, data_parallel: int) -> int:
    """Over the ranks, the most elements of the parameters (whole) that overlap a rank's partition
    of the flat buffer: what `copy_grads_in_partition` copies into `grads_in_partition`."""
    overlapping = [0] * data_parallel
    start = 0
    for size in parameter_sizes:
        end = start + size
        if size:
            for rank in range(start // partition, min(data_parallel, -(-end // partition))):
                overlapping[rank] += size
        start = end
    return max(overlapping)


@dataclasses.dataclass(frozen=True)
class Parameter:
    """A trainable parameter as one rank holds it, in the optimizer's order (`muon_state_bytes`)."""

    shape: tuple[int, ...]  # this rank's (its tensor-parallel shard's)
    whole: tuple[int, ...]  # of the weight it is a shard of: `shape` unless split over the tensor ranks
    muon: bool  # a Muon matrix (`sleepscale.train.optim.is_hidden_matrix`); else AdamW updates it

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def split(self) -> bool:
        return self.shape != self.whole

    @property
    def split_columns(self) -> bool:
        """Split along a later dimension than the first (megatron's row-parallel layers): its pieces of a
        whole tensor are not contiguous."""
        return self.split and self.shape[0] == self.whole[0]


def muon_assignment(
    parameters: list[Parameter], data_parallel: int, tensor_parallel: int, ns_steps: int = MUON_NS_STEPS
) -> Assignment:
    """`Muon`'s owners for these parameters (`sleepscale.train.muon.assign`): `matrices` in the order of
    the Muon matrices among `parameters`, `adam` in that of the others."""
    return assign(
        [(p.whole, p.elements) for p in parameters if p.muon],
        [p.elements for p in parameters if not p.muon],
        data_parallel,
        tensor_parallel,
        ns_steps,
    )


def muon_owners(
    parameters: list[Parameter], data_parallel: int, tensor_parallel: int, ns_steps: int = MUON_NS_STEPS
) -> list[tuple[int, int]]:
    """Each parameter's owner, in `parameters`' order: (data rank, tensor rank) of a Muon matrix's
    Newton-Schulz, (data rank, None) for an AdamW parameter."""
    found = muon_assignment(parameters, data_parallel, tensor_parallel, ns_steps)
    matrices, adam = iter(found.matrices), iter(found.adam)
    return [next(matrices) if p.muon else (next(adam), None) for p in parameters]


def muon_state_bytes(
    parameters: list[Parameter],
    zero_stage: int,
    data_parallel: int,
    tensor_parallel: int,
    settings: dict,
    ns_steps: int = MUON_NS_STEPS,
) -> ModelStateBytes:
    """`model_state_bytes` with our Muon as the optimizer (see the module's docstring), each category on
    the rank that holds the most. `zero_stage`: `train.zero_stage` (0, 1 or 2; DeepSpeed runs its stage
    0, which `settings`, the run's `deepspeed_config`, must say); `parameters`: this rank's trainable
    parameters, in module order."""
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2 with Muon, not {zero_stage}")
    deepspeed = model_state_bytes([p.elements for p in parameters], 0, data_parallel, settings)
    shard_state = zero_stage > 0
    owners = muon_owners(parameters, data_parallel, tensor_parallel, ns_steps)
    if shard_state:
        state = max(muon_assignment(parameters, data_parallel, tensor_parallel, ns_steps).state)
    else:
        state = sum(p.elements * (1 if p.muon else 2) for p in parameters)
    temporaries = max(
        _muon_step_elements(parameters, owners, data, tensor, tensor_parallel)
        for data in range(data_parallel)
        for tensor in range(tensor_parallel)
    )
    shared = _shared_elements(parameters, owners, data_parallel, shard_state)
    flats = max((a + b for a, b in zip([0, *shared], shared)), default=0)  # a buffer and the one before it
    return dataclasses.replace(
        deepspeed,
        optimizer=FLOAT32 * state,
        buffers=max(deepspeed.buffers, FLOAT32 * temporaries, FLOAT32 * flats),
    )


def _muon_step_elements(
    parameters: list[Parameter], owners: list[tuple[int, int | None]], data: int, tensor: int, tensor_parallel: int
) -> int:
    """Float32 elements Muon's step holds at its largest on rank (data, tensor), beyond the weights,
    gradients and momentum: the largest of its phases' (`_muon_step_phases`)."""
    return max(_muon_step_phases(parameters, owners, data, tensor, tensor_parallel).values())


def _muon_step_phases(
    parameters: list[Parameter], owners: list[tuple[int, int | None]], data: int, tensor: int, tensor_parallel: int
) -> dict[str, int]:
    """The most float32 elements each phase of Muon's step holds on rank (data, tensor) beyond the
    weights, gradients and momentum: "gathers", "newton_schulz", "scatters" (see the module's
    docstring). The same at every `train.zero_stage`: only the matrices this data rank owns get a
    Nesterov input."""
    mine = [(p, math.prod(p.whole), t == tensor) for p, (d, t) in zip(parameters, owners) if p.muon and d == data]
    split = tensor_parallel > 1
    held = sum(whole for _, whole, here in mine if here)  # each a whole input, then an update
    gathers = gathered = 0
    for p, whole, here in mine:
        if here and split and p.split:  # the shard, the gathered pieces and their concatenation
            gathers = max(gathers, gathered + p.elements + 2 * whole)
        else:  # the input: kept on its owner, sent and freed elsewhere
            gathers = max(gathers, gathered + p.elements)
        gathered += whole if here else 0
    newton_schulz = held + max((whole for _, whole, here in mine if here), default=0)
    scatters, previous, waiting = 0, 0, held
    for p, whole, here in mine:
        arriving = p.elements + (whole if here and p.split_columns else 0) if split else 0
        scatters = max(scatters, waiting + previous + arriving)
        waiting -= whole if here else 0
        previous = p.elements  # the update just applied, kept by the loop's variable
    return {"gathers": gathers, "newton_schulz": newton_schulz, "scatters": scatters}


def _shared_elements(
    parameters: list[Parameter], owners: list[tuple[int, int | None]], data_parallel: int, shard_state: bool
) -> list[int]:
    """Elements of each data rank's flat buffer of updated weights (`Muon._share_updated`), on each of its
    tensor ranks, for the data ranks that have one; [] with one data rank (nothing is shared)."""
    if data_parallel == 1:
        return []
    shared = [0] * data_parallel
    for p, (data, _) in zip(parameters, owners):
        if p.muon or shard_state:
            shared[data] += p.elements
    return [elements for elements in shared if elements]
