"""The hybrid language model: embedding, a stack of attention / Gated DeltaNet blocks, norm, head.

The model knows nothing about windows or passes; it offers the pieces the sleep engine
(`sleepscale.sleep`) drives: `embed`, `run_blocks` over any block range with explicit states, and
`head`, and `cross_entropy` for the loss. Module names follow fla's HF models (embeddings, layers,
norm, lm_head) so that checkpoints convert by renaming (`sleepscale.convert.families`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from sleepscale.config import ModelConfig
from sleepscale.data.sample import IGNORE_INDEX
from sleepscale.model.attention import Attention
from sleepscale.model.blocks import Block
from sleepscale.model.gdn import GatedDeltaNet
from sleepscale.model.norm import RMSNorm
from sleepscale.model.recompute import Form
from sleepscale.model.recompute import run as run_in_form
from sleepscale.model.state import MixerState, NotHeld


def _make_block(letter: str, config: ModelConfig) -> Block:
    if letter in "Aa":
        attention = config.attention
        mixer = Attention(
            config.hidden_size,
            attention.num_heads,
            config.attention_kv_heads,
            config.attention_head_dim,
            attention.rope_theta,
            rotary_dim=config.attention_rotary_dim,
            rope_scaling=attention.rope_scaling,
            qkv_bias=attention.qkv_bias,
            output_bias=attention.output_bias,
            qk_norm=attention.qk_norm,
            output_gate=attention.output_gate,
            norm_eps=config.norm_eps,
            zero_centered_norms=config.zero_centered_norms,
        )
    else:
        mixer = GatedDeltaNet(
            config.hidden_size,
            config.gdn.num_heads,
            config.gdn_head_dim,
            config.gdn.expand_v,
            config.gdn.conv_size,
            config.norm_eps,
            config.backend,
            num_v_heads=config.gdn_v_heads,
        )
    intermediate = config.mlp_size if letter.isupper() else None
    return Block(mixer, config.hidden_size, intermediate, config.norm_eps, config.zero_centered_norms)


class CrossEntropy(nn.Module):
    """Summed token cross-entropy of the head's logits. A module of its own so that tensor
    parallelism can swap in a vocab-parallel one (`sleepscale.parallel.tensor`)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return F.cross_entropy(
            logits.flatten(0, 1).to(dtype), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (the head's may be a shard of it)."""
        return logits


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_make_block(letter, config) for letter in config.blocks)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, config.zero_centered_norms)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embeddings.weight
        self.cross_entropy = CrossEntropy()
        self.loop_range = range(*config.loop_range)
        self.held = range(len(self.layers))  # the blocks this rank holds: all, or a pipeline stage's (`cut_to_blocks`)

    def initial_states(self, batch_size: int, span: int, device: torch.device | None = None) -> list[MixerState]:
        """Fresh per-block states for a batch of new sequences; `span` is the attention window L.
        Blocks this rank does not hold get `NotHeld` placeholders."""
        return [
            block.initial_state(batch_size, span, device) if i in self.held else NotHeld()
            for i, block in enumerate(self.layers)
        ]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def run_blocks(
        self, hidden: torch.Tensor, states: list[MixerState], blocks: range, checkpoint: Form = "none"
    ) -> tuple[torch.Tensor, list[MixerState]]:
        """Runs blocks[i] for i in `blocks` that this rank holds (`held`; a contiguous part of them,
        possibly none), reading and replacing states[i]; other states are untouched. `checkpoint`:
        the recomputation form of the range (`sleepscale.model.recompute`: "none", or "pass", "block",
        "nested", "selective", each non-reentrant so that blocks reused N times work under ZeRO-2/3)."""
        blocks = range(max(blocks.start, self.held.start), min(blocks.stop, self.held.stop))
        if not blocks:
            return hidden, states
        if checkpoint != "none" and torch.is_grad_enabled():
            return run_in_form(functools.partial(HybridLM.run_blocks, self), hidden, states, blocks, checkpoint)
        states = list(states)
        for i in blocks:
            hidden, states[i] = self.layers[i](hidden, states[i])
        return hidden, states

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    @property
    def holds_embedding(self) -> bool:
        return self.embeddings is not None

    @property
    def holds_head(self) -> bool:
        return self.lm_head is not None


def cut_to_blocks(model: HybridLM, blocks: range) -> HybridLM:
    """`model` cut, in place, to the blocks `blocks` (a pipeline stage's): the other blocks become
    `nn.Identity` placeholders, so parameter names stay the whole model's (the stages' state dicts
    together are the model's); the embedding stays only when `blocks` start the stack, the final norm
    and head only when they end it. Works on the meta device, before any weight exists."""
    for index in range(len(model.layers)):
        if index not in blocks:
            model.layers[index] = nn.Identity()
    if blocks.start != 0:
        model.embeddings = None
    if blocks.stop != len(model.layers):
        model.norm = model.lm_head = None
    model.held = blocks
    return model
