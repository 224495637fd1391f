"""Activation memory of one micro-batch's training forward: what autograd saves for backward, and the
recurrent states checkpoints hold, per pipeline stage, from the model's shapes and the sleep plan.

Nothing here is a hand-written byte count. The engine itself (`sleepscale.sleep.sleep_forward`)
runs on fake tensors (torch's `FakeTensorMode`: shapes, dtypes and autograd, no data, no memory),
under `saved_tensors_hooks` that count what it saves, so every checkpointing mode, `grad_passes`,
state operation, eviction mode, precision (autocast) and loss chunking counts as it runs. Two
reductions keep that cheap at any scale, both exact for the engine as it is:

- *depth*: blocks of the same letter in the same part of the stack (prelude, loop, coda) save the
  same bytes per run, so the traced model keeps, per part, its first block (it reads the previous
  part's output, which may already be saved) and one block of each letter after it; their bytes
  are multiplied by how many such blocks the full model has;
- *length*: windows after the first see the same shapes (the same key span under sliding eviction,
  the same carried states), so at most three windows are traced, the first, one middle one and the
  last (which may be shorter and is never slept on), and the middle one counts for all middle ones.

Bytes are attributed to what was running when a tensor was saved: a block, the embedding, the head
and loss, the input of a checkpointed unit (`run_blocks` under per-pass or per-window
checkpointing), or a state operation between passes; so a pipeline stage's share is the sum over
what it runs. A storage counts once (views share it), and parameters count not at all (they are
model state, not activations); under bf16 autocast the bf16 copies of weights a matmul saves do
count (`sleepscale.model.precision.precision_context` casts afresh per use).

`held` is what checkpointed units keep outside autograd: non-reentrant checkpointing keeps the
Python arguments of each unit for its recomputation, among them the recurrent states (GDN fast
weights, convolution tails, attention caches) the unit started from. They are memory as much as
saved tensors are, but `saved_tensors_hooks` do not see them.

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
import dataclasses
import functools
import math
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import sleepscale.ops as ops
import sleepscale.sleep as engine
from sleepscale.config import ModelConfig, SleepConfig
from sleepscale.model.hybrid import HybridLM
from sleepscale.model.precision import precision_context
from sleepscale.plan import make_plan
from sleepscale.sleep import sleep_forward

# What a saved byte is attributed to (the second part of a key; the first is the window's class).
EMBEDDING, HEAD, STATE_OPS = "embedding", "head", "state_ops"


class SavedStorages:
    """Counts the distinct storages autograd saves for backward while active (a context manager),
    leaving out `excluded` ones (the parameters). `key` says what the bytes are attributed to."""

    def __init__(self, excluded: Iterator[torch.Tensor] = ()):
        self.excluded = {_storage_id(t) for t in excluded}
        self.seen: dict[int, torch.Tensor] = {}
        self.bytes: dict = defaultdict(int)
        self.key = None

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = _storage_id(tensor)
        if storage not in self.excluded and storage not in self.seen:
            # kept, so that its storage's address is not reused by a later one while counting (a graph branch
            # nobody reads, such as an evicted state's, can be freed during the forward)
            self.seen[storage] = tensor
            self.bytes[self.key] += tensor.untyped_storage().nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    @contextlib.contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            yield self


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
    """Measured: the distinct non-parameter bytes `sleep_forward` saves for backward on these inputs
    (what `MicroBatchActivations.saved` predicts)."""
    counter = SavedStorages(model.parameters())
    with counter.counting(), precision_context(precision, input_ids.device):
        sleep_forward(model, input_ids, sleep, targets=targets, return_logits=False)
    return counter.total


@dataclasses.dataclass(frozen=True)
class MicroBatchActivations:
    """Bytes one micro-batch's forward keeps until its backward, per pipeline stage."""

    saved: list[int]  # saved for backward (saved_tensors_hooks), per stage
    held: list[int]  # recurrent states kept by checkpointed units outside autograd, per stage
    states: list[
        int
    ]  # the recurrent states the sequence ends with (GDN fast weights, attention and convolution caches)
    largest_unit: int  # the most bytes one checkpointed unit saves when backward recomputes it (0: none)

    @property
    def total(self) -> list[int]:
        return [sum(parts) for parts in zip(self.saved, self.held, self.states)]


@dataclasses.dataclass(frozen=True)
class _Reduced:
    """The traced model's pattern and, per traced block, the full model's blocks it stands for."""

    config: ModelConfig
    stands_for: list[list[int]]  # per traced block: full-model block indices


def _reduced(config: ModelConfig) -> _Reduced:
    blocks, loop_part = config.blocks, range(*config.loop_range)
    pattern, stands_for, loop = "", [], None
    for part in _parts(config):
        first, rest = part[0], part[1:]
        start = len(pattern)
        pattern += blocks[first]
        stands_for.append([first])
        for letter in dict.fromkeys(blocks[i] for i in rest):
            pattern += letter
            stands_for.append([i for i in rest if blocks[i] == letter])
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
    trace = _traced(model, sleep, batch, length, precision, kernels)
    return MicroBatchActivations(
        trace.per_stage(trace.saved, stages),
        trace.per_stage(trace.held, stages),
        trace.per_stage(trace.states, stages),
        _largest_unit(model, sleep, batch, length, precision, kernels, stages),
    )


@functools.lru_cache(maxsize=64)
def _traced(model: ModelConfig, sleep: SleepConfig, batch: int, length: int, precision: str, kernels: str) -> _Trace:
    """The trace for these settings; a search over layouts asks for the same ones again."""
    return _Trace(model, sleep, batch, length, precision, kernels)


class _Trace:
    """One fake-tensor run of the engine on the reduced model; bytes per (traced window, what ran)."""

    def __init__(self, model: ModelConfig, sleep: SleepConfig, batch: int, length: int, precision: str, kernels: str):
        self.model, self.reduced = model, _reduced(model)
        sleep = sleep.model_copy(update={"sleep_on": "evicted"})  # the worst case; which windows carry loss is data
        self.windows = math.ceil(length / sleep.window)
        traced_length = length if self.windows <= 3 else 2 * sleep.window + length - (self.windows - 1) * sleep.window
        self.traced_windows = math.ceil(traced_length / sleep.window)
        counter = SavedStorages()
        with FakeTensorMode():
            traced = HybridLM(self.reduced.config)
            counter.excluded = {_storage_id(p) for p in traced.parameters()}
            ids, targets = (torch.zeros(batch, traced_length, dtype=torch.long) for _ in range(2))
            with (
                _attributed(traced, counter) as held,
                counter.counting(),
                precision_context(precision, ids.device),
                _kernels_as_on(kernels),
            ):
                out = sleep_forward(traced, ids, sleep, targets=targets, return_logits=False)
            # the recurrent states the sequence ends with, per block (GDN fast weights; caches under sliding eviction)
            self.states = {
                (0, ("block", i)): sum(t.untyped_storage().nbytes() for t in _tensors(state))
                for i, state in enumerate(out.states)
            }
        self.saved = defaultdict(int, counter.bytes)
        # The embedding and the loss save their window's slice of the micro-batch's ids and targets: a view of the
        # whole [batch, length] tensor, so its storage counts once, at the full length.
        untraced = batch * (length - traced_length) * ids.element_size()
        self.saved[0, EMBEDDING] += untraced
        self.saved[0, HEAD] += untraced
        self.held = {
            key: sum(size for storage, size in found.items() if storage not in counter.seen)
            for key, found in held.items()
        }

    def window_weight(self, window: int) -> int:
        """How many windows of the full sequence traced window `window` stands for."""
        if self.traced_windows < 3 or window in (0, self.traced_windows - 1):
            return 1
        return self.windows - 2

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
        if kind == "block":
            for block in self.reduced.stands_for[index]:
                found[stage_of[block]] += 1
            return found
        # a checkpointed unit's input: one per stage the unit's blocks run on
        return {stage: 1 for stage in {stage_of[b] for b in _full_part(self.model, self.reduced.stands_for[index][0])}}

    def per_stage(self, found: dict, stages: list[range]) -> list[int]:
        totals = [0.0] * len(stages)
        for (window, what), size in found.items():
            for stage, count in self.shares(what, stages).items():
                totals[stage] += size * count * self.window_weight(window)
        return [round(total) for total in totals]


def _loop_gdn(config: ModelConfig) -> list[int]:
    return [i for i in range(*config.loop_range) if config.blocks[i] in "Gg"]


def _parts(config: ModelConfig) -> list[range]:
    """The prelude, loop and coda blocks (those that exist)."""
    start, stop = config.loop_range
    return [part for part in (range(0, start), range(start, stop), range(stop, len(config.blocks))) if part]


def _full_part(model: ModelConfig, block: int) -> range:
    return next(part for part in _parts(model) if block in part)


@contextlib.contextmanager
def _attributed(model, counter: SavedStorages):
    """Sets `counter.key` to (window, what runs) as the engine runs `model`; yields, per key, the
    state storages (id -> bytes) that checkpointed units keep as arguments."""
    window = [-1]
    counter.key = (0, EMBEDDING)  # under per-window checkpointing the window's inputs are saved before it runs
    held: dict = defaultdict(dict)

    def hold(states, blocks) -> None:
        for i in blocks:
            for tensor in _tensors(states[i]):
                held[(max(window[0], 0), ("block", i))][_storage_id(tensor)] = tensor.untyped_storage().nbytes()

    hooks = [
        model.embeddings.register_forward_pre_hook(lambda *_: _enter_window(window, counter)),
        model.norm.register_forward_pre_hook(lambda *_: setattr(counter, "key", (window[0], HEAD))),
    ]
    for index, layer in enumerate(model.layers):
        hooks.append(
            layer.register_forward_pre_hook(
                lambda *_, index=index: setattr(counter, "key", (window[0], ("block", index)))
            )
        )
    run_blocks = model.run_blocks

    def attributed_run_blocks(hidden, states, blocks, checkpoint="none"):
        if checkpoint != "none" and torch.is_grad_enabled():
            counter.key = (window[0], ("unit", blocks.start))
            hold(states, blocks)
        return run_blocks(hidden, states, blocks, checkpoint)

    model.run_blocks = attributed_run_blocks
    originals = {
        name: getattr(engine, name)
        for name in ("before_pass", "after_pass", "after_sleep", "after_window", "_run_window")
    }

    def state_op(function):
        def run(*args, **kwargs):
            counter.key = (window[0], STATE_OPS)
            return function(*args, **kwargs)

        return run

    def run_window(model, window_plan, window_ids, window_targets, states, want_logits=True):
        if (
            window_plan.checkpoint == "window" and torch.is_grad_enabled()
        ):  # the checkpoint keeps the window's starting states
            hold(states, range(len(states)))
        return originals["_run_window"](model, window_plan, window_ids, window_targets, states, want_logits)

    for name, function in originals.items():
        setattr(engine, name, run_window if name == "_run_window" else state_op(function))
    try:
        yield held
    finally:
        for name, function in originals.items():
            setattr(engine, name, function)
        del model.run_blocks
        for hook in hooks:
            hook.remove()


def _enter_window(window: list[int], counter: SavedStorages) -> None:
    window[0] += 1
    counter.key = (window[0], EMBEDDING)


def _tensors(state) -> Iterator[torch.Tensor]:
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, torch.Tensor):
                yield item


def _largest_unit(
    model: ModelConfig, sleep: SleepConfig, batch: int, length: int, precision: str, kernels: str, stages: list[range]
) -> int:
    """The most bytes a checkpointed unit saves when backward recomputes it: under `pass`, the
    largest of the wake pass's units (`PassPlan.checkpoint_units`: prelude, loop and coda; a sleep
    pass's one unit is the loop; a pipeline stage runs its share of each as a unit) run once over a
    window; under `window`, a whole window with its passes (a middle one, when there are several)."""
    mode, window = sleep.checkpointing, min(sleep.window, length)
    if mode == "none":
        return 0
    if mode == "window":
        trace = _traced(
            model, sleep.model_copy(update={"checkpoint": "none"}), batch, min(length, 3 * window), precision, kernels
        )
        middle = {key: size for key, size in trace.saved.items() if key[0] == min(1, trace.traced_windows - 1)}
        return sum(trace.per_stage(middle, [range(len(model.blocks))])) // trace.window_weight(
            min(1, trace.traced_windows - 1)
        )
    one_pass = sleep.model_copy(update={"checkpoint": "none", "passes": 1, "random_passes": None, "grad_passes": None})
    trace = _traced(model, one_pass, batch, window, precision, kernels)
    blocks = {key: size for key, size in trace.saved.items() if key[1] not in (EMBEDDING, HEAD)}
    wake = make_plan(sleep, batch, window, len(model.blocks), range(*model.loop_range)).windows[0].passes[0]
    units = [
        range(max(unit.start, stage.start), min(unit.stop, stage.stop))
        for unit in wake.checkpoint_units
        for stage in stages
    ]
    return max(trace.per_stage(blocks, [unit for unit in units if len(unit)]))


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
