"""Levers that make sleep affordable: checkpointing, truncated backprop, random N, state bounds."""

import numpy as np
import pytest
import torch
from conftest import make_config, make_model

from sleepscale.config import PassesDistribution
from sleepscale.model.attention import AttentionState
from sleepscale.model.gdn import GDNState
from sleepscale.passes import draw_passes
from sleepscale.sleep import sleep_forward


def loss_and_grads(config, tokens, **sleep):
    model = make_model(config, dtype=torch.float32)
    out = sleep_forward(model, tokens, config.sleep.model_copy(update=sleep), targets=tokens.roll(-1, 1))
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}, model


@pytest.mark.parametrize("mode", ["none", "pass", "window"])
def test_grad_passes_equal_to_n_is_the_plain_engine(mode, tokens):
    config = make_config(passes=3)
    plain_out, plain, _ = loss_and_grads(config, tokens)
    out, grads, _ = loss_and_grads(config, tokens, grad_passes=3, checkpoint=mode)
    assert torch.equal(out.loss, plain_out.loss)
    assert all(torch.equal(grads[name], g) for name, g in plain.items())


def truncated_reference(model, tokens, passes, k, window=8):
    """Hand-built: per window, wake pass with gradient; sleep passes 2..N-k under no_grad; the last
    k passes with gradient from where those left off; hard eviction; loss from the wake passes."""
    states = model.initial_states(tokens.shape[0], window)
    targets = tokens.roll(-1, 1)
    losses, count = [], 0
    bounds = list(range(0, tokens.shape[1], window))
    for index, start in enumerate(bounds):
        ids = tokens[:, start : start + window]
        entry = states
        hidden, states = model.run_blocks(model.embed(ids), states, range(len(model.layers)))
        logits = model.head(hidden)
        losses.append(
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), targets[:, start : start + window].flatten(), reduction="sum"
            )
        )
        count += ids.numel()
        if index == len(bounds) - 1:
            break
        for pass_number in range(2, passes + 1):
            with torch.set_grad_enabled(pass_number > passes - k):
                states = [s.next_pass(e) for s, e in zip(states, entry)]
                hidden, states = model.run_blocks(hidden, states, range(len(model.layers)))
        states = [s.evicted() for s in states]
    return sum(losses) / count


@pytest.mark.parametrize("k", [1, 2])
def test_truncated_backprop_keeps_values_and_matches_a_hand_built_reference(k, tokens):
    config = make_config(passes=4)
    plain_out, plain, _ = loss_and_grads(config, tokens)
    out, grads, model = loss_and_grads(config, tokens, grad_passes=k)
    assert torch.equal(out.loss, plain_out.loss)  # forward values unchanged
    assert any(not torch.equal(grads[name], g) for name, g in plain.items())

    reference_model = make_model(config, dtype=torch.float32)
    truncated_reference(reference_model, tokens, passes=4, k=k).backward()
    for name, p in reference_model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def saved_bytes(config, tokens, **sleep) -> int:
    """Bytes autograd keeps for backward, counted exactly as they are saved."""
    model = make_model(config, dtype=torch.float32)
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = sleep_forward(
            model, tokens, config.sleep.model_copy(update=sleep), targets=tokens.roll(-1, 1), return_logits=False
        )
    out.loss.backward()
    return total


def test_activation_memory_is_flat_in_n_with_per_pass_checkpointing():
    """Per-pass checkpointing keeps, per extra pass over a slept window, exactly the hidden states at
    the pass boundary (batch x L x width floats; the GDN states there are held by the checkpoint
    too, outside autograd's saved tensors). With a vocabulary much larger than the width, as in
    language models, that is <= 1.2x at N=8."""
    config = make_config(passes=1, hidden_size=32, vocab_size=512)
    tokens = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    saved = {n: saved_bytes(config, tokens, passes=n, checkpoint="pass") for n in (1, 2, 8)}
    boundary = 3 * 8 * 32 * 4  # batch x window x width, float32
    slept_windows = 3  # of the 4 windows, all but the last
    assert saved[2] - saved[1] == slept_windows * boundary
    assert saved[8] - saved[1] == 7 * slept_windows * boundary
    assert saved[8] <= 1.2 * saved[1], saved
    window = {n: saved_bytes(config, tokens, passes=n, checkpoint="window") for n in (1, 8)}
    assert window[8] == window[1]


def test_activation_memory_grows_linearly_in_n_without_checkpointing(tokens):
    config = make_config(passes=1, hidden_size=32)

    plain = {n: saved_bytes(config, tokens, passes=n) for n in (1, 2, 4, 8)}
    per_pass = (plain[8] - plain[1]) / 7
    assert per_pass > 0.05 * plain[1]
    for n in (2, 4):  # about linear: each sleep pass adds the same amount
        assert abs(plain[n] - (plain[1] + (n - 1) * per_pass)) <= 0.05 * plain[n], (n, plain)


def test_detach_every_cuts_gradient_through_the_carried_state(tokens):
    config = make_config(passes=2)
    model = make_model(config)
    embeddings = []

    def keep(module, args, output):
        output.retain_grad()
        embeddings.append(output)

    model.embeddings.register_forward_hook(keep)
    targets = torch.full_like(tokens, -100)
    targets[:, 16:] = tokens[:, 16:]  # loss only in windows 3 and 4
    out = sleep_forward(model, tokens, config.sleep.model_copy(update={"detach_every": 2}), targets=targets)
    out.loss.backward()
    assert embeddings[0].grad.abs().sum() == 0 and embeddings[1].grad.abs().sum() == 0  # cut after window 2
    assert embeddings[2].grad.abs().sum() > 0
    plain = sleep_forward(model, tokens, config.sleep, targets=targets)
    assert torch.equal(plain.loss, out.loss)


def test_state_norm_bound_caps_every_pass_and_is_off_by_default(tokens):
    config = make_config(passes=4, model={"init_std": 1.0})
    model = make_model(config)
    whole_windows = tokens[:, :24]  # slept on to the end, so the final states come from a sleep pass
    free = sleep_forward(model, whole_windows, config.sleep, sequence_continues=True)
    assert free.pass_state_norms.shape == (4,) and free.pass_state_norms[1:].max() > 0.5
    bounded = sleep_forward(
        model, whole_windows, config.sleep.model_copy(update={"state_norm_bound": 0.5}), sequence_continues=True
    )
    assert bounded.pass_state_norms[1:].max() <= 0.5 + 1e-9
    for state in bounded.states:
        if isinstance(state, GDNState):
            assert state.fast_weights.flatten(2).norm(dim=-1).max() <= 0.5 + 1e-9
        else:
            assert isinstance(state, AttentionState)


def test_random_passes_are_a_function_of_seed_and_step():
    distribution = PassesDistribution(kind="uniform", low=1, high=4)
    first = [draw_passes(distribution, 7, step) for step in range(200)]
    torch.manual_seed(123)
    np.random.seed(5)  # the global RNGs (which a rank or a resumed run may have elsewhere) play no part
    assert [draw_passes(distribution, 7, step) for step in range(200)] == first
    assert [draw_passes(distribution, 7, step) for step in range(100, 200)] == first[100:]  # a resume at step 100
    assert first != [draw_passes(distribution, 8, step) for step in range(200)]


def test_random_passes_follow_their_distribution():
    uniform = PassesDistribution(kind="uniform", low=2, high=5)
    counts = np.bincount([draw_passes(uniform, 0, s) for s in range(8000)], minlength=6)
    assert counts[:2].sum() == 0 and all(abs(c - 2000) < 200 for c in counts[2:])
    heavy = PassesDistribution(kind="poisson_lognormal", mean=4, sigma=0.5, max=64)
    draws = np.array([draw_passes(heavy, 0, s) for s in range(20000)])
    assert abs(draws.mean() - 4) < 0.1 and draws.min() >= 1 and draws.max() <= 64
    capped = PassesDistribution(kind="poisson_lognormal", mean=4, max=5)
    assert max(draw_passes(capped, 0, s) for s in range(2000)) == 5


def test_flops_count_every_pass_actually_run():
    from torch import nn

    from sleepscale.flops import plan_flops
    from sleepscale.model import build_model
    from sleepscale.sleep import plan_for

    config = make_config("AGAG", passes=1)
    model = build_model(config.model)
    ids = torch.zeros(1, 32, dtype=torch.long)  # four windows of 8
    linear = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, nn.Linear))
    attention = 2 * 4 * 2 * 8 * 8  # 2 attention blocks, 2 heads of 8, all 8 keys (the causal mask saves nothing)
    gdn = 2 * 2 * (4 * 8 * 8 + 2 * 8 * 12 + 6 * 8 * 12)  # 2 GDN blocks, 2 heads, one chunk of 8, d_k 8, d_v 12
    loop_pass = 2 * linear + attention + gdn  # forward FLOPs per token of a pass over the blocks
    solves = 2 * 2 * 2 * 8 * (8 + 12)  # the matmul in the backward of the delta rule's triangular solves
    head = 2 * model.lm_head.weight.numel()
    last_matmul = 2 * model.layers[-1].mlp.down_proj.weight.numel()

    def flops(**sleep):
        sleep = config.sleep.model_copy(update=sleep)
        return plan_flops(plan_for(model, ids, sleep, ids), model, sleep.window)

    # Per slept window (3 of 4): a sleep pass without gradient costs its forward; one more pass with
    # gradient before the last costs forward and a backward of twice that (attention's 2.5 times).
    assert flops(passes=4, grad_passes=1) - flops(passes=3, grad_passes=1) == 3 * 8 * loop_pass
    assert flops(passes=3) - flops(passes=2) == 3 * 8 * (3 * loop_pass + 0.5 * attention + solves)
    # Checkpointing re-runs the forward: the window's, head included, or each pass's blocks but for
    # their last matmul, which torch's early stop skips.
    assert flops(checkpoint="window") - flops() == 32 * (loop_pass + head)
    assert flops(checkpoint="pass") - flops() == 32 * (loop_pass - last_matmul)
