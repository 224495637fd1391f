"""Our GDN layer and model against fla's own, run through fla's Triton kernels (interpreted on the
CPU, float32) in a subprocess; the weight mapping tested here is the checkpoint converter."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sleepscale.config import validate
from sleepscale.model import build_model
from sleepscale.model.convert import (
    UnsupportedFlaConfig,
    model_config_from_fla,
    state_dict_from_fla,
    state_dict_to_fla,
)
from sleepscale.model.gdn import GatedDeltaNet
from sleepscale.sleep import sleep_forward

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def fla_outputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("fla") / "outputs.pt"
    subprocess.run([sys.executable, str(TESTS / "fla_outputs.py"), str(path)], cwd=TESTS, check=True, capture_output=True, timeout=600)
    return torch.load(path)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def test_gdn_layer_with_fla_weights_matches_fla_layer(fla_outputs):
    layer = GatedDeltaNet(hidden_size=32, num_heads=4, head_dim=8, expand_v=1.5, conv_size=4, norm_eps=1e-5)
    layer.load_state_dict(fla_outputs["layer_state"], strict=True)
    x = fla_outputs["layer_input"]
    with torch.no_grad():
        out, _ = layer(x, layer.initial_state(x.shape[0]))
    assert relative_error(out, fla_outputs["layer_output"]) < 1e-5


def test_gdn_layer_with_grouped_value_heads_matches_fla_layer(fla_outputs):
    """Four value heads on two key heads: the weight layout and which key head each value head reads."""
    layer = GatedDeltaNet(hidden_size=32, num_heads=2, head_dim=8, expand_v=1.5, conv_size=4, norm_eps=1e-5, num_v_heads=4)
    layer.load_state_dict(fla_outputs["grouped_state"], strict=True)
    x = fla_outputs["layer_input"]
    with torch.no_grad():
        out, _ = layer(x, layer.initial_state(x.shape[0]))
    assert relative_error(out, fla_outputs["grouped_output"]) < 1e-5


def test_fla_model_converts_and_matches(fla_outputs):
    model_section = model_config_from_fla(fla_outputs["model_config"])
    config = validate({"model": model_section, "sleep": {"window": 40, "passes": 1}, "train": {"steps": 1}})
    model = build_model(config.model)
    model.load_state_dict(state_dict_from_fla(fla_outputs["model_state"]), strict=True)
    with torch.no_grad():
        logits = sleep_forward(model, fla_outputs["input_ids"], config.sleep).logits
    assert relative_error(logits, fla_outputs["logits"]) < 1e-5

    back = state_dict_to_fla(model.state_dict())
    assert back.keys() == fla_outputs["model_state"].keys()
    assert all(torch.equal(back[name], tensor) for name, tensor in fla_outputs["model_state"].items())


@pytest.mark.parametrize(
    "override,message",
    [
        ({"use_gate": False}, "use_gate=False"),
        ({"attn": {"layers": [0], "num_heads": 2, "window_size": 64}}, "window_size"),
    ],
)
def test_unsupported_fla_settings_are_refused(override, message):
    fla_config = {"num_hidden_layers": 2, "hidden_size": 32, "num_heads": 2, "head_dim": 16, "vocab_size": 50, **override}
    with pytest.raises(UnsupportedFlaConfig, match=message):
        model_config_from_fla(fla_config)


def test_fla_hybrid_config_maps_attention_layers():
    section = model_config_from_fla(
        {
            "num_hidden_layers": 4, "hidden_size": 32, "num_heads": 2, "head_dim": 16, "vocab_size": 50,
            "attn": {"layers": [1, 3], "num_heads": 4, "num_kv_heads": 2},
        }
    )
    assert section["pattern"] == "GAGA" and section["attention"] == {"num_heads": 4, "num_kv_heads": 2, "rope_theta": 10000.0}


def test_fla_grouped_value_heads_map_to_gdn_num_v_heads():
    fla_config = {"num_hidden_layers": 2, "hidden_size": 32, "num_heads": 2, "head_dim": 16, "vocab_size": 50}
    assert model_config_from_fla({**fla_config, "num_v_heads": 4})["gdn"]["num_v_heads"] == 4
    assert model_config_from_fla({**fla_config, "num_v_heads": None})["gdn"]["num_v_heads"] == 2
