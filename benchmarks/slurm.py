"""Slurm overheads on a local one-node cluster: time from `sbatch` to the first training step, and
what a requeue costs (pre-timeout signal to the first resumed step), for slurm/train.sbatch.

    python benchmarks/slurm.py [--repeats 3] [--ranks 2] [--slurm-defaults]

Starts its own cluster (tests/slurm_cluster.py; needs root and Debian's Slurm + munge packages) and
stops it at the end. The job is the tests' tiny model; its start-up (imports, process group, data
loader, MLflow) dominates "first step", as it would for any model. `--slurm-defaults` keeps Slurm's
own requeue hold (cred_expire 120 s) and scheduler intervals (60 s / 30 s) instead of the short
ones the tests use. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from slurm_cluster import SlurmCluster  # noqa: E402
from train_helpers import write_config  # noqa: E402

POLL = 0.1


def steps_logged(run: Path) -> set[int]:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return set()
    steps = set()
    for line in lines:
        try:
            steps.add(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return steps


def wait_until(condition, what: str, timeout: float = 900) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(POLL)
    return time.monotonic()


def one_job(cluster: SlurmCluster, tmp: Path, data: Path, index: int, ranks: int) -> dict[str, float]:
    run = tmp / f"run{index}"
    config = write_config(tmp, data, run)
    env = {
        "SLEEPSCALE_PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "SLEEPSCALE_NPROC_PER_NODE": str(ranks),
        "SLEEPSCALE_FAULT_PAUSE_AT_STEP": "3",
    }
    submitted = time.monotonic()
    job = cluster.sbatch(
        f"--chdir={tmp}",
        f"--output={tmp}/%x-%j.out",
        "--time=30",
        str(REPO / "slurm" / "train.sbatch"),
        str(config),
        "train.steps=6",
        env=env,
    )
    running = wait_until(lambda: cluster.job(job).get("JobState") == "RUNNING", "job start")
    first_step = wait_until(lambda: 1 in steps_logged(run), "first step")
    log = tmp / f"sleepscale-{job}.out"
    wait_until(lambda: log.exists() and "rank 0 paused after step 3" in log.read_text(), "the pause after step 3")
    signalled = time.monotonic()
    cluster.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@... does
    checkpointed = wait_until(
        lambda: (
            (run / "checkpoints" / "latest").exists() and (run / "checkpoints" / "latest").read_text() == "step-000003"
        ),
        "checkpoint",
    )
    requeued = wait_until(lambda: cluster.job(job).get("Restarts") == "1", "requeue")
    restarted = wait_until(
        lambda: cluster.job(job).get("JobState") == "RUNNING" and cluster.job(job).get("Restarts") == "1", "restart"
    )
    resumed_step = wait_until(lambda: 4 in steps_logged(run), "first resumed step")
    cluster.wait_for_state(job, {"COMPLETED"}, 900)
    return {
        "sbatch -> job running": running - submitted,
        "sbatch -> first training step": first_step - submitted,
        "signal -> checkpoint written": checkpointed - signalled,
        "signal -> job requeued": requeued - signalled,
        "requeued -> job running again": restarted - requeued,
        "running again -> first resumed step": resumed_step - restarted,
        "signal -> first resumed step (requeue overhead)": resumed_step - signalled,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--slurm-defaults", action="store_true", help="Slurm's default requeue hold and scheduler intervals"
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    data = tmp / "data"
    with SlurmCluster(quick_requeue=not args.slurm_defaults) as cluster:
        results = [one_job(cluster, tmp, data, index, args.ranks) for index in range(args.repeats)]
    shutil.rmtree(tmp)
    # The first job also generates the tiny dataset before its first step; reported separately.
    mode = (
        "Slurm defaults (cred_expire 120 s, sched 60 s, backfill 30 s)"
        if args.slurm_defaults
        else "test cluster (cred_expire 10 s, sched/backfill 2 s)"
    )
    print(f"slurm/train.sbatch, {args.ranks} ranks on 1 node, tiny config; {mode}; {args.repeats} job(s); seconds\n")
    print("| phase | " + " | ".join(f"job {i + 1}" for i in range(args.repeats)) + " | median |")
    print("|---|" + "---:|" * (args.repeats + 1))
    for name in results[0]:
        values = [result[name] for result in results]
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {statistics.median(values):.1f} |")
    print("\n(job 1 also generates the dataset before its first step)")


if __name__ == "__main__":
    main()
