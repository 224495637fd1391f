"""The planner's activation memory (`sleepscale.planner.activations`) against what the engine saves."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config
from planner_recomputed import recomputed_peak_bytes

from sleepscale.model import build_model
from sleepscale.planner import activations
from sleepscale.planner.activations import micro_batch_activations, saved_bytes, tensor_parallel_shapes

TESTS = Path(__file__).parent

# A grid over N, checkpointing, grad_passes, window length and micro-batch size, plus eviction, a loop
# with prelude and coda, repeated block letters (the depth reduction), long sequences (the length
# reduction), bf16 autocast and the state-norm bound.
# (pattern, N, checkpoint, grad_passes, window, batch, length, extra)
GRID_FIELDS = ("pattern", "passes", "checkpoint", "grad_passes", "window", "batch", "length", "extra")
GRID = [
    ("AGag", 1, "none", None, 8, 2, 30, {}),
    ("AGag", 3, "none", None, 8, 2, 30, {}),
    ("AGag", 3, "pass", None, 8, 2, 30, {}),
    ("AGag", 3, "window", None, 8, 2, 30, {}),
    ("AGag", 4, "none", 1, 8, 1, 30, {}),
    ("AGag", 4, "pass", 2, 16, 3, 40, {}),
    ("AGag", 2, "none", None, 16, 1, 64, {"eviction": "sliding"}),
    ("AGag", 3, "pass", None, 8, 2, 44, {"eviction": "sliding"}),
    ("GGGAGGGA", 3, "none", None, 8, 2, 45, {"model": {"loop": [1, 7]}}),
    ("GGGAGGGA", 4, "pass", 2, 8, 1, 45, {"model": {"loop": [2, 6]}}),
    ("GGGAGGGA", 2, "window", None, 4, 3, 21, {}),
    ("GgGA", 3, "none", None, 8, 2, 30, {"state_norm_bound": 1.0}),
    ("AGag", 3, "none", None, 8, 2, 30, {"precision": "bf16"}),
    ("AGag", 3, "pass", 1, 8, 2, 30, {"precision": "bf16"}),
]


def _grid_case(pattern, passes, checkpoint, grad_passes, window, batch, length, extra):
    """(config, precision, token ids) of a grid row."""
    extra = dict(extra)
    precision = extra.pop("precision", "fp32")
    config = make_config(
        pattern=pattern,
        passes=passes,
        checkpoint=checkpoint,
        grad_passes=grad_passes,
        window=window,
        hidden_size=32,
        vocab_size=64,
        **extra,
    )
    return config, precision, torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(GRID_FIELDS, GRID)
def test_predicted_saved_bytes_match_the_engine(pattern, passes, checkpoint, grad_passes, window, batch, length, extra):
    config, precision, ids = _grid_case(pattern, passes, checkpoint, grad_passes, window, batch, length, extra)
    measured = saved_bytes(build_model(config.model), ids, ids.roll(-1, 1), config.sleep, precision)
    predicted = micro_batch_activations(config.model, config.sleep, batch, length, precision=precision, kernels="cpu")
    # The issue asks for 10%; the trace is exact up to a few scalars, so hold it to 1% (per-window checkpointing
    # saves only the windows' token ids: there a few scalars are more than 1%).
    assert abs(predicted.saved[0] - measured) <= max(0.01 * measured, 64), (predicted.saved[0], measured)


FORMS = ("block", "nested", "selective")
# The grid's rows with their checkpoint setting replaced by a form: rows that differ only there are one.
# The forms take the rows in turn (CI time: every form on every row took ~8 minutes), so that each form
# meets a long loop (GGGAGGGA), sliding eviction and bf16 or the state-norm bound.
FORM_GRID = [
    (FORMS[index % len(FORMS)], *row)
    for index, row in enumerate({(*row[:2], None, *row[3:7], repr(row[7])): row for row in GRID}.values())
]


@pytest.mark.parametrize(("form", *GRID_FIELDS), FORM_GRID)
def test_recomputation_forms_save_and_recompute_what_the_planner_predicts(
    form, pattern, passes, checkpoint, grad_passes, window, batch, length, extra
):
    """Each finer recomputation form over the grid (its own checkpoint setting replaced): what the
    forward saves for backward (under `selective` the matmul outputs its cache keeps too) and the
    recomputation floor, the most bytes backward's recomputations create and keep at once
    (`planner_recomputed.RecomputedStorages`: storages that ops create while a checkpoint recomputes,
    followed until freed; transients and a unit's existing inputs do not count, as they cost no memory
    beyond what the forward kept), against the planner's prediction."""
    config, precision, ids = _grid_case(pattern, passes, form, grad_passes, window, batch, length, extra)
    model = build_model(config.model)
    measured = saved_bytes(model, ids, ids.roll(-1, 1), config.sleep, precision)
    recomputed = recomputed_peak_bytes(model, ids, ids.roll(-1, 1), config.sleep, precision)
    predicted = micro_batch_activations(config.model, config.sleep, batch, length, precision=precision, kernels="cpu")
    assert abs(predicted.saved[0] - measured) <= max(0.01 * measured, 64), (predicted.saved[0], measured)
    assert abs(predicted.largest_unit - recomputed) <= 0.01 * recomputed, (predicted.largest_unit, recomputed)


# (pattern, form, grad_passes, extra): each form, grad_passes, the state bound, sliding eviction, sleeping on
# context, a prelude, loop and coda
REDUCED = [
    ("AGag", "none", None, {}),
    ("AGag", "pass", None, {}),
    ("AGag", "block", 2, {}),
    ("AGag", "nested", 3, {"eviction": "sliding"}),
    ("AGag", "selective", None, {"state_norm_bound": 1.0}),
    ("AGag", "window", 1, {}),
    ("GgGA", "pass", 4, {"sleep_on": "context", "state_norm_bound": 1.0}),
    ("GGGAGGGA", "nested", None, {"model": {"loop": [2, 6]}}),
    ("GGGAGGGA", "block", 2, {"model": {"loop": [2, 6]}, "eviction": "sliding"}),
]


@pytest.mark.parametrize(
    ("pattern", "form", "grad_passes", "extra", "passes"),
    [(*row, (6, 9)[index % 2]) for index, row in enumerate(REDUCED)],  # N = 6 and 9 in turn (CI time)
)
def test_the_passes_reduction_is_exact(pattern, form, grad_passes, extra, passes, monkeypatch):
    """The trace over a few passes standing for N (the module docstring) equals the trace over all N."""
    config = make_config(
        pattern=pattern,
        passes=passes,
        checkpoint=form,
        grad_passes=grad_passes,
        window=8,
        hidden_size=32,
        vocab_size=64,
        **extra,
    )
    stages = [range(0, len(pattern) // 2 + 1), range(len(pattern) // 2 + 1, len(pattern))]  # a cut inside the loop
    reduced = micro_batch_activations(config.model, config.sleep, 2, 30, stages=stages, kernels="cpu")
    assert activations._passes_reduced(config.sleep)[0].passes < passes  # the reduction applies
    monkeypatch.setattr(activations, "REDUCE_PASSES", False)
    full = micro_batch_activations(config.model, config.sleep, 2, 30, stages=stages, kernels="cpu")
    assert reduced == full


def test_pipeline_stages_split_the_same_bytes():
    config = make_config(
        pattern="GGGAGGGA", passes=3, checkpoint="none", window=8, hidden_size=32, vocab_size=64, model={"loop": [1, 7]}
    )
    whole = micro_batch_activations(config.model, config.sleep, 2, 30, kernels="cpu")
    split = micro_batch_activations(config.model, config.sleep, 2, 30, stages=[range(0, 3), range(3, 8)], kernels="cpu")
    assert sum(split.saved) == whole.saved[0] and all(split.saved)
    assert split.saved[1] > split.saved[0]  # more blocks, and the head's logits


def test_per_pass_checkpointing_holds_the_states_each_pass_starts_from():
    """What the checkpoints keep besides saved tensors: per checkpointed unit, its blocks' GDN fast
    weights (batch x value heads x K x V, float32) as the unit started them."""
    config = make_config(pattern="GG", passes=3, checkpoint="pass", window=8, hidden_size=32, vocab_size=64)
    found = micro_batch_activations(config.model, config.sleep, 2, 24)
    fast_weights = 2 * 2 * 16 * 24 * 4  # batch, value heads, K = 32 / 2, V = 1.5 K
    assert found.held[0] > 0 and found.held[0] % fast_weights == 0
    # the states the sequence ends with: each block's fast weights and its convolutions' tails
    # (q, k, v: 3 taps of 32 + 32 + 48)
    assert found.states == [2 * (fast_weights + 2 * 3 * (32 + 32 + 48) * 4)]
    assert micro_batch_activations(
        config.model, config.sleep.model_copy(update={"checkpoint": "none"}), 2, 24
    ).held == [0]


def test_tensor_parallel_shapes_hold_one_shard_of_each_split_dimension():
    config = make_config(
        model={"attention": {"num_heads": 4, "num_kv_heads": 2}, "gdn": {"num_heads": 4}}, vocab_size=39
    )
    shard = tensor_parallel_shapes(config.model, 2)
    assert (shard.attention.num_heads, shard.attention_kv_heads, shard.gdn.num_heads) == (2, 1, 2)
    assert (shard.attention_head_dim, shard.gdn_head_dim) == (
        config.model.attention_head_dim,
        config.model.gdn_head_dim,
    )
    assert shard.vocab_size == 20 and shard.mlp_size == config.model.mlp_size // 2


def test_gpu_kernels_save_what_the_trace_predicts(tmp_path):
    """The "cuda" trace (kernels' Python code on fake tensors, launches skipped) against the same
    kernels really run under Triton's CPU interpreter: our window kernel and fla's chunked kernel."""
    out = tmp_path / "saved.json"
    subprocess.run(
        [sys.executable, str(TESTS / "planner_kernel_saved.py"), str(out)],
        cwd=TESTS,
        check=True,
        capture_output=True,
        timeout=600,
    )
    measured = json.loads(out.read_text())
    for case, size in measured.items():
        window, passes, checkpoint = case.split("-")
        window, passes = int(window), int(passes)
        config = make_config(
            pattern="GA", window=window, passes=passes, checkpoint=checkpoint, hidden_size=32, vocab_size=64
        )
        predicted = micro_batch_activations(config.model, config.sleep, 2, 2 * window + 5, kernels="cuda")
        assert abs(predicted.saved[0] - size) <= 0.01 * size, (case, predicted.saved[0], size)
        if checkpoint == "none":  # the kernels save less than the PyTorch op (which the other tests measure)
            assert (
                micro_batch_activations(config.model, config.sleep, 2, 2 * window + 5, kernels="cpu").saved[0]
                > 1.3 * size
            )


def test_sleeping_on_context_only_is_planned_at_its_worst_case():
    config = make_config(pattern="GA", passes=3, window=8, hidden_size=32, vocab_size=64)
    context = config.sleep.model_copy(update={"sleep_on": "context"})
    assert (
        micro_batch_activations(config.model, context, 2, 24).saved
        == micro_batch_activations(config.model, config.sleep, 2, 24).saved
    )
