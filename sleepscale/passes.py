"""Random numbers of sleep passes: one draw per training step, a pure function of (seed, step).

Every rank draws the same N without communicating, and a resumed run replays the same draws. One
model trained this way can then be evaluated at any N.

- `uniform`: N uniform on [low, high].
- `poisson_lognormal` (Huginn's sampler): N = 1 + Poisson(exp(tau)), tau ~ Normal(log(mean - 1) -
  sigma^2 / 2, sigma), so that E[N] = mean; heavy-tailed, clipped to `max`.
"""

from __future__ import annotations

import math

import numpy as np

from sleepscale.config import PassesDistribution

_STREAM = 0x5EE9  # keeps these draws apart from other uses of the same seed


def draw_passes(distribution: PassesDistribution, seed: int, step: int) -> int:
    rng = np.random.default_rng([seed, step, _STREAM])
    if distribution.kind == "uniform":
        return int(rng.integers(distribution.low, distribution.high + 1))
    sigma = distribution.sigma
    tau = rng.normal(math.log(distribution.mean - 1) - sigma**2 / 2, sigma)
    return int(min(1 + rng.poisson(math.exp(tau)), distribution.max))
