"""The trainer's stability levers as real `sleepscale train` runs: spike skipping and random N."""

import re
import subprocess
import sys

import pytest
import torch
from conftest import make_config
from train_helpers import losses, metric, train, write_config

from sleepscale.config import ConfigError, PassesDistribution, validate
from sleepscale.passes import draw_passes
from sleepscale.train.checkpoint import load_model_from_checkpoint
from sleepscale.train.spikes import SpikeGuard


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "rule110"


def _with_train(**train):
    data = make_config().model_dump(mode="json")
    data["train"].update(train)
    return validate(data)


def _guard(**train):
    return SpikeGuard(_with_train(**train).train, [], [])


def test_spike_guard_judges_against_the_median_of_accepted_steps_once_the_window_is_full():
    guard = _guard(loss_spike_ratio=2.0, spike_window=3)
    for loss in (4.0, 3.0):
        guard.accept(loss, None)
    assert not guard.is_loss_spike(100.0)  # the window is not full yet
    guard.accept(1.0, None)
    assert guard.is_loss_spike(6.1) and not guard.is_loss_spike(6.0)  # median 3
    guard.accept(1.0, None)  # the window slides: 3, 1, 1
    assert guard.is_loss_spike(2.1) and guard.loss_history == [3.0, 1.0, 1.0]
    guard.restart()
    assert not guard.is_loss_spike(100.0)


def test_grad_spike_skipping_needs_our_zero0_fp32_optimizer():
    message = "train.grad_spike_ratio: needs zero_stage 0 (or optimizer muon) and precision fp32"
    with pytest.raises(ConfigError, match=re.escape(message)):
        _with_train(grad_spike_ratio=3, zero_stage=2)


@pytest.mark.parametrize("detector", ["loss_spike_ratio", "grad_spike_ratio", None])
def test_a_spike_is_skipped_and_counted_only_by_its_detector(tmp_path, data, detector):
    run = tmp_path / "run"
    train_section = {"spike_window": 4, **({detector: 3.0} if detector else {})}
    config = write_config(tmp_path, data, run, train=train_section)
    train(config, "train.steps=8", env={"SLEEPSCALE_FAULT_SPIKE_LOSS_STEPS": "6"})
    skipped, loss = metric(run, "skipped_steps"), losses(run)
    assert loss[7] > 100 * loss[6]  # the logged loss is the real, spiking one
    if detector is None:
        assert skipped[8] == 0
        return
    assert [skipped[s] for s in range(1, 9)] == [0] * 6 + [1, 1]
    counter = {"loss_spike_ratio": "loss_spikes", "grad_spike_ratio": "grad_spikes"}[detector]
    other = {"loss_spikes", "grad_spikes"} - {counter}
    assert metric(run, counter)[8] == 1 and metric(run, other.pop())[8] == 0
    model, _ = load_model_from_checkpoint(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_random_n_run_trains_and_evaluates_every_requested_n(tmp_path, data):
    run = tmp_path / "run"
    config = write_config(tmp_path, data, run, eval={"passes": [1, 2, 4], "batch_size": 16})
    train(config, "sleep.random_passes={kind: uniform, low: 1, high: 3}", "train.steps=12", "sleep.grad_passes=1")
    drawn = metric(run, "passes")
    expected = [draw_passes(PassesDistribution(kind="uniform", low=1, high=3), 0, step) for step in range(12)]
    assert [drawn[s] for s in range(1, 13)] == expected and len(set(expected)) == 3
    loss = losses(run)
    assert sum(list(loss.values())[-3:]) < sum(list(loss.values())[:3])

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sleepscale.cli",
            "eval",
            str(run),
            "--passes",
            "1,2,4",
            "--no-mlflow",
            "--out",
            str(tmp_path / "eval.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = (tmp_path / "eval.csv").read_text().splitlines()[1:]
    assert {row.split(",")[2] for row in rows} == {"1", "2", "4"}
