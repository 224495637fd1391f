"""`sleepscale generate`: a checkpoint reads a prompt in a `SleepingSession` (sleeping on each window
it evicts) and streams its continuation as text, in the tokenizer of the run's dataset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from sleepscale.config import ConfigError
from sleepscale.data.shards import read_manifest
from sleepscale.data.tokenizer import tokenizer_from_description
from sleepscale.inference.session import SleepingSession
from sleepscale.train.checkpoint import load_model_from_checkpoint, resolve_checkpoint


def generate(args) -> int:
    """Prints the continuation of `args.prompt` (or `args.prompt_file`) as it comes, then one JSON
    line of counts on stderr."""
    if args.passes is not None and args.passes < 1:
        raise ConfigError(f"--passes {args.passes}: give N >= 1")
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    model, config = load_model_from_checkpoint(resolve_checkpoint(args.checkpoint))
    manifest, _ = read_manifest(args.data or config.data.path)
    tokenizer = tokenizer_from_description(manifest["tokenizer"])
    text = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    ids = tokenizer.encode(text)
    if not ids:
        raise ConfigError("the prompt is empty after tokenisation")
    sleep = config.sleep.model_copy(update={"passes": args.passes or config.sleep.passes, "random_passes": None})
    session = SleepingSession(model, sleep)
    session.feed(torch.tensor([ids]))
    eos = getattr(tokenizer, "eos_id", None)
    tokens = session.generate(
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        () if eos is None else (eos,),
        torch.Generator().manual_seed(args.seed),
        vocabulary=tokenizer.vocab_size,
    )
    generated = stream_text((token.item() for token in tokens), tokenizer, eos)
    counts = {"prompt_tokens": len(ids), "generated_tokens": len(generated), "passes": sleep.passes}
    print(json.dumps(counts), file=sys.stderr)
    return 0


def stream_text(tokens, tokenizer, eos: int | None) -> list[int]:
    """Prints the text of `tokens` (ids, up to `eos`) as they come, then a newline; returns the ids."""
    generated, shown = [], ""
    for token in tokens:
        if token == eos:
            break
        generated.append(token)
        decoded = tokenizer.decode(generated)  # the whole continuation, so that multi-byte characters print whole
        print(decoded[len(shown) :] if decoded.startswith(shown) else " " + decoded, end="", flush=True)
        shown = decoded
    print()
    return generated
