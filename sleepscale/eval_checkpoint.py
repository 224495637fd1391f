"""`sleepscale eval`: a checkpoint's accuracy table (`sleepscale.eval`) over a dataset split, printed,
written as CSV and logged to the MLflow run that wrote the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from sleepscale.config import ConfigError
from sleepscale.data.loader import ShardLoader
from sleepscale.eval import evaluate, format_table, metrics, write_csv
from sleepscale.tracking import Tracker
from sleepscale.train.checkpoint import load_model_from_checkpoint, resolve_checkpoint


def evaluate_checkpoint(args) -> None:
    checkpoint = resolve_checkpoint(args.checkpoint)
    model, config = load_model_from_checkpoint(checkpoint)
    try:
        passes = [int(n) for n in args.passes.split(",")] if args.passes else config.eval.passes
    except ValueError:
        raise ConfigError(f"--passes {args.passes!r}: give comma-separated integers such as 1,2,4") from None
    if min(passes) < 1:
        raise ConfigError(f"--passes {args.passes!r}: every N must be >= 1")
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


def log_evaluation(checkpoint: Path, config, rows: list[dict], csv_path: Path, split: str) -> None:
    """Adds the table to the MLflow run that wrote the checkpoint, at the checkpoint's step."""
    progress = json.loads((checkpoint / "trainer.json").read_text())["progress"]
    if not progress.get("mlflow_run_id"):
        print("the checkpoint's run had no MLflow run; table not logged")
        return
    tracker = Tracker(config, checkpoint.parent.parent, enabled=True)
    if tracker.start(progress["mlflow_run_id"], tags={}) is None:
        return  # the tracker has said why
    tracker.log_metrics(metrics(rows, prefix=split), progress["step"])
    tracker.log_artifact(csv_path)
    tracker.finish()
    print(f"logged to MLflow run {progress['mlflow_run_id']} ({tracker.uri})")
