"""A small sleep training run on CPU: the main job until the trainer lands.

Task (generated, nothing downloaded): each sequence is two windows. The first holds random tokens
and carries no loss; the second starts with a query token and must reproduce the first window. Under
hard eviction attention cannot see the first window, so everything must pass through the GDN
fast weights that sleep writes.
"""

from __future__ import annotations

import time

import torch

from sleepscale.config import Config
from sleepscale.model import build_model
from sleepscale.sleep import IGNORE_INDEX, sleep_forward

QUERY_TOKEN = 1
FIRST_CONTENT_TOKEN = 2


def recall_batch(batch_size: int, window: int, vocab_size: int, generator: torch.Generator):
    """(input_ids, targets), each [batch, 2 * window]."""
    content = torch.randint(FIRST_CONTENT_TOKEN, vocab_size, (batch_size, window), generator=generator)
    query = torch.full((batch_size, 1), QUERY_TOKEN)
    input_ids = torch.cat([content, query, content[:, :-1]], dim=1)
    targets = torch.cat([torch.full_like(content, IGNORE_INDEX), content], dim=1)
    return input_ids, targets


def run_demo(config: Config, log=print) -> list[float]:
    """Trains for config.train.steps AdamW steps; returns the losses."""
    torch.manual_seed(config.train.seed)
    model = build_model(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    generator = torch.Generator().manual_seed(config.train.seed)
    parameters = sum(p.numel() for p in model.parameters())
    log(
        f"model {config.model.pattern} width {config.model.hidden_size}, {parameters:,} parameters; "
        f"sleep N={config.sleep.passes} L={config.sleep.window} eviction={config.sleep.eviction}"
    )
    losses, started = [], time.perf_counter()
    for step in range(1, config.train.steps + 1):
        input_ids, targets = recall_batch(config.train.batch_size, config.sleep.window, config.model.vocab_size, generator)
        out = sleep_forward(model, input_ids, config.sleep, targets=targets, return_logits=False)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        if step == 1 or step % 10 == 0 or step == config.train.steps:
            tokens_per_second = step * input_ids.numel() / (time.perf_counter() - started)
            log(
                f"step {step:4d}/{config.train.steps}  loss {losses[-1]:.4f}  "
                f"passes/window {out.passes.float().mean():.2f}  tokens/s {tokens_per_second:,.0f}"
            )
    log(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
    return losses
