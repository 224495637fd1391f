"""Picking the next token from logits: greedy at temperature 0, else a draw from the softmax at a
temperature, restricted to the top-p nucleus and, when a tokenizer is smaller than the model's
embedding table, to the ids it can decode."""

from __future__ import annotations

import torch


def check_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    vocabulary: int | None = None,
) -> torch.Tensor:
    """Next tokens [batch] from logits [batch, vocab]: argmax at temperature 0, else a draw from the
    softmax at `temperature` restricted to the smallest set of tokens whose probability reaches `top_p`.
    `vocabulary`: only ids below it are picked (a tokenizer smaller than the model's embedding table)."""
    if vocabulary is not None and vocabulary < logits.shape[-1]:
        logits = logits.clone()
        logits[:, vocabulary:] = float("-inf")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probabilities, order = probabilities.sort(dim=-1, descending=True)
        before = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities  # mass of the tokens ranked above
        sorted_probabilities = sorted_probabilities.masked_fill(before >= top_p, 0.0)
        probabilities = torch.zeros_like(probabilities).scatter(-1, order, sorted_probabilities)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
