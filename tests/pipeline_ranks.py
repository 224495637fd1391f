"""Run under torchrun: the statically scheduled pipeline (`sleepscale.parallel.pipeline`) against the
single-process engine, same weights, several micro-batches; rank 0 writes a JSON report.

    torchrun --nproc_per_node P tests/pipeline_ranks.py OUT.json [--tensor 2,1]

With several tensor-parallel sizes, each layout runs in turn on the same ranks (one start-up for
both); the report holds each layout's, by tensor-parallel size.

Cases: eviction, N=1, recomputation with truncation, a loop spanning stages, sleep on the context,
and (without tensor parallelism) each stage's blocks compiled as `train.compile` compiles them.
Per case: the largest relative differences of loss, logits (forward only) and gradients; whether
every parameter of the model has its gradient on exactly one stage; whether the transfers every
rank posted pair up one to one with its peers'; the threads alive during the step; and the peak
bytes saved for backward on each stage with M = P and M = 8 micro-batches.
"""

import argparse
import json
import threading

import torch
import torch.distributed as dist
from conftest import make_config

from sleepscale.model import build_model
from sleepscale.parallel.compile import compile_blocks
from sleepscale.parallel.groups import init_parallel_groups
from sleepscale.parallel.pipeline import run_step
from sleepscale.parallel.pipeline_stage import PipelineStage
from sleepscale.parallel.tensor import full_state_dict, parallelize_tensor
from sleepscale.sleep import IGNORE_INDEX, plan_for, sleep_forward


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def micro_batches(count: int, lengths=(20, 20, 13)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for index in range(count):
        length = lengths[index % len(lengths)]  # micro-batches of different window counts
        ids = torch.randint(0, 40, (2, length), generator=generator)
        targets = ids.roll(-1, dims=1)
        targets[:, :5] = IGNORE_INDEX
        batches.append((ids, targets))
    return batches


def _threads() -> int:
    """Threads alive, but tqdm's monitor, which torch.compile's first compilation starts (not the pipeline's)."""
    return sum(thread.name != "tqdm_monitor" for thread in threading.enumerate())


def build(case: dict, groups):
    config = make_config(
        pattern=case["pattern"],
        passes=case.get("passes", 3),
        eviction=case["eviction"],
        checkpoint=case.get("checkpoint", "none"),
        grad_passes=case.get("grad_passes"),
        sleep_on=case.get("sleep_on", "evicted"),
        model={"init_std": 0.02, "loop": case.get("loop"), "attention": {"num_heads": 2, "num_kv_heads": 2}},
    )
    model = build_model(config.model).double()
    if groups.tensor.size() > 1:
        parallelize_tensor(model, groups.tensor)
    stage = PipelineStage(model, config.model.stage_ranges, groups.pipeline.rank())
    if case.get("compiled"):  # the stage's blocks, as `train.compile` compiles them (aot_eager: no C++ build)
        compile_blocks(stage.model, torch.device("cpu"), backend="aot_eager")
    return config, stage


def saved_bytes_peak(function) -> int:
    """The most bytes saved for backward alive at once while `function` runs."""
    alive, peak = {}, [0]

    def pack(tensor):
        key = object()
        alive[key] = tensor.numel() * tensor.element_size()
        peak[0] = max(peak[0], sum(alive.values()))
        return key, tensor

    def unpack(packed):
        key, tensor = packed
        alive.pop(key, None)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        function()
    return peak[0]


def compare(case: dict, groups) -> dict:
    config, stage = build(case, groups)
    batches = micro_batches(case.get("micro_batches", 3))
    reference = build_model(config.model).double()
    expected = [sleep_forward(reference, ids, config.sleep, targets=targets) for ids, targets in batches]
    (sum(out.loss for out in expected) / len(batches)).backward()

    plans = [plan_for(stage.model, ids, config.sleep, targets) for ids, targets in batches]
    threads = []
    step = run_step(
        stage,
        groups.pipeline,
        plans,
        [ids for ids, _ in batches],
        [t for _, t in batches],
        config.sleep.window,
        in_flight=groups.pipeline.size(),
        backward=lambda tensors, grads: (
            threads.append(_threads()),
            torch.autograd.backward(tensors, grads),
        ),
    )
    with torch.no_grad():
        evaluation = run_step(
            stage,
            groups.pipeline,
            plans,
            [ids for ids, _ in batches],
            [t for _, t in batches],
            config.sleep.window,
            in_flight=groups.pipeline.size(),
            want_logits=True,
        )

    grads = full_state_dict(stage.model, groups.tensor, gradients=True)
    reference_grads = dict(reference.named_parameters())
    last = stage.is_last
    result = {
        "grads": max(relative(grad, reference_grads[name].grad) for name, grad in grads.items()),
        "grad_names": sorted(grads),
        "loss": relative(step.loss, sum(out.loss for out in expected).detach() / len(batches)) if last else 0.0,
        "logits": max(relative(g, e.logits) for g, e in zip(evaluation.logits, expected)) if last else 0.0,
        "transfers": [(kind, peer, repr(transfer)) for kind, peer, transfer in step.transfers + evaluation.transfers],
        "threads": max(threads, default=1),
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    stages = groups.pipeline.size()
    pipeline_ranks = [dist.get_global_rank(groups.pipeline, s) for s in range(stages)]
    by_stage = {s: gathered[pipeline_ranks[s]] for s in range(stages)}
    paired = all(
        [(("recv" if k == "send" else "send"), what) for k, p, what in by_stage[s]["transfers"] if p == peer]
        == [(k, what) for k, p, what in by_stage[peer]["transfers"] if p == s]
        for s in range(stages)
        for peer in range(stages)
        if peer != s
    )
    return {
        "grads": max(r["grads"] for r in gathered),
        "loss": max(r["loss"] for r in gathered),
        "logits": max(r["logits"] for r in gathered),
        "stages_cover_the_model": sorted(n for r in gathered[:: groups.tensor.size()] for n in r["grad_names"])
        == sorted(reference_grads),
        "transfers_pair_up": paired and all(by_stage[s]["transfers"] for s in range(stages)),
        "threads": max(r["threads"] for r in gathered),
    }


FORMS = ("block", "nested", "selective")


def recomputation_forms(groups) -> dict:
    """Per recomputation form: whether the pipeline step's loss and every gradient (on every rank)
    equal, bit for bit, those of the same pipeline step with `checkpoint: none`: N=3, the last two
    passes with gradient, sliding eviction, a prelude and a coda (the loop spans the stages)."""
    case = {
        "pattern": "GA|GA" if groups.pipeline.size() == 2 else "G|A|G|A",
        "eviction": "sliding",
        "grad_passes": 2,
        "loop": [1, 3],
    }
    batches = micro_batches(3)
    runs = {}
    for form in ("none", *FORMS):
        config, stage = build({**case, "checkpoint": form}, groups)
        plans = [plan_for(stage.model, ids, config.sleep, targets) for ids, targets in batches]
        step = run_step(
            stage,
            groups.pipeline,
            plans,
            [ids for ids, _ in batches],
            [t for _, t in batches],
            config.sleep.window,
            in_flight=groups.pipeline.size(),
        )
        runs[form] = [step.loss, *(p.grad for p in stage.model.parameters())]
    report = {}
    for form in FORMS:
        equal = all(torch.equal(a, b) for a, b in zip(runs[form], runs["none"], strict=True))
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, equal)
        report[form] = all(ranks)
    return report


def saved_bytes(groups) -> dict:
    """Peak saved-for-backward bytes per stage with M = P and M = 8 micro-batches (same lengths)."""
    case = {"pattern": "AG|GA" if groups.pipeline.size() == 2 else "A|G|G|A", "eviction": "hard", "passes": 3}
    peaks = {}
    for count in (groups.pipeline.size(), 8):
        config, stage = build(case, groups)
        batches = micro_batches(count, lengths=(20,))
        plans = [plan_for(stage.model, ids, config.sleep, targets) for ids, targets in batches]
        peaks[count] = saved_bytes_peak(
            lambda: run_step(
                stage,
                groups.pipeline,
                plans,
                [ids for ids, _ in batches],
                [t for _, t in batches],
                config.sleep.window,
                in_flight=groups.pipeline.size(),
            )
        )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, peaks)
    return {"few": max(p[groups.pipeline.size()] for p in gathered), "many": max(p[8] for p in gathered)}


def layout_report(tensor: int) -> dict:
    """The report of every case at tensor-parallel size `tensor` (the pipeline: the other ranks)."""
    groups = init_parallel_groups(tensor=tensor, pipeline=dist.get_world_size() // tensor)
    two = groups.pipeline.size() == 2
    cases = {
        "hard": {"pattern": "AG|GA" if two else "A|G|G|A", "eviction": "hard"},
        "sliding": {"pattern": "AG|GA" if two else "A|G|G|A", "eviction": "sliding"},
        "n1": {"pattern": "AG|GA" if two else "A|G|G|A", "eviction": "hard", "passes": 1},
        "checkpointed-truncated": {
            "pattern": "AG|GA" if two else "A|G|G|A",
            "eviction": "sliding",
            "checkpoint": "pass",
            "grad_passes": 1,
            "micro_batches": 5,
        },
        # a prelude and a coda: the loop (blocks 1-2) spans two stages and loops back
        "prelude-coda": {"pattern": "GA|GA" if two else "G|A|G|A", "eviction": "hard", "loop": [1, 3]},
        "sleep-on-context": {"pattern": "AG|GA" if two else "A|G|G|A", "eviction": "hard", "sleep_on": "context"},
    }
    if groups.tensor.size() == 1:  # train.compile refuses tensor parallelism
        cases["compiled"] = {"pattern": "AG|GA" if two else "A|G|G|A", "eviction": "sliding", "compiled": True}
    report = {name: compare(case, groups) for name, case in cases.items()}
    if "compiled" in report:  # graphs torch.compile made on this rank (the compiled case is the only one compiled)
        report["compiled"]["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    report["saved_bytes"] = saved_bytes(groups)
    report["forms"] = recomputation_forms(groups)
    return report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument(
        "--tensor",
        default="1",
        help="tensor-parallel sizes, comma-separated: each layout in turn, on the same ranks (a list ending "
        "in 1 puts the compiled case last, after which no layout runs)",
    )
    args = parser.parse_args()
    dist.init_process_group("gloo")
    reports = {}
    for tensor in (int(size) for size in args.tensor.split(",")):
        if reports:  # the previous layout's groups make way for this one's
            from megatron.core import parallel_state

            dist.barrier()
            parallel_state.destroy_model_parallel()
        reports[str(tensor)] = layout_report(tensor)
    if dist.get_rank() == 0:
        with open(args.out, "w") as out:
            json.dump(reports, out, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
