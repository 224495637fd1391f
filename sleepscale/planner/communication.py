"""Communication of a training step, per rank, counted from its sleep plans (`sleepscale.plan`).

Bytes here are payload: the bytes of the tensors this rank hands to a collective or sends, once per
call (an all-reduce's tensor; an all-gather's or reduce-scatter's input, this rank's contribution;
a point-to-point send's tensor). They are not the bytes a ring algorithm puts on the wire: per rank
that is 2 (T-1)/T times the payload for an all-reduce over T ranks (`all_reduce_wire_factor`),
(T-1)/T for a reduce-scatter (of its input), T-1 for an all-gather (of its input), 1 for a send.

Tensor parallelism (`sleepscale.parallel.tensor`), T > 1: all-reduces only, over the tensor-parallel
group, whose payloads do not depend on T. With A = B L H elements of one [batch, window, hidden]
activation and L the window's length:

- forward: per window, the vocab-parallel embedding's all-reduce (A) and the vocab-parallel
  cross-entropy's three [B, L] all-reduces (maximum, target logit, sum of exponentials); per block
  run, one all-reduce (A) after each row-parallel layer (the mixer's o_proj, the MLP's down_proj);
- backward, only where autograd runs (`sleepscale.flops.liveness`: passes with gradient, and in
  them the runs with an output that reaches the loss): per block run, one all-reduce (A) of the
  mixer's input gradient, and one of the MLP's when the block's hidden output is live; per window
  one of the head's input gradient (A); per backward call (one per micro-batch, as the trainer runs
  them without pipelining; `run_step` makes one per op) one sum of each per-head norm's weight
  gradient (GDN's o_norm, attention's q_norm and k_norm; a hook on the parameter, which fires once
  per call): every block's wake pass reaches the loss, so each gets one;
- recomputation re-runs forward all-reduces: non-reentrant checkpointing re-runs a unit (the plan's:
  `PassPlan.checkpoint_units`, `WindowPlan.is_checkpoint_unit`) up to the last tensor its forward
  saved for backward. Megatron's row-parallel matmul (an autograd Function) saves its inputs as it
  returns and the all-reduce after it saves nothing, so a unit ending on a block's last row-parallel
  layer re-runs that matmul but not its all-reduce (measured). Per pass with gradient, in the runs
  `sleepscale.flops.recomputed_runs` gives: under `pass`, every unit with a live output re-runs its
  all-reduces but the last; under `block`, every block reached re-runs its own but the last (the
  mixer's o_proj one when it has an MLP); under `nested`, every range reached re-runs all those of
  its blocks but the last, then each block reached as under `block`. Under `selective`, none:
  torch's selective checkpointing keeps the row-parallel matmul's output and megatron's all-reduce
  of it (`sleepscale.model.recompute._KEPT`), and recomputation takes both from its cache, sending
  nothing (measured where the collectives reach the process group). Under `window`, the whole
  window (embedding, passes without gradient, the cross-entropy) is re-run, and the last all-reduce
  too unless the window ends on it (`WindowPlan.ends_on_matmul`: it has sleep passes, no bound after
  the last and no per-sequence choice of sleepers);
- a window whose logits exceed `sleepscale.sleep.LOSS_CHUNK_ELEMENTS` gets its loss in checkpointed
  token chunks: each chunk's cross-entropy (and its three all-reduces) is re-run in backward, and
  under `window` checkpointing once more, in the window's recomputation (nested checkpoints), but
  for the last chunk of a window without sleep passes: that recomputation stops before it, the
  chunk's checkpoint saving only its inputs. Chunking changes no other byte: chunks split the
  head's and cross-entropy's tensors by tokens.

Element sizes: parameters, gradients and what is not a matmul's output are float32 (4 bytes); under
`train.precision: bf16` (autocast over float32 parameters, `sleepscale.model.precision.precision_context`)
the matmul outputs are bf16, and so are two kinds of reduced tensor: the row-parallel outputs
reduced in forward, and the head's input gradient, which megatron's column-parallel layer
all-reduces inside its backward, straight from its bf16 matmul (`activation_bytes`). The mixer's and
MLP's input gradients are reduced after autograd has summed their projections' gradients into the
float32 input (the copy-to-tensor-parallel region's backward), the embedding's output is float32
(a lookup), and the cross-entropy computes in float32: those stay 4 bytes.
Assumed: a training step (`return_logits=False`, so no vocabulary gather) from fresh states.

Pipeline parallelism (`sleepscale.parallel.pipeline.run_step`): each traversal
(`sleepscale.parallel.pipeline_schedule.traversals`) sends its hidden states [B, L, H] forward at
every stage boundary it crosses, and from the stage where its source traversal ended when that is
not its first stage (a sleep pass looping back); a traversal with gradient sends a gradient back
over each boundary it crossed, and over the loop-back too when its source traversal has gradient.

Data parallelism over D ranks, P parameters (`data_parallel_bytes`), from DeepSpeed's ZeRO. With
`optimizer.name: muon` DeepSpeed runs at its stage 0 whatever `train.zero_stage` says (its gradient
all-reduce, P, `sleepscale.parallel.zero.deepspeed_zero_stage`), and our Muon adds its own
collectives inside the optimizer step (`muon_sent_bytes`).
"""

from __future__ import annotations

from torch import nn

from sleepscale import sleep as engine
from sleepscale.flops import Live, gdn_blocks, liveness, recomputed_runs, window_shape
from sleepscale.model.attention import Attention
from sleepscale.parallel.pipeline_schedule import traversals
from sleepscale.plan import SleepPlan, WindowPlan
from sleepscale.planner.model_states import MUON_NS_STEPS, Parameter, muon_owners

FLOAT32 = 4


def all_reduce_wire_factor(size: int) -> float:
    """Bytes a ring all-reduce over `size` ranks puts on the wire per rank, per payload byte."""
    return 2 * (size - 1) / size


def tensor_parallel_bytes(plans: list[SleepPlan], model: nn.Module, tensor: int, activation_bytes: int = 4) -> int:
    """Payload bytes this rank passes to all-reduce (and other collectives) over the tensor-parallel
    group in one training step's forward, backward and recomputation of these micro-batches' sleep
    plans. `model`: the unsharded model (meta device is fine: only shapes are read; `HybridLM(config.model)`
    under `torch.device('meta')`); `activation_bytes`: element size of the reduced matmul outputs
    (4 fp32; 2 under bf16 autocast, see the module docstring)."""
    return sum(tensor_parallel_phases(plans, model, tensor, activation_bytes))


def tensor_parallel_phases(
    plans: list[SleepPlan], model: nn.Module, tensor: int, activation_bytes: int = 4
) -> tuple[int, int]:
    """`tensor_parallel_bytes` split into (forward, backward with its recomputation)."""
    if tensor == 1:
        return 0, 0
    blocks = _Blocks(model)
    forward = backward = 0
    counted = {}  # per shape of window (and batch): its bytes, counted once
    for plan in plans:
        backward += blocks.head_norm_bytes
        for window in plan.windows:
            shape = (plan.batch, plan.loop, window_shape(window))
            if shape not in counted:
                counted[shape] = _window(plan, window, blocks, activation_bytes)
            forward, backward = forward + counted[shape][0], backward + counted[shape][1]
    return forward, backward


class _Blocks:
    """What the count reads of the model, taken from it once (walking its modules for every block
    run would dominate the planner's time at large N)."""

    def __init__(self, model: nn.Module):
        layers = list(model.layers)
        self.hidden_size, self.vocab_size = model.config.hidden_size, model.config.vocab_size
        self.gdn = gdn_blocks(model)
        self.mlp = [block.mlp is not None for block in layers]
        self.row_parallel = [1 + mlp for mlp in self.mlp]  # the mixer's o_proj, and the MLP's down_proj
        # per backward call: each per-head norm's weight gradient, summed over the group
        norms = [norm for block in layers for norm in _head_norms(block.attn)]
        self.head_norm_bytes = FLOAT32 * sum(norm.weight.numel() for norm in norms)

    def input_gradients(self, block: int, live: Live) -> int:
        """Input-gradient all-reduces of one block run's backward: the mixer's when any output is live,
        the MLP's when the hidden output is."""
        return bool(live) + (live.hidden and self.mlp[block])


def _head_norms(mixer: nn.Module) -> list[nn.Module]:
    """Replicated norms applied per head, whose weight gradients are summed over the group."""
    if isinstance(mixer, Attention):
        return [mixer.q_norm, mixer.k_norm] if mixer.q_norm is not None else []
    return [mixer.o_norm]


def _window(plan: SleepPlan, window: WindowPlan, blocks: _Blocks, activation_bytes: int) -> tuple[int, int]:
    """(forward, backward with recomputation) bytes of one window."""
    tokens = plan.batch * window.length
    activation = tokens * blocks.hidden_size
    reduced = activation_bytes * activation  # one row-parallel all-reduce, or the head's input gradient
    loss = 3 * FLOAT32 * tokens
    live = liveness(plan, window, blocks.gdn)
    forward, backward, recompute = FLOAT32 * activation + loss, reduced, 0
    for planned in window.passes:
        lives = live[planned.number]
        for unit in planned.block_ranges:
            forward += reduced * sum(blocks.row_parallel[i] for i in unit)
            if planned.grad:
                backward += FLOAT32 * activation * sum(blocks.input_gradients(i, lives[i]) for i in unit)
        for run, stops_early in recomputed_runs(planned, lives):  # early stop spares the run's last all-reduce
            recompute += reduced * (sum(blocks.row_parallel[i] for i in run) - stops_early)
    last_chunk = _last_loss_chunk(plan, window, blocks.vocab_size)
    if window.is_checkpoint_unit:
        recompute += forward - _not_recomputed(window, reduced, 3 * FLOAT32 * plan.batch * last_chunk)
    recompute += loss if last_chunk else 0  # each chunk's own recomputation
    return forward, backward + recompute


def _last_loss_chunk(plan: SleepPlan, window: WindowPlan, vocab_size: int) -> int:
    """Tokens of the last of the checkpointed token chunks the window's loss is computed in
    (`sleepscale.sleep.head_and_loss`); 0 when it is computed at once."""
    chunk = engine.loss_chunk_length(plan.batch, window.length, vocab_size)
    return 0 if chunk is None else (window.length - 1) % chunk + 1


def _not_recomputed(window: WindowPlan, reduced: int, last_chunk_loss: int) -> int:
    """Bytes at the end of a window's forward that its recomputation stops before, nothing after
    them saving a tensor for backward: the last sleep pass's final row-parallel all-reduce when the
    window ends on its matmul (`WindowPlan.ends_on_matmul`: no bound or per-sequence choice of
    sleepers after it), or without sleep passes the last loss chunk, a checkpoint of its own
    (`last_chunk_loss`: its cross-entropy's bytes, 0 when the loss is not chunked; unchunked, the
    loss saves tensors to its end)."""
    if len(window.passes) == 1:
        return last_chunk_loss
    return reduced if window.ends_on_matmul else 0


def pipeline_bytes(
    plans: list[SleepPlan], stages: list[range], hidden_size: int, activation_bytes: int = 4
) -> list[int]:
    """Bytes each pipeline stage sends (hidden states forward, their gradients backward) in one
    training step of these micro-batches' plans, with blocks split into `stages`."""
    sent = [0] * len(stages)
    for plan in plans:
        walks = traversals(plan, stages)
        for walk in walks:
            size = activation_bytes * plan.batch * plan.windows[walk.window].length * hidden_size
            for stage in range(walk.first, walk.last):
                sent[stage] += size  # forward to stage + 1
                sent[stage + 1] += size if walk.grad else 0  # and its gradient back
            if walk.source is not None and walk.source[1] != walk.first:  # a sleep pass loops back
                sent[walk.source[1]] += size
                sent[walk.first] += size if walk.grad and walks[walk.source[0]].grad else 0
    return sent


def data_parallel_bytes(parameters: int, zero_stage: int, data_parallel: int, gradient_bytes: int = 4) -> int:
    """Payload per rank per step of data parallelism over `data_parallel` ranks, for `parameters`
    trainable elements with gradients (and parameters) of `gradient_bytes` each, as DeepSpeed runs it:

    - ZeRO-0: an all-reduce of every gradient: P;
    - ZeRO-1/2: a reduce of every gradient to the rank owning its partition (P), and after the
      optimizer step an all-gather of the updated partitions (this rank's P/D): P + P/D;
    - ZeRO-3: a reduce-scatter of the gradients (P) and parameter all-gathers (this rank's P/D
      each), assumed one in forward and one again in backward: P + 2 P/D. The forward's one
      assumes DeepSpeed's module trace is in use (from the second step on) and that
      `stage3_max_reuse_distance` covers a window's passes (`loop_reuse_distance`, the trainer's
      default; see `sleepscale.parallel.zero.deepspeed_config`), so the loop blocks stay
      gathered across passes and windows. The backward's one assumes each parameter was released
      between its last forward use and its first backward use (at scale, more than the distance
      apart for all but the last blocks) and stays gathered through the backward, its
      recomputation included. Both bound what is measured in benchmarks/results/zero3_gather.md from
      different sides: there, on a toy model whose whole step lies within the distance, backward
      re-gathers almost nothing (this over-counts by P/D); in the first step (no trace yet), after a
      change of N, or with a distance shorter than the loop, the loop is gathered once per pass
      (this under-counts).

    On the wire (ring) that is 2 (D-1)/D P for ZeRO-0 to 2 and 3 (D-1)/D P for ZeRO-3. Collectives
    of scalars (gradient norm, overflow checks) are not counted."""
    if data_parallel == 1:
        return 0
    shard = -(-parameters // data_parallel)  # DeepSpeed pads the flat partitions to equal sizes
    gathers = {0: 0, 1: 1, 2: 1, 3: 2}[zero_stage]
    return gradient_bytes * (parameters + gathers * shard)


def data_parallel_wire_bytes(parameters: int, zero_stage: int, data_parallel: int, gradient_bytes: int = 4) -> float:
    """Bytes a ring puts on the wire per rank for `data_parallel_bytes`' collectives: a reduce-scatter
    and an all-gather of every parameter's size per step, 2 (D-1)/D P at ZeRO 0-2 (an all-reduce is
    both), plus the second all-gather at ZeRO-3, 3 (D-1)/D P."""
    if data_parallel == 1:
        return 0.0
    passes = 3 if zero_stage == 3 else 2
    return passes * (data_parallel - 1) / data_parallel * gradient_bytes * parameters


def muon_sent_bytes(
    parameters: list[Parameter],
    zero_stage: int,
    data_parallel: int,
    tensor_parallel: int,
    ns_steps: int = MUON_NS_STEPS,
) -> dict[tuple[int, int], tuple[int, int]]:
    """Bytes each rank of a pipeline stage, by (data rank, tensor rank), sends in our Muon's collectives
    in one optimizer step (`sleepscale.train.muon`), as (over its tensor-parallel group, over its
    data-parallel group); what `Muon.sent_bytes` counts. `parameters`: the stage's trainable parameters
    as one rank holds them (`sleepscale.planner.model_states.Parameter`), in module order;
    `zero_stage`: `train.zero_stage` (1 and 2 shard Muon's state over the data ranks).

    Sent bytes, unlike the payloads above: the bytes of what a rank hands to a collective for other
    ranks, once per rank they go to (a gather's input, from each rank but the root; a scatter's pieces
    but the root's own; a broadcast's tensor, from its root, D - 1 times). All float32 (the Nesterov
    inputs, the updates and the weights). Owners are `Muon`'s (`sleepscale.train.muon.assign`). For a
    Muon matrix of e elements per tensor rank, owned by data rank d and tensor rank t, under T > 1:

    - gather of the Nesterov input's shards to rank t (split matrices only), on data rank d: each other
      tensor rank sends 4 e;
    - scatter of the update's shards back: rank t sends 4 e (T - 1) (a matrix that is not split is
      broadcast whole instead, the same bytes).

    Over D > 1 data ranks each data rank broadcasts the weights it updated, in one flat buffer: its
    Muon matrices, and with state sharding its AdamW parameters too (at `train.zero_stage` 0 every data
    rank updates every AdamW parameter itself): each of its tensor ranks sends 4 S_d (D - 1), S_d the
    buffer's elements, about (M + A) / D (zero_stage 1/2) or M / D (0) each.

    Collectives of the model's forward and backward and DeepSpeed's gradient all-reduce (`data_parallel_bytes`
    at stage 0) come on top."""
    shard_state = zero_stage > 0
    owners = muon_owners(parameters, data_parallel, tensor_parallel, ns_steps)
    tensor_sent = {(d, t): 0 for d in range(data_parallel) for t in range(tensor_parallel)}
    shared = [0] * data_parallel
    for p, (data, tensor) in zip(parameters, owners):
        if p.muon and tensor_parallel > 1:
            for t in range(tensor_parallel):
                if t == tensor:
                    tensor_sent[data, t] += FLOAT32 * p.elements * (tensor_parallel - 1)
                elif p.split:
                    tensor_sent[data, t] += FLOAT32 * p.elements
        if p.muon or shard_state:
            shared[data] += p.elements
    return {(d, t): (sent, FLOAT32 * shared[d] * (data_parallel - 1)) for (d, t), sent in tensor_sent.items()}
