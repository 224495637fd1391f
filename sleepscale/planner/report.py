"""The text `sleepscale plan` prints: an estimate's breakdown, and a table of layouts."""

from __future__ import annotations

from sleepscale.planner.estimate import GB, Estimate


def breakdown(found: Estimate) -> str:
    layout = found.layout
    where = f", pipeline stage {found.stage} (the most loaded)" if layout.pipeline > 1 else ""
    lines = [f"layout: {layout.describe()}, N={found.passes}{where}", "per GPU:"]
    lines += [f"  {name:<42} {size / GB:9.2f} GB" for name, size in found.rows()]
    if not found.traced:
        lines.append("  (activations not traced: model states and reserve alone exceed the GPU memory)")
    verdict = "fits" if found.fits else "DOES NOT FIT"
    at_least = "" if found.traced else "at least "
    lines.append(f"  {'total':<42} {at_least}{found.total / GB:9.2f} GB of {found.gpu_memory / GB:.0f} GB: {verdict}")
    optimizer = f", Muon's step {found.optimizer_bytes / GB:.3f} GB" if found.optimizer_bytes else ""
    lines.append(
        f"communication per GPU per step: tensor {found.tensor_bytes / GB:.3f} "
        f"GB, pipeline {found.pipeline_bytes / GB:.3f} GB, "
        f"data {found.data_bytes / GB:.3f} GB{optimizer}"
    )
    bound = "" if found.idle_simulated else "at least "
    idle = f", pipeline idle {bound}{found.pipeline_idle:.0%}" if layout.pipeline > 1 else ""
    lines.append(
        f"FLOPs per step {found.flops:.3e} (all GPUs); step {bound}{found.step_seconds:.2f} s = compute "
        f"{found.compute_seconds:.2f} s{idle} + communication {found.communication_seconds:.2f} s; "
        f"{'' if found.idle_simulated else 'at most '}{found.tokens_per_second:,.0f} tokens/s"
    )
    if not found.idle_simulated:
        lines.append("  (schedule too long to simulate: its idle time is bounded from below, not simulated)")
    return "\n".join(lines)


def table(found: list[Estimate]) -> str:
    """One row per layout whose activations were traced (tokens/s "<=": an upper bound, its schedule too long
    to simulate); the layouts whose model states and reserve alone exceed the GPU memory (not traced) in one
    line after them."""
    header = (
        f"{'fits':<5} {'TP':>3} {'PP':>3} {'DP':>4} {'ZeRO':>4} {'ckpt':<9} {'in flight':>9} {'micro x acc':>11} "
        f"{'GB/GPU':>8} {'tokens/s':>12}"
    )
    rows = [header]
    for e in found:
        if not e.traced:
            continue
        layout = e.layout
        in_flight = str(layout.in_flight) if layout.pipeline > 1 else "-"
        rows.append(
            f"{'yes' if e.fits else 'no':<5} {layout.tensor:>3} {layout.pipeline:>3} "
            f"{layout.data:>4} {layout.zero_stage:>4} {layout.checkpoint:<9} {in_flight:>9} "
            f"{f'{layout.micro_batch} x {layout.grad_accumulation}':>11} {e.total / GB:>8.1f} "
            f"{'<=' if not e.idle_simulated else '':>2}{e.tokens_per_second:>10,.0f}"
        )
    untraced = [e for e in found if not e.traced]
    if untraced:
        shapes = sorted({(e.layout.tensor, e.layout.pipeline, e.layout.zero_stage) for e in untraced})
        rows.append(
            f"and {len(untraced)} layouts not traced, their model states and reserve alone exceeding "
            f"{untraced[0].gpu_memory / GB:.0f} GB (at least {min(e.total for e in untraced) / GB:.1f} GB): "
            + ", ".join(f"TP{t} x PP{p} ZeRO-{z}" for t, p, z in shapes)
        )
    return "\n".join(rows)
