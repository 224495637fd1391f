"""The weights of a model built from `model.seed`: each parameter drawn from an RNG stream of its own.

A parameter's stream is seeded by (`model.seed`, the parameter's name), so its value depends on
nothing else: not on the order in which modules are built, not on the parallel layout, and not on
which other parameters a rank draws. A pipeline or tensor-parallel rank therefore draws only the
parameters it holds (a tensor-parallel shard is cut from its parameter drawn whole, one parameter at
a time), and still gets the values a single process gets: no rank ever holds the whole model.

`SeededWeights` reads like a model directory (`sleepscale.model.weights.SafetensorsFiles`:
`names`, `shape`, `get` with rows or columns), so `load_weights` fills a meta-device model from
either; `build_model` is the whole model drawn so. The rules, as transformers' and fla's defaults:
normal(0, init_std) for linear and embedding weights, residual output projections (`o_proj`,
`down_proj`) at init_std / sqrt(2 * layers), zero biases, fla's decay init for a GDN's `A_log` and
`dt_bias`, nn.Conv1d's default for the short convolutions, ones for norm weights (zeros for
zero-centred norms).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from sleepscale.config import ModelConfig
from sleepscale.model.gdn import GatedDeltaNet, GatedRMSNorm, ShortConvolution, initial_decay_parameters
from sleepscale.model.hybrid import HybridLM
from sleepscale.model.norm import RMSNorm
from sleepscale.model.weights import load_weights

RESIDUAL_PROJECTIONS = ("attn.o_proj", "mlp.down_proj")  # scaled by 1/sqrt(2 * layers), as GPT-2 and Megatron


def build_model(config: ModelConfig, device: torch.device | str | None = None) -> HybridLM:
    """The whole model with weights drawn from `config.seed` (one RNG stream per parameter, so a rank
    holding a part of the model draws the same values for it); the caller's RNG is untouched."""
    with torch.device("meta"):
        model = HybridLM(config)
    load_weights(model, SeededWeights(config), device=device if device is not None else "cpu")
    return model


def stream_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, name), the same on every machine and Python (not `hash`)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SeededWeights:
    """The seeded model's tensors by name, drawn on request on the CPU in float32."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.directory = f"model.seed {config.seed}"  # what errors name, as a model directory's path
        with torch.device("meta"):
            self.shapes = HybridLM(config)  # shapes and module types only; holds no memory
        self.parameters = dict(self.shapes.named_parameters())

    def names(self) -> list[str]:
        return list(self.parameters)

    def __contains__(self, name: str) -> bool:
        return name in self.parameters

    def shape(self, name: str) -> list[int]:
        return list(self.parameters[name].shape)

    def get(
        self, name: str, rows: tuple[int, int] | None = None, columns: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The parameter's value, or its rows [start, stop) or columns: drawn whole, then cut, so
        that a shard equals the same part of the single-process model's parameter."""
        value = self._draw(name)
        if rows is not None:
            return value[rows[0] : rows[1]]
        return value if columns is None else value[:, columns[0] : columns[1]]

    def _draw(self, name: str) -> torch.Tensor:
        owner_name, _, attribute = name.rpartition(".")
        owner = self.shapes.get_submodule(owner_name)
        value = torch.empty(self.shape(name), dtype=torch.float32, device="cpu")
        generator = torch.Generator().manual_seed(stream_seed(self.config.seed, name))
        std = self.config.init_std
        if isinstance(owner, (nn.Linear, nn.Embedding)) and attribute == "weight":
            if owner_name.endswith(RESIDUAL_PROJECTIONS):
                std /= math.sqrt(2 * len(self.config.blocks))
            return value.normal_(0, std, generator=generator)
        if isinstance(owner, nn.Linear) and attribute == "bias":
            return value.zero_()
        if isinstance(owner, GatedDeltaNet) and attribute in ("A_log", "dt_bias"):
            return initial_decay_parameters(value.shape[0], generator)[attribute]
        if isinstance(owner, ShortConvolution):
            return nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
        if isinstance(owner, RMSNorm):
            return value.zero_() if owner.zero_centered else value.fill_(1)
        if isinstance(owner, GatedRMSNorm):
            return value.fill_(1)
        raise NotImplementedError(
            f"no initialisation rule for {name} ({type(owner).__name__}.{attribute}); "
            "add one to sleepscale/model/seeded_weights.py"
        )
