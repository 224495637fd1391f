"""Training FLOPs of a step, counted from its sleep plan (`sleepscale.plan`): what actually runs.

The plan says, per window, which passes run over which block ranges, which carry gradient and what
is checkpointed; `plan_flops` walks it and adds up the matrix products of the forward, backward and
recomputation over the whole batch, counted as `torch.utils.flop_counter.FlopCounterMode` counts
them (2 FLOPs per multiply-add of every mm/bmm, its formulas for scaled dot-product attention).
Elementwise work (norms, activations, rotary, short convolutions, gates, biases, decays, the loss),
the embedding and the triangular solves' own work are not counted (FlopCounterMode has no formula
for them). `tests/test_flops.py` holds the count to FlopCounterMode on real CPU steps, where it is
exact; there attention runs as a CPU kernel FlopCounterMode has no formula for (it would count 0),
so the tests give that kernel torch's own attention formulas.

Forward, per window of L tokens (the last window may be shorter) and every sequence of the batch (a
window's sleep passes run for the whole batch even when only some sequences keep their result):

- linear layers: 2 FLOPs per weight and token; the head (2 per weight and token) on the wake pass;
- attention: FlopCounterMode counts the whole [queries x keys] score matrix whatever the mask,
  4 d per query, key and head (scores and weighted values). Keys: the window's own, plus under
  sliding eviction the retained tail (at most `window` - 1) the window started with, on every pass;
- Gated DeltaNet, as the CPU delta rule computes it (`sleepscale.ops.delta_rule_torch`): the window
  in n chunks of C = fitted_chunk_size(L) (zero-padded), per chunk and value head (grouped value
  heads repeat their key head's queries and keys) 4 C^2 d_k + 2 C^2 d_v + 6 C d_k d_v. On a GPU,
  fla's kernel computes the same products in chunks of 64 whatever the window (and FlopCounterMode
  sees none of its Triton work): there this count is the CPU algorithm's, a close estimate rather
  than a measurement.

Backward is what autograd runs: only passes that carry gradient (`PassPlan.grad`), and in them only
what reaches the loss. A block's run has three outputs (`Live`): its hidden states (read by the next
block, the next pass, or the head), its GDN fast weights (read by the next pass, or after the window
by the next window unless detached), and its context (attention keys and values, convolution tails:
only the final pass's, and only under sliding eviction, reach the next window). Hence the last
sleep pass's hidden output, the final states of the last window, the wake pass's fast weights
before a sleep pass without gradient, and everything slept on before a detach get no backward. A
linear layer's backward is 4 FLOPs per weight and token (input and weight gradients) when what it
feeds is live; attention's is FlopCounterMode's 10 d per query, key and head; the delta
rule's is that of each product whose result is needed and of each operand that requires grad (the
fast weights a pass starts from do not after a pass without gradient, a detach, or at the start),
plus the matmul in the backward of each triangular solve, 2 C^2 (d_k + d_v) per chunk and head.

Recomputation (non-reentrant checkpointing with torch's default early stop) re-runs a checkpointed
unit whose backward runs, up to the last tensor its forward saved for backward. Autograd saves a
matmul's inputs before computing it, so the unit's last matmul (the last block's down_proj, or its
o_proj without MLP) is not re-run when nothing after it saves a tensor. What each form
(`sleep.checkpoint`, `sleepscale.model.recompute`) re-runs, per pass with gradient
(`recomputed_runs`; units: `PassPlan.checkpoint_units`):

- `pass`: each block range reached (the coda too, not the head) but its last block's last matmul;
- `block`: each block reached but its last matmul;
- `nested`: each range reached but its last block, whole (its blocks are units of their own, whose
  forward saved only their inputs: the last block's input ends the range's recomputation), then
  each block reached as under `block`: about one more forward of the range than `pass`;
- `selective`: each block reached, as under `block`, but its matrix products return the outputs its
  forward kept: it re-runs no counted FLOP, only element-wise work;
- `window`: the whole window with the head, passes without gradient included
  (`WindowPlan.is_checkpoint_unit`; there a bound or a per-sequence choice of sleepers after the last
  pass saves tensors, so the last matmul is re-run too: `WindowPlan.ends_on_matmul`).

A window whose loss is computed in checkpointed token chunks (`sleepscale.sleep.loss_chunk_length`:
large vocabularies) re-runs each chunk's head once more in backward; a window without sleep passes
under `window` then ends on its last chunk, which saved only its input: its recomputation stops
before it.

The count is worked out once per block and liveness, per pass and per shape of window (`_Blocks`,
`_pass_liveness`, `window_shape`): a step at large N repeats a few of each many times.

Assumed: a training step (targets, so a loss on every window's wake pass) from fresh states (no
`states=` carried in), training every parameter (a stage that freezes some skips their weight
gradients, which this counts).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable

import torch
from torch import nn

from sleepscale.model.attention import Attention
from sleepscale.model.gdn import GatedDeltaNet
from sleepscale.ops.delta_rule_torch import fitted_chunk_size
from sleepscale.plan import PassPlan, SleepPlan, WindowPlan
from sleepscale.sleep import loss_chunk_length

# Dense bf16 tensor-core peak of the accelerators MFU is reported for (FLOP/s).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# Their dense TF32 tensor-core peak (FLOP/s): what fp32 training reaches with TF32 matmuls (train.tf32).
PEAK_TF32_FLOPS = {"H100": 495e12, "H200": 495e12, "A100": 156e12}


def peak_flops(device) -> float | None:
    """The accelerator's dense bf16 peak, when it is one we know."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


@dataclasses.dataclass(frozen=True)
class Live:
    """Which outputs of one block's run over a window reach the loss (so that backward runs there)."""

    hidden: bool = False  # its output hidden states
    memory: bool = False  # its GDN fast weights
    context: bool = False  # its context: attention keys and values, short-convolution tails

    def __bool__(self) -> bool:
        return self.hidden or self.memory or self.context


# The eight values of Live, one object each: tuples of them (a pass's) then compare by identity, fast
_LIVE = {(h, m, c): Live(h, m, c) for h in (False, True) for m in (False, True) for c in (False, True)}
_DEAD = _LIVE[False, False, False]

# The outputs each linear layer of a mixer feeds (the MLP's feed only the hidden states).
_FEEDS = {
    Attention: {
        "q_proj": {"hidden"},
        "k_proj": {"hidden", "context"},
        "v_proj": {"hidden", "context"},
        "o_proj": {"hidden"},
    },
    GatedDeltaNet: {
        "q_proj": {"hidden", "context"},
        "k_proj": {"hidden", "memory", "context"},
        "v_proj": {"hidden", "memory", "context"},
        "a_proj": {"hidden", "memory"},
        "b_proj": {"hidden", "memory"},
        "g_proj": {"hidden"},
        "o_proj": {"hidden"},
    },
}


def _linears(block: nn.Module) -> list[tuple[int, set[str]]]:
    """(weights, outputs it feeds) of each linear layer of a block."""
    feeds = _FEEDS[type(block.attn)]
    layers = [
        (layer.weight.numel(), feeds[name])
        for name, layer in block.attn.named_children()
        if isinstance(layer, nn.Linear)
    ]
    if block.mlp is not None:
        layers += [(layer.weight.numel(), {"hidden"}) for layer in block.mlp.children() if isinstance(layer, nn.Linear)]
    return layers


def _last_matmul(block: nn.Module) -> int:
    """Weights of the block's last matrix product, per token: the one early stop does not re-run."""
    return (block.mlp.down_proj if block.mlp is not None else block.attn.o_proj).weight.numel()


def gdn_blocks(model: nn.Module) -> tuple[bool, ...]:
    """Which of the model's blocks are Gated DeltaNet blocks (`liveness` reads it)."""
    return tuple(isinstance(block.attn, GatedDeltaNet) for block in model.layers)


def _attention(mixer: Attention, queries: int, keys: int, live: Live) -> tuple[float, float]:
    """(forward, backward) of scaled dot-product attention for `queries` queries over the batch,
    with FlopCounterMode's formulas (`sdpa_flop_count`, `sdpa_backward_flop_count`)."""
    scores = queries * keys * mixer.num_heads * mixer.head_dim
    return 4.0 * scores, (10.0 * scores if live.hidden else 0.0)


def _delta_rule(mixer: GatedDeltaNet, sequences: int, length: int, live: Live, state_grad: bool) -> tuple[float, float]:
    """(forward, backward) of the chunked delta rule over a window of `length` tokens for `sequences`
    sequences; `state_grad`: the fast weights it starts from require grad. Per chunk of C tokens
    and value head, with S the chunk's starting state and E its new values (see delta_rule_torch):
    forward K_beta K^T and Q K^T (2 C^2 d_k each), W S, Q S and K^T E (2 C d_k d_v each), and
    (Q K^T * decay) E (2 C^2 d_v); backward the same per needed product and operand that requires
    grad, and the matmul in each solve's backward."""
    chunk = fitted_chunk_size(length)
    chunks, c, k, v = math.ceil(length / chunk), chunk, mixer.head_k_dim, mixer.head_v_dim
    forward = chunks * (4 * c * c * k + 2 * c * c * v + 6 * c * k * v)
    backward = 0
    starts_with_grad = chunks - 1 + state_grad  # chunks whose S requires grad (the first only if the input state does)
    if live.hidden or live.memory:  # E = U - W S, from two triangular solves of K_beta K^T, feeds both
        backward += chunks * (2 * c * c * (k + v) + 4 * c * c * k + 2 * c * k * v) + starts_with_grad * 2 * c * k * v
        backward += (chunks - 1 + live.memory) * 4 * c * k * v  # the state updates whose result is read
    if live.hidden:  # the output: Q K^T, A E and Q S
        backward += chunks * (4 * c * c * k + 4 * c * c * v + 2 * c * k * v) + starts_with_grad * 2 * c * k * v
    scale = sequences * mixer.num_v_heads
    return float(scale * forward), float(scale * backward)


class _Blocks:
    """The FLOPs of the model's block runs over windows of one shape (`sequences` x `length` tokens,
    `keys` keys per attention query), each worked out once: a step at large N runs every loop
    block N times per window over a handful of distinct (block, live outputs, state gradient)."""

    def __init__(self, model: nn.Module, sequences: int, length: int, keys: int):
        self.layers = list(model.layers)  # indexing an nn.ModuleList is slow
        self.sequences, self.length, self.keys = sequences, length, keys
        self.linears = [_linears(block) for block in self.layers]
        self.forwards = [self._run(i, _DEAD, False)[0] for i in range(len(self.layers))]  # whatever is live
        # each block's last matmul, over the window: what early stop spares
        self.last_matmuls = [2.0 * _last_matmul(block) * sequences * length for block in self.layers]
        self.backwards: dict[tuple[int, Live, bool], float] = {}

    def backward(self, block: int, live: Live, state_grad: bool) -> float:
        key = (block, live, state_grad)
        if key not in self.backwards:
            self.backwards[key] = self._run(block, live, state_grad)[1]
        return self.backwards[key]

    def _run(self, index: int, live: Live, state_grad: bool) -> tuple[float, float]:
        """(forward, backward) of one run of block `index`; `state_grad`: the fast weights it starts
        from require grad."""
        block, tokens = self.layers[index], self.sequences * self.length
        forward = sum(2.0 * weights for weights, _ in self.linears[index]) * tokens
        backward = (
            sum(4.0 * weights for weights, feeds in self.linears[index] if any(getattr(live, f) for f in feeds))
            * tokens
        )
        if isinstance(block.attn, Attention):
            mixer = _attention(block.attn, tokens, self.keys, live)
        else:
            mixer = _delta_rule(block.attn, self.sequences, self.length, live, state_grad)
        return forward + mixer[0], backward + mixer[1]


def liveness(plan: SleepPlan, window: WindowPlan, gdn: tuple[bool, ...]) -> dict[int, tuple[Live, ...]]:
    """Live outputs of each block's run over `window`, per pass number and block (Live() for the
    blocks a pass does not run), walked from its last pass back; `gdn`: which blocks are Gated
    DeltaNet blocks (`gdn_blocks`). The states after the window reach the loss when a next window
    reads them with their gradient (`WindowPlan.carries_states`)."""
    carried = window.carries_states
    partial = window.sleepers is not None  # the window's states: the wake pass's or the last pass's, per sequence
    context = carried and not window.evict  # the context the window ends with is read by the next window
    live, hidden_read, memory_read = {}, False, (False,) * len(gdn)
    for planned in reversed(window.passes):
        final = planned is window.passes[-1] or (planned.number == 1 and partial)  # its states end the window
        live[planned.number], hidden_read, memory_read = _pass_liveness(
            planned, plan.loop, gdn, final, carried, context, hidden_read, memory_read
        )
    return live


@functools.lru_cache(maxsize=4096)
def _pass_liveness(
    planned: PassPlan,
    loop: range,
    gdn: tuple[bool, ...],
    final: bool,
    carried: bool,
    context: bool,
    hidden_read: bool,
    memory_read: tuple[bool, ...],
) -> tuple[tuple[Live, ...], bool, tuple[bool, ...]]:
    """One pass of `liveness`: (the Live of each block's run; whether the pass reads its input hidden
    states with gradient; per block, whether it reads the fast weights it starts from with gradient),
    given whether the passes after it read its output hidden states (`hidden_read`) and each block's
    fast weights (`memory_read`) with gradient. `final`: its states end the window. Memoised: a
    window's sleep passes repeat it, mostly with the same arguments."""
    lives, read = [_DEAD] * len(gdn), [False] * len(gdn)

    def back(blocks: list[int] | range, hidden: bool) -> bool:
        """Marks the runs of `blocks` (in order on this pass) given whether their output hidden
        states are read with gradient; returns whether their input's are."""
        for i in reversed(blocks):
            ends = final or i not in loop  # prelude and coda blocks run on the wake pass only
            outputs = _LIVE[hidden, gdn[i] and (ends and carried or memory_read[i]), ends and context]
            lives[i] = outputs if planned.grad else _DEAD
            read[i] = planned.grad and (outputs.hidden or outputs.memory)  # the fast weights feed both
            hidden = planned.grad and bool(outputs)  # every output depends on the block's input
        return hidden

    if planned.readout is not None:  # the wake pass: the coda and the head read its loop output
        back(planned.readout, True)
    hidden_read = back(_flat(planned.blocks), planned.readout is not None or hidden_read)
    return tuple(lives), hidden_read, tuple(read)


def _flat(ranges: tuple[range, ...]) -> list[int]:
    return [i for blocks in ranges for i in blocks]


def recomputed_runs(planned: PassPlan, live: tuple[Live, ...]) -> list[tuple[range, bool]]:
    """Where backward repeats matrix products (and, under tensor parallelism, the all-reduces after
    them) of a pass's checkpoint units (`PassPlan.checkpoint_units`, in the pass's form,
    `sleepscale.model.recompute`), as runs of blocks, each (blocks, stops_early); `live`: the pass's
    `liveness`. A unit is re-run only when backward reaches it (one of its blocks has a live output),
    and then, under non-reentrant checkpointing's early stop, only up to the last tensor its forward
    saved for backward: `stops_early` says the run ends inside its last block, at that block's last
    saved tensor (what that spares, a matmul or an all-reduce, is the caller's to count); without it
    the run's blocks run whole.

    - `pass`: each range reached re-runs to its early stop;
    - `block`: each block reached, the same;
    - `nested`: a range reached re-runs its blocks but the last whole, stopping at the last block's
      input: its blocks are units of their own, whose forward saved only their inputs, so that input
      is the range's last saved tensor. Then each block reached re-runs to its early stop, as under
      `block`;
    - `selective`: none. Its blocks reached re-run as under `block`, but their matrix products and
      all-reduces return the outputs their forward kept: only element-wise work runs again."""
    runs = []
    for blocks in planned.block_ranges:
        reached = [i for i in blocks if live[i]]
        if not reached or planned.checkpoint in ("none", "selective"):
            continue
        if planned.checkpoint == "pass":
            runs.append((blocks, True))
            continue
        if planned.checkpoint == "nested" and len(blocks) > 1:
            runs.append((blocks[:-1], False))
        runs += [(range(i, i + 1), True) for i in reached]
    return runs


def _window(plan: SleepPlan, window: WindowPlan, model: nn.Module, keys: int) -> float:
    """FLOPs of one window: forward, backward and recomputation. `keys`: keys each attention query
    sees."""
    sequences, length = plan.batch, window.length
    blocks = _Blocks(model, sequences, length, keys)
    live = liveness(plan, window, gdn_blocks(model))
    head = 2.0 * model.lm_head.weight.numel() * sequences * length
    forward = backward = recompute = 0.0
    previous: PassPlan | None = None
    for planned in window.passes:
        lives = live[planned.number]
        # whether the fast weights the pass starts from require grad
        starts_with_grad = window.starts_with_carried_states if previous is None else previous.grad
        for unit in planned.block_ranges:
            unit_forward = 0.0
            for i in unit:
                unit_forward += blocks.forwards[i]
                backward += blocks.backward(i, lives[i], starts_with_grad)
            forward += unit_forward
        for run, stops_early in recomputed_runs(planned, lives):
            rerun = 0.0
            for i in run:
                rerun += blocks.forwards[i]
            recompute += rerun - (blocks.last_matmuls[run[-1]] if stops_early else 0.0)
        if planned.readout is not None:
            forward, backward = forward + head, backward + 2 * head
        previous = planned
    chunk = loss_chunk_length(sequences, length, model.config.vocab_size)
    if chunk is not None:  # each checkpointed chunk of the loss re-runs its head in backward
        recompute += head
    if window.is_checkpoint_unit:
        not_rerun = 0.0
        if window.ends_on_matmul:  # the last matmul of the last sleep pass's last block
            not_rerun = blocks.last_matmuls[window.passes[-1].blocks[-1][-1]]
        recompute += forward - not_rerun
        if (
            chunk is not None and len(window.passes) == 1
        ):  # the window ends on the last chunk, which saved only its input
            recompute -= head * ((length - 1) % chunk + 1) / length
    return forward + backward + recompute


def window_shape(window: WindowPlan) -> WindowPlan:
    """`window` moved to the sequence's start: what its counts depend on, with the keys its attention
    sees, so that windows of one shape are counted once."""
    return dataclasses.replace(window, index=0, start=0, end=window.length)


def plan_flops(plan: SleepPlan, model: nn.Module, window: int) -> float:
    """FLOPs of one training forward, backward and recomputation of the batch `plan` describes
    (`sleepscale.sleep.plan_for`), for `model` (the meta-device twin will do: only shapes are read);
    `window`: `sleep.window`, the attention span."""
    total, tail, counted = 0.0, 0, {}
    for planned in plan.windows:
        shape = (window_shape(planned), tail + planned.length)
        if shape not in counted:
            counted[shape] = _window(plan, planned, model, tail + planned.length)
        total += counted[shape]
        tail = 0 if planned.evict else min(window - 1, tail + planned.length)  # keys the next window starts with
    return total


def training_flops_per_token(plans: Iterable[SleepPlan], model: nn.Module, window: int) -> float:
    """FLOPs per token of a training step of these micro-batches' plans: their `plan_flops` over the
    tokens they run (batch x length, padding rows included)."""
    plans = list(plans)
    return sum(plan_flops(plan, model, window) for plan in plans) / sum(
        plan.batch * plan.windows[-1].end for plan in plans
    )
