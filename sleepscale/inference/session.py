"""Inference with sleep: a stream read window by window, then answered token by token.

A `SleepingSession` holds a batch of streams. Tokens arrive in chunks of any size, the same number
for every stream (`feed`) or a different number each (`feed_each`); the session reads them the way
training does, because it runs the training engine (`sleep_forward`) on them:

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

Streams that have read different numbers of tokens still run as one batch whenever they take the
same step (decoding: one token each): the attention keys of a stream whose window holds fewer
tokens are left-padded and masked (`AttentionState.valid`), and a stream whose window is full sleeps
on it and is evicted on its own (its rows of the states are taken out, run, and put back).

Every state kept between calls is float32 (or wider) whatever the compute dtype (`MixerState.at_least_float32`).
`generate` picks each next token from the logits (`sleepscale.inference.sampling`: greedy,
temperature, top-p) with stop tokens and a token limit, yielding tokens as they come.
`snapshot`/`restore` copy the whole session, which the consolidated-state cache
(`sleepscale.inference.state_cache`) keeps per prefix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch

from sleepscale.config import SleepConfig
from sleepscale.inference.sampling import check_sampling, sample
from sleepscale.model.hybrid import HybridLM
from sleepscale.model.state import MixerState
from sleepscale.sleep import sleep_forward


@dataclasses.dataclass
class SessionState:
    """Everything a session carries between calls. Streams may have read different numbers of
    tokens: the host lists say how many, per stream."""

    window_start: list[MixerState]  # the states each stream's current window started from
    states: list[MixerState]  # after the current window's tokens so far (wake pass)
    window_tokens: torch.Tensor  # [batch, window]: each stream's current window, its first `filled` tokens
    filled: list[int]  # per stream: tokens of the current window read so far
    positions: list[int]  # per stream: tokens read so far
    last_logits: torch.Tensor | None  # [batch, vocab] after each stream's last token read


class SleepingSession:
    def __init__(
        self, model: HybridLM, sleep: SleepConfig, batch_size: int = 1, device: torch.device | str | None = None
    ):
        if sleep.random_passes is not None:
            raise ValueError("sleep.random_passes draws N per training step; give a fixed sleep.passes for inference")
        self.model, self.sleep = model.eval(), sleep
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        start = _at_least_float32(model.initial_states(batch_size, sleep.window, self.device))
        window_tokens = torch.zeros(batch_size, sleep.window, dtype=torch.long, device=self.device)
        self.state = SessionState(start, start, window_tokens, [0] * batch_size, [0] * batch_size, None)

    @property
    def batch_size(self) -> int:
        return self.state.window_tokens.shape[0]

    @torch.no_grad()
    def feed(self, tokens: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Reads `tokens` [batch, n] (n >= 1), the same number for every stream, and returns their
        logits [batch, n, vocab]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if tokens.dim() != 2 or tokens.shape[0] != self.batch_size or tokens.shape[1] == 0:
            raise ValueError(f"feed takes [batch={self.batch_size}, n >= 1] token ids, got shape {tuple(tokens.shape)}")
        self._check_vocabulary(tokens)
        return torch.stack(self._read(list(tokens), rectangle=tokens))

    @torch.no_grad()
    def feed_each(self, tokens: Sequence[torch.Tensor | Sequence[int]], logits: bool = True) -> list[torch.Tensor]:
        """Reads a different number of tokens into each stream (`tokens[i]` [n_i], possibly empty)
        and returns each stream's logits [n_i, vocab] (nothing without `logits`: a prompt read only
        to be continued, whose last logits `generate` still starts from). Streams of different
        lengths then decode together: `generate` reads one token into every stream per step, in one
        forward."""
        if len(tokens) != self.batch_size:
            raise ValueError(f"feed_each takes one token list per stream ({self.batch_size}), got {len(tokens)}")
        tokens = [torch.as_tensor(t, dtype=torch.long, device=self.device) for t in tokens]
        if any(t.dim() != 1 for t in tokens) or not any(t.numel() for t in tokens):
            raise ValueError("feed_each takes a flat list of token ids per stream, at least one token in all")
        self._check_vocabulary(torch.cat(tokens))
        return self._read(tokens, keep_logits=logits)

    def _check_vocabulary(self, tokens: torch.Tensor) -> None:
        vocab = self.model.config.vocab_size
        low, high = tokens.min().item(), tokens.max().item()  # a check of the caller's input, once per call
        if low < 0 or high >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}) (the model's vocabulary), got {low}..{high}")

    def _read(
        self, tokens: list[torch.Tensor], rectangle: torch.Tensor | None = None, keep_logits: bool = True
    ) -> list[torch.Tensor]:
        """Reads tokens[i] [n_i] into stream i and returns each stream's logits [n_i, vocab] (none
        without `keep_logits`). `rectangle` [batch, n], when given, holds the same tokens: a step
        every stream takes at the same offset is then a slice of it. Streams that take the same step
        (as many tokens, the same whole-window case) run as one batch whatever they read before:
        the attention masks the padding of shorter tails."""
        window, state, everyone = self.sleep.window, self.state, list(range(self.batch_size))
        logits: list[list[torch.Tensor]] = [[] for _ in tokens]
        read = [0] * len(tokens)
        while active := [i for i, t in enumerate(tokens) if read[i] < len(t)]:
            full = [i for i in active if state.filled[i] == window]
            if full:  # these streams go on: sleep on their full windows and evict them
                self._sleep_and_evict(full)
            steps: dict[tuple[int, bool], list[int]] = {}
            for i in active:
                left = len(tokens[i]) - read[i]
                take = min(window - state.filled[i], left)
                continues = state.filled[i] == 0 and take == window and left > take
                steps.setdefault((take, continues), []).append(i)
            for (take, continues), streams in steps.items():
                if rectangle is not None and streams == everyone and len(set(read)) == 1:
                    piece = rectangle[:, read[0] : read[0] + take]
                else:
                    piece = torch.stack([tokens[i][read[i] : read[i] + take] for i in streams])
                out = sleep_forward(
                    self.model,
                    piece,
                    self.sleep,
                    states=self._rows(state.states, streams),
                    sequence_continues=continues,
                )
                new_states = _at_least_float32(out.states)
                state.states = self._scattered(state.states, streams, new_states)
                if continues:  # a whole window with more to come: slept on and evicted in the same call
                    state.window_start = self._scattered(state.window_start, streams, new_states)
                else:
                    self._remember_window_tokens(streams, piece)
                state.last_logits = self._scattered_rows(state.last_logits, streams, out.logits[:, -1].float())
                for row, i in enumerate(streams):
                    if keep_logits:
                        logits[i].append(out.logits[row])
                    read[i] += take
                    state.positions[i] += take
                    state.filled[i] = 0 if continues else state.filled[i] + take
        vocab = self.model.config.vocab_size
        return (
            [
                torch.cat(pieces) if pieces else state.window_tokens.new_zeros(0, vocab, dtype=torch.float)
                for pieces in logits
            ]
            if keep_logits
            else []
        )

    def _sleep_and_evict(self, streams: list[int]) -> None:
        state = self.state
        window_tokens = state.window_tokens if len(streams) == self.batch_size else state.window_tokens[streams]
        out = sleep_forward(
            self.model,
            window_tokens,
            self.sleep,
            states=self._rows(state.window_start, streams),
            sequence_continues=True,
            return_logits=False,
        )
        new_states = _at_least_float32(out.states)
        state.window_start = self._scattered(state.window_start, streams, new_states)
        state.states = self._scattered(state.states, streams, new_states)
        for i in streams:
            state.filled[i] = 0

    def _remember_window_tokens(self, streams: list[int], piece: torch.Tensor) -> None:
        filled = [self.state.filled[i] for i in streams]
        if len(set(filled)) == 1:  # the usual case: one slice
            rows = slice(None) if len(streams) == self.batch_size else streams
            self.state.window_tokens[rows, filled[0] : filled[0] + piece.shape[1]] = piece
        else:
            columns = torch.tensor(filled, device=self.device)[:, None] + torch.arange(
                piece.shape[1], device=self.device
            )
            self.state.window_tokens[torch.tensor(streams, device=self.device)[:, None], columns] = piece

    def _rows(self, states: list[MixerState], streams: list[int]) -> list[MixerState]:
        if streams == list(range(self.batch_size)):
            return states
        index = torch.tensor(streams, device=self.device)
        return [state.rows(index) for state in states]

    def _scattered(self, states: list[MixerState], streams: list[int], part: list[MixerState]) -> list[MixerState]:
        """`states` with the rows of `streams` replaced by `part` (whose row j is stream streams[j])."""
        if streams == list(range(self.batch_size)):
            return part
        index, chosen = self._spread(streams)
        return [new.rows(index).where(chosen, old) for new, old in zip(part, states)]

    def _scattered_rows(self, tensor: torch.Tensor | None, streams: list[int], part: torch.Tensor) -> torch.Tensor:
        if streams == list(range(self.batch_size)):
            return part
        if tensor is None:
            tensor = part.new_zeros(self.batch_size, *part.shape[1:])
        index, chosen = self._spread(streams)
        return torch.where(chosen[:, None], part.index_select(0, index), tensor)

    def _spread(self, streams: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """For every stream: the row of a part over `streams` that holds it (0 for the others), and
        whether it is in the part."""
        index, chosen = [0] * self.batch_size, [False] * self.batch_size
        for row, i in enumerate(streams):
            index[i], chosen[i] = row, True
        return torch.tensor(index, device=self.device), torch.tensor(chosen, device=self.device)

    @torch.no_grad()
    def generate(
        self,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_tokens: Sequence[int] = (),
        generator: torch.Generator | None = None,
        vocabulary: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yields the next token of every stream [batch], up to `max_new_tokens` or until every
        stream has produced a stop token (a finished stream keeps yielding its stop token). Starts
        from the logits of the last token read: feed a prompt first. `vocabulary`: only ids below
        it are generated (a tokenizer smaller than the model's embedding table)."""
        if 0 in self.state.positions:
            raise ValueError("a stream has read nothing yet: feed every stream a prompt before generating")
        check_sampling(temperature, top_p)
        stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=self.device)
        finished = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            token = sample(self.state.last_logits, temperature, top_p, generator, vocabulary)
            if stops.numel():
                token = torch.where(finished, stops[0], token)
                finished |= torch.isin(token, stops)
            yield token
            if stops.numel() and bool(finished.all()):
                return
            if step + 1 < max_new_tokens:
                with torch.no_grad():
                    self._read(list(token[:, None]), rectangle=token[:, None], keep_logits=False)

    def snapshot(self) -> SessionState:
        """A copy of the session (states, current window, last logits) that `restore` brings back."""
        return _copy(self.state)

    def restore(self, snapshot: SessionState) -> None:
        if snapshot.window_tokens.shape[0] != self.batch_size:
            raise ValueError(
                f"the snapshot holds {snapshot.window_tokens.shape[0]} streams, this session {self.batch_size}"
            )
        self.state = _copy(snapshot, self.device)  # a snapshot read from disk is on the CPU


def _at_least_float32(states: list[MixerState]) -> list[MixerState]:
    return [state.at_least_float32() for state in states]


def _copy(state: SessionState, device: torch.device | None = None) -> SessionState:
    """A copy that owns its tensors, on `device` (default: where they are)."""

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.clone() if device is None or tensor.device == device else tensor.to(device)

    return SessionState(
        [s.mapped(copy) for s in state.window_start],
        [s.mapped(copy) for s in state.states],
        copy(state.window_tokens),
        list(state.filled),
        list(state.positions),
        None if state.last_logits is None else copy(state.last_logits),
    )
