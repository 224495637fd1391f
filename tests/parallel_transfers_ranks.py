"""Run under torchrun: one real training step (DeepSpeed engine over `SleepingModel`, micro-batches,
the parallelism's `forward_backward`, the update guard, `engine.step()`, as the trainer runs them) under
tensor or pipeline parallelism, recording every tensor handed to torch.distributed; then, as a
control, one evaluation-style forward with `return_logits=True`. Rank 0 writes, per rank, what
was transferred and which transfers were shaped like logits, as JSON.

    torchrun --nproc_per_node 2 tests/parallel_transfers_ranks.py OUT.json --tensor 2    # TP=2
    torchrun --nproc_per_node 2 tests/parallel_transfers_ranks.py OUT.json --pipeline 2  # PP=2

The vocabulary (97) is a size no other dimension of the model or batch has; at T=2 it is padded to
98 and each rank holds 49 rows. A transfer is logits-like if its last dimension is one of these, or
its element count is that of a [batch, length, vocab] block (a window, the short last window or the
whole sequence, and T of them for a gather's output).

What is recorded: each call of torch.distributed's collectives and point-to-point functions, also
where another module holds its own reference to one (megatron-core's `dist_all_gather_func`,
DeepSpeed's backend's `all_gather_function`): those references are replaced too. Calls made from
inside a recorded call (batch_isend_irecv's sends) are not recorded again.
"""

import argparse
import collections
import contextlib
import functools
import json
import sys
import threading

import torch
import torch.distributed as dist
from conftest import make_config

from sleepscale.config import validate
from sleepscale.model.hybrid import HybridLM
from sleepscale.parallel.distributed import setup_processes
from sleepscale.parallel.parallelism import micro_batch, parallelize
from sleepscale.sleep import IGNORE_INDEX
from sleepscale.train.spikes import SpikeGuard
from sleepscale.train.step import UpdateGuard
from sleepscale.train.trainer import TrainingStage, build_stage_engine

VOCAB = 97  # prime: no other dimension here equals it, its padding (98 at T=2) or a shard of it (49)
BATCH, WINDOW, LENGTH, HIDDEN = 3, 8, 20, 16  # windows of 8, 8 and 4 tokens
MICRO_BATCHES = 2

RECORDED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "isend",
    "irecv",
    "send",
    "recv",
    "batch_isend_irecv",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
)


class Transfers:
    """Replaces torch.distributed's communication functions, and every other reference to them in the
    loaded modules, by recording wrappers while active."""

    def __init__(self):
        self.calls: list[dict] = []
        self._depth = threading.local()
        self._active = False
        originals = {name: getattr(dist, name) for name in RECORDED if hasattr(dist, name)}
        self._wrappers = {id(function): self._wrap(name, function) for name, function in originals.items()}
        self._originals = {id(function): function for function in originals.values()}
        # (holder, attribute, original): the torch.distributed package itself, module-level aliases
        # elsewhere (not torch.distributed's own submodules: their internal calls would count twice),
        # and DeepSpeed's backend object, which keeps the all-gather / reduce-scatter it picked.
        self._sites = [(dist, name, function) for name, function in originals.items()]
        for module_name, module in list(sys.modules.items()):
            if module is None or module_name == "torch.distributed" or module_name.startswith("torch.distributed."):
                continue
            try:
                attributes = list(vars(module).items())
            except TypeError:
                continue
            for attribute, value in attributes:
                if callable(value) and id(value) in self._originals and self._originals[id(value)] is value:
                    self._sites.append((module, attribute, value))
        backend = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
        for attribute in ("all_gather_function", "reduce_scatter_function"):
            value = getattr(backend, attribute, None)
            if value is not None and id(value) in self._originals:
                self._sites.append((backend, attribute, value))

    def aliases(self) -> list[str]:
        """Where the replaced references live, besides torch.distributed."""
        return sorted(
            {
                f"{getattr(holder, '__name__', type(holder).__name__)}.{attribute}"
                for holder, attribute, _ in self._sites
                if holder is not dist
            }
        )

    def _wrap(self, name, function):
        return _Recorded(self, name, function)

    @contextlib.contextmanager
    def recording(self):
        self.calls = []
        for holder, attribute, original in self._sites:
            setattr(holder, attribute, self._wrappers[id(original)])
        self._active = True
        try:
            yield self
        finally:
            self._active = False
            for holder, attribute, original in self._sites:
                setattr(holder, attribute, original)


class _Recorded:
    """A recording stand-in for a torch.distributed function. It compares equal to the function it
    stands in for: `dist.P2POp` checks that its op is `isend` or `irecv` with ==."""

    def __init__(self, transfers: Transfers, name: str, function):
        self.transfers, self.name, self.function = transfers, name, function
        functools.update_wrapper(self, function)

    def __call__(self, *args, **kwargs):
        transfers = self.transfers
        depth = getattr(transfers._depth, "value", 0)
        if transfers._active and depth == 0:
            transfers.calls.append(_describe(self.name, args, kwargs))
        transfers._depth.value = depth + 1
        if (
            self.name == "batch_isend_irecv"
        ):  # its ops were made with our isend / irecv: it tells them apart by identity
            for operation in args[0]:
                if isinstance(operation.op, _Recorded):
                    operation.op = operation.op.function
        try:
            return self.function(*args, **kwargs)
        finally:
            transfers._depth.value = depth

    def __eq__(self, other):
        return other is self or other is self.function

    def __hash__(self):
        return hash(self.function)


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dist.P2POp):
        yield value.tensor


def _describe(name: str, args, kwargs) -> dict:
    values = [*args, *kwargs.values()]
    groups = [v for v in values if isinstance(v, dist.ProcessGroup)]
    tensors = [t for v in values for t in _tensors(v)]
    return {
        "op": name,
        "shapes": [list(t.shape) for t in tensors],
        "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
        "bytes": [t.numel() * t.element_size() for t in tensors],
        "group": dist.get_process_group_ranks(groups[0]) if groups else "world",
    }


def logits_sizes(tensor: int) -> tuple[set[int], set[int]]:
    """(last dimensions, element counts) of logits-like tensors."""
    padded = -(-VOCAB // tensor) * tensor
    widths = {VOCAB, padded, padded // tensor}
    lengths = {WINDOW, LENGTH % WINDOW or WINDOW, LENGTH}
    return widths, {BATCH * length * width * copies for length in lengths for width in widths for copies in (1, tensor)}


def logits_like(calls: list[dict], tensor: int) -> list[dict]:
    widths, counts = logits_sizes(tensor)
    flagged = []
    for call in calls:
        for shape in call["shapes"]:
            numel = 1
            for size in shape:
                numel *= size
            if (len(shape) >= 2 and shape[-1] in widths) or numel in counts:
                flagged.append({"op": call["op"], "shape": shape})
    return flagged


def summary(calls: list[dict]) -> list[dict]:
    """Calls grouped by op, tensor shapes, dtypes and group, with their count and bytes."""
    grouped = collections.Counter()
    total = collections.Counter()
    for call in calls:
        key = (call["op"], json.dumps(call["shapes"]), json.dumps(call["dtypes"]), json.dumps(call["group"]))
        grouped[key] += 1
        total[key] += sum(call["bytes"])
    return [
        {
            "op": op,
            "shapes": json.loads(shapes),
            "dtypes": json.loads(dtypes),
            "group": json.loads(group),
            "count": count,
            "bytes": total[(op, shapes, dtypes, group)],
        }
        for (op, shapes, dtypes, group), count in sorted(grouped.items())
    ]


def build_config(tensor: int, pipeline: int):
    data = make_config(
        pattern="AG|GA" if pipeline > 1 else "AGAG",
        window=WINDOW,
        passes=3,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        checkpoint="pass",
        model={"init_std": 0.02, "attention": {"num_heads": 2, "num_kv_heads": 2}},
    ).model_dump(mode="json")
    data["train"].update(micro_batch_size=BATCH, grad_accumulation=MICRO_BATCHES)
    data["parallel"] = {"tensor": tensor, "pipeline": pipeline}
    return validate(data)


def loader_batches() -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(MICRO_BATCHES):
        ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator)
        targets = ids.roll(-1, dims=1)
        targets[:, :5] = IGNORE_INDEX
        batches.append({"input_ids": ids, "targets": targets, "num_samples": BATCH})
    return batches


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--pipeline", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = build_config(args.tensor, args.pipeline)
    # As `run_training` sets up processes and the model.
    ctx = setup_processes(config.parallel)
    torch.manual_seed(config.train.seed)
    parallelism = parallelize(config, ctx)
    model = parallelism.model
    with torch.device("meta"):
        shapes = HybridLM(config.model)
    engine, sleep = build_stage_engine(parallelism, config, TrainingStage(0, config.stage_list()[0], 0, 1))
    guard = UpdateGuard(config.train, engine, parallelism, SpikeGuard(config.train, [], []))
    batches = loader_batches()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    transfers = Transfers()
    with transfers.recording():  # one training step, as `_run_steps` runs it
        micro_batches = [micro_batch(batch, shapes, sleep, ctx.device) for batch in batches]
        result = parallelism.forward_backward(engine, micro_batches, sleep, guard.before_backward)
        decision = guard.decide()
        engine.step()
    step_calls = transfers.calls
    updated = any(not torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())

    # Control: an evaluation forward asks for logits (as `_evaluate` does); they must be seen travelling.
    ids, targets = micro_batches[0].input_ids, micro_batches[0].targets
    engine.module.eval()
    with transfers.recording(), torch.no_grad():
        parallelism.evaluation_forward(engine, ids, targets, sleep)
    control_calls = transfers.calls

    mine = {
        "rank": dist.get_rank(),
        "aliases": transfers.aliases(),
        "step": summary(step_calls),
        "step_logits_like": logits_like(step_calls, args.tensor),
        "control": summary(control_calls),
        "control_logits_like": logits_like(control_calls, args.tensor),
        "applied": decision.apply,
        "updated": updated,
        "loss": result.loss.item(),
        "logits_widths": sorted(logits_sizes(args.tensor)[0]),
        "activation_shape": [BATCH, WINDOW, HIDDEN],
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        with open(args.out, "w") as out:
            json.dump({"tensor": args.tensor, "pipeline": args.pipeline, "ranks": gathered}, out, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
