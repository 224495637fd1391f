"""`sleepscale convert`: tiny random transformers models, saved with save_pretrained, converted,
against the transformers models themselves; round trips; insertion; refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hf_models import COMMON, VOCAB, hf_config, hf_model

from sleepscale.config import ConfigError, validate
from sleepscale.config_loading import load_config
from sleepscale.convert import convert_from_hf, export_to_hf
from sleepscale.convert.model_dir import read_description
from sleepscale.model import build_model
from sleepscale.model.weights import SafetensorsFiles, load_weights
from sleepscale.sleep import sleep_forward

LENGTH = 24
TESTS = Path(__file__).parent
FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_5"]


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf = hf_model(family)
    hf.save_pretrained(root / "hf", max_shard_size="40KB")  # several shards, read lazily
    ours_dir = convert_from_hf(root / "hf", root / "ours")
    description = read_description(ours_dir)
    return family, hf, root, ours_dir, description


def _ours(ours_dir, window: int, passes: int = 1, eviction: str = "hard"):
    config = validate(
        {
            "model": read_description(ours_dir)["model"],
            "sleep": {"window": window, "passes": passes, "eviction": eviction},
            "train": {"steps": 1},
        }
    )
    model = build_model(config.model).eval()
    load_weights(model, ours_dir)
    return model, config


def _ids():
    return torch.randint(0, VOCAB, (2, LENGTH), generator=torch.Generator().manual_seed(1))


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def test_converted_model_gives_the_transformers_logits(converted):
    _, hf, _, ours_dir, _ = converted
    model, config = _ours(ours_dir, window=LENGTH)
    with torch.no_grad():
        expected = hf(_ids()).logits
        logits = sleep_forward(model, _ids(), config.sleep).logits
    assert relative_error(logits, expected) < 1e-5


def _hf_window_by_window(hf, ids, window: int):
    """The transformers model over each window in turn: attention and convolutions start afresh in
    every window, the GDN layers' recurrent state is carried (hard eviction, N=1)."""
    from transformers import DynamicCache

    logits, carried = [], {}
    gdn_layers = [
        i for i, kind in enumerate(getattr(hf.config, "layer_types", None) or []) if kind == "linear_attention"
    ]
    for start in range(0, ids.shape[1], window):
        cache = DynamicCache(config=hf.config) if gdn_layers else None
        for layer, (conv, recurrent) in carried.items():  # a cache holds a recurrent state only beside a conv state
            cache.update_conv_state(torch.zeros_like(conv), layer)
            cache.update_recurrent_state(recurrent, layer)
        logits.append(hf(ids[:, start : start + window], cache=cache, use_cache=cache is not None).logits)
        carried = {
            layer: (cache.get_conv_state(layer).clone(), cache.get_recurrent_state(layer).clone())
            for layer in gdn_layers
        }
    return torch.cat(logits, dim=1)


def test_windows_with_hard_eviction_match_transformers_window_by_window(converted):
    _, hf, _, ours_dir, _ = converted
    model, config = _ours(ours_dir, window=8)
    with torch.no_grad():
        expected = _hf_window_by_window(hf, _ids(), 8)
        logits = sleep_forward(model, _ids(), config.sleep).logits
    assert relative_error(logits, expected) < 1e-5


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_converted_model_sleeps(converted, eviction):
    _, _, _, ours_dir, _ = converted
    model, config = _ours(ours_dir, window=8, passes=3, eviction=eviction)
    targets = _ids().roll(-1, dims=1)
    out = sleep_forward(model, _ids(), config.sleep, targets=targets)
    out.loss.backward()
    assert torch.isfinite(out.logits).all() and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )


def test_partial_loop_on_a_converted_model(converted):
    _, _, _, ours_dir, description = converted
    section = {**description["model"], "loop": [1, 3]}
    config = validate({"model": section, "sleep": {"window": 8, "passes": 3}, "train": {"steps": 1}})
    model = build_model(config.model)
    load_weights(model, ours_dir)
    with torch.no_grad():
        assert torch.isfinite(sleep_forward(model, _ids(), config.sleep).logits).all()


def test_export_round_trip_is_bit_exact(converted):
    _, _, root, ours_dir, _ = converted
    back = export_to_hf(ours_dir, root / "back")
    original, exported = SafetensorsFiles(root / "hf"), SafetensorsFiles(back)
    assert sorted(original.names()) == sorted(exported.names())
    for name in original.names():
        assert torch.equal(original.get(name), exported.get(name)), name
    assert json.loads((back / "config.json").read_text()) == json.loads((root / "hf" / "config.json").read_text())


def test_config_fills_the_model_section_from_init_from(converted, tmp_path):
    _, _, _, ours_dir, description = converted
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"init_from": str(ours_dir), "pattern": description["model"]["pattern"], "seed": 3},
                "sleep": {"window": 8},
                "train": {"steps": 1},
            }
        )
    )
    config = load_config(path)
    assert config.model.hidden_size == 32 and config.model.seed == 3 and config.model.init_from == str(ours_dir)
    with pytest.raises(ConfigError, match=r"model.hidden_size: the config gives 64, model.init_from .* has 32"):
        load_config(path, ["model.hidden_size=64"])


def test_insertion_keeps_the_logits_and_writes_the_two_stage_config(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    ours_dir = convert_from_hf(tmp_path / "hf", tmp_path / "ours", insert_gdn=2)
    description = read_description(ours_dir)
    assert description["model"]["pattern"] == "AAgAAg" and description["inserted_blocks"] == [2, 5]
    model, config = _ours(ours_dir, window=LENGTH)
    with torch.no_grad():
        assert relative_error(sleep_forward(model, _ids(), config.sleep).logits, hf(_ids()).logits) < 1e-5
    recipe = yaml.safe_load((ours_dir / "train.yaml").read_text())
    first, second = recipe["stages"]
    assert (first["eviction"], first["train"], second["eviction"], second["train"]) == (
        "hard",
        ["layers.2.*", "layers.5.*"],
        "sliding",
        ["*"],
    )
    with pytest.raises(Exception, match="inserted"):
        export_to_hf(ours_dir, tmp_path / "back")


def test_insertion_recipe_trains_the_inserted_blocks_first(tmp_path):
    from train_helpers import changed_parameters, train

    from sleepscale.data.build import build_task_dataset
    from sleepscale.data.rule110 import Rule110Task

    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    ours_dir = convert_from_hf(tmp_path / "hf", tmp_path / "ours", insert_gdn=2)
    build_task_dataset(Rule110Task([0, 1], 8, 2), tmp_path / "data", 0, 64, 16, 32)
    run = tmp_path / "run"
    train(
        ours_dir / "train.yaml",
        f"data.path={tmp_path / 'data'}",
        f"train.run_dir={run}",
        "sleep.window=8",
        "stages.0.steps=2",
        "stages.1.steps=2",
        "checkpoint.every=2",
        "checkpoint.keep=2",
        "train.micro_batch_size=4",
        "optimizer.lr=0.01",
    )
    initial = _ours(ours_dir, window=8)[0].state_dict()
    assert changed_parameters(run, 2, initial) == {
        name for name in initial if name.startswith(("layers.2.", "layers.5."))
    }
    assert "layers.0.attn.q_proj.weight" in changed_parameters(run, 4, initial)


def _convert_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sleepscale.cli", "convert", *map(str, args)], capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "config,message",
    [
        (
            {"model_type": "qwen3_moe", "num_experts": 8},
            "config.json num_experts=8: mixture-of-experts is not supported",
        ),
        ({"model_type": "gpt2"}, "config.json model_type='gpt2' is not supported by sleepscale (supported: llama"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "config.json hidden_act='gelu'"),
        ({"model_type": "llama", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type='yarn'"),
    ],
)
def test_unsupported_checkpoints_are_one_line(tmp_path, config, message):
    source = tmp_path / "hf"
    source.mkdir()
    base = json.loads(hf_config("llama").to_json_string())
    (source / "config.json").write_text(json.dumps({**base, **config}))
    result = _convert_cli(source, tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def _convert_main(capsys, *args) -> tuple[int, str]:
    """`sleepscale convert ARGS` in this process (cheaper than `_convert_cli`): exit code, stderr."""
    from sleepscale.cli import main

    capsys.readouterr()  # what building the inputs printed
    code = main(["convert", *map(str, args)])
    return code, capsys.readouterr().err


def _one_line(code: int, stderr: str, *parts: str) -> bool:
    return code == 2 and len(stderr.strip().splitlines()) == 1 and all(part in stderr for part in parts)


def _llama_config(source: Path) -> None:
    """A Hugging Face directory with a tiny Llama's config.json (written without importing transformers)."""
    source.mkdir()
    (source / "config.json").write_text(json.dumps({**COMMON, "model_type": "llama", "rms_norm_eps": 1e-6}))


def test_a_config_json_that_is_not_json_is_one_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama",')
    code, stderr = _convert_main(capsys, tmp_path / "hf", tmp_path / "out")
    assert _one_line(code, stderr, "config.json: not valid JSON", "save_pretrained"), stderr


def test_a_truncated_safetensors_file_is_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    _llama_config(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    save_file({"model.embed_tokens.weight": torch.ones(VOCAB, 32)}, str(weights))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, stderr = _convert_main(capsys, tmp_path / "hf", tmp_path / "out")
    assert _one_line(code, stderr, "model.safetensors: not a readable safetensors file", "truncated"), stderr
    assert not (tmp_path / "out").exists()


def test_insert_gdn_0_is_refused(tmp_path, capsys):
    _llama_config(tmp_path / "hf")
    code, stderr = _convert_main(capsys, tmp_path / "hf", tmp_path / "out", "--insert-gdn", "0")
    assert _one_line(code, stderr, "--insert-gdn 0: give K >= 1"), stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "entries,found", [([], "it is empty"), (["weights.bin", "notes.txt"], "it holds notes.txt, weights.bin")]
)
def test_a_directory_with_nothing_to_convert_is_one_line(tmp_path, capsys, entries, found):
    source = tmp_path / "source"
    source.mkdir()
    for name in entries:
        (source / name).write_text("")
    code, stderr = _convert_main(capsys, source, tmp_path / "out")
    assert _one_line(code, stderr, "no config.json", "no trainer.json", found), stderr


def _large_model_dir(tmp_path):
    """A model directory of ~70M float32 parameters (280 MB): large enough that a rank's share
    stands out from the process's own memory."""
    from sleepscale.convert.model_dir import write_model_dir

    section = {
        "vocab_size": 8000,
        "hidden_size": 1024,
        "pattern": "AGAG",
        "intermediate_size": 2816,
        "attention": {"num_heads": 8, "qk_norm": True},
        "gdn": {"num_heads": 8, "num_v_heads": 16, "head_dim": 64},
    }
    model = build_model(validate({"model": section, "sleep": {"window": 8}, "train": {"steps": 1}}).model)
    return write_model_dir(
        tmp_path / "large",
        {"model": section, "source": None, "inserted_blocks": []},
        ((name, p.detach()) for name, p in model.named_parameters()),
        shard_bytes=64 * 2**20,
    )


@pytest.mark.parametrize(
    "modes", [["tensor", "tensor-seed"], ["pipeline", "pipeline-seed"], ["zero3"]], ids=["tensor", "pipeline", "zero3"]
)
def test_each_rank_loads_only_its_part(tmp_path, modes):
    """From a model directory, or drawn from a seed (`-seed`; in the same launch as the directory's,
    measured after it): each rank holds only its part, peaks below 0.7x the whole model while building
    it, and its values equal the whole model's."""
    from train_helpers import torchrun_command

    model_dir = _large_model_dir(tmp_path)
    out = tmp_path / "ranks.json"
    # Reading or drawing one whole parameter after another (a ZeRO-3 gather, a tensor-parallel shard
    # cut from its seeded parameter) leaves glibc's heap holding freed buffers of every size
    # (1.3-1.7x the model resident here); served by mmap, a freed buffer is returned, and the peak is
    # what the ranks really hold at once.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    subprocess.run(
        torchrun_command(
            int("2"),
            str(TESTS / "convert_ranks.py"),
            str(model_dir),
            ",".join(modes),
            str(out),
        ),
        check=True,
        cwd=TESTS,
        timeout=600,
        env=env,
    )
    largest = 8000 * 1024 * 4  # the embedding's (and head's) bytes
    report = json.loads(out.read_text())
    assert sorted(report) == sorted(modes)
    for mode, ranks in report.items():
        for rank in ranks:
            assert rank["equal_to_files"] and rank["equal_forward"] in (True, None), (mode, rank)
            assert rank["held_bytes"] < 0.6 * rank["whole_bytes"], (mode, rank)
            if mode == "zero3":  # its partition, plus a whole parameter gathered and (rank 0) one read
                assert rank["peak_bytes"] < rank["held_bytes"] + 3 * largest, (mode, rank)
            else:
                assert rank["peak_bytes"] < 0.7 * rank["whole_bytes"], (mode, rank)


def test_zero3_run_from_a_model_directory_trains_as_zero0(tmp_path):
    """ZeRO-3 builds the model partitioned and fills it one gathered parameter at a time; its losses
    equal ZeRO-0's from the same model directory."""
    from train_helpers import losses, train

    from sleepscale.data.build import build_task_dataset
    from sleepscale.data.rule110 import Rule110Task

    hf_model("qwen3_5").save_pretrained(tmp_path / "hf")
    ours_dir = convert_from_hf(tmp_path / "hf", tmp_path / "ours")
    build_task_dataset(Rule110Task([1], 8, 2), tmp_path / "data", 0, 64, 16, 32)
    recorded = {}
    for stage in (0, 3):
        config = tmp_path / f"zero{stage}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "model": {"init_from": str(ours_dir)},
                    "sleep": {"window": 8, "passes": 2},
                    "data": {"path": str(tmp_path / "data")},
                    "optimizer": {"lr": 0.001},
                    "train": {
                        "run_dir": str(tmp_path / f"run{stage}"),
                        "steps": 3,
                        "micro_batch_size": 4,
                        "zero_stage": stage,
                        "log_every": 1,
                    },
                }
            )
        )
        train(config, ranks=2, timeout=600)
        recorded[stage] = [losses(tmp_path / f"run{stage}")[step] for step in (1, 2, 3)]
    # ZeRO-3 reduces gradients in another order: agreement to float32 summation (~1e-5 relative by step 3).
    torch.testing.assert_close(torch.tensor(recorded[3]), torch.tensor(recorded[0]), rtol=1e-4, atol=0)

    # The trained run exports back to its family, and transformers computes what the run's model does.
    import transformers

    from sleepscale.train.checkpoint import load_model_from_checkpoint

    trained, trained_config = load_model_from_checkpoint(tmp_path / "run3")
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        export_to_hf(tmp_path / "run3", tmp_path / "back")
    ).eval()
    window = trained_config.sleep.model_copy(update={"window": LENGTH, "passes": 1})
    ids = _ids() % 8
    with torch.no_grad():
        assert relative_error(sleep_forward(trained.eval(), ids, window).logits, exported(ids).logits) < 1e-5


def test_the_text_model_of_a_multimodal_qwen3_5_checkpoint(tmp_path):
    """A `qwen3_5` checkpoint nests the text model under model.language_model and its config under
    text_config, beside a vision tower: the text model converts, and exports as Qwen3_5ForCausalLM."""
    from safetensors.torch import save_file

    hf, root = hf_model("qwen3_5"), tmp_path
    hf.save_pretrained(root / "hf")
    text = SafetensorsFiles(root / "hf")
    source = tmp_path / "multimodal"
    source.mkdir()
    tensors = {name.replace("model.", "model.language_model.", 1): text.get(name) for name in text.names()}
    save_file({**tensors, "model.visual.patch_embed.weight": torch.zeros(4, 4)}, str(source / "model.safetensors"))
    text_config = json.loads((root / "hf" / "config.json").read_text())
    (source / "config.json").write_text(
        json.dumps({"model_type": "qwen3_5", "text_config": text_config, "vision_config": {}})
    )
    converted_dir = convert_from_hf(source, tmp_path / "ours")
    model, config = _ours(converted_dir, window=LENGTH)
    with torch.no_grad():
        assert relative_error(sleep_forward(model, _ids(), config.sleep).logits, hf(_ids()).logits) < 1e-5
    back = export_to_hf(converted_dir, tmp_path / "back")
    exported = SafetensorsFiles(back)
    assert sorted(exported.names()) == sorted(text.names())
    assert json.loads((back / "config.json").read_text())["model_type"] == "qwen3_5_text"
