"""Training FLOPs counted from the sleep plan (`sleepscale.flops`) against FlopCounterMode on real steps."""

import pytest
import torch
from conftest import make_config, make_model
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from sleepscale import flops
from sleepscale.data.sample import IGNORE_INDEX
from sleepscale.flops import plan_flops, training_flops_per_token
from sleepscale.sleep import plan_for, sleep_forward

aten = torch.ops.aten
# On a CPU, scaled_dot_product_attention runs as these kernels, for which FlopCounterMode has no
# formula (it has one for the CUDA kernels, and would count attention as 0 here): give them its own.
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda grad, q, k, v, *args, **kwargs: (
        sdpa_backward_flop_count(grad, q, k, v)
    ),
}
WINDOW = 8


@pytest.fixture(autouse=True)
def one_thread():
    """These steps are thousands of tiny ops, each slower (and much slower on a busy machine) when
    torch splits it over threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(length=12):
    """Two sequences; 12 tokens are a window of 8 (slept on) and a short last window of 4."""
    ids = torch.randint(0, 40, (2, length), generator=torch.Generator().manual_seed(0))
    return ids, ids.roll(-1, 1)


def planned_and_counted(config, ids, targets):
    """(the plan's FLOPs, FlopCounterMode's on one real forward and backward of that plan)."""
    model = make_model(config, dtype=torch.float32)
    plan = plan_for(model, ids, config.sleep, targets)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        sleep_forward(model, ids, config.sleep, targets=targets, return_logits=False, plan=plan).loss.backward()
    return plan_flops(plan, model, config.sleep.window), counter.get_total_flops()


FORMS = ("none", "pass", "window", "block", "nested", "selective")


@pytest.mark.parametrize(
    "passes, checkpoint, grad_passes, loop",
    [
        *[(1, checkpoint, None, None) for checkpoint in FORMS],
        *[(3, checkpoint, k, None) for checkpoint in FORMS for k in (None, 1)],
        # a prelude and a coda: ranges of one block and of two (a nested unit re-runs all but its last block)
        *[(3, checkpoint, None, [1, 3]) for checkpoint in FORMS],
    ],
)
def test_plan_flops_are_what_flop_counter_counts(passes, checkpoint, grad_passes, loop):
    """Exact, for every recomputation form: `block` re-runs each block reached but its last matmul,
    `nested` each range reached but its last block then each block as `block` does, `selective` no
    matmul (it keeps their outputs)."""
    model = {} if loop is None else {"loop": loop}
    config = make_config(
        "AGAG", window=WINDOW, passes=passes, checkpoint=checkpoint, grad_passes=grad_passes, model=model
    )
    planned, counted = planned_and_counted(config, *batch())
    assert planned == counted


@pytest.mark.parametrize("checkpoint", ["none", "pass", "nested"])
def test_plan_flops_with_the_options_of_pretrained_checkpoints(checkpoint):
    """q_proj's doubled rows (output gate) count through its weight; biases, q/k norms and partial
    rotary add nothing; the delta rule runs per value head (two per key head)."""
    model = {
        "attention": {
            "num_heads": 2,
            "num_kv_heads": 1,
            "rotary_fraction": 0.5,
            "qkv_bias": True,
            "output_bias": True,
            "qk_norm": True,
            "output_gate": True,
        },
        "gdn": {"num_heads": 2, "num_v_heads": 4, "expand_v": 1.5},
        "zero_centered_norms": True,
    }
    config = make_config("AGAG", window=WINDOW, passes=3, checkpoint=checkpoint, eviction="sliding", model=model)
    planned, counted = planned_and_counted(config, *batch())
    assert planned == pytest.approx(counted, rel=0.02)


@pytest.mark.parametrize(
    ("passes", "checkpoint"), [(1, "none"), (3, "pass"), (1, "window"), (3, "window"), (3, "block"), (3, "selective")]
)
def test_plan_flops_with_the_loss_in_chunks(monkeypatch, passes, checkpoint):
    """A large vocabulary's loss is computed in checkpointed chunks of tokens (here 3 per chunk, so
    a window of 8 has a short last chunk), whose head backward recomputes."""
    import sleepscale.sleep

    monkeypatch.setattr(sleepscale.sleep, "LOSS_CHUNK_ELEMENTS", 3 * 2 * 400)
    config = make_config("AGAG", window=WINDOW, passes=passes, checkpoint=checkpoint, vocab_size=400)
    planned, counted = planned_and_counted(config, *batch())
    assert planned == pytest.approx(counted, rel=0.005)


@pytest.mark.parametrize("checkpoint", ["window", "nested"])
def test_plan_flops_when_some_sequences_sleep(checkpoint):
    """sleep_on: context, the first window slept on by one sequence of two (the other keeps its wake
    states): the sleep passes still run for both."""
    config = make_config("AGAG", window=WINDOW, passes=3, checkpoint=checkpoint, sleep_on="context")
    ids, targets = batch()
    targets[0, :WINDOW] = IGNORE_INDEX
    planned, counted = planned_and_counted(config, ids, targets)
    assert planned == pytest.approx(counted, rel=0.02)


def test_flops_follow_the_plan():
    config = make_config("AGAG", window=WINDOW, passes=3, sleep_on="context")
    model = make_model(config)
    ids, targets = batch(length=20)  # windows of 8, 8 and 4

    def flops(*loss_free_windows):
        window_targets = targets.clone()
        for w in loss_free_windows:
            window_targets[:, w * WINDOW : (w + 1) * WINDOW] = IGNORE_INDEX
        return plan_flops(plan_for(model, ids, config.sleep, window_targets), model, WINDOW)

    awake = flops()  # every window carries loss: nothing is slept on, as at N = 1
    assert awake == plan_flops(
        plan_for(model, ids, config.sleep.model_copy(update={"passes": 1}), targets), model, WINDOW
    )
    assert awake < flops(1) < flops(0, 1)
    assert flops(0) == flops(1)  # whole windows of equal length: which one sleeps makes no difference
    assert flops(2) == awake  # the last window is never slept on

    plan = plan_for(model, ids, config.sleep, targets)
    short = plan_for(model, ids[:1, :12], config.sleep, targets[:1, :12])
    assert training_flops_per_token([plan, short], model, WINDOW) == (
        (plan_flops(plan, model, WINDOW) + plan_flops(short, model, WINDOW)) / (2 * 20 + 12)
    )


@pytest.mark.parametrize("checkpoint", FORMS)
def test_plan_flops_count_each_window_shape_once_as_each_window_alone(checkpoint):
    """`plan_flops` counts windows of one shape once: the same as counting every window on its own,
    over windows that differ in length, carried states, detaching, eviction and sleepers."""
    config = make_config(
        "AGAG", window=WINDOW, passes=4, checkpoint=checkpoint, grad_passes=2, eviction="sliding", detach_every=2
    )
    model = make_model(config)
    ids, targets = batch(length=44)  # windows of 8 x 5 and a short 4
    targets[1, 16:24] = IGNORE_INDEX
    for sleep in (config.sleep, config.sleep.model_copy(update={"sleep_on": "context"})):
        plan = plan_for(model, ids, sleep, targets)
        alone, tail = 0.0, 0
        for window in plan.windows:
            alone += flops._window(plan, window, model, tail + window.length)
            tail = min(WINDOW - 1, tail + window.length)
        assert plan_flops(plan, model, WINDOW) == alone
