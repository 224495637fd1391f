"""Run under torchrun: on every rank, the single-process model and its pipeline-parallel version
(tensor-parallel too when the world is larger than the number of stages), same initial weights,
N=3 sleep over several micro-batches; rank 0 writes the largest relative differences as JSON.

    torchrun --nproc_per_node 2 tests/parallel_pipeline_ranks.py OUT.json            # PP=2
    torchrun --nproc_per_node 4 tests/parallel_pipeline_ranks.py OUT.json --tensor 2 # TP=2 x PP=2
"""

import argparse
import json

import torch
import torch.distributed as dist

from conftest import make_config
from sleepscale.model import build_model
from sleepscale.parallel.groups import init_parallel_groups
from sleepscale.parallel.pipeline import PipelineStage, lane_groups
from sleepscale.parallel.tensor import full_state_dict, parallelize_tensor
from sleepscale.sleep import IGNORE_INDEX, sleep_forward

MICRO_BATCHES = 3


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(MICRO_BATCHES):
        ids = torch.randint(0, 40, (2, 20), generator=generator)  # 3 windows of 8, the last one short
        targets = ids.roll(-1, dims=1)
        targets[:, :5] = IGNORE_INDEX
        batches.append((ids, targets))
    return batches


def compare(case: dict, groups, lanes) -> dict:
    config = make_config(pattern=case["pattern"], passes=3, eviction=case["eviction"], checkpoint=case["checkpoint"],
                         model={"init_std": 0.02, "loop": case.get("loop"), "attention": {"num_heads": 2, "num_kv_heads": 2}})
    batches = micro_batches()

    reference = build_model(config.model)
    expected = [sleep_forward(reference, ids, config.sleep, targets=targets) for ids, targets in batches]
    (sum(out.loss for out in expected) / len(batches)).backward()

    model = build_model(config.model)
    if groups.tensor.size() > 1:
        parallelize_tensor(model, groups.tensor)
    stage = PipelineStage(model, config.model.stage_ranges, groups.pipeline, lanes, groups.tensor)
    got = stage.run_micro_batches([
        lambda ids=ids, targets=targets: sleep_forward(stage, ids, config.sleep, targets=targets) for ids, targets in batches])
    loss = sum(out.loss for out in got) / len(batches)
    stage.backward_root(loss).backward()
    stage.wait_for_sends()

    grads = full_state_dict(stage, groups.tensor, gradients=True)
    reference_grads = dict(reference.named_parameters())
    last = stage.index == stage.last
    result = {
        "grads": max(relative(grad, reference_grads[name].grad) for name, grad in grads.items()),
        "grad_names": sorted(grads),
        "loss": relative(loss.detach(), sum(out.loss for out in expected).detach() / len(batches)) if last else 0.0,
        "logits": max(relative(g.logits, e.logits) for g, e in zip(got, expected)),
        "passes_equal": all(torch.equal(g.passes, e.passes) for g, e in zip(got, expected)),
    }
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    return {
        "grads": max(r["grads"] for r in gathered),
        "loss": max(r["loss"] for r in gathered),
        "logits": max(r["logits"] for r in gathered),
        "passes_equal": all(r["passes_equal"] for r in gathered),
        # every parameter of the unsplit model has its gradient on exactly one stage
        "stages_cover_the_model": sorted(n for r in gathered[:: groups.tensor.size()] for n in r["grad_names"]) == sorted(reference_grads),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tensor", type=int, default=1)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    groups = init_parallel_groups(tensor=args.tensor, pipeline=dist.get_world_size() // args.tensor)
    lanes = lane_groups(groups.pipeline, MICRO_BATCHES)
    cases = {
        "hard": {"pattern": "AG|GA", "eviction": "hard", "checkpoint": "none"},
        "sliding": {"pattern": "AG|GA", "eviction": "sliding", "checkpoint": "none"},
        "sliding-checkpointed": {"pattern": "AG|GA", "eviction": "sliding", "checkpoint": "pass"},
        # a prelude and a coda: the loop (blocks 1-2) spans both stages and loops back from stage 1 to 0
        "prelude-coda": {"pattern": "GA|GA", "eviction": "hard", "checkpoint": "pass", "loop": [1, 3]},
    }
    report = {name: compare(case, groups, lanes) for name, case in cases.items()}
    if dist.get_rank() == 0:
        with open(args.out, "w") as out:
            json.dump(report, out, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
