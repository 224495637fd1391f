"""`sleepscale launch`: argument checks, and real multi-"node" jobs of two launchers on loopback."""

import os
import signal
import subprocess
import sys
import time
import types

import pytest
from train_helpers import free_port, losses, write_config

from sleepscale.launch import LaunchError, plan

TIMEOUT = 300  # seconds; a guard against hangs, not a performance check


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "rule110"


def launch_argv(config, *options: str) -> list[str]:
    return [sys.executable, "-m", "sleepscale.cli", "launch", *options, str(config)]


def launch(config, *options: str, overrides=(), env=None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [*launch_argv(config, *options), *overrides], capture_output=True, text=True, env=environment, timeout=TIMEOUT
    )


def two_nodes(config, *overrides: str, env=None) -> list[subprocess.CompletedProcess]:
    """Two launchers on this machine that rendezvous as two nodes of one job (one rank each)."""
    endpoint = f"127.0.0.1:{free_port()}"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    nodes = [
        subprocess.Popen(
            [
                *launch_argv(
                    config,
                    "--nnodes",
                    "2",
                    "--nproc-per-node",
                    "1",
                    "--rdzv-endpoint",
                    endpoint,
                    "--rdzv-id",
                    "loopback",
                    "--rdzv-timeout",
                    "120",
                ),
                *overrides,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        for _ in range(2)
    ]
    try:
        results = []
        for node in nodes:
            stdout, stderr = node.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(node.args, node.returncode, stdout, stderr))
        return results
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()


def test_two_launchers_on_loopback_train_together_and_match_one_node(tmp_path, data):
    one_node, two_node = tmp_path / "one-node", tmp_path / "two-nodes"
    result = launch(write_config(tmp_path, data, one_node), "--nproc-per-node", "2", overrides=["train.steps=5"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 node(s) x 2 process(es)" in result.stderr
    nodes = two_nodes(write_config(tmp_path, data, two_node), "train.steps=5")
    assert [node.returncode for node in nodes] == [0, 0], [node.stderr[-3000:] for node in nodes]
    both = "".join(node.stderr for node in nodes)
    assert "rank 0 of 2" in both and "rank 1 of 2" in both
    # Same world size and micro-batch: the same global batches, so the same losses.
    reference, measured = losses(one_node), losses(two_node)
    assert sorted(measured) == [1, 2, 3, 4, 5]
    assert measured == pytest.approx(reference, rel=1e-6, abs=1e-7)


def test_a_rank_dying_on_one_node_fails_both_nodes_naming_it(tmp_path, data):
    nodes = two_nodes(
        write_config(tmp_path, data, tmp_path / "run"), "train.steps=30", env={"SLEEPSCALE_FAULT_EXIT_AT_STEP": "1:2"}
    )
    assert all(node.returncode != 0 for node in nodes), [node.returncode for node in nodes]
    both = "".join(node.stderr for node in nodes)
    assert "sleepscale launch: rank 1 (local rank 0 on" in both and "exited with code 13" in both
    assert max(losses(tmp_path / "run")) < 30


def test_a_stop_signal_to_the_launcher_checkpoints_every_rank_and_exits_75(tmp_path, data):
    run = tmp_path / "run"
    config = write_config(tmp_path, data, run)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "SLEEPSCALE_FAULT_PAUSE_AT_STEP": "2"}
    log = tmp_path / "launch.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [*launch_argv(config, "--nproc-per-node", "2"), "train.steps=6"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=environment,
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while "rank 0 paused after step 2" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        process.send_signal(signal.SIGUSR1)  # only to the launcher: it passes it on
        process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert process.returncode == 75, output[-3000:]
    assert "got SIGUSR1: passed it to 2 training process(es)" in output
    assert "[rank 1] stopped by signal at step 2" in output and "\nstopped by signal at step 2" in output
    assert (run / "checkpoints" / "latest").read_text() == "step-000002"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--nnodes", "2"], "--rdzv-endpoint HOST:PORT is required with --nnodes > 1"),
        (["--rdzv-endpoint", "node1"], "--rdzv-endpoint 'node1': give HOST:PORT"),
        (["--nproc-per-node", "0"], "--nproc-per-node 0: must be >= 1"),
    ],
)
def test_bad_launch_arguments_are_one_line(tmp_path, options, message):
    result = subprocess.run(
        launch_argv(tmp_path / "config.yaml", *options), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"sleepscale launch: {message}") and len(result.stderr.strip().splitlines()) == 1


def test_plan_runs_the_trainer_as_an_argv_list_with_threads_split_over_processes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    args = types.SimpleNamespace(
        nnodes=2,
        nproc_per_node=4,
        rdzv_endpoint="node1:29400",
        rdzv_id=None,
        config="a b.yaml",
        overrides=["tracking.run_name=x; rm -rf /"],
    )
    the_plan = plan(args)
    assert the_plan.threads_per_process == 2  # 8 CPUs granted by Slurm / 4 processes
    assert the_plan.rdzv_id == "4242"
    assert the_plan.command[-2:] == ["a b.yaml", "tracking.run_name=x; rm -rf /"]  # values stay whole
    with pytest.raises(LaunchError):
        plan(types.SimpleNamespace(**{**vars(args), "nnodes": 0}))
