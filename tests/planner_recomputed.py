"""Measures the recomputation floor of a real backward, for test_planner_activations.py: the most bytes
that checkpoints' recomputations create and keep at once while `loss.backward()` runs."""

import contextlib
import weakref

import torch
import torch.utils._pytree as pytree
import torch.utils.checkpoint as torch_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

from sleepscale.model.precision import precision_context
from sleepscale.sleep import sleep_forward


class RecomputedStorages(TorchDispatchMode):
    """Follows, during backward, the storages that ops create while a checkpoint recomputes its unit
    (`torch.utils.checkpoint._run_fn_with_dynamo_disabled` runs every recomputation), each until it is
    freed. What a recomputation keeps is what is still alive once it has ended (its transients are
    gone): the tensors it saved for the unit's backward, and for a `nested` unit the inputs of its inner
    units. Outputs `selective` keeps are handed back from its cache without running the op, so they are
    not created again and do not count; nor do a unit's inputs, which exist already. `peak` is the most
    such bytes alive at once, sampled as each recomputation ends (by the next op outside one): between
    recomputations what they kept only shrinks, as backward consumes it."""

    def __init__(self):
        super().__init__()
        self.alive: dict[int, int] = {}  # storage id -> bytes
        self.recomputing, self.ended, self.peak = 0, False, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.ended and not self.recomputing:
            self.peak, self.ended = max(self.peak, sum(self.alive.values())), False
        out = func(*args, **(kwargs or {}))
        if self.recomputing:  # new storages only: views (of parameters, of a unit's inputs) and in-place ops make none
            existing = {tensor.untyped_storage()._cdata for tensor in _tensors((args, kwargs))}
            for tensor in _tensors(out):
                if tensor.untyped_storage()._cdata not in existing:
                    self._follow(tensor.untyped_storage())
        return out

    def _follow(self, storage) -> None:
        key = storage._cdata
        if key not in self.alive:
            self.alive[key] = storage.nbytes()
            weakref.finalize(storage, self.alive.pop, key, None)

    @contextlib.contextmanager
    def following(self):
        run = torch_checkpoint._run_fn_with_dynamo_disabled

        def recompute(fn, *args, **kwargs):
            self.recomputing += 1
            try:
                return run(fn, *args, **kwargs)
            finally:
                self.recomputing -= 1
                self.ended = True

        torch_checkpoint._run_fn_with_dynamo_disabled = recompute
        try:
            with self:
                yield self
        finally:
            torch_checkpoint._run_fn_with_dynamo_disabled = run


def _tensors(tree):
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def recomputed_peak_bytes(model, input_ids, targets, sleep, precision="fp32") -> int:
    """Measured: the recomputation floor of `sleep_forward`'s backward on these inputs (what
    `MicroBatchActivations.largest_unit` predicts)."""
    with precision_context(precision, input_ids.device):
        loss = sleep_forward(model, input_ids, sleep, targets=targets, return_logits=False).loss
    with RecomputedStorages().following() as measured:
        loss.backward()
        torch.zeros(()).add_(1)  # an op outside any recomputation: samples the last one
    return measured.peak
