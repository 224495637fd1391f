"""Hybrid attention / Gated DeltaNet language model."""

from sleepscale.model.hybrid import HybridLM
from sleepscale.model.seeded_weights import build_model

__all__ = ["HybridLM", "build_model"]
