"""Inference with sleep: a stream read window by window, then answered token by token.

A `SleepingSession` holds a batch of streams that advance together. Tokens arrive in chunks of any
size (`feed`); the session reads them the way training does, because it runs the training engine
(`sleep_forward`) on them:

- A chunk that continues the current window runs the wake pass over it, continuing from the
  states the window's earlier tokens left (the attention keys and short-convolution inputs of the
  window so far act as the KV cache; the GDN fast weights are the recurrent state). Decoding is
  the same call with one token, so a decoded token costs one pass whatever N is.
- When a token arrives after a complete window, that window is about to be evicted: the session
  sleeps on it exactly as training does, by running the engine over the whole window from the
  states it started from with `sequence_continues=True` (wake pass, passes 2..N of the loop
  blocks, eviction; `sleep_on`, partial loops and sliding eviction included), and the next window
  starts from the result. A whole window fed at once takes that path directly; a window filled
  piece by piece (decoding) pays its wake pass once more there.

Every state kept between calls is float32 (or wider) whatever the compute dtype (`MixerState.at_least_float32`).
`generate` samples from the logits (greedy, temperature, top-p) with stop tokens and a token limit,
yielding tokens as they come. `snapshot`/`restore` copy the whole session, which the consolidated-
state cache (`sleepscale.state_cache`) keeps per prefix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch

from sleepscale.config import SleepConfig
from sleepscale.model.hybrid import HybridLM
from sleepscale.model.state import MixerState
from sleepscale.sleep import sleep_forward


@dataclasses.dataclass
class SessionState:
    """Everything a session carries between calls."""

    window_start: list[MixerState]  # the states the current window started from
    states: list[MixerState]  # after the current window's tokens so far (wake pass)
    window_tokens: torch.Tensor  # [batch, tokens of the current window so far]
    last_logits: torch.Tensor | None  # [batch, vocab] after the last token read
    position: int  # tokens read so far


class SleepingSession:
    def __init__(self, model: HybridLM, sleep: SleepConfig, batch_size: int = 1, device: torch.device | str | None = None):
        if sleep.random_passes is not None:
            raise ValueError("sleep.random_passes draws N per training step; give a fixed sleep.passes for inference")
        self.model, self.sleep = model.eval(), sleep
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        start = _at_least_float32(model.initial_states(batch_size, sleep.window, self.device))
        self.state = SessionState(start, start, torch.zeros(batch_size, 0, dtype=torch.long, device=self.device), None, 0)

    @property
    def batch_size(self) -> int:
        return self.state.window_tokens.shape[0]

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Reads `tokens` [batch, n] (n >= 1) and returns their logits [batch, n, vocab]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if tokens.dim() != 2 or tokens.shape[0] != self.batch_size or tokens.shape[1] == 0:
            raise ValueError(f"feed takes [batch={self.batch_size}, n >= 1] token ids, got shape {tuple(tokens.shape)}")
        vocab = self.model.config.vocab_size
        low, high = tokens.min().item(), tokens.max().item()  # a check of the caller's input, once per call
        if low < 0 or high >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}) (the model's vocabulary), got {low}..{high}")
        return self._read(tokens)

    def _read(self, tokens: torch.Tensor) -> torch.Tensor:
        window, state, logits = self.sleep.window, self.state, []
        while tokens.shape[1]:
            if state.window_tokens.shape[1] == window:  # the stream goes on: sleep on the full window, evict it
                self._sleep_and_evict()
            filled = state.window_tokens.shape[1]
            take = min(window - filled, tokens.shape[1])
            piece, tokens = tokens[:, :take], tokens[:, take:]
            continues = filled == 0 and take == window and tokens.shape[1] > 0
            out = sleep_forward(self.model, piece, self.sleep, states=state.states, sequence_continues=continues)
            logits.append(out.logits)
            if continues:  # a whole window with more to come: slept on and evicted in the same call
                state.window_start = state.states = _at_least_float32(out.states)
                state.window_tokens = state.window_tokens[:, :0]
            else:
                state.states = _at_least_float32(out.states)
                state.window_tokens = torch.cat([state.window_tokens, piece], dim=1)
            state.position += take
        logits = torch.cat(logits, dim=1)
        state.last_logits = logits[:, -1].float()
        return logits

    def _sleep_and_evict(self) -> None:
        state = self.state
        out = sleep_forward(self.model, state.window_tokens, self.sleep, states=state.window_start,
                            sequence_continues=True, return_logits=False)
        state.window_start = state.states = _at_least_float32(out.states)
        state.window_tokens = state.window_tokens[:, :0]

    @torch.no_grad()
    def generate(self, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yields the next token of every stream [batch], up to `max_new_tokens` or until every
        stream has produced a stop token (a finished stream keeps yielding its stop token). Starts
        from the logits of the last token read: feed a prompt first."""
        if self.state.last_logits is None:
            raise ValueError("nothing read yet: feed a prompt before generating")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")
        stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=self.device)
        finished = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            token = sample(self.state.last_logits, temperature, top_p, generator)
            if stops.numel():
                token = torch.where(finished, stops[0], token)
                finished |= torch.isin(token, stops)
            yield token
            if stops.numel() and bool(finished.all()):
                return
            if step + 1 < max_new_tokens:
                with torch.no_grad():
                    self._read(token[:, None])

    def snapshot(self) -> SessionState:
        """A copy of the session (states, current window, last logits) that `restore` brings back."""
        return _copy(self.state)

    def restore(self, snapshot: SessionState) -> None:
        if snapshot.window_tokens.shape[0] != self.batch_size:
            raise ValueError(f"the snapshot holds {snapshot.window_tokens.shape[0]} streams, this session {self.batch_size}")
        self.state = _copy(snapshot)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [batch] from logits [batch, vocab]: argmax at temperature 0, else a draw from the
    softmax at `temperature` restricted to the smallest set of tokens whose probability reaches `top_p`."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probabilities = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probabilities, order = probabilities.sort(dim=-1, descending=True)
        before = sorted_probabilities.cumsum(dim=-1) - sorted_probabilities  # mass of the tokens ranked above
        sorted_probabilities = sorted_probabilities.masked_fill(before >= top_p, 0.0)
        probabilities = torch.zeros_like(probabilities).scatter(-1, order, sorted_probabilities)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


def _at_least_float32(states: list[MixerState]) -> list[MixerState]:
    return [state.at_least_float32() for state in states]


def _copy(state: SessionState) -> SessionState:
    return SessionState([s.cloned() for s in state.window_start], [s.cloned() for s in state.states],
                        state.window_tokens.clone(), None if state.last_logits is None else state.last_logits.clone(),
                        state.position)
