"""`sleepscale.planner.model_states`: the model-state bytes of a rank under ZeRO 0-3 with AdamW and
under our Muon at `train.zero_stage` 0-2, against a census of live tensors in real DeepSpeed engines
on two gloo ranks (and on one, to compare), and the formulas' behaviour."""

import json
import os
import subprocess

import pytest
import torch
from conftest import make_config
from train_helpers import torchrun_command

from sleepscale.config import OptimizerConfig
from sleepscale.parallel.zero import deepspeed_config
from sleepscale.planner.model_states import (
    REDUCE_BUCKET_SIZE,
    Parameter,
    _muon_step_elements,
    _muon_step_phases,
    model_state_bytes,
    muon_assignment,
    muon_owners,
    muon_state_bytes,
)
from sleepscale.train.muon import Muon, MuonLayout

CATEGORIES = ("weights", "gradients", "optimizer", "buffers")


def settings(zero_stage: int, **zero) -> dict:
    config = make_config()
    config = config.model_copy(update={"train": config.train.model_copy(update={"zero_stage": zero_stage})})
    ds = deepspeed_config(config)
    ds["zero_optimization"].update(zero)
    return ds


def census(out, ranks: int, *cases: str) -> dict:
    subprocess.run(
        torchrun_command(
            ranks,
            "tests/planner_model_states_ranks.py",
            str(out),
            *cases,
        ),
        check=True,
        capture_output=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Every case on two data ranks."""
    return census(tmp_path_factory.mktemp("model_states") / "report.json", 2)


@pytest.fixture(scope="module")
def measured_on_one_rank(tmp_path_factory):
    return census(tmp_path_factory.mktemp("model_states") / "report.json", 1, "adamw1", "muon1", "muon2")


CASES = ["adamw0", "adamw1", "adamw2", "adamw3", "muon0", "muon1", "muon2"]  # optimizer, train.zero_stage


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_prediction_matches_a_census_of_the_engines_tensors(measured, case):
    """The total within 5% of the largest the four categories sum to at one moment of a step, and
    each category within 1% of its own largest, on the rank that holds the most. With Muon, each
    rank's optimizer holds the state elements the planner's owners give it, and its step holds at its
    largest the bytes the planner gives the rank (whether or not DeepSpeed's flat copy is larger)."""
    ranks = measured[case]
    predicted = ranks[0]["predicted"]
    for category in (*CATEGORIES, "total"):
        largest = max(rank["measured"][category] for rank in ranks)
        tolerance = 0.05 if category == "total" else 0.01
        assert predicted[category] == pytest.approx(largest, rel=tolerance), (category, ranks)
    for rank in ranks:
        # between steps every live tensor of the engine is in a category: nothing else is held
        assert rank["after_step"]["other"] < 4096, rank
        assert rank["after_step"]["claimed_not_in_gc"] == 0, rank
        if case.startswith("muon"):
            assert rank["state_elements"]["measured"] == rank["state_elements"]["predicted"], rank
            assert rank["muon_step"]["measured"] == rank["muon_step"]["predicted"], rank


@pytest.mark.slow
@pytest.mark.parametrize("case", ["adamw1", "muon1", "muon2"])
def test_two_data_ranks_hold_at_most_055_of_one_ranks_optimizer_state(measured, measured_on_one_rank, case):
    """The issue's acceptance check, by census: at DP2 each rank's optimizer state (Muon's momentum and
    AdamW moments; DeepSpeed's AdamW moments and master partition) is at most 0.55 x DP1's, and the
    planner predicts both."""
    one, two = measured_on_one_rank[case], measured[case]
    assert max(rank["measured"]["optimizer"] for rank in two) <= 0.55 * one[0]["measured"]["optimizer"]
    for ranks in (one, two):
        assert ranks[0]["predicted"]["optimizer"] == pytest.approx(
            max(rank["measured"]["optimizer"] for rank in ranks), rel=0.01
        )


SIZES = [4096 * 1024, 1024, 1024 * 4096, 4096, 3 * 1024 * 1024 + 7]  # a few matrices, norms, an odd size
N = sum(SIZES)


def test_zero0_holds_16_bytes_a_parameter_and_a_flat_copy_of_the_gradients():
    states = model_state_bytes(SIZES, 0, 2, settings(0))
    assert (states.weights, states.gradients, states.optimizer) == (4 * N, 4 * N, 8 * N)
    assert states.buffers == 4 * N  # the all-reduce's flattened gradients (one bucket: N < 5e8)
    assert states.total == 20 * N


def test_zero0_does_not_depend_on_data_parallel():
    assert model_state_bytes(SIZES, 0, 1, settings(0)) == model_state_bytes(SIZES, 0, 8, settings(0))


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero12_optimizer_states_and_master_weights_halve_over_two_ranks(zero_stage):
    one, two = (model_state_bytes(SIZES, zero_stage, d, settings(zero_stage)) for d in (1, 2))
    assert one.optimizer == 12 * (N + 1)  # master copy + exp_avg + exp_avg_sq, of N padded to 2 elements
    assert two.optimizer == pytest.approx(one.optimizer / 2, abs=16)
    assert one.weights == two.weights == pytest.approx(4 * N, abs=16)  # the flat buffer is not partitioned
    assert one.buffers == two.buffers == 4 * REDUCE_BUCKET_SIZE


def test_zero1_keeps_every_gradient_until_backward_ends_zero2_only_its_partition():
    zero1, zero2 = (model_state_bytes(SIZES, stage, 4, settings(stage)) for stage in (1, 2))
    assert zero1.gradients == 4 * N
    # ZeRO-2: the whole parameters overlapping the largest partition, plus the flat partition
    assert N // 4 * 4 < zero2.gradients < zero1.gradients


def test_zero12_reduce_bucket_follows_the_settings():
    assert model_state_bytes(SIZES, 2, 2, settings(2, reduce_bucket_size=1000)).buffers == 4000
    assert model_state_bytes(SIZES, 2, 2, settings(2, reduce_bucket_size=1000, overlap_comm=True)).buffers == 8000
    assert model_state_bytes(SIZES, 1, 2, settings(1, contiguous_gradients=False)).buffers == 0


def test_zero3_partitions_every_parameter_padded_to_the_ranks():
    states = model_state_bytes([5, 8], 3, 4, settings(3, reduce_bucket_size=10))
    partition = 2 + 2  # ceil(5 / 4) + 8 / 4
    assert states.weights == 4 * partition
    assert states.optimizer == 12 * partition  # master copy + exp_avg + exp_avg_sq
    assert states.gradients == 8 * partition  # the flat partition buffer + the step's flattened copy
    assert states.buffers == 4 * (10 + 13)  # the bucket + the whole model gathered


def test_zero3_gathers_at_most_the_reuse_distance_and_prefetch():
    whole = model_state_bytes(SIZES, 3, 2, settings(3, reduce_bucket_size=1))
    bounded = model_state_bytes(
        SIZES, 3, 2, settings(3, reduce_bucket_size=1, stage3_max_reuse_distance=1000, stage3_prefetch_bucket_size=24)
    )
    assert whole.buffers == 4 * (1 + N)
    assert bounded.buffers == 4 * (1 + 1000 + 24 + max(SIZES))


def test_rejects_a_stage_that_the_settings_contradict():
    with pytest.raises(ValueError):
        model_state_bytes(SIZES, 2, 2, settings(3))


def muon_parameters() -> list[Parameter]:
    """A block's matrices (Muon's), a norm and an embedding (AdamW's)."""
    return [
        Parameter((64, 16), (64, 16), False),
        Parameter((16,), (16,), False),
        *(Parameter(shape, shape, True) for shape in [(16, 16), (8, 16), (8, 16), (16, 16), (48, 16), (16, 48)]),
    ]


def muon_settings() -> dict:
    config = make_config()
    config = config.model_copy(update={"optimizer": config.optimizer.model_copy(update={"name": "muon"})})
    return deepspeed_config(config)


def test_muon_holds_deepspeeds_stage_0_weights_and_gradients_and_its_own_state():
    parameters = muon_parameters()
    matrices = sum(p.elements for p in parameters if p.muon)
    every = sum(p.elements for p in parameters)
    adam = every - matrices
    for data in (1, 4):
        zero0 = muon_state_bytes(parameters, 0, data, 1, muon_settings())
        assert (zero0.weights, zero0.gradients) == (4 * every, 4 * every)
        assert zero0.optimizer == 4 * (matrices + 2 * adam)  # momentum; exp_avg and exp_avg_sq
    one, two = (muon_state_bytes(parameters, 1, d, 1, muon_settings()) for d in (1, 2))
    assert one.optimizer == 4 * (matrices + 2 * adam)
    state = muon_assignment(parameters, 2, 1).state  # each data rank's own parameters' state, no copy
    assert sum(state) == matrices + 2 * adam and two.optimizer == 4 * max(state) < one.optimizer
    assert muon_state_bytes(parameters, 2, 2, 1, muon_settings()) == two  # ZeRO-2 shards as ZeRO-1
    # one data rank: the step's peak, each matrix's whole input or update plus the largest matrix's other
    # (2304 + 768 elements), is under the flat gradients the all-reduce copies
    assert _muon_step_elements(parameters, muon_owners(parameters, 1, 1), 0, 0, 1) == matrices + 48 * 16
    assert one.buffers == 4 * every > 4 * (matrices + 48 * 16)


def test_muon_step_phases_by_hand():
    """Over 2 tensor ranks: a 16 x 4 matrix split by rows (Newton-Schulz on tensor rank 0), a 4 x 16 split
    by columns (on 1) and a replicated 4 x 4 (on 0, the lighter Newton-Schulz to the rank with the least
    load, a tie to the lower rank)."""
    parameters = [Parameter((8, 4), (16, 4), True), Parameter((4, 8), (4, 16), True), Parameter((4, 4), (4, 4), True)]
    assert muon_owners(parameters, 1, 2) == [(0, 0), (0, 1), (0, 0)]
    # tensor rank 0: gathers its shard, the pieces and their concatenation (32 + 2 x 64); Newton-Schulz
    # of the 16 x 4: both wholes and its update (64 + 16 + 64); the first scatter: the two updates and
    # the arriving shard (64 + 16 + 32; the pieces of a split by rows are views; no input is left)
    assert _muon_step_phases(parameters, muon_owners(parameters, 1, 2), 0, 0, 2) == dict(
        gathers=160, newton_schulz=144, scatters=112
    )
    # tensor rank 1: the second scatter: its update, the previous shard applied, the arriving shard and
    # the contiguous copies of the pieces (64 + 32 + 32 + 64)
    assert _muon_step_phases(parameters, muon_owners(parameters, 1, 2), 0, 1, 2) == dict(
        gathers=160, newton_schulz=128, scatters=192
    )


def test_muon_refuses_zero3_and_deepspeed_settings_of_another_stage():
    with pytest.raises(ValueError, match="0, 1 or 2"):
        muon_state_bytes(muon_parameters(), 3, 2, 1, muon_settings())
    with pytest.raises(ValueError):
        muon_state_bytes(muon_parameters(), 1, 2, 1, settings(1))  # DeepSpeed runs stage 0 under Muon


class FakeGroup:
    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


def test_the_planners_owners_are_the_optimizers():
    """Shards of tensor-parallel matrices (rows and columns) and replicated ones, over 3 data x 2 tensor
    ranks: the planner's description gives Muon's own owners."""
    shapes = [((16, 8), 1, True), ((12, 8), 0, True), ((8, 8), None, True), ((30,), 0, False), ((8,), None, False)]
    tensors, parameters = [], []
    for shape, dim, is_muon in shapes:
        tensor = torch.nn.Parameter(torch.zeros(shape))
        whole = list(shape)
        if dim is not None:
            tensor.tensor_model_parallel, tensor.partition_dim = True, dim
            whole[dim] *= 2
        tensors.append(tensor)
        parameters.append(Parameter(shape, tuple(whole), is_muon))
    muon, adam = (
        [t for t, p in zip(tensors, parameters) if p.muon],
        [t for t, p in zip(tensors, parameters) if not p.muon],
    )
    layout = MuonLayout(data=FakeGroup(3), tensor=FakeGroup(2), shard_state=True)
    optimizer = Muon(muon, adam, OptimizerConfig(name="muon"), layout)
    expected = [
        optimizer.ns_owner[t] if p.muon else (optimizer.data_owner[t], None) for t, p in zip(tensors, parameters)
    ]
    assert muon_owners(parameters, 3, 2) == expected
    assert len({owner for owner, p in zip(expected, parameters) if p.muon}) == 3  # spread over the ranks
