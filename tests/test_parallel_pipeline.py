"""Pipeline-parallel configuration: stage marks in the pattern, layouts, and what is refused (the
pipeline itself against the single process: test_pipeline.py)."""

import re

import pytest
from conftest import make_config

from sleepscale.config import ConfigError, validate
from sleepscale.parallel.groups import check_layout


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"model": {"pattern": "AGAG"}},
            "model.pattern: parallel.pipeline 2 needs 1 stage boundaries '|' in model.pattern, found 0",
        ),
        (
            {"model": {"pattern": "A|G|AG"}},
            "model.pattern: parallel.pipeline 2 needs 1 stage boundaries '|' in model.pattern, found 2",
        ),
        ({"model": {"pattern": "AG||AG"}}, "model.pattern: 'AG||AG' has a pipeline stage without blocks"),
        (
            {"train": {"zero_stage": 3}},
            "train.zero_stage: 3 with parallel.pipeline 2: ZeRO-3 partitions every parameter",
        ),
        (
            {"sleep": {"checkpoint": "window"}},
            "sleep.checkpoint: window with parallel.pipeline 2: a window spans stages",
        ),
        (
            {"model": {"tie_embeddings": True}},
            "model.tie_embeddings: true with parallel.pipeline 2: the embedding and the head",
        ),
    ],
)
def test_invalid_pipeline_configs_fail_with_one_line(sections, message):
    data = make_config(pattern="AG|AG").model_dump(mode="json")
    for section, values in sections.items():
        data[section].update(values)
    data["parallel"] = {"pipeline": 2}
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(data)


def test_stage_marks_split_the_pattern_and_are_ignored_without_pipeline_parallelism():
    config = make_config(pattern="AG|GGA|g")
    assert config.model.blocks == "AGGGAg" and config.model.loop_range == (0, 6)
    assert config.model.stage_ranges == [range(0, 2), range(2, 5), range(5, 6)]
    assert validate({**config.model_dump(mode="json"), "parallel": {"pipeline": 3}}).parallel.pipeline == 3


def test_world_size_must_be_a_multiple_of_tensor_times_pipeline():
    assert check_layout(8, tensor=2, pipeline=2) == 2
    with pytest.raises(
        ConfigError, match=r"parallel: world size 6 is not a multiple of tensor 1 x pipeline 4; launch a multiple of 4"
    ):
        check_layout(6, tensor=1, pipeline=4)
