"""The GPU check: run by `bash benchmarks/gpu/check.sh` on one CUDA GPU; writes benchmarks/results/gpu.md.

1. Parity: our window kernel and fla's kernels (through `sleepscale.ops.gated_delta_rule`) against
   the PyTorch op on the CPU in float64, same inputs: output, final state and all input gradients,
   fp32 and bf16 inputs, windows of 24 and 64 tokens with a carried state.
2. Kernel time: ours against fla's chunked kernel, forward and forward+backward with a state, at
   window lengths 24, 64, 75 and 256 (ours takes at most 64).
3. A ~380M-parameter AGAG... hybrid (bf16 autocast, fused AdamW): tokens/s, peak memory and MFU at
   N in {1, 2, 4}, with per-pass checkpointing and with `grad_passes: 1`, on each backend, eager and
   compiled (`train.compile`, with its compile time); and the host synchronisations in one step
   (torch.cuda.set_sync_debug_mode).
4. Decoding: milliseconds per token at N = 1 and 4.

`--cpu-smoke` (`check.sh --smoke`) runs none of that: the tiny model, one eager training step and a
short decode on the CPU with the PyTorch backend, one table row, no file; it shows that the bundle
of wheels (benchmarks/gpu/bundle.sh) holds everything this script imports, in seconds, without Triton.
"""

from __future__ import annotations

import argparse
import datetime
import time
import warnings
from pathlib import Path

import torch

from sleepscale.config import validate
from sleepscale.flops import peak_flops, plan_flops
from sleepscale.inference import SleepingSession
from sleepscale.model import HybridLM, build_model
from sleepscale.ops import gated_delta_rule
from sleepscale.parallel.compile import compile_blocks
from sleepscale.sleep import plan_for, sleep_forward

NAMES = ("output", "state", "q", "k", "v", "a", "b", "A_log", "dt_bias", "initial_state")


def op_inputs(batch, length, heads, value_heads, key_dim, value_dim, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    return [
        randn(batch, length, heads, key_dim),
        randn(batch, length, heads, key_dim),
        randn(batch, length, value_heads, value_dim),
        randn(batch, length, value_heads),
        randn(batch, length, value_heads),
        torch.rand(value_heads, generator=generator, dtype=torch.float64) * 2,
        randn(value_heads),
        randn(batch, value_heads, key_dim, value_dim, scale=0.3),
    ]


def run_op(backend, inputs, d_output, d_state):
    """Outputs and the gradients of every input for the given output gradients."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    output, state = gated_delta_rule(*leaves, backend=backend)
    torch.autograd.backward([output, state], [d_output.to(output.dtype), d_state.to(state.dtype)])
    return [output.detach(), state.detach()] + [x.grad for x in leaves]


def parity(device, smoke: bool) -> list[str]:
    rows = []
    dim = 8 if smoke else 128
    for length in (24,) if smoke else (24, 64):
        inputs = op_inputs(2, length, 4, 8, dim, dim)
        generator = torch.Generator().manual_seed(1)
        d_output = torch.randn(2, length, 8, dim, generator=generator, dtype=torch.float64)
        d_state = torch.randn(2, 8, dim, dim, generator=generator, dtype=torch.float64)
        expected = run_op("torch", inputs, d_output, d_state)
        for dtype in (torch.float32, torch.bfloat16):
            cast = [x.to(device, dtype if i < 5 else torch.float32) for i, x in enumerate(inputs)]
            for backend in ("window", "fla"):
                if device.type == "cpu" and backend == "fla" and dtype == torch.bfloat16:
                    # Triton's interpreter multiplies bf16 tl.dot operands as raw bits (tests/triton_cpu_interpreter.py)
                    continue
                got = run_op(backend, cast, d_output.to(device), d_state.to(device))
                errors = {
                    name: ((g.double().cpu() - e).abs().max() / e.abs().max()).item()
                    for name, g, e in zip(NAMES, got, expected)
                }
                gradients = {name: error for name, error in errors.items() if name not in ("output", "state")}
                worst = max(gradients, key=gradients.get)
                rows.append(
                    f"| {length} | {str(dtype).removeprefix('torch.')} | {backend} | {errors['output']:.1e} | "
                    f"{errors['state']:.1e} | {gradients[worst]:.1e} ({worst}) |"
                )
    return rows


def timer(device):
    """Milliseconds per call: triton's do_bench on CUDA; on the CPU (the smoke run) one timed call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench

    def once(function):
        start = time.perf_counter()
        function()
        return (time.perf_counter() - start) * 1e3

    return once


def kernel_times(device, smoke: bool) -> list[str]:
    rows = []
    batch, heads, dim = (1, 1, 8) if smoke else (16, 8, 128)  # the 380M model's GDN: 8 heads of 128, 16 sequences
    do_bench = timer(device)
    for length in (24,) if smoke else (24, 64, 75, 256):
        inputs = [
            x.to(device, torch.bfloat16 if i < 5 else torch.float32)
            for i, x in enumerate(op_inputs(batch, length, heads, heads, dim, dim))
        ]
        leaves = [x.requires_grad_() for x in inputs]
        times = {}
        for backend in ("window", "fla"):
            if backend == "window" and length > 64:
                times[backend] = (None, None)
                continue

            def forward():
                return gated_delta_rule(*leaves, backend=backend)

            def forward_backward():
                output, state = forward()
                torch.autograd.backward([output, state], [torch.ones_like(output), torch.ones_like(state)])

            times[backend] = (do_bench(forward), do_bench(forward_backward))
        ours, theirs = times["window"], times["fla"]

        def cell(t):
            return "—" if t is None else f"{t * 1e3:.0f}"

        def ratio(a, b):
            return "—" if a is None else f"{b / a:.2f}x"

        rows.append(
            f"| {length} | {cell(ours[0])} | {cell(theirs[0])} | {ratio(ours[0], theirs[0])} | {cell(ours[1])} | "
            f"{cell(theirs[1])} | {ratio(ours[1], theirs[1])} |"
        )
    return rows


MODEL = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "pattern": "AGAG" * 6,
    "intermediate_size": 2816,
    "attention": {"num_heads": 16, "num_kv_heads": 4},
    "gdn": {"num_heads": 8, "head_dim": 128},
}
SMOKE_MODEL = {
    "vocab_size": 64,
    "hidden_size": 32,
    "pattern": "AG",
    "intermediate_size": 48,
    "attention": {"num_heads": 2, "num_kv_heads": 1},
    "gdn": {"num_heads": 2, "head_dim": 8},
}


def model_rows(device, steps: int, smoke: bool) -> list[str]:
    rows = []
    shapes = SMOKE_MODEL if smoke else MODEL
    batch, length, window = (1, 16, 8) if smoke else (8, 1024, 64)
    settings = (
        [(1, "none", None, "auto", False)]
        + [(n, "pass", None, "auto", compiled) for n in (1, 4) for compiled in (False, True)]
        + [(2, "pass", None, "auto", False)]
        + [(n, "none", 1, "auto", False) for n in (2, 4)]
        + [(4, "pass", None, "fla", False), (4, "pass", None, "fla", True)]
    )
    if smoke:
        settings = [(2, "pass", None, "auto", False), (2, "none", 1, "fla", False), (2, "pass", None, "auto", True)]
    cuda = device.type == "cuda"
    for passes, checkpoint, grad_passes, backend, compiled in settings:
        config = validate(
            {
                "model": {**shapes, "backend": backend},
                "sleep": {"window": window, "passes": passes, "checkpoint": checkpoint, "grad_passes": grad_passes},
                "train": {"steps": 1},
            }
        )
        torch.manual_seed(0)
        model = build_model(config.model, device)
        if compiled:  # `train.compile`; the smoke run skips inductor's C++ build (aot_eager: the same graphs)
            compile_blocks(model, device, backend="aot_eager" if smoke else "inductor")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        ids = torch.randint(0, shapes["vocab_size"], (batch, length), device=device)
        targets = ids.roll(-1, 1)
        plan = plan_for(model, ids, config.sleep)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = sleep_forward(model, ids, config.sleep, targets=targets, return_logits=False, plan=plan).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        compile_start = time.perf_counter()
        for _ in range(1 if compiled else 0 if smoke else 2):  # compile and warm up
            step()
        compile_seconds = f"{time.perf_counter() - compile_start:.0f}" if compiled else "—"
        syncs = "—"
        if cuda:
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                step()
                torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / steps
        flops = plan_flops(plan, model, config.sleep.window)
        peak = peak_flops(device)
        mfu = f"{flops / seconds / peak:.3f}" if peak else "—"
        rows.append(
            f"| {passes} | {checkpoint} | {grad_passes or 'all'} | {backend} | {'yes' if compiled else 'no'} | "
            f"{ids.numel() / seconds:,.0f} | {torch.cuda.max_memory_allocated() / 2**30 if cuda else 0:.1f} | "
            f"{mfu} | {syncs} | {compile_seconds} |"
        )
        print(rows[-1], flush=True)
        model = optimizer = None  # freed before the next setting is built
        if cuda:
            torch.cuda.empty_cache()
    return rows


def decode_rows(device, smoke: bool) -> list[str]:
    """Milliseconds per decoded token at N = 1 and 4 (a decoded token is one pass whatever N is)."""
    shapes = SMOKE_MODEL if smoke else MODEL
    batch, window, tokens = (1, 8, 2) if smoke else (8, 64, 32)
    rows = []
    for passes in (1, 4):
        config = validate({"model": shapes, "sleep": {"window": window, "passes": passes}, "train": {"steps": 1}})
        torch.manual_seed(0)
        model = build_model(config.model, device)
        session = SleepingSession(model, config.sleep, batch_size=batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            # three windows and one token: the decoded tokens then fill the fourth window, no eviction among them
            session.feed(torch.randint(0, shapes["vocab_size"], (batch, 3 * window + 1), device=device))
            stream = session.generate(tokens + 1)
            next(stream)  # the first token comes from the prompt's logits
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in stream:
                pass
            if device.type == "cuda":
                torch.cuda.synchronize()
        rows.append(f"| {passes} | {(time.perf_counter() - start) * 1e3 / tokens:.2f} |")
        print(rows[-1], flush=True)
    return rows


def cpu_smoke() -> None:
    """One eager training step and a 4-token decode of the tiny model on the CPU (PyTorch backend)."""
    config = validate(
        {
            "model": {**SMOKE_MODEL, "backend": "torch"},
            "sleep": {"window": 8, "passes": 2, "checkpoint": "pass"},
            "train": {"steps": 1},
        }
    )
    torch.manual_seed(0)
    model = build_model(config.model, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, SMOKE_MODEL["vocab_size"], (1, 16))
    start = time.perf_counter()
    loss = sleep_forward(model, ids, config.sleep, targets=ids.roll(-1, 1), return_logits=False).loss
    loss.backward()
    optimizer.step()
    train_ms = (time.perf_counter() - start) * 1e3
    if not torch.isfinite(loss):
        raise SystemExit(f"check.py --cpu-smoke: the training step's loss is {loss.item()}")
    session = SleepingSession(model, config.sleep)
    session.feed(ids[:, :5])
    start = time.perf_counter()
    tokens = [int(token) for token in session.generate(4)]
    decode_ms = (time.perf_counter() - start) * 1e3
    print(
        f"| torch | N | loss | train step ms | decoded | decode ms |\n| --- | --- | --- | --- | --- | --- |\n"
        f"| {torch.__version__} | {config.sleep.passes} | {loss.item():.3f} | {train_ms:.0f} | {tokens} | "
        f"{decode_ms:.0f} |"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per setting")
    parser.add_argument("--out", default="benchmarks/results/gpu.md")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on the CPU under TRITON_INTERPRET=1 "
        "(tests/test_gpu_check.py runs it so that the script itself is tested without a GPU)",
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="one eager training step and decode of the tiny model on the CPU, no Triton; "
        "prints one row, writes nothing",
    )
    args = parser.parse_args()
    if args.cpu_smoke:
        return cpu_smoke()
    device = torch.device("cpu" if args.smoke else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    with torch.device("meta"):
        shapes = HybridLM(
            validate(
                {"model": SMOKE_MODEL if args.smoke else MODEL, "sleep": {"window": 64}, "train": {"steps": 1}}
            ).model
        )
    parameters = sum(p.numel() for p in shapes.parameters())
    name = "CPU (smoke run, Triton interpreted)" if args.smoke else torch.cuda.get_device_name(device)
    lines = [
        f"# GPU check: {name}",
        "",
        f"`bash benchmarks/gpu/check.sh` on {datetime.date.today()}, torch {torch.__version__}, one {name}.",
        "",
        "## Parity against the PyTorch op in float64 (max |error| / max |truth|; B=2, H=4, HV=8, K=V=128, with state)",
        "",
        "| T | inputs | backend | output | state | worst gradient |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += parity(device, args.smoke)
    print("\n".join(lines), flush=True)
    kernel = [
        "",
        "## Kernel time, microseconds (bf16 inputs, B=16, H=HV=8, K=V=128, with state; triton.testing.do_bench)",
        "",
        "| T | ours fwd | fla chunk fwd | fla / ours | ours fwd+bwd | fla chunk fwd+bwd | fla / ours |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ] + kernel_times(device, args.smoke)
    print("\n".join(kernel), flush=True)
    model = [
        "",
        f"## Training a {parameters / 1e6:.0f}M-parameter AGAG x6 hybrid (hidden 1024, window 64, 8 x 1024 tokens, "
        f"bf16 autocast, fused AdamW; mean of {args.steps} steps)",
        "",
        "| N | checkpoint | grad_passes | backend | compiled | tokens/s | peak GiB | MFU | host syncs in a step | "
        "compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ] + model_rows(device, args.steps, args.smoke)
    decode = [
        "",
        "## Decoding within a window after a 3-window prompt (`SleepingSession.generate`, batch 8, no CUDA graphs: "
        "`train.cuda_graphs` does not exist yet)",
        "",
        "| N | ms per token |",
        "| --- | --- |",
    ] + decode_rows(device, args.smoke)
    print("\n".join(decode), flush=True)
    Path(args.out).write_text("\n".join(lines + kernel + model + decode) + "\n")
    print("\n".join(model[:5]), f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
