"""`sleepscale sweep` and `sleepscale sweep-report` as real processes: runs, MLflow nesting, the
report, resuming a stopped sweep, bad arguments."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from train_helpers import losses, metric, write_config

from sleepscale.config import ConfigError
from sleepscale.sweep import parse_arguments, split_values


def sweep(config, *arguments, check=True, timeout=600):
    result = subprocess.run(
        [sys.executable, "-m", "sleepscale.cli", "sweep", str(config), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def config(tmp_path):
    return write_config(
        tmp_path,
        tmp_path / "data",
        tmp_path / "unused",
        train={"steps": 6, "log_every": 2},
        eval={"every": 3, "passes": [1, 2], "batch_size": 16},
    )


def test_sweep_over_n_runs_nested_mlflow_runs_and_writes_the_report(tmp_path, config):
    out = tmp_path / "sweep"
    result = sweep(
        config, "sleep.passes=1,2", "optimizer.lr=0.02", "--out", str(out), "--parallel", "2", "--equal-flops"
    )
    names = ["passes-1", "passes-2", "passes-1-equal-flops"]
    report = (out / "report.md").read_text()
    assert report in result.stdout + "\n" or report.strip() in result.stdout
    lines = report.splitlines()
    assert "| run | trained N | eval N | t=0 | t=1 | tokens | training FLOPs | train s | wall s | status |" in lines
    for name in names:
        assert sum(line.startswith(f"| {name} |") for line in lines) == 2  # evaluated at N = 1 and 2
        assert all(line.endswith("| finished |") for line in lines if line.startswith(f"| {name} |"))
    assert (out / "report.png").stat().st_size > 0 and (out / "report.csv").exists()

    # Equal FLOPs: N = 1 trained for more steps, to within a step of N = 2's training FLOPs.
    flops = {name: metric(out / name, "training_flops")[max(metric(out / name, "training_flops"))] for name in names}
    steps = {name: max(losses(out / name)) for name in names}
    assert steps["passes-1"] == steps["passes-2"] == 6 and steps["passes-1-equal-flops"] > 6
    assert abs(flops["passes-1-equal-flops"] - flops["passes-2"]) <= flops["passes-1"] / 6
    assert any(
        line.startswith("- At equal training tokens") and "passes-1 (N=1" in line and "passes-2 (N=2" in line
        for line in lines
    )
    assert any(
        line.startswith("- At equal training FLOPs") and "passes-1-equal-flops" in line and "passes-2" in line
        for line in lines
    )
    assert lines.count("") >= 2 and any(
        line.startswith("Evaluation: at least 1") and "items per cell" in line for line in lines
    )

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    runs = {
        run.info.run_name: run
        for run in client.search_runs([client.get_experiment_by_name("sleepscale").experiment_id])
    }
    parent = runs.pop(f"sweep {out.name}")
    assert sorted(runs) == sorted(names)
    for name, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["passes"] == name.split("-")[1] and run.data.params["optimizer.lr"] == "0.02"
    assert parent.info.status == "FINISHED"
    assert {"report.md", "report.csv", "report.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    history = [
        line for line in (out / "passes-2" / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in line
    ]
    assert [json.loads(line)["step"] for line in history] == [3, 6] and all(
        "training_flops" in line for line in history
    )
    assert (out / "passes-2" / "eval_steps.png").exists()  # periodic evaluation: accuracy against step per N


def test_under_a_constant_learning_rate_equal_flops_extends_the_shorter_run(tmp_path, config):
    """With a constant learning rate the N=1 run is extended to twice N=2's FLOPs (`--flops-factor 2`)
    instead of repeated: its first 6 steps are a 6-step run's (losses and evaluation), it is
    evaluated where it meets N=2's FLOPs (`eval.at_steps`, not a multiple of `eval.every`), and the
    report compares it with N=2 at its step-6 evaluation (equal tokens), there (equal FLOPs) and at
    its end (2x FLOPs)."""
    from train_helpers import train

    out = tmp_path / "sweep"
    arguments = [
        "sleep.passes=1,2",
        "schedule.kind=constant",
        "--out",
        str(out),
        "--equal-flops",
        "--flops-factor",
        "2",
    ]
    sweep(config, *arguments)
    assert sorted(path.name for path in out.iterdir() if (path / "config.yaml").exists()) == ["passes-1", "passes-2"]
    extended, steps = losses(out / "passes-1"), max(losses(out / "passes-2"))
    at_steps = yaml.safe_load((out / "passes-1" / "config.yaml").read_text())["eval"]["at_steps"]
    assert steps == 6 and len(at_steps) == 3 and at_steps[0] == 6 and at_steps[2] == max(extended)
    matched = at_steps[1]
    flops = {run: metric(out / run, "training_flops") for run in ("passes-1", "passes-2")}
    assert abs(flops["passes-1"][matched] - flops["passes-2"][6]) <= flops["passes-1"][6] / 6
    assert abs(2 * matched - max(extended)) <= 1 and matched % 3 != 0
    short = tmp_path / "short"
    train(config, "sleep.passes=1", "schedule.kind=constant", f"train.run_dir={short}")
    assert [extended[step] for step in (2, 4, 6)] == pytest.approx(
        [losses(short)[step] for step in (2, 4, 6)], rel=1e-5
    )
    accuracy = "eval_accuracy_t1_N1"
    evaluated = metric(out / "passes-1", accuracy)
    assert evaluated[6] == pytest.approx(metric(short, accuracy)[6], abs=1e-9) and matched in evaluated
    zero = metric(out / "passes-1", "eval_accuracy_t0_N1")
    lines = (out / "report.md").read_text().splitlines()
    assert any(
        line.startswith("- At equal training tokens")
        and f"passes-1 (N=1, eval N=1, at step 6 of {max(extended)})" in line
        and "passes-2 (N=2, eval N=2)" in line
        for line in lines
    ), lines
    assert any(
        line.startswith("- At equal training FLOPs")
        and f"passes-1 (N=1, eval N=1, at step {matched} of {max(extended)})" in line
        and "passes-2 (N=2, eval N=2)" in line
        for line in lines
    ), lines
    assert any(
        line.startswith("- At 2x training FLOPs")
        and "against passes-2 (N=2, eval N=2)" in line
        and line.endswith(
            f"): passes-1 (N=1, eval N=1): t=0: {zero[max(extended)]:.3f}, t=1: {evaluated[max(extended)]:.3f}"
        )
        for line in lines
    ), lines
    again = sweep(config, *arguments[:-2], check=False)  # the same directory, another command
    assert again.returncode == 2 and "--flops-factor" not in again.stderr and "other arguments" in again.stderr


def test_a_stopped_sweep_resumes_and_finishes_only_what_is_missing(tmp_path, config):
    out = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "sleepscale.cli",
        "sweep",
        str(config),
        "sleep.passes=1,2",
        "--out",
        str(out),
        "train.steps=30",
        "train.log_every=1",
        "eval.every=0",
        "checkpoint.every=100",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "passes-2" / "metrics.jsonl").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # until run 2 is stepping
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-4000:]
    assert "the same command resumes it" in stderr
    state = json.loads((out / "sweep.json").read_text())["runs"]
    assert state["passes-1"]["finished"] and not state["passes-2"]["finished"] and state["passes-2"]["exit_code"] == 75
    stopped_at = max(losses(out / "passes-2"))
    first_losses = losses(out / "passes-1")

    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 runs (1 already finished)" in result.stdout
    assert losses(out / "passes-1") == first_losses  # not run again
    assert (out / "logs" / "passes-1.log").read_text().count("stage 0 'train'") == 1
    assert f"resuming from {out / 'passes-2' / 'checkpoints'}" in (out / "logs" / "passes-2.log").read_text()
    assert sorted(losses(out / "passes-2")) == list(range(1, 31)) and stopped_at < 30
    assert "| passes-2 | 2 | 2 |" in (out / "report.md").read_text()

    other = subprocess.run(
        [*command[:5], "sleep.passes=1,3", "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert other.returncode == 2 and other.stderr.count("\n") == 1
    assert "holds a sweep started with other arguments" in other.stderr


def test_sweep_report_reads_a_directory_of_runs(tmp_path, config):
    out = tmp_path / "sweep"
    sweep(config, "sleep.passes=1,2", "--out", str(out))
    (out / "report.md").unlink()
    (out / "sweep.json").unlink()  # as slurm/sweep.sbatch leaves it: run directories only
    result = subprocess.run(
        [sys.executable, "-m", "sleepscale.cli", "sweep-report", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "| passes-1 | 1 | 1 |" in result.stdout and (out / "report.md").exists()
    empty = subprocess.run(
        [sys.executable, "-m", "sleepscale.cli", "sweep-report", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert empty.returncode == 2 and "no run directories" in empty.stderr and empty.stderr.count("\n") == 1


def test_sweep_arguments():
    assert split_values("1,3") == ["1", "3"] and split_values("[0,2],[1,3]") == ["[0,2]", "[1,3]"]
    assert parse_arguments(["sleep.passes=1,3", "model.loop=[1,3]", "optimizer.lr=1e-3,3e-3"]) == (
        [("sleep.passes", ["1", "3"]), ("optimizer.lr", ["1e-3", "3e-3"])],
        ["model.loop=[1,3]"],
    )
    for arguments, message in (
        (["sleep.passes"], "give KEY=V1,V2"),
        (["sleep.passes=4"], "nothing to sweep"),
        (["sleep.passes=1,,3"], "an empty value"),
        (["sleep.passes=1,2", "sleep.passes=3,4"], "swept twice"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_arguments(arguments)


def test_bad_sweep_values_are_one_line(tmp_path, config):
    result = sweep(config, "sleep.passes=1,0", "--out", str(tmp_path / "sweep"), check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "sleep.passes" in result.stderr


def test_evaluation_plots_accuracy_against_n_and_against_step(tmp_path):
    from sleepscale.eval import metrics, plot, plot_history

    rows = [
        {"difficulty": "t", "value": t, "passes": n, "accuracy": (10 * t + n) / 128} for t in (0, 2) for n in (1, 2, 4)
    ]
    drawn = plot(rows, tmp_path / "eval.png")
    assert drawn == {
        "t=0": ([1, 2, 4], [1 / 128, 2 / 128, 4 / 128]),
        "t=2": ([1, 2, 4], [21 / 128, 22 / 128, 24 / 128]),
    }
    single = plot([row for row in rows if row["passes"] == 2], tmp_path / "single.png")
    assert single == {"N=2": (["t=0", "t=2"], [2 / 128, 22 / 128])}  # one bar per difficulty, not a point on an axis
    history = [(step, [{**row, "accuracy": row["accuracy"] * step} for row in rows]) for step in (10, 20)]
    drawn = plot_history(history, tmp_path / "steps.png")
    assert drawn["t=2 N=4"] == ([10, 20], [240 / 128, 480 / 128]) and len(drawn) == 6
    assert set(metrics(rows)) == {f"eval_accuracy_t{t}_N{n}" for t in (0, 2) for n in (1, 2, 4)}
    assert all(path.stat().st_size > 0 for path in tmp_path.glob("*.png"))


def test_a_flops_factor_needs_equal_flops_and_at_least_1(tmp_path, config, capsys):
    from sleepscale.cli import main

    out = ["--out", str(tmp_path / "sweep")]
    assert main(["sweep", str(config), "sleep.passes=1,2", "--flops-factor", "2", *out]) == 2
    assert "--flops-factor 2: give it with --equal-flops" in capsys.readouterr().err
    assert main(["sweep", str(config), "sleep.passes=1,2", "--equal-flops", "--flops-factor", "0.5", *out]) == 2
    assert "--flops-factor 0.5: give a multiple >= 1" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()  # refused before anything was made
