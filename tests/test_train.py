"""`sleepscale train` and `sleepscale eval` as real processes: tracking, resume, crash safety, guards, stages."""

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from train_helpers import changed_parameters, free_port, losses, metric, train, write_config

from sleepscale.config_loading import load_config
from sleepscale.model import build_model
from sleepscale.train.checkpoint import load_model_from_checkpoint
from sleepscale.train.trainer import EXIT_BAD_STEPS, EXIT_PREEMPTED


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Generated once by the first run that needs it (the trainer generates missing data)."""
    return tmp_path_factory.mktemp("data") / "rule110"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    """A 20-step run that every resume test compares against."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run = tmp / "run"
    result = train(write_config(tmp, data, run))
    return run, result


def test_short_run_trains_and_is_tracked_in_mlflow(uninterrupted):
    run, result = uninterrupted
    loss = losses(run)
    assert sorted(loss) == list(range(1, 21))
    assert sum(list(loss.values())[-5:]) / 5 < sum(list(loss.values())[:5]) / 5
    assert "validation accuracy by difficulty and N" in result.stdout and "| t | 0 | 2 |" in result.stdout
    assert f"sqlite:///{run.resolve()}/mlflow.db" in result.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.resolve()}/mlflow.db")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("sleepscale").experiment_id])
    assert mlflow_run.data.params["sleep.passes"] == "2" and mlflow_run.data.params["model.pattern"] == "AGAG"
    assert mlflow_run.data.tags["passes"] == "2" and mlflow_run.data.tags["eviction"] == "hard"
    assert len(mlflow_run.data.tags["git_commit"]) in (7, 40) or mlflow_run.data.tags["git_commit"] == "unknown"
    history = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 21)) and [m.value for m in history] == list(losses(run).values())
    for name in (
        "grad_norm",
        "lr",
        "tokens_per_second",
        "passes_per_window",
        "skipped_steps",
        "gdn_state_norm_layer1",
        "eval_accuracy_t0_N1",
        "eval_accuracy_t1_N2",
    ):
        assert client.get_metric_history(mlflow_run.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"config.yaml", "eval.csv", "eval.png", "eval.md"} <= artifacts
    assert mlflow_run.info.status == "FINISHED"


def test_tracking_to_a_real_mlflow_server(tmp_path, data):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        uri = f"http://127.0.0.1:{port}"
        run = tmp_path / "run"
        train(write_config(tmp_path, data, run, tracking={"uri": uri, "experiment": "served"}), "train.steps=6")

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        (mlflow_run,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
        assert [m.step for m in client.get_metric_history(mlflow_run.info.run_id, "loss")] == list(range(1, 7))
        assert "eval.png" in {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def test_sigterm_checkpoints_exits_75_and_each_restart_matches_the_uninterrupted_run(tmp_path, data, uninterrupted):
    """Stopped at step 7, restarted and stopped again at step 10 (where a periodic checkpoint falls too),
    restarted: steps 8 to 20 equal the uninterrupted run's, bit for bit."""
    run = tmp_path / "run"
    config = write_config(tmp_path, data, run)
    for step in (7, 10):
        stopped = train(config, env={"SLEEPSCALE_FAULT_SIGTERM_AT_STEP": str(step)}, check=False)
        assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-2000:]
        assert f"stopped by signal at step {step}" in stopped.stderr
        assert (run / "checkpoints" / "latest").read_text() == f"step-{step:06d}"
    train(config)
    resumed, reference = losses(run), losses(uninterrupted[0])
    assert sorted(resumed) == list(range(1, 21))
    assert [resumed[s] for s in range(8, 21)] == [reference[s] for s in range(8, 21)]  # exact, not close


def test_sigkill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, data, uninterrupted):
    run = tmp_path / "run"
    config = write_config(tmp_path, data, run)
    killed = train(config, env={"SLEEPSCALE_FAULT_KILL_DURING_SAVE": "20"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "latest").read_text() == "step-000010"
    assert (run / "checkpoints" / ".partial" / "step-000020").exists()  # the half-written one
    model, _ = load_model_from_checkpoint(run)
    assert model.layers[1].attn.q_proj.weight.shape == (16, 16)
    train(config)
    assert [losses(run)[s] for s in range(11, 21)] == [losses(uninterrupted[0])[s] for s in range(11, 21)]


def test_nan_loss_is_skipped_and_counted_and_an_unreachable_tracking_server_does_not_stop_training(tmp_path, data):
    """ZeRO-2 (ZeRO-0 below, with the consecutive bad steps), tracking to a server nobody listens on:
    said once, and the run trains on, metrics.jsonl holding every metric."""
    run = tmp_path / "run"
    unreachable = {"uri": f"http://127.0.0.1:{free_port()}"}
    config = write_config(tmp_path, data, run, train={"zero_stage": 2}, tracking=unreachable)
    result = train(config, "train.steps=6", env={"SLEEPSCALE_FAULT_NAN_LOSS_STEPS": "2"})
    assert result.stderr.count("training continues without MLflow tracking") == 1
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
    skipped = metric(run, "skipped_steps")
    assert [skipped[s] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert all(v == v for s, v in losses(run).items() if s != 3)  # NaN only at step 3
    model, _ = load_model_from_checkpoint(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nan_loss_is_skipped_and_consecutive_bad_steps_stop_with_a_checkpoint(tmp_path, data):
    """ZeRO-0: step 3's NaN is skipped and counted, and training goes on; steps 5 and 6, two in a row,
    stop it."""
    run = tmp_path / "run"
    config = write_config(tmp_path, data, run, train={"max_bad_steps": 2})
    result = train(config, env={"SLEEPSCALE_FAULT_NAN_LOSS_STEPS": "2,4,5"}, check=False)
    assert result.returncode == EXIT_BAD_STEPS
    assert "2 consecutive steps were skipped (NaN/Inf loss or gradient, or a spike)" in result.stderr
    assert (run / "checkpoints" / "latest").read_text() == "step-000006"
    skipped = metric(run, "skipped_steps")
    assert [skipped[s] for s in range(1, 5)] == [0, 0, 1, 1]
    assert all(v == v for s, v in losses(run).items() if s not in (3, 5, 6))  # NaN only where made so
    model, _ = load_model_from_checkpoint(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_first_stage_trains_only_the_named_parameters(tmp_path, data):
    run = tmp_path / "run"
    stages = [
        {
            "name": "gdn-only",
            "steps": 5,
            "eviction": "hard",
            "passes": 2,
            "train": ["layers.1.attn.*", "layers.3.attn.*"],
        },
        {"name": "all", "steps": 3, "eviction": "sliding", "passes": 2, "train": ["*"]},
    ]
    config = write_config(tmp_path, data, run, stages=stages, train={"steps": None}, checkpoint={"every": 5, "keep": 5})
    result = train(config)
    assert "stage 0 'gdn-only'" in result.stderr and "stage 1 'all'" in result.stderr
    initial = build_model(load_config(config).model).state_dict()
    assert changed_parameters(run, 5, initial) == {
        name for name in initial if name.startswith(("layers.1.attn.", "layers.3.attn."))
    }
    assert "embeddings.weight" in changed_parameters(run, 8, initial)


def test_eval_command_prints_and_writes_the_table(uninterrupted, tmp_path):
    run, _ = uninterrupted
    out = tmp_path / "table.csv"
    result = subprocess.run(
        [sys.executable, "-m", "sleepscale.cli", "eval", str(run), "--passes", "1,3", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "| difficulty | value | passes | items | accuracy | token_accuracy |" in result.stdout
    rows = out.read_text().splitlines()
    assert rows[0] == "difficulty,value,passes,items,accuracy,token_accuracy"
    assert {(r.split(",")[1], r.split(",")[2]) for r in rows[1:]} == {("0", "1"), ("0", "3"), ("1", "1"), ("1", "3")}
    assert sum(int(r.split(",")[3]) for r in rows[1:]) == 2 * 32
    assert "logged to MLflow run" in result.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.resolve()}/mlflow.db")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("sleepscale").experiment_id])
    assert client.get_metric_history(mlflow_run.info.run_id, "validation_accuracy_t0_N3")
    assert "table.csv" in {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}


def test_bad_eval_arguments_are_one_line(uninterrupted, tmp_path):
    run, _ = uninterrupted
    for args, message in (
        (["--passes", "1,x"], "--passes '1,x': give comma-separated integers"),
        (["--data", str(tmp_path)], "no manifest"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "sleepscale.cli", "eval", str(run), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = subprocess.run(
        [sys.executable, "-m", "sleepscale.cli", "eval", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "not a sleepscale checkpoint or run directory" in result.stderr


def test_resuming_with_a_changed_config_is_refused(tmp_path, data, uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted[0], run)
    result = train(write_config(tmp_path, data, run), "model.hidden_size=32", check=False)
    assert result.returncode == 2
    assert "holds a checkpoint of a different configuration" in result.stderr
    assert json.loads((run / "checkpoints" / "step-000020" / "trainer.json").read_text())["progress"]["step"] == 20


@pytest.mark.parametrize(
    "overrides",
    [["optimizer.name=muon", "optimizer.muon_lr=0.02"], ["train.precision=bf16", "train.zero_stage=1"]],
    ids=["muon", "bf16-zero1"],
)
def test_muon_and_bf16_runs_train(tmp_path, data, overrides):
    run = tmp_path / "run"
    train(write_config(tmp_path, data, run), "train.steps=8", *overrides)
    loss = losses(run)
    assert len(loss) == 8 and all(v == v for v in loss.values())
    assert sum(list(loss.values())[-3:]) < sum(list(loss.values())[:3])
    model, _ = load_model_from_checkpoint(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_shipped_two_stage_config_first_trains_only_the_inserted_gdn_layers():
    import fnmatch

    config = load_config("configs/two_stage_sliding.yaml")
    first, second = config.stages
    assert (first.eviction, second.eviction, second.train) == ("hard", "sliding", ["*"])
    model = build_model(config.model)
    trained = {name for name, _ in model.named_parameters() if any(fnmatch.fnmatchcase(name, p) for p in first.train)}
    gdn_only = {i for i, letter in enumerate(config.model.pattern) if letter == "g"}
    expected = {
        name
        for name, _ in model.named_parameters()
        if name.startswith("layers.") and int(name.split(".")[1]) in gdn_only
    }
    assert trained == expected and expected


def _dataset_with_bad_shards(tmp_path, bad: int):
    """The tiny dataset (8 training shards of 40 samples), its first `bad` training shards overwritten."""
    from sleepscale.data.build import generate_missing

    data = tmp_path / "data"
    config = write_config(tmp_path, data, tmp_path / "run")
    generate_missing(load_config(config).data)
    for shard in sorted(data.glob("train-*.tar"))[:bad]:
        shard.write_bytes(b"not a tar file")
    return config


def test_skipping_bad_shards_is_one_line_each_and_stops_beyond_the_allowed_fraction(tmp_path):
    config = _dataset_with_bad_shards(tmp_path, bad=8)
    for fraction, message in (
        (
            0.01,
            "skipped 320 of the 320 samples of epoch 0 on this rank, more than "
            "data.max_skipped_fraction = 0.01 of them; bad shards: ",
        ),
        (1.0, "no good sample left in epoch 0 on this rank: all 320 were skipped; bad shards: "),
    ):
        result = train(config, "data.skip_bad_samples=true", f"data.max_skipped_fraction={fraction}", check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("sleepscale train: " + message) and "train-000000.tar (40 samples)" in last
        skip_lines = [line for line in result.stderr.splitlines() if "bad sample(s)" in line]
        assert len(skip_lines) == 8  # one per shard, not one per sample
        assert not (tmp_path / "run" / "metrics.jsonl").exists() or not losses(tmp_path / "run")  # no step on padding


def test_batches_of_padding_only_are_never_steps(tmp_path):
    config = _dataset_with_bad_shards(tmp_path, bad=4)  # half of every epoch is padding after skipping
    result = train(config, "data.skip_bad_samples=true", "data.max_skipped_fraction=0.5", "train.steps=25")
    run = tmp_path / "run"
    tokens = metric(run, "tokens")
    assert sorted(tokens) == list(range(1, 26))
    assert {tokens[s] - tokens.get(s - 1, 0) for s in tokens} == {8 * 36}  # every step: 8 real sequences of 36 tokens
    assert min(losses(run).values()) > 0
    assert result.stderr.count("passing over the batches of padding only that end epoch 0") == 1
