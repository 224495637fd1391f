"""Config loading, overrides, and the one-line error for every invalid value."""

import pytest
import yaml

from sleepscale.cli import main
from sleepscale.config import ConfigError, validate
from sleepscale.config_loading import apply_overrides, load_config


def base():
    return {
        "model": {
            "vocab_size": 32,
            "hidden_size": 16,
            "pattern": "AGAG",
            "attention": {"num_heads": 2},
            "gdn": {"num_heads": 2},
        },
        "sleep": {"window": 8, "passes": 2},
        "train": {"steps": 10},
    }


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["model.pattern=AGXG"],
            "model.pattern: unknown block letter 'X' at position 2 "
            "(allowed: A, a, G, g, and | between pipeline stages)",
        ),
        (["model.pattern="], "model.pattern: "),
        (
            ["model.loop=[2, 7]"],
            "model.loop: [2, 7) is not a block range of the 4-block stack; need 0 <= start < end <= 4",
        ),
        (["model.loop=[3, 3]"], "model.loop: [3, 3) is not a block range"),
        (["sleep.passes=0"], "sleep.passes: Input should be greater than or equal to 1"),
        (["sleep.window=0"], "sleep.window: Input should be greater than or equal to 1"),
        (["model.attention.num_heads=3"], "model.attention.num_heads: 3 does not divide hidden_size 16"),
        (["model.gdn.num_heads=5"], "model.gdn.num_heads: 5 does not divide hidden_size 16"),
        (["model.attention.num_kv_heads=3"], "model.attention.num_kv_heads: 3 must divide attention.num_heads 2"),
        (["sleep.eviction=soft"], "sleep.eviction: Input should be 'hard' or 'sliding'"),
        (["sleep.sleep_on=always"], "sleep.sleep_on: Input should be 'evicted' or 'context'"),
        (
            ["sleep.checkpoint=layer"],
            "sleep.checkpoint: Input should be 'auto', 'none', 'pass', 'window', 'block', 'nested' or 'selective'",
        ),
        (
            ["sleep.checkpoint=selective", "train.zero_stage=3"],
            "sleep.checkpoint: selective with train.zero_stage 3: ZeRO-3 gathers weights inside each block",
        ),
        (["model.backend=cuda"], "model.backend: Input should be 'auto', 'torch', 'fla' or 'window'"),
        (
            ["model.gdn.head_dim=512"],
            "model.gdn.head_dim: 512 is above 256, the largest key head dimension fla's kernels take",
        ),
        (["model.gdn.head_dim=512", "model.backend=fla"], "model.gdn.head_dim: 512 is above 256"),
        (
            ["model.gdn.head_dim=160", "model.backend=window"],
            "model.backend: window takes GDN head dimensions up to 128",
        ),
        (
            ["model.backend=window", "sleep.window=75"],
            "model.backend: window runs windows of at most 64 tokens, sleep.window is 75",
        ),
        (
            ["sleep.pases=3"],
            "sleep.pases: unknown key (allowed: window, passes, eviction, sleep_on, "
            "checkpoint, grad_passes, detach_every, random_passes, state_norm_bound)",
        ),
        (
            ["modle.pattern=AG"],
            "modle: unknown key (allowed: model, sleep, data, optimizer, "
            "schedule, stages, train, parallel, checkpoint, tracking, eval)",
        ),
        (
            ["data.path=d", "data.pth=x"],
            "data.pth: unknown key (allowed: path, generate, num_workers, "
            "skip_bad_samples, max_skipped_fraction, shard_url_prefix)",
        ),
        (
            ["stages=[{name: a, steps: 2, trian: ['*']}]"],
            "stages.0.trian: unknown key (allowed: name, steps, epochs, eviction, passes, train)",
        ),
        (["stages=[{name: a}]"], "stages.0.steps: give exactly one of steps and epochs"),
        (["train.steps=null"], "train.steps: required when no stages are given"),
        (
            ["optimizer.name=muon", "train.zero_stage=3"],
            "train.zero_stage: 3 with optimizer muon: ZeRO-3 splits every weight over the data ranks",
        ),
        (
            ["train.zero_stage=3", "stages=[{name: a, steps: 1, train: [x]}, {name: b, steps: 1}]"],
            "stages: stages that train different parameters need train.zero_stage <= 2",
        ),
        (["eval.passes=[0, 2]"], "eval.passes: every N must be >= 1"),
        (["sleep.grad_passes=3"], "sleep.grad_passes: 3 is more than passes 2"),
        (["sleep.random_passes={kind: uniform, low: 4, high: 2}"], "sleep.random_passes.high: 2 is below low 4"),
        (
            ["sleep.random_passes={kind: poisson, mean: 3}"],
            "sleep.random_passes.kind: Input should be 'uniform' or 'poisson_lognormal'",
        ),
        (["train.precision=fp16"], "train.precision: Input should be 'fp32' or 'bf16'"),
        (["model.gdn.expand_v=0.3"], "model.gdn.expand_v: head_dim 8 * expand_v 0.3 is not an integer"),
    ],
)
def test_invalid_values_fail_with_one_line_naming_the_field(overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate(apply_overrides(base(), overrides))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_missing_section_is_named():
    data = base()
    del data["sleep"]
    with pytest.raises(ConfigError, match="^sleep: required, but not given$"):
        validate(data)


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base()))
    config = load_config(
        path, ["sleep.passes=4", "model.loop=[1, 3]", "sleep.eviction=sliding", "model.tie_embeddings=true"]
    )
    assert config.sleep.passes == 4 and config.model.loop_range == (1, 3)
    assert config.sleep.eviction == "sliding" and config.model.tie_embeddings is True


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["passes"], "override 'passes' must look like key=value"),
        (["sleep.passes.x=1"], "override 'sleep.passes.x=1': passes is a value, not a section"),
    ],
)
def test_malformed_overrides(tmp_path, overrides, expected):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base()))
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_config(path, overrides)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {vocab_size: 3\nsleep: [")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML at line"):
        load_config(broken)


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base()))
    assert main(["config", str(path), "sleep.passes=0"]) == 2
    err = capsys.readouterr().err
    assert err == "sleepscale config: sleep.passes: Input should be greater than or equal to 1\n"


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path("configs").glob("*.yaml")))
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert config.data is not None and config.stage_list()


def test_fingerprint_ignores_tracking_and_eval_but_not_the_model():
    config = validate(base())
    assert (
        config.fingerprint()
        == validate(apply_overrides(base(), ["tracking.experiment=x", "eval.passes=[1,4]"])).fingerprint()
    )
    assert config.fingerprint() != validate(apply_overrides(base(), ["model.hidden_size=32"])).fingerprint()


def test_checkpointing_defaults_to_per_pass_once_the_model_sleeps():
    from sleepscale.config import SleepConfig

    assert SleepConfig(window=8).checkpointing == "none"
    assert SleepConfig(window=8, passes=2).checkpointing == "pass"
    assert SleepConfig(window=8, random_passes={"kind": "uniform", "low": 1, "high": 3}).checkpointing == "pass"
    assert SleepConfig(window=8, passes=4, checkpoint="none").checkpointing == "none"
    assert SleepConfig(window=8, passes=4, checkpoint="window").checkpointing == "window"
