"""What `train.compile` costs and buys on this CPU: compile time, step time compiled against eager
(inductor's CPU backend), and operators dispatched per pass, at the quickstart's shape and
`benchmarks/step_time.py`'s wide shape, N = 1 and 4; every ratio from one process, eager and
compiled steps alternating.

    python benchmarks/compile.py [--shapes quickstart wide] [--passes 1 4] [--rounds 3] [--out FILE]

Compile time: the first compiled step (every block graph compiled, forward and backward, for full
windows and the shorter last one) less an eager step, with inductor's on-disk cache empty (a fresh
`TORCHINDUCTOR_CACHE_DIR`; `--warm-cache` keeps the usual one: what a second run of the same shapes
pays, as the quickstart sweep's N=1 run after its N=3 one); a later N replays the same graphs. Operators
per pass: aten operators the profiler records in one step (forward and backward), over the step's
block passes (windows x passes); a compiled graph's fused kernels are one call each, its matrix
products stay aten calls.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from step_time import config_dict

from sleepscale.config import validate
from sleepscale.model import build_model
from sleepscale.parallel.compile import compile_blocks
from sleepscale.sleep import sleep_forward

# shape -> (step_time model, batch, tokens per sequence): the quickstart trains batches of 128 sequences of 50 tokens
SHAPES = {"quickstart": ("narrow", 128, 50), "wide": ("wide", 4, 100)}


def _config(shape: str, passes: int):
    model, batch, _ = SHAPES[shape]
    return validate(config_dict(model, passes, "pass" if passes > 1 else "none", batch))


def _step(model, ids, sleep) -> float:
    start = time.perf_counter()
    out = sleep_forward(model, ids, sleep, targets=ids.roll(-1, 1), return_logits=False)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _operators(model, ids, sleep) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        _step(model, ids, sleep)
    return sum(1 for event in profile.events() if event.name.startswith("aten::"))


def measure(shape: str, passes_list: list[int], rounds: int) -> list[dict]:
    _, batch, length = SHAPES[shape]
    config = _config(shape, passes_list[0])
    eager = build_model(config.model)
    compiled = compile_blocks(copy.deepcopy(eager), torch.device("cpu"))
    ids = torch.randint(0, config.model.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    eager_first = _step(eager, ids, config.sleep)
    compile_seconds = _step(compiled, ids, config.sleep) - eager_first
    rows = []
    for passes in passes_list:
        sleep = _config(shape, passes).sleep
        _step(compiled, ids, sleep)  # a new N: nothing to compile, but warm
        times = {"eager": [], "compiled": []}
        for _ in range(rounds):
            for name, model in (("eager", eager), ("compiled", compiled)):
                times[name].append(_step(model, ids, sleep))
        windows = -(-length // sleep.window)
        block_passes = windows + (windows - 1) * (passes - 1)  # the last window is not slept on
        operators = {name: _operators(model, ids, sleep) for name, model in (("eager", eager), ("compiled", compiled))}
        eager_s, compiled_s = (statistics.median(times[name]) for name in ("eager", "compiled"))
        rows.append(
            {
                "shape": shape,
                "N": passes,
                "compile s": compile_seconds if passes == passes_list[0] else None,
                "eager s": eager_s,
                "compiled s": compiled_s,
                "compiled / eager": compiled_s / eager_s,
                "ops per pass eager": operators["eager"] / block_passes,
                "ops per pass compiled": operators["compiled"] / block_passes,
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--passes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's usual on-disk cache")
    args = parser.parse_args()
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    rows = [row for shape in args.shapes for row in measure(shape, args.passes, args.rounds)]
    header = list(rows[0])
    lines = [
        f"`python benchmarks/compile.py --shapes {' '.join(args.shapes)} --passes {' '.join(map(str, args.passes))} "
        f"--rounds {args.rounds}{' --warm-cache' if args.warm_cache else ''}`",
        "",
        f"{datetime.date.today()}; {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; "
        f"inductor's CPU backend, its cache {'warm' if args.warm_cache else 'cold'}; medians of {args.rounds} "
        "alternating rounds; the run took "
        f"{time.perf_counter() - start:.0f} s",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = ["" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
