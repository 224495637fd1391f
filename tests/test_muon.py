"""Our Muon on one rank against plain references; its balanced assignment; its config rules."""

import pytest
import torch
from conftest import make_config

from sleepscale.config import ConfigError, OptimizerConfig
from sleepscale.model import build_model
from sleepscale.train.muon import Muon, MuonLayout, assign_owners, newton_schulz
from sleepscale.train.optim import build_optimizer, is_hidden_matrix


def test_newton_schulz_in_bfloat16_is_the_float32_iteration_to_bfloat16_precision():
    torch.manual_seed(0)
    for shape in [(16, 48), (48, 16), (32, 32)]:
        matrix = torch.randn(shape)
        exact = newton_schulz(matrix, 5, torch.float32)
        assert (newton_schulz(matrix, 5, torch.bfloat16) - exact).norm() < 0.05 * exact.norm()
        if shape[0] > shape[1]:  # tall matrices are scaled by sqrt(rows / columns)
            assert torch.linalg.svdvals(exact).mean() > 0.8 * (shape[0] / shape[1]) ** 0.5


def test_newton_schulz_in_float32_brings_singular_values_near_one():
    torch.manual_seed(0)
    matrix = torch.randn(24, 64) @ torch.diag(torch.logspace(-2, 1, 64))
    singular = torch.linalg.svdvals(newton_schulz(matrix, 5, torch.float32))
    assert singular.min() > 0.5 and singular.max() < 1.5


def test_one_step_equals_the_update_written_out():
    """Momentum, Nesterov, Newton-Schulz, decoupled decay for matrices; AdamW with bias correction
    for the rest (Keller Jordan's Muon with its auxiliary Adam)."""
    torch.manual_seed(0)
    matrix, vector = torch.nn.Parameter(torch.randn(8, 12)), torch.nn.Parameter(torch.randn(12))
    config = OptimizerConfig(name="muon", muon_lr=0.02, lr=0.003, weight_decay=0.1, muon_ns_dtype="float32")
    optimizer = Muon([matrix], [vector], config, MuonLayout())
    expected_matrix, expected_vector = matrix.detach().clone(), vector.detach().clone()
    momentum, first, second = torch.zeros(8, 12), torch.zeros(12), torch.zeros(12)
    for step in range(1, 4):
        matrix.grad, vector.grad = torch.randn(8, 12), torch.randn(12)
        momentum = 0.95 * momentum + 0.05 * matrix.grad
        nesterov = 0.05 * matrix.grad + 0.95 * momentum
        expected_matrix = expected_matrix * (1 - 0.02 * 0.1) - 0.02 * newton_schulz(nesterov, 5, torch.float32)
        first, second = 0.9 * first + 0.1 * vector.grad, 0.95 * second + 0.05 * vector.grad**2
        corrected = (first / (1 - 0.9**step)) / ((second / (1 - 0.95**step)).sqrt() + 1e-8)
        expected_vector = expected_vector - 0.003 * corrected
        optimizer.step()
        torch.testing.assert_close(matrix.detach(), expected_matrix, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vector.detach(), expected_vector, rtol=1e-5, atol=1e-6)
    assert optimizer.newton_schulz_runs == 3


def test_an_overflowing_step_changes_nothing():
    matrix = torch.nn.Parameter(torch.randn(8, 12))
    optimizer = Muon([matrix], [], OptimizerConfig(name="muon"), MuonLayout())
    before = matrix.detach().clone()
    matrix.grad = torch.randn(8, 12)
    optimizer.overflow = True
    optimizer.step()
    assert torch.equal(matrix.detach(), before) and not optimizer.state and optimizer.newton_schulz_runs == 0


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = build_model(make_config().model)
    optimizer = build_optimizer(model, OptimizerConfig(name="muon"), skips_on_overflow=True)
    muon, adam = (group["params"] for group in optimizer.param_groups)
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[id(p)] for p in muon} == {n for n, p in model.named_parameters() if is_hidden_matrix(n, p)}
    assert all(p.dim() == 2 and ".layers." in f".{names[id(p)]}" for p in muon)
    assert any("embed" in names[id(p)] for p in adam) and any("a_proj" in names[id(p)] for p in adam)


def test_assignment_is_balanced_largest_first():
    owners = assign_owners([5, 3, 3, 2, 2, 1], 2)
    loads = [sum(c for c, o in zip([5, 3, 3, 2, 2, 1], owners) if o == r) for r in range(2)]
    assert loads == [8, 8] and owners == assign_owners([5, 3, 3, 2, 2, 1], 2)
    assert assign_owners([1.0] * 6, 4) == [0, 1, 2, 3, 0, 1]
    assert assign_owners([4, 1], 2, loads=[10.0, 0.0]) == [1, 1]


def test_sharded_state_loads_only_at_the_layout_that_wrote_it():
    matrix = torch.nn.Parameter(torch.randn(8, 12))
    written = Muon([matrix], [], OptimizerConfig(name="muon"), MuonLayout()).state_dict()
    written["sharding"] = {**written["sharding"], "data_size": 2, "shard_state": True}
    sharded = Muon([matrix], [], OptimizerConfig(name="muon"), MuonLayout(shard_state=True))
    with pytest.raises(ConfigError, match="resume at the layout that wrote it"):
        sharded.load_state_dict(written)
