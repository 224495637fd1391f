"""Our GDN layer and model against fla's own, run through fla's Triton kernels (interpreted on the
CPU, float32) in a subprocess; the weight mapping tested here is the checkpoint converter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sleepscale.config import validate
from sleepscale.convert import convert_from_hf, export_to_hf
from sleepscale.convert.families import FlaGatedDeltaNet, UnsupportedCheckpoint
from sleepscale.convert.model_dir import read_description, write_model_dir
from sleepscale.model import build_model
from sleepscale.model.gdn import GatedDeltaNet
from sleepscale.model.weights import SafetensorsFiles, load_weights
from sleepscale.sleep import sleep_forward

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def fla_outputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("fla") / "outputs.pt"
    subprocess.run(
        [sys.executable, str(TESTS / "fla_outputs.py"), str(path)],
        cwd=TESTS,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return {**torch.load(path), "model_dir": path.parent / "fla_model"}


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
    layer = GatedDeltaNet(
        hidden_size=32, num_heads=2, head_dim=8, expand_v=1.5, conv_size=4, norm_eps=1e-5, num_v_heads=4
    )
    layer.load_state_dict(fla_outputs["grouped_state"], strict=True)
    x = fla_outputs["layer_input"]
    with torch.no_grad():
        out, _ = layer(x, layer.initial_state(x.shape[0]))
    assert relative_error(out, fla_outputs["grouped_output"]) < 1e-5


def test_fla_model_converts_and_matches(fla_outputs, tmp_path):
    fla_dir = fla_outputs["model_dir"]
    ours = convert_from_hf(fla_dir, tmp_path / "ours")
    config = validate(
        {"model": read_description(ours)["model"], "sleep": {"window": 40, "passes": 1}, "train": {"steps": 1}}
    )
    model = build_model(config.model)
    load_weights(model, ours)
    with torch.no_grad():
        logits = sleep_forward(model, fla_outputs["input_ids"], config.sleep).logits
    assert relative_error(logits, fla_outputs["logits"]) < 1e-5

    windowed = validate({"model": read_description(ours)["model"], "sleep": {"window": 8}, "train": {"steps": 1}})
    with torch.no_grad():
        window_logits = sleep_forward(model, fla_outputs["input_ids"], windowed.sleep).logits
    assert relative_error(window_logits, fla_outputs["window_logits"]) < 1e-5

    back = export_to_hf(ours, tmp_path / "back")
    original, exported = SafetensorsFiles(fla_dir), SafetensorsFiles(back)
    assert sorted(original.names()) == sorted(exported.names())
    assert all(torch.equal(original.get(name), exported.get(name)) for name in original.names())


def test_a_model_trained_from_scratch_exports_as_an_fla_hybrid(tmp_path):
    section = {
        "vocab_size": 50,
        "hidden_size": 32,
        "pattern": "AGAG",
        "intermediate_size": 48,
        "attention": {"num_heads": 4, "num_kv_heads": 2},
        "gdn": {"num_heads": 2, "num_v_heads": 4},
    }
    model = build_model(validate({"model": section, "sleep": {"window": 8}, "train": {"steps": 1}}).model)
    source = write_model_dir(
        tmp_path / "scratch",
        {"model": section, "source": None, "inserted_blocks": []},
        ((name, p.detach()) for name, p in model.named_parameters()),
    )
    exported = export_to_hf(source, tmp_path / "fla")
    fla_config = json.loads((exported / "config.json").read_text())
    assert fla_config["model_type"] == "gated_deltanet" and fla_config["attn"]["layers"] == [0, 2]
    again = convert_from_hf(exported, tmp_path / "again")
    reloaded = build_model(
        validate({"model": read_description(again)["model"], "sleep": {"window": 8}, "train": {"steps": 1}}).model
    )
    load_weights(reloaded, again)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reloaded.parameters(), strict=True))


@pytest.mark.parametrize(
    "override,message",
    [
        ({"use_gate": False}, "use_gate=False"),
        ({"attn": {"layers": [0], "num_heads": 2, "window_size": 64}}, "window_size"),
    ],
)
def test_unsupported_fla_settings_are_refused(override, message):
    fla_config = {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_heads": 2,
        "head_dim": 16,
        "vocab_size": 50,
        **override,
    }
    with pytest.raises(UnsupportedCheckpoint, match=message):
        FlaGatedDeltaNet().model_section(fla_config)


FLA = {"num_hidden_layers": 2, "hidden_size": 32, "num_heads": 2, "head_dim": 16, "vocab_size": 50}


def test_fla_hybrid_config_maps_attention_layers():
    section = FlaGatedDeltaNet().model_section(
        {**FLA, "num_hidden_layers": 4, "attn": {"layers": [1, 3], "num_heads": 4, "num_kv_heads": 2}}
    )
    assert section["pattern"] == "GAGA" and section["attention"] == {
        "num_heads": 4,
        "num_kv_heads": 2,
        "rope_theta": 10000.0,
    }


def test_fla_grouped_value_heads_map_to_gdn_num_v_heads():
    assert FlaGatedDeltaNet().model_section({**FLA, "num_v_heads": 4})["gdn"]["num_v_heads"] == 4
    assert "num_v_heads" not in FlaGatedDeltaNet().model_section({**FLA, "num_v_heads": None})["gdn"]


def test_a_decoding_step_with_grouped_value_heads_matches_fla(fla_outputs):
    """One token through our gated_delta_rule (torch backend: norms and gates in PyTorch, q and k
    repeated per value head) against fla's kernels given the raw inputs with their in-kernel L2
    norm, gate and beta options, as our fla backend calls them."""
    from sleepscale.ops import gated_delta_rule

    step = fla_outputs["decode_step"]
    output, state = gated_delta_rule(**step["inputs"], backend="torch")
    assert relative_error(output, step["output"]) < 1e-5 and relative_error(state, step["state"]) < 1e-5
    # fla's fused recurrent kernel, which the fla backend decodes with, agrees too
    assert relative_error(output, step["fused_output"]) < 1e-5 and relative_error(state, step["fused_state"]) < 1e-5


@pytest.mark.parametrize("backend", ["window", "fla"])
def test_our_layer_computes_the_same_on_every_delta_rule_backend(fla_outputs, backend):
    """Our GatedDeltaNet over a 24-token window from a carried state, through the dispatcher, on our
    window kernel and on fla's kernels (both interpreted) against the PyTorch backend: output, state,
    and the gradients of the input, the state and every parameter (fla computes the decay in base 2:
    A_log's and dt_bias's gradients agree to 4e-5)."""
    results = fla_outputs["backends"]
    for name, expected in results["torch"].items():
        tolerance = 1e-4 if backend == "fla" and name in ("d_A_log", "d_dt_bias", "d_a_proj.weight") else 1e-5
        assert relative_error(results[backend][name], expected) < tolerance, name


def test_the_fla_backend_decodes_with_the_fused_recurrent_kernel_and_trains_with_the_chunked_one():
    from sleepscale.ops import fla_kernel_for

    assert fla_kernel_for(1, needs_grad=False) == "fused_recurrent"  # decoding
    assert fla_kernel_for(64, needs_grad=False) == "fused_recurrent"  # a short window read at inference
    assert fla_kernel_for(65, needs_grad=False) == "chunk"
    assert fla_kernel_for(1, needs_grad=True) == "chunk"  # the fused recurrent kernel has no backward
