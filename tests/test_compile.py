"""`train.compile` (`sleepscale.parallel.compile`): compiled blocks give the eager values, with no
graph break, and one graph per block kind and window length whatever N."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from conftest import make_config
from torch._dynamo.utils import counters
from train_helpers import losses, train, write_config

from sleepscale.config import ConfigError, validate
from sleepscale.model import build_model
from sleepscale.parallel.compile import compile_blocks
from sleepscale.sleep import sleep_forward

CPU = torch.device("cpu")
TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _step(model, ids, sleep):
    """Logits, loss and every gradient of one forward and backward."""
    model.zero_grad(set_to_none=True)
    out = sleep_forward(model, ids, sleep, targets=ids.roll(-1, 1))
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


def _relative_errors(got, want) -> dict[str, float]:
    """Norm-wise relative error of logits, loss and every gradient."""
    pairs = {"logits": (got[0], want[0]), "loss": (got[1], want[1])}
    pairs |= {name: (got[2][name], want[2][name]) for name in want[2]}
    return {name: ((a.double() - b.double()).norm() / b.double().norm()).item() for name, (a, b) in pairs.items()}


def _compare(backend, **sleep):
    """In float64 the compiled blocks compute what eager ones do (to 1e-10); in float32 they are as
    close to that float64 result as eager float32 is, within a factor of 4. (Not 1e-6 between compiled
    and eager float32: the gates' gradients, A_log and dt_bias, are sums over every token with
    cancellation, where float32's own error is ~1e-5 here and any reordering of the sums, as fusion
    does, moves them by as much.)"""
    config = make_config(hidden_size=32, **sleep)
    fp32 = build_model(config.model)
    ids = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(0))  # windows 8, 8, 8 and 6
    truth = _step(copy.deepcopy(fp32).double(), ids, config.sleep)
    compiled64 = compile_blocks(copy.deepcopy(fp32).double(), CPU, backend=backend)
    assert max(_relative_errors(_step(compiled64, ids, config.sleep), truth).values()) < 1e-10
    torch._dynamo.reset()  # the float32 blocks' graphs alone (the limit counts both dtypes' together)
    eager = _relative_errors(_step(fp32, ids, config.sleep), truth)
    compiled = _relative_errors(
        _step(compile_blocks(copy.deepcopy(fp32), CPU, backend=backend), ids, config.sleep), truth
    )
    worse = {name: (compiled[name], eager[name]) for name in eager if compiled[name] > 4 * eager[name] + 1e-7}
    assert not worse, worse
    assert dict(counters["graph_break"]) == {}


def test_compiled_blocks_give_the_eager_values():
    # aot_eager: dynamo and AOT autograd as inductor sees them, without its code generation (seconds, not minutes)
    _compare("aot_eager", passes=3, checkpoint="pass")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("passes", "checkpoint", "eviction"),
    [  # with the fast test's N=3 `pass` hard and the trainer's N=2 `none` hard (inductor's)
        (1, "pass", "sliding"),
        (3, "none", "sliding"),
        (3, "window", "hard"),
        (3, "nested", "hard"),
    ],
)
def test_compiled_blocks_give_the_eager_values_in_every_setting(passes, checkpoint, eviction):
    _compare("aot_eager", passes=passes, checkpoint=checkpoint, eviction=eviction)


def test_one_graph_per_block_kind_and_window_length_whatever_n():
    """Three steps at random N in [1, 3] over windows of 8, 8, 8 and 6 tokens: the attention and GDN
    blocks each compile once for full windows and once for the shorter last one, in the first step;
    later steps compile nothing, and nothing breaks a graph."""
    config = make_config(hidden_size=32, checkpoint="pass", random_passes={"kind": "uniform", "low": 1, "high": 3})
    model = compile_blocks(build_model(config.model), CPU, backend="aot_eager")
    ids = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    graphs = []
    for _ in range(3):
        _step(model, ids, config.sleep)
        graphs.append(counters["stats"]["unique_graphs"])
    assert dict(counters["graph_break"]) == {}
    assert graphs == [4, 4, 4]  # (attention, GDN) x (full window, last window)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"parallel": {"tensor": 2}}, "parallel.tensor"),
        ({"train": {"zero_stage": 3}}, "train.zero_stage"),
        ({"sleep": {"checkpoint": "selective"}}, "sleep.checkpoint"),
    ],
)
def test_what_cannot_compile_is_refused_in_one_line(overrides, field):
    raw = {
        "model": {"vocab_size": 40, "hidden_size": 16, "pattern": "AGAG", **overrides.get("model", {})},
        "sleep": {"window": 8, "passes": 3, **overrides.get("sleep", {})},
        "train": {"steps": 1, "compile": True, **overrides.get("train", {})},
        "parallel": overrides.get("parallel", {}),
    }
    with pytest.raises(ConfigError) as error:
        validate(raw)
    message = str(error.value)
    assert "\n" not in message and field in message and "train.compile" in message


@pytest.mark.slow
def test_a_compiled_training_run_follows_the_eager_one(tmp_path):
    """`sleepscale train` with `train.compile: true` (inductor's generated code, DeepSpeed around the
    compiled blocks, evaluation's no-gradient graphs too): the losses of its steps follow the eager
    run's (inductor's fused reductions round differently: 1e-4)."""
    data = tmp_path / "rule110"
    settings = {"train": {"steps": 4}, "eval": {"passes": [1, 2], "batch_size": 16, "every": 4}}
    eager_run, compiled_run = tmp_path / "eager", tmp_path / "compiled"
    train(write_config(tmp_path, data, eager_run, **settings))
    result = train(write_config(tmp_path, data, compiled_run, **settings), "train.compile=true", timeout=900)
    assert "validation accuracy by difficulty and N" in result.stdout
    eager, compiled = losses(eager_run), losses(compiled_run)
    assert sorted(compiled) == [1, 2, 3, 4]
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-4), (step, compiled[step], loss)


def _interpreted(script: str) -> dict:
    """The JSON line `script` (in tests/) prints, run in a subprocess under Triton's CPU interpreter."""
    result = subprocess.run(
        [sys.executable, str(TESTS / script)],
        env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_triton_window_kernel_stays_opaque_under_compile():
    """Our Triton window kernel (`sleepscale::window_delta_rule`, a custom operator) under torch.compile
    through Triton's CPU interpreter: no graph break, and outputs and gradients equal to eager, for the
    operator and for a model on `model.backend: window`."""
    assert _interpreted("kernel_window_compiled.py") == {"graph_breaks": 0, "op": 0.0, "model": 0.0}


@pytest.mark.slow
def test_fla_kernels_stay_opaque_under_compile():
    """fla's Triton kernels (`model.backend: fla`, as custom operators) under torch.compile through
    Triton's CPU interpreter: no graph break, and logits, loss and gradients equal to eager fla."""
    found = _interpreted("kernel_fla_compiled.py")
    assert found["graph_breaks"] == 0 and found["graphs"] > 0 and found["model"] < 1e-6, found
