"""The text `sleepscale plan` prints: an estimate's breakdown, and a table of layouts."""

from __future__ import annotations

from sleepscale.planner.estimate import GB, Estimate


def breakdown(found: Estimate) -> str:
    layout = found.layout
    where = f", pipeline stage {found.stage} (the most loaded)" if layout.pipeline > 1 else ""
    lines = [f"layout: {layout.describe()}, N={found.passes}{where}", "per GPU:"]
    lines += [f"  {name:<42} {size / GB:9.2f} GB" for name, size in found.rows()]
    verdict = "fits" if found.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<42} {found.total / GB:9.2f} GB of {found.gpu_memory / GB:.0f} GB: {verdict}")
    optimizer = f", Muon's step {found.optimizer_bytes / GB:.3f} GB" if found.optimizer_bytes else ""
    lines.append(
        f"communication per GPU per step: tensor {found.tensor_bytes / GB:.3f} "
        f"GB, pipeline {found.pipeline_bytes / GB:.3f} GB, "
        f"data {found.data_bytes / GB:.3f} GB{optimizer}"
    )
    idle = f", pipeline idle {found.pipeline_idle:.0%}" if layout.pipeline > 1 else ""
    lines.append(
        f"FLOPs per step {found.flops:.3e} (all GPUs); step {found.step_seconds:.2f} s = compute "
        f"{found.compute_seconds:.2f} s{idle} + communication {found.communication_seconds:.2f} s; "
        f"{found.tokens_per_second:,.0f} tokens/s"
    )
    return "\n".join(lines)


def table(found: list[Estimate]) -> str:
    header = (
        f"{'fits':<5} {'TP':>3} {'PP':>3} {'DP':>4} {'ZeRO':>4} {'ckpt':<6} {'micro x acc':>11} {'GB/GPU':>8} "
        f"{'tokens/s':>12}"
    )
    rows = [header]
    for e in found:
        layout = e.layout
        rows.append(
            f"{'yes' if e.fits else 'no':<5} {layout.tensor:>3} {layout.pipeline:>3} "
            f"{layout.data:>4} {layout.zero_stage:>4} {layout.checkpoint:<6} "
            f"{f'{layout.micro_batch} x {layout.grad_accumulation}':>11} {e.total / GB:>8.1f} "
            f"{e.tokens_per_second:>12,.0f}"
        )
    return "\n".join(rows)
