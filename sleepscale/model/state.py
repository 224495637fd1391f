"""What a token mixer carries from one call to the next, and how sleep treats it.

Every mixer is `forward(x, state) -> (y, new_state)`. A state has two kinds of content:
- *memory* that the sleep passes refine: the GDN fast-weight matrix. Pass j+1 over a window starts
  from pass j's memory, and memory is all that survives hard eviction.
- *context*: the tail of past inputs that local operators look back on (short-convolution inputs,
  attention keys and values). Every pass over a window starts from the context the window began
  with; under sliding eviction the context left by the final pass is carried to the next window.

The engine only uses the three methods below, so it never needs to know which mixer it drives.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch

State = TypeVar("State", bound="MixerState")


@dataclasses.dataclass(frozen=True)
class MixerState:
    """Base for mixer states: a frozen dataclass of batch-first tensors (or None, or tuples of them)
    and of settings that are the same for every sequence (plain Python values). A None tensor field
    stands for zeros (a convolution tail that has seen no input yet)."""

    def evicted(self: State) -> State:
        """The state after hard eviction: memory kept, context dropped."""
        raise NotImplementedError

    def next_pass(self: State, window_start: State) -> State:
        """The state another pass over the same window starts from."""
        raise NotImplementedError

    def bounded(self: State, bound: float) -> State:
        """This state with its memory rescaled to norm <= bound (stability option); context as is."""
        return self

    def detached(self: State) -> State:
        """This state cut from the autograd graph (truncated backprop across windows)."""
        return type(self)(**{f.name: _detach(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def at_least_float32(self: State) -> State:
        """This state with its floating-point tensors in float32 or wider (how inference keeps states
        between calls whatever the compute dtype; the mixers cast them back on use)."""
        return self.mapped(lambda t: t.to(torch.promote_types(t.dtype, torch.float32)) if t.is_floating_point() else t)

    def cloned(self: State) -> State:
        """A copy that owns its tensors."""
        return self.mapped(torch.Tensor.clone)

    def mapped(self: State, function) -> State:
        """This state with `function` applied to each of its tensors."""
        return type(self)(**{f.name: _map(function, getattr(self, f.name)) for f in dataclasses.fields(self)})

    def rows(self: State, index: torch.Tensor) -> State:
        """The state of the sequences `index` [rows] (a long tensor on the state's device), in that order."""
        return self.mapped(lambda t: t.index_select(0, index))

    def where(self: State, mask: torch.Tensor, other: State) -> State:
        """Per sequence: this state where `mask` [batch] is True, else `other`."""
        return type(self)(
            **{f.name: _where(mask, getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)}
        )


def _map(function, value):
    if isinstance(value, tuple):
        return tuple(_map(function, v) for v in value)
    return function(value) if isinstance(value, torch.Tensor) else value


def _detach(value):
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value.detach() if isinstance(value, torch.Tensor) else value


def _where(mask: torch.Tensor, a, b):
    if isinstance(a, tuple) and b is None:
        b = (None,) * len(a)
    elif a is None and isinstance(b, tuple):
        a = (None,) * len(b)
    if isinstance(a, tuple):
        return tuple(_where(mask, x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and b is None:
        b = torch.zeros_like(a)
    elif a is None and isinstance(b, torch.Tensor):
        a = torch.zeros_like(b)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.where(mask.view(-1, *([1] * (a.dim() - 1))), a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a != b:
        raise ValueError(f"cannot select per sequence between {type(a).__name__} and {type(b).__name__} state fields")
    return a


@dataclasses.dataclass(frozen=True)
class NotHeld(MixerState):
    """The state of a block this rank does not hold (another pipeline stage's): every state operation
    leaves it as it is, so the engine's state operations run unchanged over a stage's states."""

    def evicted(self) -> NotHeld:
        return self

    def next_pass(self, window_start: NotHeld) -> NotHeld:
        return self

    def where(self, mask: torch.Tensor, other: NotHeld) -> NotHeld:
        return self
