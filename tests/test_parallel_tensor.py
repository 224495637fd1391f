"""Tensor parallelism (megatron-core layers over gloo ranks) against the unsharded model."""

import json
import os
import re
import subprocess

import pytest
from conftest import make_config
from train_helpers import torchrun_command

from sleepscale.config import ConfigError, validate
from sleepscale.parallel.groups import check_layout


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """One launch of tests/parallel_tensor_ranks.py on two ranks (process start-up is most of its time)."""
    out = tmp_path_factory.mktemp("tensor") / "report.json"
    subprocess.run(
        torchrun_command(2, "tests/parallel_tensor_ranks.py", str(out)),
        check=True,
        capture_output=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_tensor_parallel_ranks_equal_the_unsharded_model_with_three_sleep_passes(report):
    """Also with every option of pretrained checkpoints on (case sliding-features-fp64)."""
    report = dict(report)
    report.pop("forms")
    collectives = report.pop("collectives")
    assert set(report) == {"hard", "sliding", "hard-tied", "sliding-fp64", "sliding-features-fp64"}
    for case, result in report.items():
        assert result["grad_names_match"] and result["gdn_state_is_own_heads"], case
        tolerance = 1e-12 if case.endswith("fp64") else 1e-5
        assert result["logits"] < tolerance, (case, result)
        # megatron's vocab-parallel cross-entropy computes in fp32 whatever the model's dtype
        assert (
            max(result["loss"], result["grads"], result["tp_to_unsharded_loss"], result["unsharded_to_tp_loss"]) < 1e-5
        ), (case, result)
    # One block pass over a window of 2 x 8 tokens at hidden size 16: in forward, one all-reduce of the
    # activations after each row-parallel layer (the mixer's o_proj, the MLP's down_proj); in backward,
    # one of the input gradient per mixer and per MLP (not one per column-parallel projection: six for
    # a GDN mixer), and for a GDN mixer the sum of its per-head output norm's weight gradient.
    activations = 2 * 8 * 16
    for letter, counted in collectives.items():
        parts = 2 if letter in "AG" else 1  # mixer, and MLP (capital letters)
        norm = [counted["head_v_dim"]] if letter in "Gg" else []
        assert counted["forward"] == [activations] * parts, (letter, counted)
        assert counted["backward"] == [activations] * parts + norm, (letter, counted)


@pytest.mark.slow
@pytest.mark.parametrize("options", ["grad1-sliding", "hard"])
@pytest.mark.parametrize("form", ["block", "nested", "selective"])
def test_recomputation_forms_equal_no_checkpointing_under_tensor_parallelism(report, form, options):
    """Loss, logits and every gradient shard on both ranks, bit for bit, N=3."""
    assert report["forms"][f"{form}-{options}"]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"model": {"attention": {"num_heads": 4, "num_kv_heads": 1}}},
            "parallel.tensor: 2 does not divide model.attention.num_kv_heads (1)",
        ),
        (
            {"model": {"attention": {"num_heads": 2}, "gdn": {"num_heads": 1}}},
            "parallel.tensor: 2 does not divide model.gdn.num_heads (1)",
        ),
        ({"train": {"zero_stage": 3}}, "parallel.tensor: tensor parallelism needs train.zero_stage <= 2"),
    ],
)
def test_invalid_tensor_parallel_configs_fail_with_one_line(sections, message):
    data = make_config(model={"attention": {"num_heads": 2, "num_kv_heads": 2}}).model_dump(mode="json")
    for section, values in sections.items():
        data[section].update(values)
    data["parallel"] = {"tensor": 2}
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(data)
    assert validate({**data, "parallel": {"tensor": 1}})


def test_world_size_must_be_a_multiple_of_the_model_parallel_size():
    assert check_layout(8, tensor=2, pipeline=2) == 2
    with pytest.raises(
        ConfigError, match=r"parallel: world size 6 is not a multiple of tensor 4 x pipeline 1; launch a multiple of 4"
    ):
        check_layout(6, tensor=4, pipeline=1)
