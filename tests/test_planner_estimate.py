"""`sleepscale plan`: layouts, the per-GPU estimate, the searches and the one-line answer."""

import dataclasses
import re
import types

import pytest
import torch
import yaml
from conftest import make_config

import sleepscale.planner.estimate as estimate_module
from sleepscale.cli import main
from sleepscale.flops import plan_flops
from sleepscale.model.hybrid import HybridLM, cut_to_blocks
from sleepscale.parallel.pipeline_schedule import build_schedule, simulate, traversals
from sleepscale.plan import make_plan
from sleepscale.planner.communication import muon_sent_bytes, pipeline_bytes, tensor_parallel_bytes
from sleepscale.planner.estimate import (
    CHECKPOINT_FORMS,
    GB,
    LARGEST_PASSES,
    Assumptions,
    Layout,
    _stage_optimized,
    advice,
    candidate_layouts,
    config_layout,
    estimate,
    in_flight_choices,
    largest_passes,
    search,
    smallest_gpus,
    stage_ranges,
)
from sleepscale.planner.model_states import Parameter
from sleepscale.planner.report import table
from sleepscale.train.optim import is_hidden_matrix

TINY = Assumptions(length=40, gpu_memory=1 * GB, peak_flops=1e12, mfu=0.5, reserve=0)


def tiny(**sections):
    config = make_config(
        pattern="AGAG|AGAG",
        passes=3,
        checkpoint="pass",
        hidden_size=32,
        vocab_size=64,
        model={"attention": {"num_heads": 4, "num_kv_heads": 2}, "gdn": {"num_heads": 4}},
    )
    data = config.model_dump(mode="json")
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return type(config).model_validate(data)


def test_zero_0_holds_16_bytes_per_parameter_plus_deepspeeds_all_reduce_copy():
    config = tiny()
    with torch.device("meta"):
        parameters = sum(p.numel() for p in HybridLM(config.model).parameters())
    found = estimate(config, Layout(1, 1, 1, 0, "pass", 8, 1, 1), TINY)
    assert (found.weights, found.gradients, found.optimizer) == (4 * parameters, 4 * parameters, 8 * parameters)
    assert found.buffers == 4 * parameters  # the flattened gradients it all-reduces
    assert found.tensor_bytes == found.pipeline_bytes == found.data_bytes == 0


def test_model_parallel_ranks_hold_their_share_and_communicate():
    config = tiny(parallel={"tensor": 2, "pipeline": 2})
    whole = estimate(config, Layout(1, 1, 1, 0, "pass", 2, 4, 1), TINY)
    split = estimate(config, config_layout(config, 8), TINY)  # TP2 x PP2 x DP2
    assert split.layout == Layout(2, 2, 2, 0, "pass", 8, 1, 2)
    assert split.weights < 0.4 * whole.weights
    assert split.tensor_bytes > 0 and split.pipeline_bytes > 0 and split.data_bytes > 0
    assert split.communication_seconds > 0 and split.step_seconds == split.compute_seconds + split.communication_seconds
    assert stage_ranges(config.model, 2) == [range(0, 4), range(4, 8)]
    assert stage_ranges(config.model, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]  # split evenly


def test_checkpointing_and_truncation_save_activation_memory_and_n_costs_it():
    config = tiny()
    layout = Layout(1, 1, 1, 0, "none", 8, 1, 1)
    plain = estimate(config, layout, TINY)
    per_pass = estimate(config, Layout(1, 1, 1, 0, "pass", 8, 1, 1), TINY)
    assert per_pass.activations + per_pass.held_states + per_pass.recompute < plain.activations
    assert estimate(config, layout, TINY, passes=6).activations > plain.activations
    truncated = config.model_copy(update={"sleep": config.sleep.model_copy(update={"grad_passes": 1})})
    assert (
        estimate(truncated, layout, TINY, passes=6).activations < estimate(config, layout, TINY, passes=6).activations
    )
    assert per_pass.flops > plain.flops  # recomputation


def test_largest_n_is_the_last_that_fits():
    config = tiny()
    layout = config_layout(config, 1)
    at_five = estimate(config, layout, TINY, passes=5).total
    at_six = estimate(config, layout, TINY, passes=6).total
    assumed = Assumptions(40, (at_five + at_six) / 2, 1e12, 0.5, reserve=0)
    assert at_six > at_five
    assert largest_passes(config, layout, assumed) == 5


def test_search_lists_fitting_layouts_first_fastest_first():
    config = tiny(train={"grad_accumulation": 2})
    layouts = candidate_layouts(config, 4)
    assert all(l.gpus == 4 and l.micro_batch * l.grad_accumulation * l.data == 8 * 2 * 4 for l in layouts)
    assert not any(l.zero_stage == 3 and l.tensor * l.pipeline > 1 for l in layouts)
    assert not any(l.checkpoint == "window" and l.pipeline > 1 for l in layouts)
    found = search(config, 4, TINY)
    fits = [e.fits for e in found]
    assert fits == sorted(fits, reverse=True)
    speeds = [e.tokens_per_second for e in found if e.fits]
    assert speeds == sorted(speeds, reverse=True)


def write(tmp_path, config) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    return str(path)


def test_a_config_that_does_not_fit_gets_one_line_with_how_much_and_which_lever(tmp_path, capsys):
    path = write(tmp_path, tiny())
    status = main(
        [
            "plan",
            path,
            "sleep.checkpoint=none",
            "sleep.passes=8",
            "--gpus",
            "1",
            "--gpu-memory",
            "0.02",
            "--sequence-length",
            "64",
            "--reserve-gb",
            "0",
            "--largest-n",
        ]
    )
    out = capsys.readouterr().out.strip().splitlines()
    assert status == 1
    assert out[-2].startswith("largest N that fits this layout: ")
    answer = out[-1]
    assert answer.startswith("sleepscale plan: does not fit: TP1 x PP1 x DP1, ZeRO-0, checkpoint none")
    assert "GB more than 0 GB" in answer or "more than" in answer
    # the fastest fitting lever is a recomputation form (pass and block recompute the same FLOPs)
    assert re.search(r"sleep\.checkpoint=(pass|block|nested|selective|window) makes it fit", answer), answer


def test_a_config_that_fits_exits_0_with_the_breakdown(tmp_path, capsys):
    path = write(tmp_path, tiny())
    assert main(["plan", path, "--gpus", "1", "--gpu-memory", "1", "--sequence-length", "64", "--reserve-gb", "0"]) == 0
    out = capsys.readouterr().out
    assert "layout: TP1 x PP1 x DP1, ZeRO-0, checkpoint pass, micro-batch 8 x 1, N=3" in out
    assert "activations saved for backward" in out and "fits" in out and "tokens/s" in out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--gpus", "3"], "--gpus 3 is not a multiple of parallel.tensor x parallel.pipeline = 4"),
        (["--gpus", "4", "--mfu", "2"], "need memory and bandwidths > 0, 0 < mfu <= 1"),
        (["--gpus", "0"], "--gpus 0: give a positive integer"),
    ],
)
def test_bad_arguments_get_one_line(tmp_path, capsys, arguments, message):
    path = write(tmp_path, tiny(parallel={"tensor": 2, "pipeline": 2}))
    status = main(["plan", path, "--gpu-memory", "80", "--sequence-length", "64", *arguments])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and message in err, err


def test_smallest_gpu_count_is_the_first_with_a_layout_that_fits():
    config = tiny()
    one = min(e.total for e in search(config, 1, TINY))
    two = min(e.total for e in search(config, 2, TINY))
    assert two < one  # tensor or pipeline ranks split the model
    assumed = Assumptions(40, (one + two) / 2, 1e12, 0.5, reserve=0)
    found = smallest_gpus(config, assumed)
    assert found.layout.gpus == 2 and found.fits


def test_muon_runs_deepspeed_at_stage_0_shards_its_own_state_and_counts_its_collectives():
    """TP2 x DP2 (Muon under tensor parallelism): at train.zero_stage 1 and 2 each data rank holds about
    half the optimizer state, DeepSpeed all-reduces the gradients (P) at every stage, and Muon's
    gathers, scatters and broadcasts are counted and timed."""
    config = tiny(optimizer={"name": "muon"})
    found = {zero: estimate(config, Layout(2, 1, 2, zero, "pass", 8, 1, 1), TINY) for zero in (0, 1, 2)}
    adamw = estimate(tiny(), Layout(2, 1, 2, 0, "pass", 8, 1, 1), TINY)
    parameters = list(_stage_optimized(config.model, 2, (range(8),), 0))
    elements = sum(p.elements for p in parameters)
    for zero, muon in found.items():
        assert (muon.weights, muon.gradients) == (adamw.weights, adamw.gradients) == (4 * elements, 4 * elements)
        assert muon.data_bytes == 4 * elements  # DeepSpeed's stage-0 all-reduce, whatever train.zero_stage
        assert muon.tensor_bytes == adamw.tensor_bytes
        sent = muon_sent_bytes(parameters, zero, 2, 2)
        assert muon.optimizer_bytes == max(sum(rank) for rank in sent.values()) > 0
        assert muon.communication_seconds > adamw.communication_seconds
    assert found[1].optimizer < 0.55 * found[0].optimizer < adamw.optimizer  # no master copy, 1 state a matrix element
    assert found[1].optimizer_bytes > found[0].optimizer_bytes  # AdamW parameters shared too
    assert dataclasses.replace(found[2], layout=found[1].layout) == found[1]  # ZeRO-2 is ZeRO-1 for Muon
    assert adamw.optimizer_bytes == 0


def test_muon_layouts_leave_out_zero_3_and_the_lever_that_fits_is_muons_zero_1(tmp_path, capsys):
    config = tiny(optimizer={"name": "muon"}, train={"micro_batch_size": 1, "grad_accumulation": 2})
    config = config.model_copy(update={"sleep": config.sleep.model_copy(update={"grad_passes": 1})})
    layouts = candidate_layouts(config, 4)
    assert not any(layout.zero_stage == 3 for layout in layouts)
    assert any(layout.tensor == 2 and layout.zero_stage in (1, 2) for layout in layouts)
    zero0, zero1 = (estimate(config, Layout(1, 1, 4, zero, "pass", 1, 2, 1), TINY) for zero in (0, 1))
    assert zero1.total < zero0.total
    assumed = Assumptions(40, (zero0.total + zero1.total) / 2, 1e12, 0.5, reserve=0)
    answer = advice(config, estimate(config, zero0.layout, assumed), assumed)
    assert "train.zero_stage=1 makes it fit" in answer and "zero_stage=3" not in answer, answer


@pytest.mark.parametrize("tied", [False, True])
def test_a_stages_parameters_are_its_models_in_the_optimizers_order(tied):
    """What the planner gives Muon's assignment is the stage's model (`cut_to_blocks`), parameter by
    parameter in module order, with Muon's matrices marked (tensor-parallel shards: the torchrun test
    in test_planner_communication.py)."""
    config = tiny(model={"tie_embeddings": True, "pattern": "AGAG"} if tied else {})
    stages = config.model.stage_ranges
    for index, blocks in enumerate(stages):
        with torch.device("meta"):
            model = cut_to_blocks(HybridLM(config.model), blocks)
        expected = [
            Parameter(tuple(p.shape), tuple(p.shape), is_hidden_matrix(n, p)) for n, p in model.named_parameters()
        ]
        assert list(_stage_optimized(config.model, 1, tuple(stages), index)) == expected
        assert any(p.muon for p in expected) and not all(p.muon for p in expected)


def test_the_search_tries_every_recomputation_form_and_fewer_micro_batches_in_flight():
    """Without pipelining every form of `sleep.checkpoint` (window included); with it every form but
    window, each with the pipeline's depth in flight and half of it and 1, at most the step's
    micro-batches; a layout says its in-flight count and the overrides that run it."""
    config = tiny(train={"micro_batch_size": 1, "grad_accumulation": 8})
    layouts = candidate_layouts(config, 4)
    for pipeline, forms in ((1, set(CHECKPOINT_FORMS)), (2, set(CHECKPOINT_FORMS) - {"window"})):
        shaped = [l for l in layouts if l.pipeline == pipeline and l.tensor == 1 and l.zero_stage == 0]
        assert (
            {l.checkpoint for l in shaped}
            == forms
            == {"none", "pass", "block", "nested", "selective", "window"} & forms
        )
        assert {l.in_flight for l in shaped} == ({1} if pipeline == 1 else {2, 1})
        assert len(shaped) == len(set(shaped)) == len(forms) * (1 if pipeline == 1 else 2)
    assert in_flight_choices(config, 8, 32) == [8, 4, 1] and in_flight_choices(config, 8, 3) == [3, 1]
    layout = Layout(2, 2, 1, 1, "nested", 1, 8, 1)
    assert layout.describe() == "TP2 x PP2 x DP1, ZeRO-1, checkpoint nested, micro-batch 1 x 8, 1 in flight"
    assert layout.overrides().endswith(
        "sleep.checkpoint=nested train.micro_batch_size=1 train.grad_accumulation=8 parallel.pipeline_in_flight=1"
    )
    assert "in flight" not in Layout(2, 1, 2, 1, "pass", 1, 8, 1).describe()
    fewer = estimate(config, layout, TINY)
    more = estimate(config, dataclasses.replace(layout, in_flight=2), TINY)
    assert fewer.activations * 2 == more.activations and fewer.pipeline_idle > more.pipeline_idle


def test_layouts_whose_model_states_alone_do_not_fit_are_not_traced(monkeypatch, capsys):
    """Model states and reserve over the GPU memory: no activation trace (counted), the layout listed
    as not fitting with its model states, in the table's summary line."""
    config = tiny(train={"micro_batch_size": 1, "grad_accumulation": 8})
    traced = []
    real = estimate_module.micro_batch_activations
    monkeypatch.setattr(estimate_module, "micro_batch_activations", lambda *a, **k: traced.append(a) or real(*a, **k))
    model_states = lambda e: e.weights + e.gradients + e.optimizer + e.buffers  # noqa: E731
    whole = estimate(config, Layout(1, 1, 4, 0, "none", 1, 2, 1), TINY)
    assumed = Assumptions(40, model_states(whole) - 1, 1e12, 0.5, reserve=0)  # ZeRO-0 without model parallelism: out
    traced.clear()
    found = search(config, 4, assumed)
    untraced = [e for e in found if not e.traced]
    assert untraced and len(traced) == len(found) - len(untraced) > 0
    for e in untraced:
        assert not e.fits and e.activations == e.held_states == e.recompute == 0
        assert e.total == model_states(e) > assumed.gpu_memory
    assert all(model_states(e) <= assumed.gpu_memory for e in found if e.traced)
    lines = table(found).splitlines()
    assert len(lines) == 1 + len(found) - len(untraced) + 1
    assert lines[-1].startswith(f"and {len(untraced)} layouts not traced") and "TP1 x PP1 ZeRO-0" in lines[-1]


def test_the_parts_a_search_shares_equal_their_uncached_evaluation():
    """FLOPs, tensor-parallel and pipeline bytes cached per micro-batch plan (times the accumulation)
    and the pipeline's idle fraction cached per traversals equal the step's own evaluation."""
    config = tiny(train={"micro_batch_size": 2, "grad_accumulation": 3})
    layout = Layout(2, 2, 1, 1, "nested", 2, 3, 2)
    found = estimate(config, layout, TINY)
    sleep = config.sleep.model_copy(update={"checkpoint": "nested"})
    plan = make_plan(sleep, 2, TINY.length, len(config.model.blocks), range(*config.model.loop_range))
    stages = stage_ranges(config.model, 2)
    with torch.device("meta"):
        model = HybridLM(config.model)
    plans = [plan] * 3
    assert found.tensor_bytes == tensor_parallel_bytes(plans, model, 2, 4) // 2 > 0
    assert found.pipeline_bytes == max(pipeline_bytes(plans, stages, config.model.hidden_size, 4)) > 0
    assert found.flops == plan_flops(plan, model, sleep.window) * 3
    schedule = build_schedule([traversals(plan, stages)] * 3, 2, 2)
    assert found.pipeline_idle == simulate(schedule).idle_fraction() > 0
    # the checkpointing form changes neither the traversals nor the schedule: one simulation for both
    estimate_module._pipeline_idle.cache_clear()
    estimate(config, dataclasses.replace(layout, checkpoint="pass"), TINY)
    estimate(config, layout, TINY)
    assert estimate_module._pipeline_idle.cache_info().misses == 1


def test_largest_n_looks_up_to_128(monkeypatch):
    """`largest_passes` bisects up to LARGEST_PASSES = 128 (each N asked is a trace of N passes)."""
    assert LARGEST_PASSES == 128
    asked = []

    def fits_up_to(limit):
        def fake(config, layout, assumed, passes=None):
            asked.append(passes)
            return types.SimpleNamespace(fits=passes <= limit)

        return fake

    for limit, expected in ((100, 100), (127, 127), (128, 128), (500, 128), (0, 0)):
        monkeypatch.setattr(estimate_module, "estimate", fits_up_to(limit))
        asked.clear()
        assert largest_passes(tiny(), None, TINY) == expected
        assert max(asked) <= 128 and len(asked) <= 16
