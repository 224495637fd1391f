"""The sbatch scripts in slurm/, submitted for real to a one-node Slurm cluster started for this module.

Needs Debian's slurmctld, slurmd, slurm-client and munge (`.ci/run` installs them) and root; without
them these tests fail, saying so. Every daemon started here is stopped at the end, also on failure.
"""

import re
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, SlurmUnavailable
from train_helpers import losses, write_config

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
JOB_TIMEOUT = 300  # seconds; a guard against hangs, not a performance check


@pytest.fixture(scope="module")
def slurm():
    cluster = SlurmCluster()
    try:
        cluster.start()
    except (SlurmUnavailable, TimeoutError) as error:
        pytest.fail(f"cannot start the local Slurm cluster: {error}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "rule110"


def job_env(**extra) -> dict:
    """What the jobs run with: this interpreter (so this checkout's sleepscale), one thread per rank."""
    return {"SLEEPSCALE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def submit(slurm, script: str, tmp: Path, *argv: str, options=(), env=None) -> tuple[str, Path]:
    job = slurm.sbatch(
        f"--chdir={tmp}", f"--output={tmp}/%x-%j.out", "--time=10", *options, str(SLURM_DIR / script), *argv, env=env
    )
    return job, tmp


def output(tmp: Path, job: str) -> str:
    (path,) = tmp.glob(f"*-{job}.out")
    return path.read_text()


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def wait_for_array(slurm, job: str) -> list[dict]:
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (elements := slurm.jobs(job)) or not all(element.get("JobState") in ENDED for element in elements):
        assert time.monotonic() < deadline, elements
        time.sleep(1)
    return elements


def mlflow_runs(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    return client, client.search_runs([client.get_experiment_by_name("sleepscale").experiment_id])


@pytest.fixture(scope="module")
def two_rank_job(slurm, data, tmp_path_factory):
    """A two-rank train.sbatch job of 6 steps, signalled as before its time limit, requeued and resumed
    to its end. The ranks wait after step 3 until the signal is there, so it always lands mid-run. One
    data worker per rank: Slurm signals every process of the step, those workers too."""
    tmp = tmp_path_factory.mktemp("train")
    run = tmp / "run"
    config = write_config(tmp, data, run)
    env = job_env(SLEEPSCALE_NPROC_PER_NODE="2", SLEEPSCALE_FAULT_PAUSE_AT_STEP="3")
    job, _ = submit(slurm, "train.sbatch", tmp, str(config), "train.steps=6", "data.num_workers=1", env=env)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not (any(tmp.glob(f"*-{job}.out")) and "rank 0 paused after step 3" in output(tmp, job)):
        assert time.monotonic() < deadline, "the job never reached step 3"
        assert slurm.job(job)["JobState"] not in ENDED, slurm.job(job)
        time.sleep(0.5)
    # What `#SBATCH --signal=B:USR1@300` does before the time limit: SIGUSR1 to the batch script.
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait_for_state(job, {"COMPLETED"}, JOB_TIMEOUT)
    return job, tmp, run, info


def test_train_sbatch_with_two_ranks_completes_with_a_checkpoint_and_an_mlflow_run(two_rank_job):
    job, tmp, run, info = two_rank_job
    assert info["ExitCode"] == "0:0"
    log = output(tmp, job)
    assert "rank 0 of 2 (local rank 0)" in log and "[rank 1] rank 1 of 2 (local rank 1)" in log
    assert "1 node(s) x 2 process(es)" in log and "training finished" in log
    assert (run / "checkpoints" / "latest").read_text() == "step-000006"
    client, (mlflow_run,) = mlflow_runs(run)
    assert mlflow_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]


def test_eval_sbatch_evaluates_the_checkpoint(slurm, two_rank_job):
    _, tmp, run, _ = two_rank_job
    job, _ = submit(slurm, "eval.sbatch", tmp, str(run), "--passes", "1,3", "--no-mlflow", env=job_env())
    slurm.wait_for_state(job, {"COMPLETED"}, JOB_TIMEOUT)
    assert "| difficulty | value | passes | items | accuracy | token_accuracy |" in output(tmp, job)
    assert (run / "checkpoints" / "step-000006" / "eval-validation.csv").exists()


def test_signal_before_the_time_limit_checkpoints_requeues_and_resumes_into_the_same_mlflow_run(two_rank_job):
    job, tmp, run, info = two_rank_job
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"
    log = output(tmp, job)
    assert "stopped by signal at step 3 after writing a checkpoint" in log
    assert "ranks stopped (exit 75); requeueing to resume from the last checkpoint" in log
    assert f"resuming from {run / 'checkpoints' / 'step-000003'} (step 3)" in log
    assert (run / "checkpoints" / "latest").read_text() == "step-000006"
    client, (mlflow_run,) = mlflow_runs(run)  # one run, continued
    assert mlflow_run.info.status == "FINISHED"
    for name in ("loss", "lr", "grad_norm"):
        assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, name)] == [1, 2, 3, 4, 5, 6], name
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_sweep_sbatch_over_n_gives_one_tagged_finished_run_per_value(slurm, data, tmp_path):
    config = write_config(tmp_path, data, tmp_path / "unused")
    sweep = tmp_path / "sweep"
    env = job_env(SLEEPSCALE_SWEEP_TAG="N", SLEEPSCALE_SWEEP_DIR=str(sweep))
    job, _ = submit(
        slurm,
        "sweep.sbatch",
        tmp_path,
        str(config),
        "sleep.passes",
        "1",
        "2",
        "--",
        "train.steps=3",
        options=["--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/%x-%A_%a.out"],
        env=env,
    )
    elements = wait_for_array(slurm, job)
    assert [element["JobState"] for element in elements] == ["COMPLETED", "COMPLETED"], elements
    for n in (1, 2):
        client, (mlflow_run,) = mlflow_runs(sweep / f"N-{n}")
        assert mlflow_run.info.status == "FINISHED"
        assert mlflow_run.data.tags["N"] == str(n) and mlflow_run.data.tags["passes"] == str(n)
        assert mlflow_run.data.params["sleep.passes"] == str(n) and mlflow_run.info.run_name == f"N={n}"
        assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "loss")] == [1, 2, 3]
    # Element 0 submitted the report, to run after the array: the local sweep's report.
    report_job = re.search(r"sweep.sbatch: report job (\d+) writes", output(tmp_path, f"{job}_0")).group(1)
    slurm.wait_for_state(report_job, {"COMPLETED"}, JOB_TIMEOUT)
    report = (sweep / "report.md").read_text()
    assert "| N-1 | 1 | 1 |" in report and "| N-2 | 2 | 1 |" in report and (sweep / "report.png").exists()
    assert "- At equal training tokens" in report


def test_sweep_sbatch_refuses_an_array_that_does_not_match_the_values(slurm, tmp_path):
    job, _ = submit(
        slurm,
        "sweep.sbatch",
        tmp_path,
        "config.yaml",
        "sleep.passes",
        "1",
        "2",
        "3",
        options=["--array=0-1", f"--output={tmp_path}/%x-%A_%a.out"],
        env=job_env(),
    )
    assert {element["JobState"] for element in wait_for_array(slurm, job)} == {"FAILED"}
    text = "".join(path.read_text() for path in tmp_path.glob("*.out"))
    assert "the array has 2 elements but there are 3 values: use --array=0-2" in text


def test_a_dying_rank_fails_the_job_naming_the_rank(slurm, data, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path, data, run)
    env = job_env(SLEEPSCALE_NPROC_PER_NODE="2", SLEEPSCALE_FAULT_EXIT_AT_STEP="1:2")
    job, _ = submit(slurm, "train.sbatch", tmp_path, str(config), "train.steps=20", env=env)
    info = slurm.wait_for_state(job, {"FAILED"}, JOB_TIMEOUT)
    assert info["Restarts"] == "0"  # a failure is not requeued
    log = output(tmp_path, job)
    assert "sleepscale launch: rank 1 (local rank 1 on" in log and "exited with code 13" in log
    assert "training failed (exit 1)" in log
    assert max(losses(run)) < 20
