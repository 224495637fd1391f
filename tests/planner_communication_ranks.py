"""Run under torchrun on 2 ranks: the communication of training steps, measured, next to what
`sleepscale.planner.communication` predicts; rank 0 writes per case (measured, predicted) as JSON.

    torchrun --nproc_per_node 2 tests/planner_communication_ranks.py OUT.json

One launch for both (process start-up is most of the time): the tensor-parallel cases over the two
ranks as megatron's tensor-parallel group, then the pipeline cases with the two ranks as two stages.

Tensor parallelism: the payload of every collective that reaches a process group (`Payloads`), by
group, in forward (`sleep_forward`) and in backward (`loss.backward()`, recomputation included), one
forward and backward per micro-batch as the trainer runs them.
Pipeline parallelism: `run_step`'s own count of the bytes each stage sent.
"""

import contextlib
import json
import sys
import time
from unittest import mock

import torch
import torch.distributed as dist
from conftest import make_config
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sleepscale import sleep as engine
from sleepscale.model import build_model
from sleepscale.model.hybrid import HybridLM
from sleepscale.model.precision import precision_context
from sleepscale.parallel.groups import init_parallel_groups
from sleepscale.parallel.pipeline import run_step
from sleepscale.parallel.pipeline_stage import PipelineStage
from sleepscale.parallel.tensor import parallelize_tensor
from sleepscale.planner.communication import pipeline_bytes, tensor_parallel_phases
from sleepscale.sleep import IGNORE_INDEX, plan_for, sleep_forward

VOCAB = 39


class Payloads(TorchDispatchMode):
    """While entered, counts the payload (the tensors this rank hands in) of each collective that
    reaches a process group, by group: `bytes[group]`, and `calls["op dtype"]`.

    Counted where the communication happens, not at the Python API: every collective of
    `torch.distributed` (and every caller's, megatron's and DeepSpeed's included) dispatches a `c10d`
    op whose kernel runs it on the group's backend, and this mode, entered around the step, sees each
    one that gets there. Torch dispatch modes stack: selective checkpointing's cache
    (`sleepscale.model.recompute`) is a mode entered later, inside this one, that sees an op first;
    an all-reduce it answers from its cache goes no further, sends nothing and is not counted, while
    one it lets run comes on to this mode. Functional collectives (`_c10d_functional`) name their group
    by a string this does not resolve: none may run."""

    # Of a c10d op's arguments, the one holding the tensors this rank hands in (the first present).
    PAYLOAD = ("input_tensors", "input_tensor", "input_list", "inputs", "input", "tensors", "tensor")

    def __init__(self):
        super().__init__()
        self.bytes, self.calls = {}, {}

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        assert op.namespace != "_c10d_functional", f"{op}: a functional collective, not counted"
        if op.namespace == "c10d":
            bound = {**dict(zip((a.name for a in op._schema.arguments), args)), **kwargs}
            if "process_group" in bound:
                payload = bound[next(name for name in self.PAYLOAD if name in bound)]
                tensors = pytree.tree_leaves(payload)
                group = dist.ProcessGroup.unbox(bound["process_group"])
                self.bytes[group] = self.bytes.get(group, 0) + sum(t.numel() * t.element_size() for t in tensors)
                key = f"{op.name()} {tensors[0].dtype}"
                self.calls[key] = self.calls.get(key, 0) + 1
        return op(*args, **kwargs)


def batches():
    """Two micro-batches: 2 x 20 tokens (windows of 8, 8 and a short 4) and 3 x 13 (8 and 5). In
    the first, sequence 0's first window carries no loss (`sleep_on: context` then sleeps on it
    for that sequence only)."""
    generator = torch.Generator().manual_seed(1)
    found = []
    for batch, length in ((2, 20), (3, 13)):
        ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
        targets = ids.roll(-1, dims=1)
        targets[:, :5] = IGNORE_INDEX
        if not found:
            targets[0, :8] = IGNORE_INDEX
        found.append((ids, targets))
    return found


TENSOR_CASES = {
    "N1": {},
    "N1-window": {"checkpoint": "window"},
    "N3-tied": {"passes": 3, "model": {"tie_embeddings": True}},
    "N3-pass-sliding": {"passes": 3, "checkpoint": "pass", "eviction": "sliding"},
    "N3-window": {"passes": 3, "checkpoint": "window"},
    "grad1-pass-sliding": {"passes": 3, "grad_passes": 1, "checkpoint": "pass", "eviction": "sliding"},
    "grad1-bound-window": {"passes": 3, "grad_passes": 1, "checkpoint": "window", "state_norm_bound": 1.0},
    "prelude-coda-pass": {"passes": 3, "checkpoint": "pass", "model": {"loop": [1, 3]}},
    "prelude-coda-window-sliding": {
        "passes": 3,
        "checkpoint": "window",
        "eviction": "sliding",
        "model": {"loop": [1, 3]},
    },
    "qk-norm-gate-bias-detach-pass": {
        "passes": 3,
        "checkpoint": "pass",
        "detach_every": 1,
        "model": {
            "attention": {
                "num_heads": 4,
                "num_kv_heads": 2,
                "qkv_bias": True,
                "output_bias": True,
                "qk_norm": True,
                "output_gate": True,
            }
        },
    },
    "context-window": {"passes": 3, "checkpoint": "window", "sleep_on": "context"},
    "chunked-pass": {"passes": 3, "checkpoint": "pass", "chunk": True},
    "chunked-window": {"passes": 3, "checkpoint": "window", "chunk": True},
    "bf16-pass-sliding": {"passes": 3, "checkpoint": "pass", "eviction": "sliding", "bf16": True},
    "N3-block": {"passes": 3, "checkpoint": "block"},
    "N3-nested": {"passes": 3, "checkpoint": "nested"},
    "N3-selective": {"passes": 3, "checkpoint": "selective"},
    "grad1-nested-sliding": {"passes": 3, "grad_passes": 1, "checkpoint": "nested", "eviction": "sliding"},
    "grad1-selective-sliding": {"passes": 3, "grad_passes": 1, "checkpoint": "selective", "eviction": "sliding"},
    "prelude-coda-block-sliding": {
        "passes": 3,
        "checkpoint": "block",
        "eviction": "sliding",
        "model": {"loop": [1, 3]},
    },
    "prelude-coda-nested": {"passes": 3, "checkpoint": "nested", "model": {"loop": [1, 3]}},
    "context-nested": {"passes": 3, "checkpoint": "nested", "sleep_on": "context"},
    "chunked-block": {"passes": 3, "checkpoint": "block", "chunk": True},
}


def tensor_case(case: dict, tp) -> dict:
    started = time.perf_counter()
    case = dict(case)
    chunk, bf16 = case.pop("chunk", False), case.pop("bf16", False)
    model_options = {
        "attention": {"num_heads": 4, "num_kv_heads": 2},
        "gdn": {"num_heads": 4, "expand_v": 1.5},
        "init_std": 0.02,
    }
    model_options.update(case.pop("model", {}))
    config = make_config(pattern="AGag", passes=case.pop("passes", 1), vocab_size=VOCAB, model=model_options, **case)
    model = parallelize_tensor(build_model(config.model), tp)
    with torch.device("meta"):
        shapes = HybridLM(config.model)
    counter, plans = Payloads(), []
    measured = [0, 0]
    # the windows' losses in chunks of 4 tokens (batch 2) and 3 (batch 3)
    chunking = mock.patch.object(engine, "LOSS_CHUNK_ELEMENTS", 3 * 3 * VOCAB) if chunk else contextlib.nullcontext()
    with chunking, precision_context("bf16" if bf16 else "fp32", torch.device("cpu")):
        for ids, targets in batches():
            plan = plan_for(shapes, ids, config.sleep, targets)
            plans.append(plan)
            with counter:
                loss = sleep_forward(model, ids, config.sleep, targets=targets, return_logits=False, plan=plan).loss
                forward = dict(counter.bytes)
                loss.backward()
            measured[0] += forward.get(tp, 0)
            measured[1] += counter.bytes.get(tp, 0) - forward.get(tp, 0)
            other = {repr(g): b for g, b in counter.bytes.items() if g is not tp}
            assert not other, f"collectives outside the tensor-parallel group: {other}"
            counter.bytes.clear()
        predicted = tensor_parallel_phases(plans, shapes, tp.size(), activation_bytes=2 if bf16 else 4)
    return {
        "measured": measured,
        "predicted": list(predicted),
        "calls": counter.calls,
        "seconds": time.perf_counter() - started,
    }


PIPELINE_CASES = {
    "N1": {"passes": 1},
    "N3": {"passes": 3},
    "N3-grad1-pass": {"passes": 3, "grad_passes": 1, "checkpoint": "pass"},
    "N4-grad2-sliding": {"passes": 4, "grad_passes": 2, "eviction": "sliding"},
    "prelude-coda": {"passes": 3, "pattern": "GA|GA", "model": {"loop": [1, 3]}},
    "prelude-coda-grad1": {"passes": 3, "grad_passes": 1, "pattern": "GA|GA", "model": {"loop": [1, 3]}},
    "loop-on-first-stage": {"passes": 3, "pattern": "GA|GA", "model": {"loop": [0, 2]}},
    "context": {"passes": 3, "sleep_on": "context"},
}


def pipeline_case(case: dict, pp) -> dict:
    started = time.perf_counter()
    case = dict(case)
    model_options = {"attention": {"num_heads": 2, "num_kv_heads": 2}, "init_std": 0.02, **case.pop("model", {})}
    config = make_config(pattern=case.pop("pattern", "AG|GA"), vocab_size=VOCAB, model=model_options, **case)
    stage = PipelineStage(build_model(config.model), config.model.stage_ranges, pp.rank())
    micro_batches = batches() * 2  # 4 micro-batches of two lengths
    plans = [plan_for(stage.model, ids, config.sleep, targets) for ids, targets in micro_batches]
    step = run_step(
        stage,
        pp,
        plans,
        [ids for ids, _ in micro_batches],
        [t for _, t in micro_batches],
        config.sleep.window,
        in_flight=pp.size(),
    )
    sent = [None] * pp.size()
    dist.all_gather_object(sent, step.sent_bytes, group=pp)
    return {
        "measured": sent,
        "predicted": pipeline_bytes(plans, config.model.stage_ranges, config.model.hidden_size),
        "seconds": time.perf_counter() - started,
    }


def main():
    started = time.perf_counter()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    tp = init_parallel_groups(tensor=dist.get_world_size()).tensor
    report = {
        "tensor": {name: tensor_case(case, tp) for name, case in TENSOR_CASES.items()},
        # run_step needs no megatron group: the two ranks are the two stages
        "pipeline": {name: pipeline_case(case, dist.group.WORLD) for name, case in PIPELINE_CASES.items()},
        "seconds": time.perf_counter() - started,
    }  # from the process group's set-up
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as out:
            json.dump(report, out, indent=1)
    if len(sys.argv) > 2:  # the Muon report of tests/planner_optimizer_ranks.py too, on the same ranks
        from megatron.core import parallel_state
        from planner_optimizer_ranks import muon_report

        parallel_state.destroy_model_parallel()  # each of its layouts makes its own groups
        muon = muon_report()
        if dist.get_rank() == 0:
            with open(sys.argv[2], "w") as out:
                json.dump(muon, out, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
