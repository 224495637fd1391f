import pytest
import torch

from sleepscale.config import validate
from sleepscale.model import build_model


def make_config(pattern="AGAG", window=8, passes=3, vocab_size=40, hidden_size=16, **sleep):
    """A tiny model + sleep config; keyword arguments go to the sleep section. Checkpointing is off
    unless asked for, so that tests compare against the plain engine."""
    sleep.setdefault("checkpoint", "none")
    return validate(
        {
            "model": {
                "vocab_size": vocab_size,
                "hidden_size": hidden_size,
                "pattern": pattern,
                "intermediate_size": 24,
                "attention": {"num_heads": 2, "num_kv_heads": 1},
                "gdn": {"num_heads": 2, "expand_v": 1.5},
                "init_std": 0.2,  # large enough that every block visibly changes the output
                **sleep.pop("model", {}),
            },
            "sleep": {"window": window, "passes": passes, **sleep},
            "train": {"steps": 1},
        }
    )


def make_model(config, dtype=torch.float64):
    return build_model(config.model).to(dtype)


@pytest.fixture
def tokens():
    return torch.randint(0, 40, (3, 30), generator=torch.Generator().manual_seed(0))
