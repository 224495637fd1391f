"""MLflow tracking on rank 0, and a plain metrics file every run keeps.

Default store: `sqlite:///<run_dir>/mlflow.db` with artifacts under `<run_dir>/mlartifacts` (no
server needed); `tracking.uri` may name any MLflow URI, a remote `mlflow server` included. A resumed
run continues the same MLflow run. If the tracking server cannot be reached, training goes on, says
so once, and `metrics.jsonl` in the run directory still holds every logged metric.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from sleepscale.config import Config

log = logging.getLogger("sleepscale.tracking")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """Every method is a no-op off rank 0 and after the tracking store has failed once."""

    def __init__(self, config: Config, run_dir: Path, enabled: bool):
        self.run_dir, self.enabled, self.run_id = Path(run_dir), enabled, None
        self.config = config
        self.uri = config.tracking.uri or f"sqlite:///{self.run_dir.resolve()}/mlflow.db"
        self._metrics_file = self.run_dir / "metrics.jsonl" if enabled else None

    def _guard(self, action: str, function, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return function(*args, **kwargs)
        except Exception as error:  # any MLflow/network failure must not stop training
            log.warning(
                "MLflow %s failed (%s: %s); training continues without MLflow tracking (metrics.jsonl still "
                "records every metric)",
                action,
                type(error).__name__,
                str(error).splitlines()[0][:200],
            )
            self.enabled = False
            return None

    def start(self, run_id: str | None, tags: dict[str, str]) -> str | None:
        if not self.enabled:
            return None
        # Fail fast instead of retrying for minutes when a remote server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow  # ~2 s: only on rank 0 with tracking on; after the settings above

        def start_run():
            mlflow.set_tracking_uri(self.uri)
            experiment = mlflow.get_experiment_by_name(self.config.tracking.experiment)
            if experiment is None:
                location = None
                if self.config.tracking.uri is None:
                    location = (self.run_dir / "mlartifacts").resolve().as_uri()
                mlflow.create_experiment(self.config.tracking.experiment, artifact_location=location)
            mlflow.set_experiment(self.config.tracking.experiment)
            run = mlflow.start_run(run_id=run_id, run_name=self.config.tracking.run_name)
            if run_id is None:
                params = flatten(self.config.model_dump(mode="json"))
                mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in params.items()})
            parent = (
                {"mlflow.parentRunId": self.config.tracking.parent_run_id} if self.config.tracking.parent_run_id else {}
            )
            mlflow.set_tags({"git_commit": git_commit(), **parent, **tags})
            return run.info.run_id

        self.run_id = self._guard("start", start_run)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float | None], step: int) -> None:
        """Unknown values (None) are left out."""
        metrics = {name: value for name, value in metrics.items() if value is not None}
        if self._metrics_file is not None:
            with self._metrics_file.open("a") as file:
                file.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.enabled:
            import mlflow  # ~2 s: only with tracking on

            self._guard("log_metrics", mlflow.log_metrics, metrics, step=step)

    def log_artifact(self, path: Path) -> None:
        if self.enabled:
            import mlflow  # ~2 s: only with tracking on

            self._guard("log_artifact", mlflow.log_artifact, str(path))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            import mlflow  # ~2 s: only with tracking on

            self._guard("set_tags", mlflow.set_tags, tags)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            import mlflow  # ~2 s: only with tracking on

            self._guard("end_run", mlflow.end_run, status=status)


def log_to_checkpoint_run(checkpoint: Path, config, values: dict[str, float], artifact: Path) -> None:
    """Adds `values` (metrics) and the file `artifact` to the MLflow run that wrote the checkpoint, at
    the checkpoint's step."""
    progress = json.loads((checkpoint / "trainer.json").read_text())["progress"]
    if not progress.get("mlflow_run_id"):
        print("the checkpoint's run had no MLflow run; results not logged")
        return
    tracker = Tracker(config, checkpoint.parent.parent, enabled=True)
    if tracker.start(progress["mlflow_run_id"], tags={}) is None:
        return  # the tracker has said why
    tracker.log_metrics(values, progress["step"])
    tracker.log_artifact(artifact)
    tracker.finish()
    print(f"logged to MLflow run {progress['mlflow_run_id']} ({tracker.uri})")
