"""Hybrid attention / Gated DeltaNet language model."""

from sleepscale.model.hybrid import HybridLM, build_model

__all__ = ["HybridLM", "build_model"]
