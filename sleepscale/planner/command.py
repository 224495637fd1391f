"""`sleepscale plan`: the assumptions the arguments give, then the estimate of the config's layout (or
of every layout, `--search`) and the searches asked for, printed (`report`)."""

from __future__ import annotations

from sleepscale.config import ConfigError
from sleepscale.config_loading import load_config
from sleepscale.flops import PEAK_FLOPS, PEAK_TF32_FLOPS
from sleepscale.planner import estimate as planner
from sleepscale.planner.assumptions import GB, GPU, Assumptions
from sleepscale.planner.report import breakdown, table


def default_peak_flops(precision: str) -> float:
    """The assumed GPU's dense peak at a training precision: bf16, or TF32 for fp32."""
    return (PEAK_FLOPS if precision == "bf16" else PEAK_TF32_FLOPS)[GPU]


def plan(args) -> int:
    """Exit status 0 when the layout (or, with --search, some layout) fits, 1 when none does."""
    for flag in ("gpus", "sequence_length"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a positive integer")
    if (
        min(args.gpu_memory, args.tensor_bandwidth, args.data_bandwidth) <= 0
        or not 0 < args.mfu <= 1
        or args.reserve_gb < 0
    ):
        raise ConfigError(
            f"--gpu-memory {args.gpu_memory}, --mfu {args.mfu}, --reserve-gb {args.reserve_gb}, "
            f"--tensor-bandwidth {args.tensor_bandwidth}, --data-bandwidth {args.data_bandwidth}: "
            "need memory and bandwidths > 0, 0 < mfu <= 1 and reserve >= 0"
        )
    config = load_config(args.config, args.overrides)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else default_peak_flops(config.train.precision)
    assumed = Assumptions(
        args.sequence_length,
        args.gpu_memory * GB,
        peak,
        args.mfu,
        int(args.reserve_gb * GB),
        args.tensor_bandwidth * GB,
        args.data_bandwidth * GB,
    )
    if args.search:
        found = planner.search(config, args.gpus, assumed)
        if not found:
            raise ConfigError(
                f"--gpus {args.gpus}: no layout keeps the config's global batch and divides the heads; "
                "change --gpus or train.grad_accumulation"
            )
        print(table(found))
        best = found[0]
    else:
        try:
            layout = planner.config_layout(config, args.gpus)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        best = planner.estimate(config, layout, assumed)
    print(breakdown(best))
    if args.search:
        print(f"config overrides for it: {best.layout.overrides()}")
    if args.largest_n:
        largest = planner.largest_passes(config, best.layout, assumed)
        text = {0: "none (not even N=1)", planner.LARGEST_PASSES: f"{planner.LARGEST_PASSES} or more (looked up to it)"}
        print(f"largest N that fits this layout: {text.get(largest, largest)}")
    if args.smallest_gpus:
        smallest = planner.smallest_gpus(config, assumed)
        print(
            f"smallest GPU count that fits: {smallest.layout.gpus} ({smallest.layout.describe()}, "
            f"{smallest.total / GB:.1f} GB)"
            if smallest
            else f"smallest GPU count that fits: none up to {planner.SMALLEST_GPUS}"
        )
    if not best.fits:
        print(f"sleepscale plan: {planner.advice(config, best, assumed)}")
        return 1
    return 0
