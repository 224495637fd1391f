"""fla's pure-PyTorch gated-delta-rule references, the oracles for our op's tests and benchmarks.

`import fla.ops...` would import every Triton kernel in fla (~10 s, and a GPU driver for some), so
`fla/ops/gated_delta_rule/naive.py` is loaded by file path; it needs only torch and einops.
"""

import importlib.util
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode


def _load_naive():
    spec = importlib.util.find_spec("fla")  # locates the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fla-core is not installed: pip install -e .")
    path = Path(spec.submodule_search_locations[0]) / "ops" / "gated_delta_rule" / "naive.py"
    module_spec = importlib.util.spec_from_file_location("fla_gated_delta_rule_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


_naive = _load_naive()
naive_recurrent_gated_delta_rule = _naive.naive_recurrent_gated_delta_rule
naive_chunk_gated_delta_rule = _naive.naive_chunk_gated_delta_rule


class _KeepFloat64(TorchFunctionMode):
    """fla's references cast their inputs to float32 (`.to(torch.float32)`, `.float()`,
    `dtype=torch.float`). Under this mode those casts keep float64, so the unmodified references
    serve as float64 oracles."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float:
            return args[0].double()
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


def recurrent_reference(q, k, v, g, beta, initial_state=None):
    """fla's token-by-token recurrence in float64; our argument order (g before beta)."""
    with _KeepFloat64():
        return _naive.naive_recurrent_gated_delta_rule(
            q, k, v, beta, g, initial_state=initial_state, output_final_state=True
        )


def chunk_reference(q, k, v, g, beta, initial_state=None):
    """fla's chunked reference in float64."""
    with _KeepFloat64():
        return _naive.naive_chunk_gated_delta_rule(
            q, k, v, g, beta, initial_state=initial_state, output_final_state=True
        )
