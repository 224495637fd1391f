"""`sleepscale eval RUN --lm-eval TASKS [--passes 1,2,4] [--limit K]`: lm-evaluation-harness on a run,
checkpoint or model directory at each N. Prints the harness's table per N, writes its results (JSON,
per N) and, for a training checkpoint, logs them to the MLflow run that wrote it: a metric
`lm_eval_<task>_<metric>_N<n>` per score and the JSON as an artifact."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sleepscale.config import ConfigError

RESULTS = "lm-eval.json"


def run_harness(args, passes: list[int] | None) -> None:
    """`passes`: the N values asked for (None: the run's eval.passes, or 1 for a model directory)."""
    import lm_eval
    from lm_eval.utils import make_table

    from sleepscale.harness.model import SleepingLM, load_evaluated
    from sleepscale.harness.tasks import resolve_tasks

    for option in ("data", "generate", "max_batches"):
        if getattr(args, option):
            raise ConfigError(f"--{option.replace('_', '-')} is for sleepscale's own evaluation, not --lm-eval")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: give a number of documents per task >= 1")
    specs, manager = resolve_tasks([name for name in args.lm_eval.split(",") if name])  # bad names fail first
    evaluated = load_evaluated(args.checkpoint, window=args.window, tokenizer=args.tokenizer)
    if passes is None:
        passes = evaluated.config.eval.passes if evaluated.config is not None else [evaluated.sleep.passes]
    results = {}
    for n in passes:
        model = SleepingLM(evaluated=evaluated, passes=n, batch_size=args.batch_size, max_length=args.max_length)
        found = lm_eval.simple_evaluate(
            model=model, tasks=specs, task_manager=manager, limit=args.limit, log_samples=False
        )
        print(f"\nN={n} (sleep passes before each eviction)")
        print(make_table(found))
        results[n] = {key: found[key] for key in ("results", "n-samples", "configs", "versions") if key in found}
    if evaluated.checkpoint is not None:
        out = Path(args.out) if args.out else evaluated.checkpoint / RESULTS
    else:
        out = Path(args.out or RESULTS)
    out.write_text(json.dumps({"passes": results}, indent=2, default=str))
    print(f"wrote {out}")
    if args.no_mlflow:
        return
    if evaluated.checkpoint is None:
        print("a model directory has no MLflow run; results not logged")
        return
    from sleepscale.tracking import log_to_checkpoint_run

    log_to_checkpoint_run(evaluated.checkpoint, evaluated.config, harness_metrics(results), out)


def harness_metrics(results: dict[int, dict]) -> dict[str, float]:
    """Every numeric score, as `lm_eval_<task>_<metric>_N<n>` (`acc,none` -> `acc`, `acc_stderr,none`
    -> `acc_stderr`)."""
    metrics = {}
    for n, found in results.items():
        for task, scores in found["results"].items():
            for key, value in scores.items():
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    continue
                name = key.removesuffix(",none").replace(",", "_")
                metrics[f"lm_eval_{task}_{name}_N{n}"] = float(value)
    return metrics
