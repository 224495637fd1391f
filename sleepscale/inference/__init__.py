"""Inference with sleep: reading a stream window by window and answering it token by token.

- `session`: `SleepingSession`, a batch of streams read (and slept on, window by window) the way
  training reads them, then decoded; `SessionState`, what it carries between calls;
- `sampling`: how the next token is picked from the logits (greedy, temperature, top-p);
- `state_cache`: `StateCache`, sessions as they stand after a prefix, so a long document's sleep is
  paid once.

The `sleepscale generate` command (a checkpoint's continuation of a prompt, streamed as text) is a
tool above this package: `sleepscale.generate`.
"""

from sleepscale.inference.sampling import sample
from sleepscale.inference.session import SessionState, SleepingSession
from sleepscale.inference.state_cache import StateCache

__all__ = ["SessionState", "SleepingSession", "StateCache", "sample"]
