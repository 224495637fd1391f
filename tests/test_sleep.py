"""Sleep semantics: what the engine runs, what crosses windows, and what checkpointing may not change."""

import pytest
import torch
from conftest import make_config, make_model

from sleepscale.model.attention import Attention, AttentionState
from sleepscale.model.gdn import GDNState
from sleepscale.sleep import IGNORE_INDEX, sleep_forward, window_bounds


def carried(states):
    """What hard eviction lets through: GDN fast weights only."""
    return [state.evicted() for state in states]


def plain_hybrid_windowed(model, tokens, window):
    """The ordinary hybrid read window by window: every block once; only GDN states cross windows."""
    states = model.initial_states(tokens.shape[0], window)
    logits = []
    for start, end in window_bounds(tokens.shape[1], window):
        hidden, states = model.run_blocks(model.embed(tokens[:, start:end]), states, range(len(model.layers)))
        logits.append(model.head(hidden))
        states = carried(states)
    return torch.cat(logits, dim=1)


def unrolled_window(model, window_ids, states, passes, window):
    """One window under hard eviction, written out literally: prelude once, loop blocks once, coda
    once on that (wake) pass, then the loop blocks `passes - 1` more times, each pass from the last
    pass's hidden states and fast weights with the context reset."""
    loop = model.loop_range
    hidden, states = model.run_blocks(model.embed(window_ids), states, range(loop.start))
    hidden, states = model.run_blocks(hidden, states, loop)
    _, states = model.run_blocks(hidden, states, range(loop.stop, len(model.layers)))
    for _ in range(passes - 1):
        states = [
            (GDNState(s.fast_weights) if isinstance(s, GDNState) else AttentionState(window)) if i in loop else s
            for i, s in enumerate(states)
        ]
        hidden, states = model.run_blocks(hidden, states, loop)
    return states


@pytest.mark.parametrize("pattern", ["AGAG", "GGA", "gAG"])
def test_one_pass_is_the_plain_hybrid(pattern, tokens):
    config = make_config(pattern, passes=1)
    model = make_model(config)
    out = sleep_forward(model, tokens, config.sleep)
    torch.testing.assert_close(out.logits, plain_hybrid_windowed(model, tokens, 8), rtol=0, atol=0)


def test_attention_only_model_forgets_earlier_windows_under_hard_eviction(tokens):
    config = make_config("AA", passes=3)
    model = make_model(config)
    changed = tokens.clone()
    changed[:, :8] = (changed[:, :8] + 1) % 40
    before, after = (
        sleep_forward(model, tokens, config.sleep).logits,
        sleep_forward(model, changed, config.sleep).logits,
    )
    assert not torch.equal(before[:, :8], after[:, :8])
    torch.testing.assert_close(before[:, 8:], after[:, 8:], rtol=0, atol=0)


def test_gdn_model_remembers_earlier_windows_only_through_carried_state(tokens):
    config = make_config("AGAG", passes=3)
    model = make_model(config)
    changed = tokens.clone()
    changed[:, :8] = (changed[:, :8] + 1) % 40
    full = sleep_forward(model, tokens, config.sleep).logits
    assert not torch.equal(full[:, 8:16], sleep_forward(model, changed, config.sleep).logits[:, 8:16])

    # Window 2 computed from nothing but window 2's tokens and the state the first window left behind.
    first = sleep_forward(model, tokens[:, :8], config.sleep, sequence_continues=True)
    assert all(s.conv_tails is None for s in first.states if isinstance(s, GDNState))
    assert all(s.keys is None for s in first.states if isinstance(s, AttentionState))
    hidden, _ = model.run_blocks(model.embed(tokens[:, 8:16]), first.states, range(len(model.layers)))
    torch.testing.assert_close(model.head(hidden), full[:, 8:16], rtol=0, atol=0)


@pytest.mark.parametrize("pattern,loop", [("AGAG", None), ("GAGAG", [1, 4]), ("GgAG", [0, 2])])
@pytest.mark.parametrize("passes", [1, 2, 4])
def test_state_after_sleep_equals_literal_unrolled_loop(pattern, loop, passes, tokens):
    config = make_config(pattern, passes=passes, model={"loop": loop})
    model = make_model(config)
    engine_states = model.initial_states(tokens.shape[0], 8)
    literal_states = list(engine_states)
    for start in (0, 8, 16):
        window_ids = tokens[:, start : start + 8]
        engine_states = sleep_forward(
            model, window_ids, config.sleep, states=engine_states, sequence_continues=True
        ).states
        literal_states = carried(unrolled_window(model, window_ids, literal_states, passes, 8))
        for engine, literal in zip(engine_states, literal_states):
            if isinstance(engine, GDNState):
                torch.testing.assert_close(engine.fast_weights, literal.fast_weights, rtol=1e-12, atol=0)


def test_segments_equal_one_call(tokens):
    config = make_config("AGAG", passes=3)
    model = make_model(config)
    whole = sleep_forward(model, tokens, config.sleep)
    first = sleep_forward(model, tokens[:, :16], config.sleep, sequence_continues=True)
    second = sleep_forward(model, tokens[:, 16:], config.sleep, states=first.states)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), whole.logits, rtol=0, atol=0)
    torch.testing.assert_close(second.states[1].fast_weights, whole.states[1].fast_weights, rtol=0, atol=0)


def test_a_continuing_segment_must_be_whole_windows(tokens):
    config = make_config(passes=2)
    with pytest.raises(ValueError, match="not a multiple of sleep.window=8"):
        sleep_forward(make_model(config), tokens[:, :12], config.sleep, sequence_continues=True)


@pytest.mark.parametrize("passes", [1, 3])
def test_pass_counts(passes, tokens):
    config = make_config(passes=passes)
    out = sleep_forward(make_model(config), tokens, config.sleep)  # 30 tokens: windows of 8, 8, 8, 6
    assert out.passes.tolist() == [[passes, passes, passes, 1]] * 3


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_sleep_on_context_sleeps_only_on_loss_free_windows(eviction, tokens):
    config = make_config(passes=3, sleep_on="context", eviction=eviction)
    model = make_model(config)
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[0, 9] = targets[1, 17] = targets[:, 29] = 1  # loss in window 1 for row 0, window 2 for row 1
    out = sleep_forward(model, tokens, config.sleep, targets=targets)
    assert out.passes.tolist() == [[3, 1, 3, 1], [3, 3, 1, 1], [3, 3, 3, 1]]
    # Each sequence behaves as if it were alone in the batch.
    for row in range(3):
        alone = sleep_forward(model, tokens[row : row + 1], config.sleep, targets=targets[row : row + 1])
        torch.testing.assert_close(alone.logits, out.logits[row : row + 1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(alone.states[1].fast_weights, out.states[1].fast_weights[row : row + 1])


def test_more_passes_change_what_later_windows_see(tokens):
    config = make_config(passes=1)
    model = make_model(config)
    one = sleep_forward(model, tokens, config.sleep).logits
    three = sleep_forward(model, tokens, config.sleep.model_copy(update={"passes": 3})).logits
    torch.testing.assert_close(one[:, :8], three[:, :8], rtol=0, atol=0)  # window 1 is predicted before any sleep
    assert not torch.allclose(one[:, 8:], three[:, 8:])


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("mode", ["pass", "window"])
def test_checkpointing_is_bit_identical(mode, eviction, tokens):
    config = make_config("AGAG", passes=3, eviction=eviction, model={"loop": [1, 3]})
    targets = tokens.roll(-1, dims=1)

    def loss_and_grads(checkpoint):
        model = make_model(config, dtype=torch.float32)
        sleep = config.sleep.model_copy(update={"checkpoint": checkpoint})
        loss = sleep_forward(model, tokens, sleep, targets=targets).loss
        loss.backward()
        return loss, {name: p.grad for name, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads("none")
    loss, grads = loss_and_grads(mode)
    assert torch.equal(loss, plain_loss)
    for name, grad in plain_grads.items():
        assert torch.equal(grads[name], grad), name


def test_sliding_eviction_with_one_pass_is_a_sliding_window_hybrid(tokens):
    config = make_config("AGAG", passes=1, eviction="sliding")
    model = make_model(config)
    states = model.initial_states(tokens.shape[0], span=8)
    hidden, _ = model.run_blocks(model.embed(tokens), states, range(len(model.layers)))
    torch.testing.assert_close(
        sleep_forward(model, tokens, config.sleep).logits, model.head(hidden), rtol=1e-10, atol=1e-10
    )


def test_sliding_window_attention_sees_exactly_the_last_span_tokens():
    attention = Attention(hidden_size=8, num_heads=2, num_kv_heads=2, head_dim=4).double()
    x = torch.randn(1, 20, 8, dtype=torch.float64, requires_grad=True)
    out, _ = attention(x, AttentionState(span=5))
    (gradient,) = torch.autograd.grad(out[0, 12].sum(), x)
    seen = gradient[0].abs().sum(-1) > 0
    assert seen.nonzero().flatten().tolist() == [8, 9, 10, 11, 12]


def test_sliding_eviction_sleeps_with_the_window_start_context(tokens):
    """With N > 1 under sliding eviction the literal loop must restart each pass from the context
    the window began with; the engine's streaming equals its single call."""
    config = make_config("AGAG", passes=3, eviction="sliding")
    model = make_model(config)
    whole = sleep_forward(model, tokens, config.sleep)
    first = sleep_forward(model, tokens[:, :8], config.sleep, sequence_continues=True)
    assert first.states[0].keys.shape[2] == 7 and first.states[1].conv_tails is not None
    second = sleep_forward(model, tokens[:, 8:], config.sleep, states=first.states)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits, rtol=0, atol=0)
    assert not torch.allclose(
        whole.logits, sleep_forward(model, tokens, config.sleep.model_copy(update={"eviction": "hard"})).logits
    )
