"""Inference with sleep: is answering flat in N? Decode and ingest time against N, and a cache hit.

    python benchmarks/inference_sleep.py [--width 256] [--window 64] [--windows 15] [--repeats 3]

One model (AGAG, random weights, float32) and one prompt of `windows` full windows plus one token,
so that the answer is decoded inside a window, with no eviction while answering. For N in 1, 2, 4, 8
(all in one run after a warm-up, interleaved over `repeats` rounds that each start at another N, best round kept):
- decode: seconds per token over the answer's tokens (one wake pass each, whatever N);
- decode across boundaries: seconds per token over 4 windows' worth of tokens, which sleeps on
  each window it fills (the sleep is paid while decoding there);
- ingest: seconds per prompt token (wake pass plus N - 1 sleep passes over every evicted window);
- cache hit: restoring the consolidated states of the prompt instead of reading it.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from sleepscale.config import validate
from sleepscale.inference import SleepingSession, StateCache
from sleepscale.model import build_model

PASSES = (1, 2, 4, 8)


def measure(model, config, prompt: torch.Tensor, answer_tokens: int, crossing_tokens: int) -> dict[str, float]:
    cache = StateCache("benchmark")
    session = SleepingSession(model, config.sleep)
    started = time.perf_counter()
    cache.ingest(session, prompt)
    ingest = time.perf_counter() - started
    snapshot = session.snapshot()

    started = time.perf_counter()
    for _ in session.generate(answer_tokens):
        pass
    decode = (time.perf_counter() - started) / answer_tokens

    session.restore(snapshot)
    started = time.perf_counter()
    for _ in session.generate(crossing_tokens):
        pass
    crossing = (time.perf_counter() - started) / crossing_tokens

    started = time.perf_counter()
    assert cache.ingest(SleepingSession(model, config.sleep), prompt)
    hit = time.perf_counter() - started
    return {
        "decode": decode,
        "crossing": crossing,
        "ingest": ingest / prompt.shape[1],
        "ingest_total": ingest,
        "hit": hit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--windows", type=int, default=15, help="full windows in the prompt")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    heads = max(1, args.width // 64)
    configs = {
        n: validate(
            {
                "model": {
                    "vocab_size": 256,
                    "hidden_size": args.width,
                    "pattern": "AGAG",
                    "attention": {"num_heads": heads},
                    "gdn": {"num_heads": heads},
                },
                "sleep": {"window": args.window, "passes": n},
                "train": {"steps": 1},
            }
        )
        for n in PASSES
    }
    model = build_model(configs[1].model).eval()
    prompt = torch.randint(0, 256, (1, args.windows * args.window + 1), generator=torch.Generator().manual_seed(0))
    answer_tokens = args.window - 1  # fills the prompt's last window, without evicting it
    measure(model, configs[1], prompt, answer_tokens, 4 * args.window)  # warm-up, not recorded
    best: dict[int, dict[str, float]] = {}
    for round_ in range(args.repeats):
        for n in PASSES[round_ % len(PASSES) :] + PASSES[: round_ % len(PASSES)]:  # a different N first each round
            result = measure(model, configs[n], prompt, answer_tokens, 4 * args.window)
            best[n] = {key: min(value, best.get(n, {}).get(key, float("inf"))) for key, value in result.items()}

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"model: AGAG, width {args.width}, {sum(p.numel() for p in model.parameters()):,} parameters, float32; window "
        f"{args.window}; prompt {prompt.shape[1]} tokens ({args.windows} windows + 1); best of {args.repeats} rounds\n"
    )
    print(
        "| N | decode ms/token | vs N=1 | decode across 4 windows ms/token | ingest ms/prompt token | vs N=1 | "
        "cache hit ms | fresh ingest / hit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in PASSES:
        row = best[n]
        print(
            f"| {n} | {row['decode'] * 1e3:.2f} | "
            f"{row['decode'] / best[1]['decode']:.3f} | {row['crossing'] * 1e3:.2f} | "
            f"{row['ingest'] * 1e3:.3f} | {row['ingest'] / best[1]['ingest']:.2f} | {row['hit'] * 1e3:.2f} | "
            f"{row['ingest_total'] / row['hit']:.0f}x |"
        )


if __name__ == "__main__":
    main()
