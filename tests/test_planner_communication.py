"""Communication per training step (`sleepscale.planner.communication`): predicted against measured
on two gloo ranks (tensor parallelism: the payload of every collective that reaches the process
group; pipeline: `run_step`'s sent bytes), Muon's collectives against `Muon.sent_bytes` on two and
four ranks, and the formulas on small cases by hand."""

import json
import os
import subprocess

import pytest
import torch
from conftest import make_config
from train_helpers import torchrun_command

from sleepscale.model.hybrid import HybridLM
from sleepscale.plan import make_plan
from sleepscale.planner.communication import (
    all_reduce_wire_factor,
    data_parallel_bytes,
    muon_sent_bytes,
    pipeline_bytes,
    tensor_parallel_bytes,
    tensor_parallel_phases,
)
from sleepscale.planner.model_states import Parameter, muon_owners


@pytest.fixture(scope="module")
def two_rank_reports(tmp_path_factory) -> tuple[dict, dict]:
    """One two-rank launch: the tensor and pipeline report, then the Muon report on two ranks."""
    tmp = tmp_path_factory.mktemp("communication")
    out, muon = tmp / "report.json", tmp / "muon.json"
    subprocess.run(
        torchrun_command(
            int("2"),
            "tests/planner_communication_ranks.py",
            str(out),
            str(muon),
        ),
        check=True,
        capture_output=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.read_text()), json.loads(muon.read_text())


@pytest.mark.slow
def test_predicted_bytes_equal_the_measured_under_tensor_and_pipeline_parallelism(two_rank_reports):
    report, _ = two_rank_reports
    for case, result in report["tensor"].items():
        assert result["measured"] == result["predicted"], (case, result)  # [forward, backward with recomputation]
        # training gathers no logits: every collective is an all-reduce
        assert all(call.startswith("c10d::allreduce_ ") for call in result["calls"]), (case, result["calls"])
    for case, result in report["pipeline"].items():
        assert result["measured"] == result["predicted"], (case, result)  # per stage
    tensor = report["tensor"]
    # bf16 autocast halves the row-parallel outputs' all-reduces, not the float32 ones
    assert tensor["bf16-pass-sliding"]["calls"].keys() == {
        "c10d::allreduce_ torch.float32",
        "c10d::allreduce_ torch.bfloat16",
    }
    assert tensor["bf16-pass-sliding"]["measured"][0] < tensor["N3-pass-sliding"]["measured"][0]
    # window checkpointing re-runs the whole forward in backward but for each slept window's last all-reduce
    # (windows of 2 x 8 tokens twice, of 3 x 8 once; hidden 16, float32); tying the embedding changes nothing
    forward, backward = tensor["N3-tied"]["measured"]
    assert tensor["N3-window"]["measured"][1] - backward == forward - 4 * 16 * (2 * 8 * 2 + 3 * 8)
    # selective checkpointing keeps the row-parallel matmuls' outputs and megatron's all-reduces of them:
    # its recomputation sends nothing, as without checkpointing (N3-tied: tying changes nothing); nested
    # re-runs more than pass, pass more than block
    assert tensor["N3-selective"]["measured"] == tensor["N3-tied"]["measured"]
    assert tensor["N3-selective"]["measured"][1] < tensor["N3-block"]["measured"][1]
    assert (
        tensor["N3-block"]["measured"][1]
        < tensor["N3-pass-sliding"]["measured"][1]
        < tensor["N3-nested"]["measured"][1]
    )


def run_ranks(script: str, out, ranks: int = 2, timeout: int = 300) -> dict:
    subprocess.run(
        torchrun_command(
            ranks,
            script,
            str(out),
        ),
        check=True,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4], ids=["DP2-and-TP2", "TP2xDP2"])
def test_muon_sent_bytes_equal_the_measured_per_rank(request, tmp_path, ranks):
    """Per rank and group (tensor, data), at train.zero_stage 0 and 1: the prediction equals the bytes
    counted at Muon's collectives, which equal `Muon.sent_bytes`; the planner's parameters, owners and
    per-rank state are the optimizer's; and each phase of the step holds at its largest the bytes the
    planner gives it (`_muon_step_phases`, by a census). Two ranks: from the launch above."""
    if ranks == 2:
        _, report = request.getfixturevalue("two_rank_reports")
    else:
        report = run_ranks("tests/planner_optimizer_ranks.py", tmp_path / "report.json", ranks, timeout=600)
    assert set(report) == (
        {"TP2xDP2-zero0", "TP2xDP2-zero1"}
        if ranks == 4
        else {"TP1xDP2-zero0", "TP1xDP2-zero1", "TP2xDP1-zero0", "TP2xDP1-zero1"}
    )
    for case, results in report.items():
        for rank in results:
            assert rank["counted"] == rank["predicted"], (case, rank)
            assert sum(rank["counted"]) == rank["sent_bytes"], (case, rank)
            assert rank["state_elements"] == rank["predicted_state_elements"], (case, rank)
            assert rank["description_is_the_planners"], (case, rank)
            assert rank["step_bytes"] == rank["predicted_step_bytes"], (case, rank)
        assert sum(rank["newton_schulz_runs"] for rank in results) == results[0]["matrices"], case  # once each
    # the model's data ranks own different bytes (the check tells them apart); state sharding adds AdamW's
    data = [tuple(rank["counted"]) for rank in report["TP1xDP2-zero1" if ranks == 2 else "TP2xDP2-zero1"]]
    assert len(set(data)) > 1
    zero0, zero1 = (report[f"TP1xDP2-zero{z}" if ranks == 2 else f"TP2xDP2-zero{z}"] for z in (0, 1))
    assert all(a["counted"][1] < b["counted"][1] for a, b in zip(zero0, zero1))


def test_muon_sent_bytes_by_hand():
    """Two Muon matrices (an 8 x 4 shard of 16 x 4 split by rows, and a replicated 4 x 4) and an AdamW
    vector, over T = 2 tensor and D = 2 data ranks."""
    parameters = [Parameter((8, 4), (16, 4), True), Parameter((4, 4), (4, 4), True), Parameter((6,), (6,), False)]
    owners = muon_owners(parameters, 2, 2)
    (big, small, vector) = owners
    assert big != small and vector[1] is None
    for zero_stage in (0, 1):
        sent = muon_sent_bytes(parameters, zero_stage, 2, 2)
        expected = {(d, t): [0, 0] for d in (0, 1) for t in (0, 1)}
        # the split matrix: gathered to its owner (4 x 32 from the other tensor rank), scattered back (4 x 32)
        expected[big][0] += 4 * 32
        expected[big[0], 1 - big[1]][0] += 4 * 32
        # the replicated one: no gather, its update broadcast over the tensor group
        expected[small][0] += 4 * 16
        # each data rank broadcasts its matrices' shards (and with state sharding its AdamW parameters)
        for (d, _), elements in ((big, 32), (small, 16)) + (((vector, 6),) if zero_stage else ()):
            for t in (0, 1):
                expected[d, t][1] += 4 * elements
        assert sent == {rank: tuple(b) for rank, b in expected.items()}, zero_stage
    assert muon_sent_bytes(parameters, 1, 1, 1) == {(0, 0): (0, 0)}


def shapes(config) -> HybridLM:
    with torch.device("meta"):
        return HybridLM(config.model)


def plan_of(config, batch: int, length: int):
    return make_plan(config.sleep, batch, length, len(config.model.blocks), range(*config.model.loop_range))


@pytest.mark.parametrize("checkpoint", ["none", "pass", "block", "nested", "selective"])
def test_tensor_parallel_bytes_of_one_window_by_hand(checkpoint):
    """An attention block and a GDN block, both with MLP, one window of 2 x 8 tokens at hidden 16."""
    config = make_config(pattern="AG", passes=1, checkpoint=checkpoint)
    model = shapes(config)
    activation = 4 * 2 * 8 * 16  # float32 [batch, window, hidden]
    # embedding, cross-entropy's three [B, L] reductions, two row-parallel layers per block
    forward = activation + 3 * 4 * 2 * 8 + 4 * activation
    # the head's input gradient, mixer and MLP input gradients per block, GDN's output-norm weight gradient
    backward = activation + 4 * activation + 4 * model.layers[1].attn.head_v_dim
    # re-run: the pass but its last all-reduce; each block but its last; nested: the first block whole, then
    # each block but its last; selective: none (each all-reduce kept with the matmul it reduces)
    backward += {"none": 0, "pass": 3, "block": 2, "selective": 0, "nested": 2 + 2}[checkpoint] * activation
    assert tensor_parallel_phases([plan_of(config, 2, 8)], model, tensor=2) == (forward, backward)
    assert tensor_parallel_bytes([plan_of(config, 2, 8)], model, tensor=1) == 0


def test_sleep_adds_the_loop_blocks_per_pass_without_checkpointing():
    """N = 3 over 3 windows, 2 slept on: each sleep pass adds the loop's forward all-reduces and, but
    for the last pass's output-only MLP of the last block, its input-gradient ones."""
    one, three = (make_config(pattern="GG", passes=n) for n in (1, 3))
    model, activation = shapes(one), 4 * 2 * 8 * 16
    plans = {n: [plan_of(config, 2, 24)] for n, config in ((1, one), (3, three))}
    forward_1, backward_1 = tensor_parallel_phases(plans[1], model, tensor=2)
    forward_3, backward_3 = tensor_parallel_phases(plans[3], model, tensor=2)
    slept = 2 * 2  # windows slept on x sleep passes
    assert forward_3 - forward_1 == slept * 4 * activation
    assert (
        backward_3 - backward_1 == slept * 4 * activation - 2 * activation
    )  # the final pass's last MLP, per slept window


def test_pipeline_bytes_match_the_ring_formula_when_the_loop_is_the_whole_stack():
    """benchmarks/pipeline.py's special case: 2 M [W (P-1) + (W-1)(N-1) P] B L H x 4 bytes per step."""
    config = make_config(pattern="GG|GG", passes=3)
    plans = [plan_of(config, 2, 24)] * 3  # M = 3 micro-batches of 3 windows of 8
    sent = pipeline_bytes(plans, config.model.stage_ranges, hidden_size=16)
    assert sent[0] == sent[1] and sum(sent) == 2 * 3 * (3 * 1 + 2 * 2 * 2) * 2 * 8 * 16 * 4


def test_truncated_backprop_sends_no_gradient_into_passes_without_it():
    config = make_config(pattern="GG|GG", passes=3, grad_passes=1)
    block = 2 * 8 * 16 * 4
    # the slept window: the wake pass 0 -> 1 and its gradient back; pass 2 (no gradient) loops back
    # 1 -> 0 and goes 0 -> 1; pass 3 the same and its gradient back 1 -> 0, but none back over the loop
    # into pass 2; the last window: its wake pass
    assert pipeline_bytes([plan_of(config, 2, 16)], config.model.stage_ranges, hidden_size=16) == [4 * block, 5 * block]


def test_data_parallel_bytes_per_zero_stage():
    assert data_parallel_bytes(1000, zero_stage=0, data_parallel=4) == 4000
    assert data_parallel_bytes(1000, zero_stage=2, data_parallel=4) == 4000 + 1000
    assert data_parallel_bytes(1000, zero_stage=3, data_parallel=4, gradient_bytes=2) == 2000 + 1000
    assert data_parallel_bytes(1000, zero_stage=3, data_parallel=1) == 0
    assert all_reduce_wire_factor(2) == 1.0 and all_reduce_wire_factor(8) == 1.75


@pytest.mark.parametrize("checkpoint", ["none", "pass", "window", "block", "nested", "selective"])
def test_tensor_parallel_bytes_count_each_window_shape_once_as_each_window_alone(checkpoint):
    """Windows of one shape are counted once: the same as counting every window of every plan on its
    own, over windows that differ in length, carried states, detaching, eviction and sleepers."""
    from sleepscale.planner import communication

    config = make_config(
        pattern="AGag", passes=4, checkpoint=checkpoint, grad_passes=2, eviction="sliding", detach_every=2
    )
    model = shapes(config)
    carries_loss = [[True, False, True, False, True, True], [False, False, True, True, True, True]]
    plans = [
        plan_of(config, 2, 44),
        plan_of(config, 3, 20),
        make_plan(config.sleep.model_copy(update={"sleep_on": "context"}), 2, 44, 4, range(4), carries_loss),
    ]
    blocks = communication._Blocks(model)
    alone = [0, len(plans) * blocks.head_norm_bytes]
    for plan in plans:
        for window in plan.windows:
            alone = [a + b for a, b in zip(alone, communication._window(plan, window, blocks, 2))]
    assert tensor_parallel_phases(plans, model, tensor=2, activation_bytes=2) == tuple(alone)
