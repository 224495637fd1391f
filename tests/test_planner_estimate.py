"""`sleepscale plan`: layouts, the per-GPU estimate, the searches and the one-line answer."""

import dataclasses

import pytest
import torch
import yaml
from conftest import make_config

from sleepscale.cli import main
from sleepscale.model.hybrid import HybridLM, cut_to_blocks
from sleepscale.planner.communication import muon_sent_bytes
from sleepscale.planner.estimate import (
    GB,
    Assumptions,
    Layout,
    _stage_optimized,
    advice,
    candidate_layouts,
    config_layout,
    estimate,
    largest_passes,
    search,
    smallest_gpus,
    stage_ranges,
)
from sleepscale.planner.model_states import Parameter
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
    assert "sleep.checkpoint=pass makes it fit" in answer, answer


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
