"""Muon's optimizer step at DP1, DP2, TP2 and TP2 x DP2 (CPU, gloo): step time, the Newton-Schulz
split, bytes sent and optimizer state per rank.

    python benchmarks/muon_scale.py [--hidden 256] [--pattern AGAGAGAG] [--vocab 256] [--warmup 2] [--steps 5]
                                    [--layouts DP1 DP2 TP2 TP2xDP2] [--ns-dtype float32]

The parent runs one `torchrun` (`python -m torch.distributed.run`, gloo on CPU, OMP_NUM_THREADS=1 per
rank) per layout and prints one table:

    DP1       1 rank
    DP2       2 ranks, train.zero_stage 1 (state sharded over the data ranks)
    TP2       2 ranks, parallel.tensor 2
    TP2xDP2   4 ranks, parallel.tensor 2, train.zero_stage 1
    DP2-Z0    2 ranks, train.zero_stage 0 (Newton-Schulz split, state replicated; not in the default list)

Each rank builds its model as the trainer does (`setup_processes`, `parallelize`, then the stage's
optimizer through `build_optimizer` with the trainer's `_muon_layout`); there is no DeepSpeed engine
(it only averages gradients before Muon runs): every trainable parameter's `.grad` is set to a
deterministic random gradient, drawn for the whole tensor from a seed per (step, parameter) and cut
to the rank's tensor-parallel shard, so it is the same on every data rank and in every layout. Then
`--warmup` untimed and `--steps` timed `optimizer.step()` calls, each after a barrier.

Per layout (every per-rank figure is the rank's median over the timed steps): step ms, median and
max over ranks; Newton-Schulz per step on a rank (`sleepscale.train.muon.newton_schulz`, wrapped),
min / max over ranks, as wall ms, as CPU ms of the calling thread (`time.thread_time`: the work
itself, which oversubscribed cores do not stretch), as runs (`newton_schulz_runs` deltas) and as
GFLOP (`newton_schulz_flops`, the cost the owners are balanced by);
bytes sent per step (`sent_bytes` deltas: the payload a rank put into the optimizer's collectives,
a broadcast counted once per receiver), max over ranks and total, next to the formula from
`sleepscale.train.muon`'s docstring, independent of which rank owns what:

    total = (D - 1) * sum over tensor ranks of the weights the data ranks share (Muon matrices;
            with state sharding every parameter)
          + (T - 1) * sum over Muon matrices of (2 x shard: one gather, one scatter, if split over
            the tensor ranks; the whole matrix, broadcast, if replicated)

state MB: the tensors in `optimizer.state` (Muon momentum, AdamW moments), max over ranks and total;
max |dw| vs DP1: the largest difference of the weights after every step from DP1's (tensor shards
gathered whole; float32 Newton-Schulz makes them bit-identical), and data ranks checked identical.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# name: (ranks, parallel.tensor, train.zero_stage)
LAYOUTS = {"DP1": (1, 1, 0), "DP2": (2, 1, 1), "TP2": (2, 2, 0), "TP2xDP2": (4, 2, 1), "DP2-Z0": (2, 1, 0)}


def build_config(args, tensor: int, zero_stage: int):
    from sleepscale.config import validate

    return validate(
        {
            "model": {"vocab_size": args.vocab, "hidden_size": args.hidden, "pattern": args.pattern},
            "sleep": {"window": 8},
            "optimizer": {"name": "muon", "muon_ns_dtype": args.ns_dtype},
            "train": {"steps": args.warmup + args.steps, "zero_stage": zero_stage, "seed": 0},
            "parallel": {"tensor": tensor},
        }
    )


def _tensor_bytes(value) -> int:
    return value.numel() * value.element_size() if torch.is_tensor(value) else 0


def rank_main(args) -> None:
    """One torchrun rank of layout `args.worker`: its measurements, gathered to rank 0 and written to `args.out`."""
    import torch.distributed as dist

    import sleepscale.train.muon as muon_module
    from sleepscale.parallel.distributed import setup_processes
    from sleepscale.parallel.parallelism import parallelize
    from sleepscale.parallel.tensor import shard_slice
    from sleepscale.train.optim import build_optimizer
    from sleepscale.train.trainer import _muon_layout

    torch.set_num_threads(1)
    _, tensor, zero_stage = LAYOUTS[args.worker]
    config = build_config(args, tensor, zero_stage)
    ctx = setup_processes(config.parallel)
    torch.manual_seed(config.train.seed)
    parallelism = parallelize(config, ctx)
    model = parallelism.model.model
    layout = _muon_layout(config, parallelism)
    optimizer = build_optimizer(model, config.optimizer, skips_on_overflow=zero_stage == 0, layout=layout)
    tensor_group = layout.tensor if layout.tensor_size > 1 else None
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def where(p):  # (dim, start, stop, stored rows) of this rank's shard in the whole tensor, or None
        return None if tensor_group is None else shard_slice(p, tensor_group)

    def gradient(step: int, index: int, p) -> torch.Tensor:
        place = where(p)
        if place is None:
            return torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + index))
        dim, start, stop, stored = place
        shape = list(p.shape)
        shape[dim] = stored if dim == 0 else p.shape[dim] * tensor_group.size()
        whole = torch.randn(shape, generator=torch.Generator().manual_seed(1000 * step + index))
        padding = p.shape[dim] * tensor_group.size() - shape[dim]
        if padding:  # vocabulary rows padded for the tensor split: no gradient
            whole = torch.cat([whole, whole.new_zeros(padding, *shape[1:])])
        return whole.narrow(dim, start, stop - start).contiguous()

    ns = {"seconds": 0.0, "cpu": 0.0, "flops": 0}
    newton_schulz = muon_module.newton_schulz

    def timed_newton_schulz(matrix, steps, dtype):
        started, cpu = time.perf_counter(), time.thread_time()
        out = newton_schulz(matrix, steps, dtype)
        ns["seconds"] += time.perf_counter() - started
        ns["cpu"] += time.thread_time() - cpu
        ns["flops"] += muon_module.newton_schulz_flops(tuple(matrix.shape), steps)
        return out

    muon_module.newton_schulz = timed_newton_schulz
    steps = []
    for step in range(args.warmup + args.steps):
        for index, (_, p) in enumerate(named):
            p.grad = gradient(step, index, p)
        runs, sent = optimizer.newton_schulz_runs, optimizer.sent_bytes
        ns.update(seconds=0.0, cpu=0.0, flops=0)
        dist.barrier()
        started = time.perf_counter()
        optimizer.step()
        seconds = time.perf_counter() - started
        if step >= args.warmup:
            steps.append(
                {
                    "seconds": seconds,
                    "ns_seconds": ns["seconds"],
                    "ns_cpu": ns["cpu"],
                    "ns_flops": ns["flops"],
                    "ns_runs": optimizer.newton_schulz_runs - runs,
                    "sent": optimizer.sent_bytes - sent,
                }
            )
    muon_module.newton_schulz = newton_schulz

    # the formula's share of this rank (summed over ranks it is the layout's total; see the module's text)
    data, tensor_size = layout.data_size, layout.tensor_size
    muon = {id(p) for group in optimizer.param_groups if group["use_muon"] for p in group["params"]}
    shared = sum(_tensor_bytes(p) for _, p in named if id(p) in muon or layout.shard_state)
    tensor_part = 0.0
    for _, p in named:
        if id(p) in muon and tensor_size > 1:
            split = getattr(p, "tensor_model_parallel", False)
            tensor_part += (2 * _tensor_bytes(p) if split else _tensor_bytes(p)) * (tensor_size - 1) / tensor_size
    formula = (data - 1) / data * shared + tensor_part / data

    # the weights: identical over data ranks? and whole (shards gathered) from global rank 0, for the parent
    whole, data_differ = {}, 0.0
    with torch.no_grad():
        for name, p in named:
            value = p.detach()
            if data > 1:
                reference = value.clone()
                dist.broadcast(reference, dist.get_global_rank(layout.data, 0), group=layout.data)
                data_differ = max(data_differ, (value - reference).abs().max().item())
            place = where(p)
            if place is not None:
                pieces = [torch.empty_like(value) for _ in range(tensor_size)]
                dist.all_gather(pieces, value.contiguous(), group=tensor_group)
                value = torch.cat(pieces, dim=place[0])[: place[3]] if place[0] == 0 else torch.cat(pieces, place[0])
            whole[name] = value.clone()
    if ctx.rank == 0:
        torch.save(whole, Path(args.out).with_suffix(".pt"))
    state = [sum(_tensor_bytes(v) for v in s.values()) for s in optimizer.state.values()]
    result = {
        "rank": ctx.rank,
        "data_rank": layout.data_rank,
        "tensor_rank": layout.tensor_rank,
        "steps": steps,
        "state_bytes": sum(state),
        "formula": formula,
        "data_differ": data_differ,
        "muon_matrices": len(muon),
        "parameters": sum(value.numel() for value in whole.values()),
    }
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if ctx.rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def model_arguments(args) -> list[str]:
    return [
        f"--hidden={args.hidden}",
        f"--pattern={args.pattern}",
        f"--vocab={args.vocab}",
        f"--warmup={args.warmup}",
        f"--steps={args.steps}",
        f"--ns-dtype={args.ns_dtype}",
    ]


def run_layout(args, name: str, work: Path) -> tuple[list[dict], dict, float]:
    out = work / f"{name}.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={LAYOUTS[name][0]}",
        f"--master_port={_free_port()}",
        __file__,
        f"--worker={name}",
        f"--out={out}",
        *model_arguments(args),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
    started = time.perf_counter()
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{name}: torchrun exited {done.returncode}")
    weights = torch.load(out.with_suffix(".pt"))
    return json.loads(out.read_text()), weights, time.perf_counter() - started


def row(name: str, results: list[dict], weights: dict, reference: dict | None) -> str:
    ranks, tensor, zero_stage = LAYOUTS[name]

    def per_rank(key: str, scale: float = 1.0) -> list[float]:  # each rank's median over the timed steps
        return [statistics.median(s[key] for s in r["steps"]) * scale for r in results]

    step, ns, ns_cpu = per_rank("seconds", 1e3), per_rank("ns_seconds", 1e3), per_rank("ns_cpu", 1e3)
    flops, sent = per_rank("ns_flops", 1e-9), per_rank("sent", 1e-6)
    runs = [s["ns_runs"] for r in results for s in r["steps"]]
    state = [r["state_bytes"] / 1e6 for r in results]
    formula = sum(r["formula"] for r in results) / 1e6
    if reference is None:
        differ = "-"
    else:
        differ = f"{max((weights[k] - reference[k]).abs().max().item() for k in reference):.1e}"
    return (
        f"| {name} | {ranks} ({tensor} x {ranks // tensor}) | {zero_stage} | {statistics.median(step):.0f} / "
        f"{max(step):.0f} | {min(ns):.0f} / {max(ns):.0f} | {min(ns_cpu):.0f} / {max(ns_cpu):.0f} | "
        f"{min(runs)} / {max(runs)} | {min(flops):.1f} / {max(flops):.1f} | {max(sent):.2f} | {sum(sent):.2f} | "
        f"{formula:.2f} | {max(state):.1f} | {sum(state):.1f} | {differ} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--pattern", default="AGAGAGAG")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ns-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layouts", nargs="+", default=["DP1", "DP2", "TP2", "TP2xDP2"], choices=list(LAYOUTS))
    parser.add_argument("--worker", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rank_main(args)
        return
    if "LOCAL_RANK" in os.environ:
        parser.error("run it with python, not under torchrun: it starts one torchrun per layout itself")

    started = time.perf_counter()
    rows, walls, first = [], [], None
    with tempfile.TemporaryDirectory(prefix="muon-scale-") as work:
        reference = None
        for name in args.layouts:
            results, weights, wall = run_layout(args, name, Path(work))
            if name == "DP1":
                reference = weights
            rows.append((name, results, weights))
            walls.append(f"{name} {wall:.0f} s")
            first = first or results[0]
        lines = [row(name, results, weights, None if name == "DP1" else reference) for name, results, weights in rows]
        data_identical = all(r["data_differ"] == 0 for _, results, _ in rows for r in results)
    command = "python benchmarks/muon_scale.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"command: {command.strip()}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo on CPU, "
        "OMP_NUM_THREADS=1 per rank"
    )
    print(
        f"model: {args.pattern}, hidden {args.hidden}, vocab {args.vocab}, {first['parameters']:,} parameters, "
        f"{first['muon_matrices']} Muon matrices; Newton-Schulz in {args.ns_dtype}; "
        f"{args.warmup} warm-up + {args.steps} timed steps per layout\n"
    )
    print(
        "| layout | ranks (T x D) | ZeRO | step ms (median / max rank) | NS wall ms/rank (min / max) "
        "| NS CPU ms/rank (min / max) | NS runs/rank (min / max) | NS GFLOP/rank (min / max) | MB sent/rank (max) "
        "| MB sent (total) | formula MB | state MB/rank (max) | state MB (total) | max \\|dw\\| vs DP1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for line in lines:
        print(line)
    print(
        f"\nweights identical over the data ranks of every layout: {data_identical}; "
        f"wall: {', '.join(walls)}; total {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
