"""`train.compile`: torch.compile applied to a rank's model from outside, block by block.

Sleep turns one pass over a window into N short ones; each block of each pass is the same code on
the same shapes, window after window, pass after pass, step after step. So each block is compiled
once (`nn.Module.compile`, `fullgraph=True`: a graph break is an error, never a silent split) and
its graph replayed for every window and pass, as torchtitan compiles each transformer block. Blocks
of one kind share a graph (the parameters are graph inputs), so the quickstart's AGAG compiles one
attention block and one GDN block.

What a block's graph depends on, and how the sleep engine keeps it steady:
- the window's length: windows of a sequence share one graph, the last window's shorter tail one
  more (static shapes: the delta rule's chunk loop unrolls over the window);
- its states' structure: the first window's fresh GDN state is a zero tensor without gradient,
  later windows' states carry gradient, which torch.compile guards on; under compile the fresh
  states are made to require gradient too (`_steady_initial_states`: a leaf nobody reads the
  gradient of, a few kB), so the first window replays the later windows' graph;
- the grad mode: passes without gradient (`sleep.grad_passes`) have a graph of their own;
- under sliding eviction, the attention and convolution caches: the first window has none, the
  next ones a growing then steady span (the quickstart's blocks at N=3: 7 graphs, against 4 under
  hard eviction).
N, random or not, changes how often a graph is replayed, not which. torch.compile's per-function
limit of graphs is made an error (`fail_on_recompile_limit_hit`) rather than a silent fall back to
eager.

The delta rule's kernels stay opaque: our Triton window kernel is a pair of custom operators
(`sleepscale::window_delta_rule` and its backward, `sleepscale.kernels.window_delta_rule`), and so
are fla's kernels (`sleepscale::fla_gated_delta_rule`, `sleepscale.ops.fla`: its backward
runs fla's forward again), one call each in a graph; the PyTorch delta rule is traced like any other
code. Only what can compile is let through (`Config` refuses the rest in one line): no tensor
parallelism (megatron-core's layers warn and reduce inside the block); a pipeline stage compiles the
blocks it holds; ZeRO below 3; recomputation forms none, pass, block, nested and window.
"""

from __future__ import annotations

import functools

import torch
import torch._dynamo

from sleepscale.model.hybrid import HybridLM

RECOMPILE_LIMIT = 16  # graphs of `Block.forward`, all block kinds together (the quickstart needs 4; sliding 7)


def compile_blocks(model: HybridLM, device: torch.device, backend: str = "inductor") -> HybridLM:
    """Compiles, in place, each block `model` holds; returns `model`. `backend`: torch.compile's."""
    # Blocks of every kind share `Block.forward`, whose graphs torch.compile counts together: room for
    # each kind's few (the module docstring; sliding eviction's caches add the first windows'), then an error.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    for index in model.held:
        model.layers[index].compile(fullgraph=True, dynamic=False, backend=backend)
    model.initial_states = functools.partial(_steady_initial_states, model.initial_states)
    return model


def _steady_initial_states(initial_states, *args, **kwargs):
    """`HybridLM.initial_states`, its floating-point tensors requiring gradient while gradient is
    recorded, as the states of every later window do (the module docstring)."""
    states = initial_states(*args, **kwargs)
    if not torch.is_grad_enabled():
        return states
    return [state.mapped(lambda t: t.requires_grad_() if t.is_floating_point() else t) for state in states]
