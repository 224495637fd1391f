"""Hugging Face model families sleepscale converts: their config fields and weight names.

A family answers two questions about a Hugging Face `config.json`:
- `model_section(hf)`: the equivalent `model:` section of a sleepscale config, or an
  `UnsupportedCheckpoint` naming the first config field whose feature our layers lack;
- `pieces(hf, model, block_of)`: where each of our weights comes from, as `Piece(ours, theirs, rows)`:
  our tensor is the source tensor `theirs`, or its row range `rows` where the source fuses several
  of ours into one (Qwen3.5's in_proj_qkv and its q/k/v convolution). Conversion reads pieces, and
  export concatenates them back in row order, so one list serves both directions and a round trip
  copies every weight bit for bit. `block_of[i]` is our block index of the source's layer i (they
  differ once GDN blocks are inserted).

Our parameter layouts follow the sources' (per-head [query, gate] rows of a gated q_proj,
consecutive value heads per key head, zero-centred norm weights stored as they are), so no weight is
ever transformed, only renamed or cut by rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from sleepscale.config import AttentionConfig, ModelConfig
from sleepscale.model.hybrid import HybridLM

MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


class UnsupportedCheckpoint(ValueError):
    """A checkpoint using a feature sleepscale does not implement; the message names its config field."""


@dataclasses.dataclass(frozen=True)
class Piece:
    ours: str
    theirs: str
    rows: tuple[int, int] | None = None  # [start, stop) of `theirs`; None: all of it


def _refuse(hf: dict[str, Any], field: str, unsupported: bool, feature: str) -> None:
    if unsupported:
        raise UnsupportedCheckpoint(f"config.json {field}={hf.get(field)!r}: {feature} is not supported by sleepscale")


def _check_common(hf: dict[str, Any]) -> None:
    for field in MOE_FIELDS:
        _refuse(hf, field, bool(hf.get(field)), "mixture-of-experts")
    _refuse(
        hf, "hidden_act", hf.get("hidden_act", "silu") not in ("silu", "swish"), "an MLP activation other than SiLU"
    )
    _refuse(hf, "mlp_bias", bool(hf.get("mlp_bias")), "MLP biases")
    _refuse(
        hf,
        "use_sliding_window",
        bool(hf.get("use_sliding_window")),
        "the checkpoint's own sliding window (sleepscale's attention span is sleep.window)",
    )


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """The attention section's RoPE fields, from transformers 5's `rope_parameters` or the older
    `rope_theta` / `rope_scaling` fields."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    section: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if fraction != 1.0:
        section["rotary_fraction"] = float(fraction)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "llama3":
        section["rope_scaling"] = {
            "kind": "llama3",
            "factor": params["factor"],
            "low_freq_factor": params["low_freq_factor"],
            "high_freq_factor": params["high_freq_factor"],
            "original_max_position_embeddings": params["original_max_position_embeddings"],
        }
    elif kind != "default":
        field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        raise UnsupportedCheckpoint(
            f"config.json {field}.rope_type={kind!r}: only default and llama3 RoPE are supported"
        )
    return section


def _attention_section(hf: dict[str, Any], qkv_bias: bool, output_bias: bool, qk_norm: bool, output_gate: bool) -> dict:
    heads = hf["num_attention_heads"]
    return {
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
        **_rope(hf),
        "qkv_bias": qkv_bias,
        "output_bias": output_bias,
        "qk_norm": qk_norm,
        "output_gate": output_gate,
    }


def _common_section(hf: dict[str, Any], pattern: str) -> dict[str, Any]:
    return {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "pattern": pattern,
        "intermediate_size": hf["intermediate_size"],
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "init_std": float(hf.get("initializer_range", 0.02)),
    }


def _attention_pieces(theirs: str, ours: str, attention: dict[str, Any]) -> list[Piece]:
    names = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    if attention.get("qkv_bias"):
        names += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
    if attention.get("output_bias"):
        names.append("o_proj.bias")
    if attention.get("qk_norm"):
        names += ["q_norm.weight", "k_norm.weight"]
    return [Piece(f"{ours}.{name}", f"{theirs}.{name}") for name in names]


def _mlp_pieces(theirs: str, ours: str) -> list[Piece]:
    return [
        Piece(f"{ours}.mlp.{name}.weight", f"{theirs}.mlp.{name}.weight")
        for name in ("gate_proj", "up_proj", "down_proj")
    ] + [
        Piece(f"{ours}.attn_norm.weight", f"{theirs}.input_layernorm.weight"),
        Piece(f"{ours}.mlp_norm.weight", f"{theirs}.post_attention_layernorm.weight"),
    ]


def _outer_pieces(prefix: str, tied: bool) -> list[Piece]:
    pieces = [Piece("embeddings.weight", f"{prefix}embed_tokens.weight"), Piece("norm.weight", f"{prefix}norm.weight")]
    return pieces if tied else pieces + [Piece("lm_head.weight", "lm_head.weight")]


class Transformer:
    """Llama, Qwen2/2.5 and Qwen3 (dense): attention + SwiGLU blocks, pre-norm."""

    model_types = ("llama", "qwen2", "qwen3")
    ignored = ()  # source tensors that are knowingly not converted

    def prefix(self, hf: dict[str, Any]) -> str:
        return "model."

    def export_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        """The config.json an export writes, from the source's."""
        return hf

    def model_section(self, hf: dict[str, Any]) -> dict[str, Any]:
        _check_common(hf)
        kind = hf["model_type"]
        biased = bool(hf.get("attention_bias", False))
        attention = _attention_section(
            hf,
            qkv_bias=True if kind == "qwen2" else biased,
            output_bias=biased and kind != "qwen2",
            qk_norm=kind == "qwen3",
            output_gate=False,
        )
        return {**_common_section(hf, "A" * hf["num_hidden_layers"]), "attention": attention}

    def pieces(self, hf: dict[str, Any], model: dict[str, Any], block_of: list[int]) -> list[Piece]:
        pieces = _outer_pieces(self.prefix(hf), model["tie_embeddings"])
        for layer, block in enumerate(block_of):
            theirs, ours = f"{self.prefix(hf)}layers.{layer}", f"layers.{block}"
            pieces += _attention_pieces(f"{theirs}.self_attn", f"{ours}.attn", model["attention"]) + _mlp_pieces(
                theirs, ours
            )
        return pieces


class Qwen35:
    """Qwen3.5 (dense text model; also the text part of the multimodal `qwen3_5` checkpoints): Gated
    DeltaNet blocks with grouped value heads and gated, partially rotary attention blocks, every
    block with a SwiGLU MLP, zero-centred RMSNorms."""

    model_types = ("qwen3_5_text", "qwen3_5")
    ignored = ("model.visual.", "mtp.")  # the vision tower and the multi-token-prediction head

    def text_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        if hf["model_type"] != "qwen3_5":
            return hf
        tied = hf.get(
            "tie_word_embeddings", hf["text_config"].get("tie_word_embeddings", False)
        )  # set on the outer config
        return {**hf["text_config"], "model_type": "qwen3_5_text", "tie_word_embeddings": tied}

    def prefix(self, hf: dict[str, Any]) -> str:
        return "model.language_model." if hf["model_type"] == "qwen3_5" else "model."

    def export_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        """The text model (Qwen3_5ForCausalLM): the vision tower of a multimodal source was not converted."""
        return (
            hf
            if hf["model_type"] == "qwen3_5_text"
            else {**self.text_config(hf), "architectures": ["Qwen3_5ForCausalLM"]}
        )

    def model_section(self, hf: dict[str, Any]) -> dict[str, Any]:
        text = self.text_config(hf)
        _check_common(text)
        letters = {"linear_attention": "G", "full_attention": "A"}
        for kind in text["layer_types"]:
            _refuse(text, "layer_types", kind not in letters, f"layer type {kind!r}")
        key_dim, value_dim = text["linear_key_head_dim"], text["linear_value_head_dim"]
        return {
            **_common_section(text, "".join(letters[kind] for kind in text["layer_types"])),
            "zero_centered_norms": True,
            "attention": _attention_section(
                text,
                qkv_bias=bool(text.get("attention_bias")),
                output_bias=bool(text.get("attention_bias")),
                qk_norm=True,
                output_gate=True,
            ),
            "gdn": {
                "num_heads": text["linear_num_key_heads"],
                "num_v_heads": text["linear_num_value_heads"],
                "head_dim": key_dim,
                "expand_v": value_dim / key_dim,
                "conv_size": text["linear_conv_kernel_dim"],
            },
        }

    def pieces(self, hf: dict[str, Any], model: dict[str, Any], block_of: list[int]) -> list[Piece]:
        text, prefix = self.text_config(hf), self.prefix(hf)
        pieces = _outer_pieces(prefix, model["tie_embeddings"])
        key_dim = text["linear_num_key_heads"] * text["linear_key_head_dim"]
        value_dim = text["linear_num_value_heads"] * text["linear_value_head_dim"]
        fused = {"q": (0, key_dim), "k": (key_dim, 2 * key_dim), "v": (2 * key_dim, 2 * key_dim + value_dim)}
        for layer, (kind, block) in enumerate(zip(text["layer_types"], block_of)):
            theirs, ours = f"{prefix}layers.{layer}", f"layers.{block}"
            pieces += _mlp_pieces(theirs, ours)
            if kind == "full_attention":
                pieces += _attention_pieces(f"{theirs}.self_attn", f"{ours}.attn", model["attention"])
                continue
            gdn, mixer = f"{theirs}.linear_attn", f"{ours}.attn"
            for letter, rows in fused.items():
                pieces += [
                    Piece(f"{mixer}.{letter}_proj.weight", f"{gdn}.in_proj_qkv.weight", rows),
                    Piece(f"{mixer}.{letter}_conv1d.weight", f"{gdn}.conv1d.weight", rows),
                ]
            pieces += [
                Piece(f"{mixer}.{ours_name}", f"{gdn}.{their_name}")
                for ours_name, their_name in (
                    ("g_proj.weight", "in_proj_z.weight"),
                    ("b_proj.weight", "in_proj_b.weight"),
                    ("a_proj.weight", "in_proj_a.weight"),
                    ("A_log", "A_log"),
                    ("dt_bias", "dt_bias"),
                    ("o_norm.weight", "norm.weight"),
                    ("o_proj.weight", "out_proj.weight"),
                )
            ]
        return pieces


class FlaGatedDeltaNet:
    """fla's `GatedDeltaNetForCausalLM` and its hybrids (`attn.layers`): our blocks use fla's
    parameter names and shapes, so every weight maps by dropping fla's `model.` nesting."""

    model_types = ("gated_deltanet",)
    ignored = ()

    def prefix(self, hf: dict[str, Any]) -> str:
        return "model."

    def export_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        return hf

    def model_section(self, hf: dict[str, Any]) -> dict[str, Any]:
        refused = [
            ("use_gate", lambda v: v is False, "GDN without output gate"),
            ("use_short_conv", lambda v: v is False, "GDN without short convolutions"),
            ("allow_neg_eigval", lambda v: v is True, "negative eigenvalues"),
            ("attnres_block_size", lambda v: v is not None, "attention residuals"),
            ("output_gate_activation", lambda v: v not in (None, "swish", "silu"), "an output gate other than swish"),
            ("hidden_act", lambda v: v not in (None, "swish", "silu"), "an MLP activation other than swish"),
        ]
        for field, is_refused, feature in refused:
            _refuse(hf, field, is_refused(hf.get(field)), feature)
        for field in MOE_FIELDS:
            _refuse(hf, field, bool(hf.get(field)), "mixture-of-experts")
        attention = hf.get("attn") or {}
        _refuse(hf, "attn", bool(attention.get("qkv_bias")), "attention q/k/v biases in fla hybrids")
        _refuse(
            hf,
            "attn",
            attention.get("window_size") is not None,
            "attention with its own window_size (sleepscale's attention span is sleep.window)",
        )
        attention_layers = set(attention.get("layers", []))
        depth = hf["num_hidden_layers"]
        intermediate = hf.get("intermediate_size")
        if intermediate is None:  # fla's GatedMLP rule
            size = int(hf["hidden_size"] * hf.get("hidden_ratio", 4) * 2 / 3)
            intermediate = 256 * ((size + 255) // 256)
        section = {
            **_common_section(
                {**hf, "intermediate_size": intermediate, "rms_norm_eps": hf.get("norm_eps", 1e-6)},
                "".join("A" if i in attention_layers else "G" for i in range(depth)),
            ),
            "gdn": {
                "num_heads": hf["num_heads"],
                "head_dim": hf["head_dim"],
                "expand_v": hf.get("expand_v", 2.0),
                "conv_size": hf.get("conv_size", 4),
                **({"num_v_heads": hf["num_v_heads"]} if hf.get("num_v_heads") not in (None, hf["num_heads"]) else {}),
            },
        }
        if attention_layers:
            section["attention"] = {
                "num_heads": attention["num_heads"],
                "num_kv_heads": attention.get("num_kv_heads") or attention["num_heads"],
                "rope_theta": attention.get("rope_theta", 10000.0),
            }
        return section

    def pieces(self, hf: dict[str, Any], model: dict[str, Any], block_of: list[int]) -> list[Piece]:
        with torch.device("meta"):
            names = [name for name, _ in HybridLM(ModelConfig(**model)).named_parameters()]
        source_block = {block: layer for layer, block in enumerate(block_of)}
        pieces = []
        for name in names:
            if name.startswith("layers."):
                _, block, rest = name.split(".", 2)
                if int(block) not in source_block:
                    continue  # an inserted block: not in the source
                pieces.append(Piece(name, f"model.layers.{source_block[int(block)]}.{rest}"))
            else:
                pieces.append(Piece(name, name if name.startswith("lm_head.") else "model." + name))
        return pieces

    def hf_config(self, model: dict[str, Any]) -> dict[str, Any]:
        """The fla config of a model sleepscale trained from scratch (export without a source)."""
        config = ModelConfig(**model)
        if config.zero_centered_norms:
            raise UnsupportedCheckpoint(
                "model.zero_centered_norms: fla's GatedDeltaNet models have no such option; export "
                "needs the model's source checkpoint family"
            )
        plain = AttentionConfig()
        for name in ("rope_scaling", "rotary_fraction", "qkv_bias", "output_bias", "qk_norm", "output_gate"):
            if getattr(config.attention, name) != getattr(plain, name):
                raise UnsupportedCheckpoint(f"model.attention.{name}: fla's attention layer has no such option")
        if set(config.blocks) - set("AG"):
            raise UnsupportedCheckpoint(
                f"model.pattern {config.pattern!r}: fla's models have an MLP in every block (A and G only)"
            )
        attention_layers = [i for i, letter in enumerate(config.blocks) if letter == "A"]
        hf = {
            "model_type": "gated_deltanet",
            "architectures": ["GatedDeltaNetForCausalLM"],
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_hidden_layers": len(config.blocks),
            "intermediate_size": config.mlp_size,
            "hidden_act": "swish",
            "norm_eps": config.norm_eps,
            "initializer_range": config.init_std,
            "tie_word_embeddings": config.tie_embeddings,
            "num_heads": config.gdn.num_heads,
            "num_v_heads": config.gdn_v_heads,
            "head_dim": config.gdn_head_dim,
            "expand_v": config.gdn.expand_v,
            "conv_size": config.gdn.conv_size,
            "use_gate": True,
            "use_short_conv": True,
        }
        if attention_layers:
            if config.attention_head_dim * config.attention.num_heads != config.hidden_size:
                raise UnsupportedCheckpoint("model.attention.head_dim: fla's attention uses hidden_size / num_heads")
            hf["attn"] = {
                "layers": attention_layers,
                "num_heads": config.attention.num_heads,
                "num_kv_heads": config.attention_kv_heads,
                "rope_theta": config.attention.rope_theta,
            }
        return hf


FAMILIES = (Transformer(), Qwen35(), FlaGatedDeltaNet())
SUPPORTED = tuple(kind for family in FAMILIES for kind in family.model_types)


def family_of(hf: dict[str, Any]):
    kind = hf.get("model_type")
    for config in (hf, hf.get("text_config") or {}):  # name the real reason rather than the MoE variant's model_type
        for field in MOE_FIELDS:
            _refuse(config, field, bool(config.get(field)), "mixture-of-experts")
    for family in FAMILIES:
        if kind in family.model_types:
            return family
    raise UnsupportedCheckpoint(
        f"config.json model_type={kind!r} is not supported by sleepscale (supported: {', '.join(SUPPORTED)})"
    )
