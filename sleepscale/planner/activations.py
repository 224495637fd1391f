"""Activation memory of one micro-batch's training forward: what autograd saves for backward, and the
recurrent states checkpoints hold, per pipeline stage, from the model's shapes and the sleep plan;
and the recomputation floor, what backward needs on top of it while it recomputes a unit.

Nothing here is a hand-written byte count. The engine itself (`sleepscale.sleep.sleep_forward`)
runs on fake tensors (torch's `FakeTensorMode`: shapes, dtypes and autograd, no data, no memory),
under `saved_tensors_hooks` that count what it saves, so every recomputation form
(`sleepscale.model.recompute`: pass, block, nested, selective; or the whole window), `grad_passes`,
state operation, eviction mode, precision (autocast) and loss chunking counts as it runs. Three
reductions keep that cheap at any scale, each exact for the engine as it is:

- *depth*: blocks of the same letter in the same part of the stack (prelude, loop, coda) save the
  same bytes per run, so the traced model keeps, per part, its first block (it reads the previous
  part's output, which may already be saved) and one block of each letter after it; their bytes
  are multiplied by how many such blocks the full model has. The loop's tail stays whole: from its
  last GDN block on (its last block, without one), each block is traced: the last sleep pass's hidden
  output is read by nobody, so what its blocks save after their last state update is freed unread
  (`SavedStorages`), and how much of a block that is depends on where it stands;
- *length*: windows after the first see the same shapes (the same key span under sliding eviction,
  the same carried states), so at most three windows are traced, the first, one middle one and the
  last (which may be shorter and is never slept on), and the middle one counts for all middle ones;
- *passes*: of a window's N passes, the sleep passes without gradient (`grad_passes`) save and hold
  nothing, and those with gradient after the first save the same bytes, save for the last (the
  state operations after it differ). So at most one pass without gradient and three with it are
  traced after the wake pass, the middle one counting for all middle ones, the one without gradient
  for all of them: the trace's cost does not grow with N.

Bytes are attributed to when they were saved (a window and a pass) and what was running: a block,
the embedding, the head and loss, the input of a checkpointed unit (one per stage for a block
range under `pass` and `nested`, one per block under `block` and `selective`; a `nested` unit's
inner units save into it, so nothing for backward), or a state operation; so a pipeline stage's
share is the sum over what it runs. A storage counts once (views share it), and parameters count
not at all (they are model state, not activations); under bf16 autocast the bf16 copies of weights
a matmul saves do count (`sleepscale.model.precision.precision_context` casts afresh per use).
Under `selective`, the outputs torch's selective checkpointing keeps (the matrix products'; it
caches them in a storage of its own, not through `saved_tensors_hooks`) count as saved: they are
held until backward as saved tensors are.

`held` is what checkpointed units keep outside autograd: non-reentrant checkpointing keeps the
Python arguments of each unit for its recomputation, among them the recurrent states (GDN fast
weights, convolution tails, attention caches) the unit started from. They are memory as much as
saved tensors are, but `saved_tensors_hooks` do not see them.

`largest_unit`, the recomputation floor: the most bytes that backward's recomputation of one unit
creates and keeps at once, on top of what the forward kept (a unit's inputs are not recomputed;
neither are the outputs `selective` keeps; nor what nobody reads, as a graph branch freed in the
forward is not recomputed). It comes from a trace of the same passes without checkpoints over up to
three windows, whose bytes per pass and block are split into the block's inputs (hidden states,
recurrent state), the matrix products' outputs, and the rest: a `pass` unit recomputes its blocks
together; `block` one block; `selective` what a block does not keep; a `nested` unit first
recomputes its range keeping each block's hidden input, then, as backward reaches them, each block
(the peak is the inputs still kept plus the block then recomputed); `window` a middle window with
all its passes, as they save without checkpoints.

Kernels (`kernels`): "cuda" traces what a GPU runs. The delta rule's kernel is chosen as on CUDA
(`sleepscale.ops.delta_rule_kernel`: our window kernel or fla's chunked one), and that kernel's own
Python code runs on the fake tensors, allocating and saving what it does on a GPU, with its Triton
launches skipped (there is no data to compute on). "cpu" traces the PyTorch delta rule
(`sleepscale.ops.delta_rule_torch`), which saves per-chunk states and so more: what a CPU run saves,
and what the tests measure. `tests/test_planner_activations.py` holds "cuda" to the kernels run under
Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import weakref
from collections import defaultdict
from collections.abc import Iterator

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import CheckpointPolicy

import sleepscale.ops as ops
import sleepscale.sleep as engine
from sleepscale.config import ModelConfig, SleepConfig
from sleepscale.model import recompute
from sleepscale.model.hybrid import HybridLM
from sleepscale.model.precision import precision_context
from sleepscale.plan import make_plan
from sleepscale.sleep import sleep_forward

# What a saved byte is attributed to (the second part of a key; the first is when: (window, pass)).
EMBEDDING, HEAD, STATE_OPS = "embedding", "head", "state_ops"
# ... or (kind, traced block) for what a block saves: its own activations, which its recomputation creates anew;
# the outputs of its matrix products among them (`selective` keeps them rather than recompute them); and its
# inputs, the hidden states and the recurrent state it starts from (a recomputation has them already)
BLOCK, KEPT, HIDDEN_IN, STATE_IN = "block", "kept", "hidden_in", "state_in"
# ... or the input of a checkpointed unit: a block range's (one per stage it runs on) or a block's (one per block)
UNIT, BLOCK_UNIT = "unit", "block_unit"
PER_BLOCK = (BLOCK, KEPT, HIDDEN_IN, STATE_IN, BLOCK_UNIT)
AFTER_PASSES = 0  # the "pass" of what runs after a window's passes (the state operations that end it)

# Whether traces reduce the passes (the module docstring); the tests switch it off to hold it to the full trace.
REDUCE_PASSES = True


class SavedStorages:
    """Counts the distinct storages autograd saves for backward while active (a context manager),
    leaving out `excluded` ones (the parameters), as long as they live: a storage saved only by graph
    nodes that nobody reads (the branch of a pass whose outputs no later pass with gradient uses, as
    the states of a pass followed by passes without gradient, or the blocks after the last pass's last
    state) is freed during the forward, costs nothing in backward and is not recomputed there, so
    `bytes` counts what is saved and still alive when it is read (read it while the forward's output
    lives). `key` says what the bytes are attributed to, unless `attribute` (storage id -> key) says
    better."""

    def __init__(self, excluded: Iterator[torch.Tensor] = ()):
        self.excluded = {_storage_id(t) for t in excluded}
        self.alive: dict[int, tuple] = {}  # storage id -> (key, bytes), from its first save until it is freed
        self.key = None
        self.attribute = lambda storage: self.key

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.excluded and key not in self.alive:
            self.alive[key] = (self.attribute(key), storage.nbytes())
            weakref.finalize(storage, self.alive.pop, key, None)  # an id is reused only once its storage is freed
        return tensor

    @property
    def bytes(self) -> dict:
        """Bytes per key of the saved storages alive now."""
        found = defaultdict(int)
        for key, size in self.alive.values():
            found[key] += size
        return found

    @property
    def total(self) -> int:
        return sum(size for _, size in self.alive.values())

    @contextlib.contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor), _selective_kept(self):
            yield self


@contextlib.contextmanager
def _selective_kept(counter: SavedStorages):
    """Counts with `counter` the op outputs that `selective` units keep for backward: torch's selective
    checkpointing caches them in a storage of its own, which `saved_tensors_hooks` do not see. Its policy
    (`recompute._keep_matmuls`, read when a unit starts) is wrapped to count what it keeps as it keeps it."""
    policy = recompute._keep_matmuls

    def counted(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if decision in (CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE) and not ctx.is_recompute:
            for output in pytree.tree_leaves(ctx.op_output):
                if isinstance(output, torch.Tensor):
                    counter.pack(output)
        return decision

    recompute._keep_matmuls = counted
    try:
        yield
    finally:
        recompute._keep_matmuls = policy


def _storage_id(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


KERNELS = ("cuda", "cpu")


@contextlib.contextmanager
def _kernels_as_on(kernels: str):
    """Under "cuda": the delta rule dispatched as on CUDA, Triton launches skipped (see the module docstring)."""
    if kernels == "cpu":
        yield
        return
    # Triton, ~0.3 s: only for traces as on CUDA
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit  # Triton: see above

    import sleepscale.kernels.window_delta_rule as window_kernel  # Triton: see above

    skip = lambda *args, **kwargs: None  # noqa: E731
    patches = [
        (jit.JITFunction, "run", skip),
        (autotuner.Autotuner, "run", skip),
        (autotuner.Heuristics, "run", skip),
        (ops, "triton_runs_on", lambda device: True),
        (window_kernel, "_INTERPRETED", True),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)


def saved_bytes(
    model, input_ids: torch.Tensor, targets: torch.Tensor, sleep: SleepConfig, precision: str = "fp32"
) -> int:
    """Measured: the distinct non-parameter bytes `sleep_forward` saves for backward on these inputs,
    the outputs `selective` units keep among them (what `MicroBatchActivations.saved` predicts)."""
    counter = SavedStorages(model.parameters())
    with counter.counting(), precision_context(precision, input_ids.device):
        loss = sleep_forward(model, input_ids, sleep, targets=targets, return_logits=False).loss
    saved = counter.total  # while the loss, and so the graph backward reads, lives (the trainer's states are detached)
    del loss
    return saved


@dataclasses.dataclass(frozen=True)
class MicroBatchActivations:
    """Bytes one micro-batch's forward keeps until its backward, per pipeline stage."""

    saved: list[int]  # saved for backward (saved_tensors_hooks, and what `selective` units keep), per stage
    held: list[int]  # recurrent states kept by checkpointed units outside autograd, per stage
    states: list[
        int
    ]  # the recurrent states the sequence ends with (GDN fast weights, attention and convolution caches)
    # the most bytes backward's recomputation of one checkpointed unit creates and keeps at once (0: none)
    largest_unit: int

    @property
    def total(self) -> list[int]:
        return [sum(parts) for parts in zip(self.saved, self.held, self.states)]


@dataclasses.dataclass(frozen=True)
class _Reduced:
    """The traced model's pattern and, per traced block, the full model's blocks it stands for."""

    config: ModelConfig
    stands_for: list[list[int]]  # per traced block: full-model block indices

    @functools.cached_property
    def traced_block(self) -> dict[int, int]:
        """Full-model block -> the traced block that stands for it."""
        return {block: traced for traced, blocks in enumerate(self.stands_for) for block in blocks}


def _reduced(config: ModelConfig) -> _Reduced:
    blocks, loop_part = config.blocks, range(*config.loop_range)
    pattern, stands_for, loop = "", [], None
    for part in _parts(config):
        first, rest = part[0], list(part[1:])
        tail = []
        if part == loop_part and rest:  # the loop's tail, from its last GDN block on (the module docstring)
            gdn = [i for i in rest if blocks[i] in "Gg"]
            tail = rest[rest.index(gdn[-1] if gdn else rest[-1]) :]
            rest = rest[: len(rest) - len(tail)]
        start = len(pattern)
        pattern += blocks[first]
        stands_for.append([first])
        for letter in dict.fromkeys(blocks[i] for i in rest):
            pattern += letter
            stands_for.append([i for i in rest if blocks[i] == letter])
        for i in tail:
            pattern += blocks[i]
            stands_for.append([i])
        if part == loop_part:
            loop = (start, len(pattern))
    return _Reduced(config.model_copy(update={"pattern": pattern, "loop": loop, "init_from": None}), stands_for)


def micro_batch_activations(
    model: ModelConfig,
    sleep: SleepConfig,
    batch: int,
    length: int,
    stages: list[range] | None = None,
    precision: str = "fp32",
    kernels: str = "cuda",
) -> MicroBatchActivations:
    """The activation bytes of one micro-batch of `batch` sequences of `length` tokens at N =
    `sleep.passes` (the random-N maximum is the caller's to put there), every evicted window slept
    on (`sleep_on: context` sleeps on fewer: this is its worst case). `model`: the shapes one rank
    holds (under tensor parallelism, `tensor_parallel_shapes`); `stages`: the full model's block
    ranges per pipeline stage (default: one stage); `kernels`: "cuda" or "cpu" (the module docstring)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r}: use one of {', '.join(KERNELS)}")
    stages = stages or [range(len(model.blocks))]
    trace = _traced(model, sleep, batch, length, precision, kernels, REDUCE_PASSES)
    return MicroBatchActivations(
        trace.per_stage(trace.saved, stages),
        trace.per_stage(trace.held, stages),
        trace.per_stage(trace.states, stages),
        _largest_unit(model, sleep, batch, length, precision, kernels, stages, REDUCE_PASSES),
    )


def _traced(
    model: ModelConfig, sleep: SleepConfig, batch: int, length: int, precision: str, kernels: str, reduce_passes: bool
) -> _Trace:
    """The trace for these settings, over fewer passes when `reduce_passes` (the module docstring)."""
    if not reduce_passes:
        return _trace(model, sleep, batch, length, precision, kernels)
    traced, pass_weights = _passes_reduced(sleep)
    return _trace(model, traced, batch, length, precision, kernels).weighted(pass_weights)


def _passes_reduced(sleep: SleepConfig) -> tuple[SleepConfig, dict[int, int]]:
    """The sleep settings to trace instead of `sleep`'s N passes, and how many passes each traced
    pass (by number) stands for, where not one: after the wake pass, at most one sleep pass without
    gradient and three with it (the first, a middle one, the last)."""
    sleep_passes = sleep.passes - 1
    with_grad = sleep_passes if sleep.grad_passes is None else min(sleep.grad_passes, sleep_passes)
    without_grad = sleep_passes - with_grad
    traced_without, traced_with = min(without_grad, 1), min(with_grad, 3)
    if (traced_without, traced_with) == (without_grad, with_grad):
        return sleep, {}
    grad_passes = None if sleep.grad_passes is None else traced_with
    traced = sleep.model_copy(
        update={"passes": 1 + traced_without + traced_with, "grad_passes": grad_passes, "random_passes": None}
    )
    weights = {}
    if traced_without:
        weights[2] = without_grad
    if traced_with == 3:
        weights[2 + traced_without + 1] = with_grad - 2
    return traced, weights


@functools.lru_cache(maxsize=64)
def _trace(model: ModelConfig, sleep: SleepConfig, batch: int, length: int, precision: str, kernels: str) -> _Trace:
    """The trace for these settings; a search over layouts asks for the same ones again."""
    return _Trace(model, sleep, batch, length, precision, kernels)


class _Trace:
    """One fake-tensor run of the engine on the reduced model; bytes per key: ((traced window, pass
    number), what ran)."""

    pass_weights: dict[int, int] = {}  # traced pass number -> the passes it stands for, where not one

    def __init__(self, model: ModelConfig, sleep: SleepConfig, batch: int, length: int, precision: str, kernels: str):
        self.model, self.reduced = model, _reduced(model)
        sleep = sleep.model_copy(update={"sleep_on": "evicted"})  # the worst case; which windows carry loss is data
        self.windows = math.ceil(length / sleep.window)
        traced_length = length if self.windows <= 3 else 2 * sleep.window + length - (self.windows - 1) * sleep.window
        self.traced_windows = math.ceil(traced_length / sleep.window)
        counter = SavedStorages()
        with _KeepingTrackOfMatmuls() as fake:
            traced = HybridLM(self.reduced.config)
            counter.excluded = {_storage_id(p) for p in traced.parameters()}
            ids, targets = (torch.zeros(batch, traced_length, dtype=torch.long) for _ in range(2))
            with (
                _attributed(traced, counter, fake.matmul_outputs) as (held, self.inputs),
                counter.counting(),
                precision_context(precision, ids.device),
                _kernels_as_on(kernels),
            ):
                out = sleep_forward(traced, ids, sleep, targets=targets, return_logits=False)
            # the recurrent states the sequence ends with, per block (GDN fast weights; caches under sliding eviction)
            self.states = {
                ((0, 1), (BLOCK, i)): sum(t.untyped_storage().nbytes() for t in _tensors(state))
                for i, state in enumerate(out.states)
            }
            loss = out.loss  # what the trainer keeps through backward (`SleepingModel` detaches the states)
            del out
        self.saved = defaultdict(int, counter.bytes)
        # The embedding and the loss save their window's slice of the micro-batch's ids and targets: a view of the
        # whole [batch, length] tensor, so its storage counts once, at the full length.
        untraced = batch * (length - traced_length) * ids.element_size()
        self.saved[(0, 1), EMBEDDING] += untraced
        self.saved[(0, 1), HEAD] += untraced
        self.held = {
            key: sum(size for storage, size in found.items() if storage not in counter.alive)
            for key, found in held.items()
        }
        del loss  # read: the graph may go

    def weighted(self, pass_weights: dict[int, int]) -> _Trace:
        """This trace with its passes standing for `pass_weights` (`_passes_reduced`)."""
        trace = copy.copy(self)
        trace.pass_weights = pass_weights
        return trace

    def window_weight(self, window: int) -> int:
        """How many windows of the full sequence traced window `window` stands for."""
        if self.traced_windows < 3 or window in (0, self.traced_windows - 1):
            return 1
        return self.windows - 2

    def weight(self, when: tuple[int, int]) -> int:
        """How many (window, pass) of the full run a traced one stands for."""
        window, number = when
        return self.window_weight(window) * self.pass_weights.get(number, 1)

    def shares(self, what, stages: list[range]) -> dict[int, float]:
        """Stage -> how many times bytes attributed to `what` count on it."""
        if what == EMBEDDING:
            return {0: 1}
        if what == HEAD:
            return {len(stages) - 1: 1}
        stage_of = {block: index for index, blocks in enumerate(stages) for block in blocks}
        found = defaultdict(float)
        if what == STATE_OPS:  # they act on each loop GDN block's state
            full, traced = (_loop_gdn(config) for config in (self.model, self.reduced.config))
            for block in full:
                found[stage_of[block]] += 1 / max(len(traced), 1)
            return found
        kind, index = what
        if kind in PER_BLOCK:
            for block in self.reduced.stands_for[index]:
                found[stage_of[block]] += 1
            return found
        # a block range unit's input: one per stage the range runs on
        return {stage: 1 for stage in {stage_of[b] for b in _full_part(self.model, self.reduced.stands_for[index][0])}}

    def per_stage(self, found: dict, stages: list[range]) -> list[int]:
        totals = [0.0] * len(stages)
        for (when, what), size in found.items():
            for stage, count in self.shares(what, stages).items():
                totals[stage] += size * count * self.weight(when)
        return [round(total) for total in totals]

    def recomputed(self, when: tuple[int, int], unit: range, form: str) -> int:
        """Bytes backward's recomputation of the full model's blocks `unit` (a unit in `form`, in traced
        (window, pass number) `when`) creates and keeps at once, at its peak (the module docstring)."""

        def block(kind: str, full_block: int) -> int:
            return self.saved.get((when, (kind, self.reduced.traced_block[full_block])), 0)

        def recomputed_block(full_block: int) -> int:  # a block recomputed alone: all but its inputs
            kept = 0 if form == "selective" else block(KEPT, full_block)
            return block(BLOCK, full_block) + kept

        if form in ("block", "selective"):
            return max(recomputed_block(b) for b in unit)
        later = unit[1:]  # their hidden inputs are recomputed too, as their predecessors' outputs
        if form == "pass":
            return sum(recomputed_block(b) for b in unit) + sum(block(HIDDEN_IN, b) for b in later)
        if form == "nested":  # the range recomputed keeping each block's hidden input, then block by block
            # (an inner unit whose block saves nothing alive, its output unread, keeps no input either)
            hidden = [
                self.inputs.get((when, self.reduced.traced_block[b]), 0) if recomputed_block(b) else 0 for b in later
            ]
            return max(sum(hidden[:i]) + recomputed_block(b) for i, b in enumerate(unit))
        raise ValueError(f"recomputation form {form!r}")


class _KeepingTrackOfMatmuls(FakeTensorMode):
    """Fake tensors, noting the outputs of the matrix products `selective` keeps (`recompute._keep_matmuls`):
    a block's recomputation under `selective` does not create them again."""

    def __init__(self):
        super().__init__()
        self.policy = recompute._keep_matmuls  # as it is, before `_selective_kept` wraps it
        self.matmul_outputs: set[int] = set()  # storage ids, each until its storage is freed (ids get reused)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.policy(None, func) == CheckpointPolicy.MUST_SAVE:
            for output in pytree.tree_leaves(out):
                if isinstance(output, torch.Tensor):
                    storage = output.untyped_storage()
                    if storage._cdata not in self.matmul_outputs:
                        self.matmul_outputs.add(storage._cdata)
                        weakref.finalize(storage, self.matmul_outputs.discard, storage._cdata)
        return out


def _loop_gdn(config: ModelConfig) -> list[int]:
    return [i for i in range(*config.loop_range) if config.blocks[i] in "Gg"]


def _parts(config: ModelConfig) -> list[range]:
    """The prelude, loop and coda blocks (those that exist)."""
    start, stop = config.loop_range
    return [part for part in (range(0, start), range(start, stop), range(stop, len(config.blocks))) if part]


def _full_part(model: ModelConfig, block: int) -> range:
    return next(part for part in _parts(model) if block in part)


@contextlib.contextmanager
def _attributed(model, counter: SavedStorages, matmul_outputs: set[int]):
    """Sets `counter.key` to ((window, pass), what runs) as the engine runs `model`; yields, per key,
    the state storages (id -> bytes) that checkpointed units keep as arguments, and per ((window,
    pass), block) the bytes of the hidden states the block started from."""
    when = [(-1, 1)]  # (window, pass number)
    counter.key = ((0, 1), EMBEDDING)  # under per-window checkpointing the window's inputs are saved before it runs
    held: dict = defaultdict(dict)
    inputs: dict = {}
    entry: dict[int, str] = {}  # storage -> HIDDEN_IN or STATE_IN, for the block now running

    def set_key(what) -> None:
        counter.key = (when[0], what)

    def attribute(storage: int):
        when_saved, what = counter.key
        if isinstance(what, tuple) and what[0] == BLOCK:
            kind = entry.get(storage) or (KEPT if storage in matmul_outputs else BLOCK)
            return when_saved, (kind, what[1])
        return counter.key

    counter.attribute = attribute

    def hold(states, blocks) -> None:
        for i in blocks:
            for tensor in _tensors(states[i]):
                held[(when[0], (BLOCK, i))][_storage_id(tensor)] = tensor.untyped_storage().nbytes()

    def enter_block(index, args) -> None:
        hidden, state = args
        entry.clear()
        entry[_storage_id(hidden)] = HIDDEN_IN
        entry.update((_storage_id(tensor), STATE_IN) for tensor in _tensors(state))
        inputs[when[0], index] = hidden.untyped_storage().nbytes()
        set_key((BLOCK, index))

    hooks = [
        model.embeddings.register_forward_pre_hook(lambda *_: set_key(EMBEDDING)),
        model.norm.register_forward_pre_hook(lambda *_: set_key(HEAD)),
    ]
    for index, layer in enumerate(model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda _, args, index=index: enter_block(index, args)))

    checkpoint, depth = recompute.checkpoint, [0]

    def unit(function, hidden, states, blocks, *args, **kwargs):
        """A checkpointed block range or block (`recompute.run`): its input is saved, its states held."""
        if not depth[0]:  # not a `nested` unit's inner one (those save into it, nothing for backward)
            set_key((BLOCK_UNIT if len(blocks) == 1 else UNIT, blocks.start))
            hold(states, blocks)
        depth[0] += 1
        try:
            return checkpoint(function, hidden, states, blocks, *args, **kwargs)
        finally:
            depth[0] -= 1

    originals = {
        name: getattr(engine, name)
        for name in ("before_pass", "after_pass", "after_sleep", "after_window", "_run_window", "run_pass")
    }

    def state_op(function, after_passes=False):
        def run(*args, **kwargs):
            if after_passes:
                when[0] = (when[0][0], AFTER_PASSES)
            set_key(STATE_OPS)
            return function(*args, **kwargs)

        return run

    def run_window(model, window_plan, window_ids, window_targets, states, want_logits=True):
        when[0] = (when[0][0] + 1, 1)
        if (
            window_plan.checkpoint == "window" and torch.is_grad_enabled()
        ):  # the checkpoint keeps the window's starting states
            hold(states, range(len(states)))
        return originals["_run_window"](model, window_plan, window_ids, window_targets, states, want_logits)

    def run_pass(model, window_plan, planned, *args, **kwargs):
        when[0] = (when[0][0], planned.number)
        return originals["run_pass"](model, window_plan, planned, *args, **kwargs)

    patched = {
        "before_pass": state_op(originals["before_pass"]),
        "after_pass": state_op(originals["after_pass"]),
        "after_sleep": state_op(originals["after_sleep"], after_passes=True),
        "after_window": state_op(originals["after_window"], after_passes=True),
        "_run_window": run_window,
        "run_pass": run_pass,
    }
    for name, function in patched.items():
        setattr(engine, name, function)
    recompute.checkpoint = unit
    try:
        yield held, inputs
    finally:
        recompute.checkpoint = checkpoint
        for name, function in originals.items():
            setattr(engine, name, function)
        for hook in hooks:
            hook.remove()


def _tensors(state) -> Iterator[torch.Tensor]:
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, torch.Tensor):
                yield item


def _largest_unit(
    model: ModelConfig,
    sleep: SleepConfig,
    batch: int,
    length: int,
    precision: str,
    kernels: str,
    stages: list[range],
    reduce_passes: bool,
) -> int:
    """The recomputation floor (the module docstring): under `pass`, `nested`, `block` and `selective`,
    the largest over the traced passes with gradient and their block ranges (the wake pass's prelude,
    loop and coda; a sleep pass's loop; a pipeline stage runs its share of each as a unit) and over the
    first, a middle and the last window (under sliding eviction, later windows attend to more keys),
    from a trace without checkpoints of the same passes: what a unit keeps depends on its pass (a pass
    whose states feed only passes without gradient, or the last pass's blocks after its last state,
    keep less); under `window`, a whole window with its passes (a middle one, when there are several)."""
    form, window = sleep.checkpointing, min(sleep.window, length)
    if form == "none":
        return 0
    plain = sleep.model_copy(update={"checkpoint": "none"})
    if form == "window":
        trace = _traced(model, plain, batch, min(length, 3 * window), precision, kernels, reduce_passes)
        middle = min(1, trace.traced_windows - 1)
        found = {key: size for key, size in trace.saved.items() if key[0][0] == middle}
        return sum(trace.per_stage(found, [range(len(model.blocks))])) // trace.window_weight(middle)
    # the trace a `none` layout's activations come from (cached: shared with it)
    trace = _traced(model, plain, batch, length, precision, kernels, reduce_passes)
    # the traced passes (with the pass reduction: those the trace ran) of a window that sleeps
    traced_sleep = _passes_reduced(plain)[0] if reduce_passes else plain
    passes = make_plan(traced_sleep, batch, 2 * window, len(model.blocks), range(*model.loop_range)).windows[0].passes
    return max(
        trace.recomputed((traced_window, planned.number), unit, form)
        for traced_window in range(trace.traced_windows)
        for planned in passes
        if planned.grad
        for blocks in planned.block_ranges
        for stage in stages
        if len(unit := range(max(blocks.start, stage.start), min(blocks.stop, stage.stop)))
    )


def tensor_parallel_shapes(model: ModelConfig, tensor: int) -> ModelConfig:
    """The model one tensor-parallel rank computes: its share of the attention and GDN heads, of the
    MLP width and of the (padded) vocabulary, at the full hidden size (`sleepscale.parallel.tensor`
    splits exactly these)."""
    if tensor == 1:
        return model
    from sleepscale.parallel.tensor import padded_vocab_size  # megatron-core and Triton, ~4 s: only for tensor > 1

    return model.model_copy(
        update={
            "init_from": None,
            "vocab_size": padded_vocab_size(model.vocab_size, tensor) // tensor,
            "intermediate_size": model.mlp_size // tensor,
            "attention": model.attention.model_copy(
                update={
                    "num_heads": model.attention.num_heads // tensor,
                    "num_kv_heads": model.attention_kv_heads // tensor,
                    "head_dim": model.attention_head_dim,
                }
            ),
            "gdn": model.gdn.model_copy(
                update={
                    "num_heads": model.gdn.num_heads // tensor,
                    "num_v_heads": model.gdn_v_heads // tensor,
                    "head_dim": model.gdn_head_dim,
                }
            ),
        }
    )
