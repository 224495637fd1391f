"""The sleep plan: the plan-driven engine equals the engine it replaced bit for bit, and running a
plan never synchronises the host with the device; nor does a training step, but for the named reads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import frozen_engine
import pytest
import torch
from conftest import make_config, make_model
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import write_config

from sleepscale.config_loading import load_config
from sleepscale.model import build_model, recompute
from sleepscale.plan import loss_windows, make_plan
from sleepscale.sleep import IGNORE_INDEX, plan_for, sleep_forward

# Operators that copy a device value to the host (and so wait for the device).
SYNC_OPERATORS = {
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::item",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique2",
    "aten::repeat_interleave",
}


class HostSyncs(TorchDispatchMode):
    """Counts device-to-host synchronising operators run inside it."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNC_OPERATORS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def context_targets(tokens):
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[0, 9] = targets[1, 17] = targets[:, 29] = 1  # loss in window 1 for row 0, window 2 for row 1
    return targets


SETTINGS = [
    {},
    {"checkpoint": "pass"},
    {"checkpoint": "window"},
    {"grad_passes": 1},
    {"grad_passes": 2, "checkpoint": "pass"},
    {"detach_every": 2},
    {"state_norm_bound": 0.5},
    {"sleep_on": "context"},
    {"sleep_on": "context", "checkpoint": "window", "eviction": "sliding"},
    {"eviction": "sliding"},
    {"eviction": "sliding", "checkpoint": "pass", "grad_passes": 1},
    {"model": {"loop": [1, 3]}},
    {"model": {"loop": [1, 3]}, "eviction": "sliding", "checkpoint": "pass", "state_norm_bound": 0.5},
]


def _loss_and_grads(engine_forward, config, tokens, targets):
    model = make_model(config, dtype=torch.float32)
    if engine_forward is frozen_engine.sleep_forward:  # it names per-pass checkpointing by a bool
        run_blocks = model.run_blocks
        model.run_blocks = lambda hidden, states, blocks, checkpoint: run_blocks(
            hidden, states, blocks, "pass" if checkpoint else "none"
        )
    out = engine_forward(model, tokens, config.sleep, targets=targets)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("passes", [1, 2, 3])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_plan_driven_engine_is_bit_identical_to_the_engine_it_replaced(passes, setting, tokens):
    """tests/frozen_engine.py is sleepscale/sleep.py as of 278da2f, before the plan."""
    setting = dict(setting)
    if setting.get("grad_passes", 0) > passes:
        setting["grad_passes"] = passes
    config = make_config("AGAG", passes=passes, **setting)
    targets = context_targets(tokens) if config.sleep.sleep_on == "context" else tokens.roll(-1, dims=1)
    old, old_grads = _loss_and_grads(frozen_engine.sleep_forward, config, tokens, targets)
    new, new_grads = _loss_and_grads(sleep_forward, config, tokens, targets)
    assert torch.equal(new.loss, old.loss)
    assert torch.equal(new.logits, old.logits)
    assert torch.equal(new.passes, old.passes)
    for name, grad in old_grads.items():
        assert (grad is None and new_grads[name] is None) or torch.equal(new_grads[name], grad), name
    if old.pass_state_norms is not None:
        assert torch.equal(new.pass_state_norms, old.pass_state_norms)


@pytest.mark.parametrize("form", ["block", "nested", "selective"])
@pytest.mark.parametrize("passes", [1, 2, 3])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_every_recomputation_form_is_bit_identical_to_no_checkpointing(form, passes, setting, tokens):
    """The identity grid above, each finer form of `sleep.checkpoint` against `checkpoint: none`."""
    setting = {key: value for key, value in setting.items() if key != "checkpoint"}
    if setting.get("grad_passes", 0) > passes:
        setting["grad_passes"] = passes
    plain = make_config("AGAG", passes=passes, checkpoint="none", **setting)
    recomputed = make_config("AGAG", passes=passes, checkpoint=form, **setting)
    targets = context_targets(tokens) if plain.sleep.sleep_on == "context" else tokens.roll(-1, dims=1)
    old, old_grads = _loss_and_grads(sleep_forward, plain, tokens, targets)
    new, new_grads = _loss_and_grads(sleep_forward, recomputed, tokens, targets)
    assert torch.equal(new.loss, old.loss)
    assert torch.equal(new.logits, old.logits)
    for name, grad in old_grads.items():
        assert (grad is None and new_grads[name] is None) or torch.equal(new_grads[name], grad), name


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("sleep_on", ["evicted", "context"])
def test_sleep_forward_never_synchronises_with_the_host(sleep_on, eviction, tokens):
    config = make_config("AGAG", passes=3, sleep_on=sleep_on, eviction=eviction, checkpoint="pass")
    model = make_model(config, dtype=torch.float32)
    targets = context_targets(tokens)
    with HostSyncs() as syncs:
        out = sleep_forward(model, tokens, config.sleep, targets=targets, return_logits=False)
        out.loss.backward()
    assert syncs.seen == []
    assert out.passes[:, :3].min() == (1 if sleep_on == "context" else 3)  # it did sleep


def test_the_plan_says_what_runs(tokens):
    config = make_config(
        "GAGAG",
        passes=3,
        grad_passes=1,
        detach_every=2,
        model={"loop": [1, 4]},
        sleep_on="context",
        checkpoint="pass",
        state_norm_bound=2.0,
    )
    model = make_model(config)
    plan = plan_for(model, tokens, config.sleep, context_targets(tokens))
    assert [(w.start, w.end) for w in plan.windows] == [(0, 8), (8, 16), (16, 24), (24, 30)]
    wake, *sleep = plan.windows[0].passes
    assert (wake.blocks, wake.readout, wake.grad, wake.next_pass) == (
        (range(0, 1), range(1, 4)),
        range(4, 5),
        True,
        False,
    )
    assert [(p.number, p.blocks, p.grad, p.next_pass, p.bound) for p in sleep] == [
        (2, (range(1, 4),), False, True, 2.0),
        (3, (range(1, 4),), True, True, 2.0),
    ]
    assert [w.sleepers for w in plan.windows] == [None, (False, True, True), (True, False, True), None]
    assert [len(w.passes) for w in plan.windows] == [3, 3, 3, 1]  # nobody sleeps on the last window
    assert [w.detach for w in plan.windows] == [False, True, False, True]
    assert [w.evict for w in plan.windows] == [True, True, True, False]
    assert plan.passes_run().tolist() == [[3, 1, 3, 1], [3, 3, 1, 1], [3, 3, 3, 1]]
    continuing = make_plan(config.sleep, 3, 16, 5, range(1, 4), sequence_continues=True)
    assert [len(w.passes) for w in continuing.windows] == [3, 3]


@pytest.mark.parametrize("loop", [(1, 4), (0, 5)], ids=["prelude-loop-coda", "all-loop"])
@pytest.mark.parametrize("checkpoint", ["none", "pass", "window", "block", "nested", "selective"])
@pytest.mark.parametrize("passes", [1, 2, 3])
def test_the_plan_says_what_is_checkpointed(passes, checkpoint, loop):
    config = make_config(
        "GAGAG", passes=passes, checkpoint=checkpoint, grad_passes=min(2, passes), model={"loop": list(loop)}
    )
    plan = make_plan(config.sleep, 3, 30, 5, range(*loop))
    ranges = tuple(blocks for blocks in (range(0, loop[0]), range(*loop), range(loop[1], 5)) if blocks)

    def units(block_ranges):  # a pass with gradient: its ranges (pass, nested) or their blocks (block, selective)
        if checkpoint in ("pass", "nested"):
            return block_ranges
        if checkpoint in ("block", "selective"):
            return tuple(range(i, i + 1) for blocks in block_ranges for i in blocks)
        return ()

    for window in plan.windows:
        wake, *sleep = window.passes
        assert len(sleep) == (passes - 1 if window.index < 3 else 0)  # the last window is not slept on
        assert wake.block_ranges == ranges  # the prelude, the loop, then the coda on the readout branch
        assert all(p.block_ranges == (range(*loop),) for p in sleep)
        # the wake pass and the last 2 passes carry gradient; the others are not checkpointed in any form
        assert wake.checkpoint_units == units(ranges)
        assert [p.checkpoint_units for p in sleep] == [
            units((range(*loop),)) if p.number > passes - 2 else () for p in sleep
        ]
        assert [p.checkpoint for p in window.passes] == [
            checkpoint if p.grad and checkpoint not in ("none", "window") else "none" for p in window.passes
        ]
        assert window.is_checkpoint_unit == (checkpoint == "window")


@pytest.mark.parametrize(
    "setting",
    [
        {"checkpoint": "pass"},
        {"checkpoint": "pass", "grad_passes": 1, "state_norm_bound": 0.5},
        {"checkpoint": "pass", "sleep_on": "context", "eviction": "sliding"},
        {"checkpoint": "block"},
        {"checkpoint": "nested", "grad_passes": 1},
        {"checkpoint": "selective", "eviction": "sliding"},
        {"checkpoint": "window"},
        {"checkpoint": "none"},
    ],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()),
)
def test_the_engine_checkpoints_the_units_the_plan_names(setting, tokens, monkeypatch):
    """The engine checkpoints exactly the plan's `PassPlan.checkpoint_units`, in order; under `nested`
    each unit's forward checkpoints its blocks as units of their own (under `window` the engine
    checkpoints the window, and no block range on its own)."""
    config = make_config("GAGAG", passes=3, model={"loop": [1, 4]}, **setting)
    model = make_model(config, dtype=torch.float32)
    targets = context_targets(tokens)
    plan = plan_for(model, tokens, config.sleep, targets)
    checkpointed, checkpoint = [], recompute.checkpoint

    def recorded(run_blocks, hidden, states, blocks, *args, **kwargs):
        checkpointed.append(blocks)
        return checkpoint(run_blocks, hidden, states, blocks, *args, **kwargs)

    monkeypatch.setattr(recompute, "checkpoint", recorded)
    sleep_forward(model, tokens, config.sleep, targets=targets, return_logits=False, plan=plan)
    units = [blocks for w in plan.windows for p in w.passes for blocks in p.checkpoint_units]
    if setting["checkpoint"] == "nested":
        units = [unit for blocks in units for unit in (blocks, *(range(i, i + 1) for i in blocks))]
    assert checkpointed == units
    # per pass: 4 windows' prelude, loop and coda, and the loop of each sleep pass with gradient over the 3 slept on
    ranges = 4 * 3 + 3 * (1 if "grad_passes" in setting else 2)
    blocks = 4 * 5 + 3 * 3 * (1 if "grad_passes" in setting else 2)
    expected = {"pass": ranges, "block": blocks, "selective": blocks, "nested": ranges + blocks}
    assert len(checkpointed) == expected.get(setting["checkpoint"], 0)


@pytest.mark.parametrize(
    "length, detach_every, carried_on",
    [
        (30, None, [True, True, True, False]),  # 4 windows: the last one's states reach no later window
        (30, 1, [False, False, False, False]),
        (30, 2, [True, False, True, False]),
        (30, 3, [True, True, False, False]),
        (8, None, [False]),
        (8, 1, [False]),
    ],
)
@pytest.mark.parametrize("passes", [1, 2, 3])
def test_the_plan_says_which_states_are_carried(passes, length, detach_every, carried_on):
    config = make_config(passes=passes, detach_every=detach_every)
    for continues in (False, True) if length % 8 == 0 else (False,):  # a segment's last window is still the plan's last
        plan = make_plan(config.sleep, 3, length, 4, range(0, 4), sequence_continues=continues)
        assert [w.carries_states for w in plan.windows] == carried_on
        # a window starts from states with gradient when the window before carried its states on
        assert [w.starts_with_carried_states for w in plan.windows] == [False, *carried_on[:-1]]


@pytest.mark.parametrize("checkpoint", ["none", "pass", "window"])
@pytest.mark.parametrize("passes", [1, 2, 3])
def test_the_plan_says_which_windows_end_on_a_matmul(passes, checkpoint, tokens):
    """A window ends on its last sleep pass's last matmul unless a bound or a per-sequence choice of
    sleepers follows it; without sleep passes it ends on the head and loss."""

    def ends_on_matmul(**sleep):
        config = make_config(passes=passes, checkpoint=checkpoint, **sleep)
        carries_loss = loss_windows(context_targets(tokens), 8) if sleep.get("sleep_on") == "context" else None
        return [w.ends_on_matmul for w in make_plan(config.sleep, 3, 30, 4, range(0, 4), carries_loss).windows]

    slept = passes > 1
    assert ends_on_matmul() == [slept, slept, slept, False]  # the last window is not slept on
    assert ends_on_matmul(state_norm_bound=0.5) == [False] * 4
    # sleepers per window [all, (False, True, True), (True, False, True), none]: only the first ends on a matmul
    assert ends_on_matmul(sleep_on="context") == [slept, False, False, False]
    assert ends_on_matmul(grad_passes=1) == [slept, slept, slept, False]  # gradient or not, the last pass runs


def test_a_plan_for_other_inputs_is_refused(tokens):
    config = make_config(passes=2)
    model = make_model(config)
    with pytest.raises(ValueError, match="plan is for 3 sequences of 16 tokens, the input is 3 of 30"):
        sleep_forward(model, tokens, config.sleep, plan=plan_for(model, tokens[:, :16], config.sleep))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "rule110"  # generated by the first run


# The reads a training step that does not log makes on the host, and why (tests/host_syncs_ranks.py).
EXPECTED_STEP_SYNCS = {
    # The update guard of our ZeRO-0 fp32 optimizer: whether to skip needs the gradient norm on the host.
    "aten::_local_scalar_dense in step.py:_gradient_norm",
    # SIGTERM/SIGUSR1 on any rank stops every rank at the same step, and a batch of padding on every
    # rank is no step: two flags agreed over ranks before each step, in one all-reduce and one read.
    "aten::_local_scalar_dense in trainer.py:_step_flags",
}


@pytest.mark.parametrize(
    "sleep",
    [{"sleep_on": "evicted", "eviction": "hard"}, {"sleep_on": "context", "eviction": "sliding"}],
    ids=["evicted-hard", "context-sliding"],
)
def test_a_training_step_reads_the_device_only_where_named(tmp_path, data, sleep):
    run = tmp_path / "run"
    config = write_config(
        tmp_path,
        data,
        run,
        sleep={"passes": 3, "checkpoint": "pass", **sleep},
        train={"steps": 4, "log_every": 4, "grad_accumulation": 2},
        checkpoint={"every": 4},
        eval={"passes": [1]},
    )
    out = tmp_path / "syncs.json"
    script = Path(__file__).parent / "host_syncs_ranks.py"
    result = subprocess.run(
        [sys.executable, str(script), str(out), str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(out.read_text())
    # torch's Adam reads each parameter's step counter with .item(); torch keeps that counter on the
    # host (unless capturable or fused), so on a GPU this reads host memory and waits for nothing.
    adam_step_counters = [s for s in seen if "adam.py:" in s]
    assert len(adam_step_counters) == sum(1 for p in build_model(load_config(config).model).parameters())
    assert sorted(set(seen) - set(adam_step_counters)) == sorted(EXPECTED_STEP_SYNCS)
    assert len(seen) - len(adam_step_counters) == len(EXPECTED_STEP_SYNCS), seen


@pytest.mark.parametrize("checkpoint", ["none", "window"])
def test_loss_in_token_chunks_equals_the_whole_window_loss(monkeypatch, checkpoint, tokens):
    """Training asks for the loss only; a window whose logits would be large gets it chunk by chunk."""
    import sleepscale.sleep

    config = make_config("AGAG", passes=2, checkpoint=checkpoint)
    targets = tokens.roll(-1, dims=1)

    def loss_and_grads(chunk_elements):
        monkeypatch.setattr(sleepscale.sleep, "LOSS_CHUNK_ELEMENTS", chunk_elements)
        model = make_model(config)
        out = sleep_forward(model, tokens, config.sleep, targets=targets, return_logits=False)
        out.loss.backward()
        assert out.logits is None
        return out.loss, [p.grad for p in model.parameters()]

    whole_loss, whole_grads = loss_and_grads(2**26)
    chunked_loss, chunked_grads = loss_and_grads(3 * 40 * 3)  # chunks of 3 tokens: 3 sequences x 40 words
    torch.testing.assert_close(chunked_loss, whole_loss, rtol=1e-12, atol=0)
    for chunked, whole in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-14)
