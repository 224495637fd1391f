"""The hybrid model: deterministic init, the pattern alphabet, tying, and the state dtype contract."""

import torch

from conftest import make_config
from sleepscale.model import build_model
from sleepscale.model.attention import Attention
from sleepscale.model.gdn import GatedDeltaNet, GDNState
from sleepscale.sleep import sleep_forward


def test_init_depends_on_the_seed_alone():
    config = make_config("AGag")
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = build_model(config.model)
    assert torch.equal(torch.rand(3), before), "building a model must not consume the caller's RNG"
    second = build_model(config.model)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    other = build_model(config.model.model_copy(update={"seed": 1}))
    assert not torch.equal(first.layers[1].attn.q_proj.weight, other.layers[1].attn.q_proj.weight)


def test_pattern_letters_choose_mixer_and_mlp():
    model = build_model(make_config("AGag").model)
    assert [type(block.attn) for block in model.layers] == [Attention, GatedDeltaNet, Attention, GatedDeltaNet]
    assert [block.mlp is not None for block in model.layers] == [True, True, False, False]


def test_tied_embeddings_share_one_tensor():
    model = build_model(make_config("AG", model={"tie_embeddings": True}).model)
    assert model.lm_head.weight is model.embeddings.weight


def test_fast_weights_stay_float32_in_a_bfloat16_model(tokens):
    config = make_config("AG", passes=2)
    model = build_model(config.model).to(torch.bfloat16)
    out = sleep_forward(model, tokens, config.sleep, targets=tokens)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert all(s.fast_weights.dtype == torch.float32 for s in out.states if isinstance(s, GDNState))
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_cpu_path_never_imports_fla():
    """fla's import costs ~10 s and needs Triton drivers; the CPU path must not pay it."""
    import subprocess
    import sys

    code = (
        "import sys, torch; sys.path.insert(0, 'tests'); from conftest import make_config; "
        "from sleepscale.model import build_model; from sleepscale.sleep import sleep_forward; "
        "c = make_config(passes=2); sleep_forward(build_model(c.model), torch.zeros(1, 20, dtype=torch.long), c.sleep); "
        "assert not any(m == 'fla' or m.startswith('fla.') for m in sys.modules), 'fla was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
