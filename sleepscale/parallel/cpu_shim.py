"""The one place where megatron-core's CUDA assumptions are bent for CPU-only torch (gloo).

megatron-core 0.16 builds parameters on `torch.cuda.current_device()` and keeps its model-parallel
RNG tracker in CUDA generator states, both of which raise on a CPU build of torch. Nothing else of
megatron that sleepscale uses needs CUDA. On a machine with CUDA this module does nothing.
"""

from __future__ import annotations

import torch

_patched = False


def patch_megatron_for_cpu() -> None:
    """Idempotent. Must run before megatron's parallel layers are built."""
    global _patched
    if _patched or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all itself (infinite recursion).
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)

    from megatron.core.tensor_parallel import random as megatron_random  # megatron-core, ~3 s: only on CPU-only torch

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _patched = True
