"""A cache of consolidated states: a session as it stands after reading (and sleeping on) a prefix.

Many questions about one long document pay its sleep once: `ingest(session, tokens)` restores the
session from the cache when the same model, sleep settings and prefix were read before, and reads
the prefix (then stores the result) otherwise. A hit restores exactly the states a fresh read
produces, so every later output is identical. Entries live in memory up to `max_bytes` (least
recently used dropped first) and, with `directory`, also on disk, where they survive the process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from sleepscale.inference.session import SessionState, SleepingSession


class StateCache:
    def __init__(self, model_key: str, max_bytes: int = 1 << 30, directory: str | Path | None = None):
        """`model_key` names the weights (e.g. a checkpoint path and step): entries of other
        weights never match."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.model_key, self.max_bytes = model_key, max_bytes
        self.directory = Path(directory) if directory is not None else None
        self._entries: OrderedDict[str, SessionState] = OrderedDict()
        self.hits = self.misses = 0

    def key(self, session: SleepingSession, tokens: torch.Tensor) -> str:
        described = json.dumps(
            {
                "model": self.model_key,
                "sleep": session.sleep.model_dump(mode="json"),
                "dtype": str(next(session.model.parameters()).dtype),
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(described.encode())
        digest.update(tokens.to("cpu", torch.int64).contiguous().numpy().tobytes())
        digest.update(str(tuple(tokens.shape)).encode())
        return digest.hexdigest()

    @property
    def bytes(self) -> int:
        return sum(_nbytes(entry) for entry in self._entries.values())

    def ingest(self, session: SleepingSession, tokens: torch.Tensor) -> bool:
        """Brings a fresh session to the state after reading `tokens` [batch, n]; True on a hit."""
        if any(session.state.positions):
            raise ValueError("ingest starts from a fresh session (a cached prefix is the whole stream so far)")
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        key = self.key(session, tokens)
        entry = self._get(key)
        if entry is not None:
            self.hits += 1
            session.restore(entry)
            return True
        self.misses += 1
        session.feed(tokens)
        self._put(key, session.snapshot())
        return False

    def _get(self, key: str) -> SessionState | None:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        if self.directory is not None and (self.directory / f"{key}.pt").exists():
            entry = torch.load(self.directory / f"{key}.pt", map_location="cpu", weights_only=False)
            self._remember(key, entry)
            return entry
        return None

    def _put(self, key: str, entry: SessionState) -> None:
        self._remember(key, entry)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            partial = self.directory / f"{key}.pt.partial"
            torch.save(entry, partial)
            os.replace(partial, self.directory / f"{key}.pt")

    def _remember(self, key: str, entry: SessionState) -> None:
        if _nbytes(entry) > self.max_bytes:
            return  # larger than the whole cache: kept on disk only, if at all
        self._entries[key] = entry
        while self.bytes > self.max_bytes:
            self._entries.popitem(last=False)


def _nbytes(state: SessionState) -> int:
    tensors = [state.window_tokens] + ([state.last_logits] if state.last_logits is not None else [])
    for mixer_state in (*state.window_start, *state.states):
        tensors += _tensors(mixer_state)
    unique = {t.data_ptr(): t for t in tensors}  # the window-start and current states may share tensors
    return sum(t.nbytes for t in unique.values())


def _tensors(mixer_state) -> list[torch.Tensor]:
    found = []
    for field in dataclasses.fields(mixer_state):
        value = getattr(mixer_state, field.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, torch.Tensor):
                found.append(item)
    return found
