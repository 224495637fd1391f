"""`sleepscale eval`: a checkpoint's accuracy table (`sleepscale.eval`) over a dataset split, printed,
written as CSV and logged to the MLflow run that wrote the checkpoint; with `--lm-eval`, the tasks of
lm-evaluation-harness instead (`sleepscale.harness.command`)."""

from __future__ import annotations

from pathlib import Path

from sleepscale.config import ConfigError
from sleepscale.data.loader import ShardLoader
from sleepscale.eval import evaluate, format_table, metrics, write_csv
from sleepscale.tracking import log_to_checkpoint_run
from sleepscale.train.checkpoint import load_model_from_checkpoint, resolve_checkpoint


def evaluate_checkpoint(args) -> None:
    passes = parse_passes(args.passes)
    if args.lm_eval:
        from sleepscale.harness.command import run_harness  # imports lm-evaluation-harness (~2 s)

        return run_harness(args, passes)
    checkpoint = resolve_checkpoint(args.checkpoint)
    model, config = load_model_from_checkpoint(checkpoint)
    passes = passes or config.eval.passes
    data = args.data or config.data.path
    loader = ShardLoader(data, args.split, batch_size=args.batch_size, shuffle=False)
    batches = [batch for index, batch in enumerate(loader) if args.max_batches is None or index < args.max_batches]
    rows = evaluate(model.eval(), batches, config.sleep, passes, by_generation=args.generate)
    out = Path(args.out) if args.out else checkpoint / f"eval-{args.split}.csv"
    write_csv(rows, out)
    print(format_table(rows))
    print(f"wrote {out}")
    if not args.no_mlflow:
        log_evaluation(checkpoint, config, rows, out, args.split)


def parse_passes(text: str | None) -> list[int] | None:
    """`--passes 1,2,4` (None when not given)."""
    if not text:
        return None
    try:
        passes = [int(n) for n in text.split(",")]
    except ValueError:
        raise ConfigError(f"--passes {text!r}: give comma-separated integers such as 1,2,4") from None
    if min(passes) < 1:
        raise ConfigError(f"--passes {text!r}: every N must be >= 1")
    return passes


def log_evaluation(checkpoint: Path, config, rows: list[dict], csv_path: Path, split: str) -> None:
    """Adds the table to the MLflow run that wrote the checkpoint, at the checkpoint's step."""
    log_to_checkpoint_run(checkpoint, config, metrics(rows, prefix=split), csv_path)
