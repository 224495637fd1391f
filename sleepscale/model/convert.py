"""Conversion between sleepscale models and fla's Hugging Face models (`fla.models`).

Our blocks use fla's parameter names and shapes, so weights convert by renaming the top level:
fla nests everything but the head under `model.`. Configs convert field by field; fla settings that
our layers do not implement are refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Any

import torch

_FLA_PREFIX = "model."
_UNNESTED = ("lm_head.",)


class UnsupportedFlaConfig(ValueError):
    """The fla config uses a feature sleepscale's layers do not implement."""


def state_dict_from_fla(fla_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for name, tensor in fla_state_dict.items():
        if name.startswith(_FLA_PREFIX):
            converted[name.removeprefix(_FLA_PREFIX)] = tensor
        elif name.startswith(_UNNESTED):
            converted[name] = tensor
        else:
            raise KeyError(f"unexpected parameter {name!r} in an fla state dict")
    return converted


def state_dict_to_fla(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name if name.startswith(_UNNESTED) else _FLA_PREFIX + name: tensor for name, tensor in state_dict.items()}


def model_config_from_fla(fla_config: dict[str, Any]) -> dict[str, Any]:
    """The `model:` section for an fla GatedDeltaNet config (`config.to_dict()`), hybrids included."""
    refused = [
        ("use_gate", lambda v: v is False, "GDN without output gate"),
        ("use_short_conv", lambda v: v is False, "GDN without short convolutions"),
        ("allow_neg_eigval", lambda v: v is True, "negative eigenvalues"),
        ("attnres_block_size", lambda v: v is not None, "attention residuals"),
        ("output_gate_activation", lambda v: v not in (None, "swish", "silu"), "an output gate other than swish"),
        ("hidden_act", lambda v: v not in (None, "swish"), "an MLP activation other than swish"),
    ]
    for key, is_refused, feature in refused:
        if is_refused(fla_config.get(key)):
            raise UnsupportedFlaConfig(f"fla config {key}={fla_config[key]!r}: {feature} is not supported by sleepscale")

    attention = fla_config.get("attn") or {}
    if attention.get("qkv_bias") or attention.get("window_size") is not None:
        raise UnsupportedFlaConfig("fla attention with qkv_bias or its own window_size is not supported (the span is sleep.window)")
    attention_layers = set(attention.get("layers", []))
    depth = fla_config["num_hidden_layers"]
    intermediate = fla_config.get("intermediate_size")
    if intermediate is None:
        size = int(fla_config["hidden_size"] * fla_config.get("hidden_ratio", 4) * 2 / 3)
        intermediate = 256 * ((size + 255) // 256)
    section = {
        "vocab_size": fla_config["vocab_size"],
        "hidden_size": fla_config["hidden_size"],
        "pattern": "".join("A" if i in attention_layers else "G" for i in range(depth)),
        "intermediate_size": intermediate,
        "tie_embeddings": fla_config.get("tie_word_embeddings", False),
        "norm_eps": fla_config.get("norm_eps", 1e-6),
        "init_std": fla_config.get("initializer_range", 0.02),
        "gdn": {
            "num_heads": fla_config["num_heads"],
            "head_dim": fla_config["head_dim"],
            "expand_v": fla_config.get("expand_v", 2.0),
            "num_v_heads": fla_config.get("num_v_heads") or fla_config["num_heads"],
            "conv_size": fla_config.get("conv_size", 4),
        },
    }
    if attention_layers:
        section["attention"] = {
            "num_heads": attention["num_heads"],
            "num_kv_heads": attention.get("num_kv_heads") or attention["num_heads"],
            "rope_theta": attention.get("rope_theta", 10000.0),
        }
    return section
