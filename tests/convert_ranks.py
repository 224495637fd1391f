"""Run under torchrun with 2 ranks: each builds its part of a model started from a model directory
(`build_rank_model`: meta device, then only its own shard or stage read from the files), or with
`-seed` from the directory's model section drawn from `model.seed` instead, and reports its peak
resident memory while doing so, and whether what it holds equals the stored weights (the
single-process model built from the seed); under tensor parallelism from a directory also whether
it computes what the model built the ordinary way (whole, then sharded) computes, gradients
included. Rank 0 writes the results as JSON.

    torchrun --nproc_per_node 2 tests/convert_ranks.py MODEL_DIR MODE[,MODE...] OUT.json

MODE: tensor|pipeline|zero3[-seed]; several modes of one layout run one after the other (one start-up),
each measured from where the previous one left the process (its model freed).
"""

import gc
import json
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist

from sleepscale.config import validate
from sleepscale.config_loading import with_init_source
from sleepscale.model import build_model
from sleepscale.model.hybrid import HybridLM
from sleepscale.model.weights import SafetensorsFiles, load_weights
from sleepscale.parallel.groups import init_parallel_groups
from sleepscale.parallel.rank_model import build_rank_model
from sleepscale.parallel.tensor import full_state_dict, parallelize_tensor
from sleepscale.sleep import sleep_forward


def resident_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


LAYOUTS = {"tensor": (2, 1), "pipeline": (1, 2), "zero3": (1, 1)}


def main(model_dir: str, modes: str, out: str) -> None:
    """`modes`: comma-separated, of one layout (e.g. `tensor,tensor-seed`), measured one after the
    other on the same ranks; rank 0 writes each mode's results."""
    dist.init_process_group("gloo")
    report = {}
    for mode in modes.split(","):
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, measure(model_dir, mode))
        report[mode] = results
        gc.collect()  # the previous mode's model gone before the next measurement
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


def measure(model_dir: str, mode: str) -> dict:
    from sleepscale.convert.model_dir import read_description

    mode, seeded = mode.removesuffix("-seed"), mode.endswith("-seed")
    tensor, pipeline = LAYOUTS[mode]
    groups = init_parallel_groups(tensor, pipeline) if mode != "zero3" else None  # idempotent
    pattern = None
    if mode == "pipeline":
        blocks = read_description(model_dir)["model"]["pattern"]
        pattern = blocks[: len(blocks) // 2] + "|" + blocks[len(blocks) // 2 :]
    model_section = {
        **(read_description(model_dir)["model"] if seeded else {"init_from": model_dir}),
        **({"pattern": pattern} if pattern else {}),
    }
    config = validate(
        with_init_source(
            {
                "model": model_section,
                "sleep": {"window": 8, "passes": 3},
                "train": {"steps": 1, "zero_stage": 3 if mode == "zero3" else 0},
                "parallel": {"tensor": tensor, "pipeline": pipeline},
            }
        )
    )

    if mode == "zero3":  # DeepSpeed's imports and set-up are not loading
        import deepspeed
        import deepspeed.comm.torch  # noqa: F401  (the submodule, patched below)

        # As `setup_distributed` does for the trainer: on CPU no JIT-compiled shared-memory collective
        # (a ~90 s compile in a fresh cache), gloo needs none.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        with deepspeed.zero.Init(
            config_dict_or_path={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        ):
            torch.nn.Linear(2, 2)
    with torch.device("meta"):
        whole_bytes = sum(p.nbytes for p in HybridLM(config.model).parameters())  # read nothing before measuring
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current resident size
    before = resident_bytes("VmRSS")
    model = build_rank_model(config, groups, torch.device("cpu"))
    peak = resident_bytes("VmHWM") - before

    if seeded:  # the single-process model, built after the measurement
        files = build_model(config.model).state_dict()
        files = types.SimpleNamespace(get=files.__getitem__)
    else:
        files = SafetensorsFiles(model_dir)
    held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).nbytes for p in model.parameters())
    if mode == "zero3":
        import deepspeed

        equal_to_files = True
        for name, parameter in model.named_parameters():
            with deepspeed.zero.GatheredParameters([parameter]):
                equal_to_files &= torch.equal(parameter, files.get(name))
        equal_forward = None
    elif mode == "tensor":
        whole = full_state_dict(model, groups.tensor)
        equal_to_files = all(torch.equal(tensor, files.get(name)) for name, tensor in whole.items())
        equal_forward = None if seeded else _same_as_ordinary_path(model, config, groups)
    else:
        equal_to_files = all(torch.equal(p, files.get(name)) for name, p in model.named_parameters())
        equal_forward = None
    return {
        "rank": dist.get_rank(),
        "peak_bytes": peak,
        "held_bytes": held,
        "whole_bytes": whole_bytes,
        "equal_to_files": equal_to_files,
        "equal_forward": equal_forward,
    }


def _same_as_ordinary_path(model, config, groups) -> bool:
    """Logits and every gradient (the replicated norms' summed over the group) equal the model
    built whole, loaded, then sharded."""
    ordinary = build_model(config.model)
    load_weights(ordinary, config.model.init_from)
    parallelize_tensor(ordinary, groups.tensor)
    ids = torch.randint(0, config.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    outputs = []
    for candidate in (model, ordinary):
        out = sleep_forward(candidate, ids, config.sleep, targets=ids.roll(-1, 1))
        out.loss.backward()
        outputs.append((out.logits.detach(), {n: p.grad for n, p in candidate.named_parameters()}))
    (logits, grads), (expected_logits, expected_grads) = outputs
    return torch.equal(logits, expected_logits) and all(
        torch.equal(grads[n], expected_grads[n]) for n in expected_grads
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
