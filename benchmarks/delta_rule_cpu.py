"""Forward+backward time of the CPU gated delta rule against fla's two PyTorch references.

    python benchmarks/delta_rule_cpu.py [--lengths 256 1024 2048] [--repeats 3]

All three run in one process on the same float32 inputs (B=4, H=4, d_k=d_v=64, with an initial
state), so the ratios hold on any machine even though the seconds do not. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from sleepscale.ops.delta_rule_torch import chunk_gated_delta_rule_torch
from sleepscale.ops.references import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule


def ours(q, k, v, g, beta, h0):
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0)


def fla_chunk(q, k, v, g, beta, h0):
    return naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)


def fla_recurrent(q, k, v, g, beta, h0):
    return naive_recurrent_gated_delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)


def inputs(batch, length, heads, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, length, heads, dim, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, length, heads, dim, generator=gen), dim=-1)
    v = torch.randn(batch, length, heads, dim, generator=gen)
    g = F.logsigmoid(torch.randn(batch, length, heads, generator=gen))
    beta = torch.rand(batch, length, heads, generator=gen)
    h0 = torch.randn(batch, heads, dim, dim, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta, h0)]


def forward_backward_seconds(op, args, repeats):
    times = []
    for _ in range(repeats + 1):  # the first run warms up allocators and is dropped
        for x in args:
            x.grad = None
        start = time.perf_counter()
        out, final = op(*args)
        (out.sum() + final.sum()).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()

    print(
        f"device: CPU ({platform.processor() or platform.machine()}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"B={args.batch} H={args.heads} d_k=d_v={args.dim}, float32, forward+backward, median of {args.repeats}\n")
    print(
        "| T | ours (s) | fla naive_chunk (s) | fla naive_recurrent (s) | naive_chunk / ours | naive_recurrent / ours |"
    )
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        data = inputs(args.batch, length, args.heads, args.dim)
        seconds = [forward_backward_seconds(op, data, args.repeats) for op in (ours, fla_chunk, fla_recurrent)]
        print(
            f"| {length} | {seconds[0]:.3f} | {seconds[1]:.3f} | {seconds[2]:.3f} | "
            f"{seconds[1] / seconds[0]:.1f}x | {seconds[2] / seconds[0]:.1f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
