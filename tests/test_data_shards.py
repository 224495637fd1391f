"""Shards on disk: determinism, the manifest, and readability by other tools."""

import json
import tarfile

import numpy as np
import webdataset as wds
from data_helpers import rule110_dataset

from sleepscale.cli import main
from sleepscale.data.shards import sha256_of


def test_same_seed_gives_byte_identical_shards(tmp_path):
    first, second, other = (
        rule110_dataset(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))
    )
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in files)
    assert (first / "train-000000.tar").read_bytes() != (other / "train-000000.tar").read_bytes()


def test_manifest_describes_the_shards(tmp_path):
    dataset = rule110_dataset(tmp_path / "d")
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["task"] == "rule110" and manifest["seed"] == 0 and manifest["generator_version"] == "1"
    assert manifest["sequence_length"] == 100 and manifest["vocab_size"] == 7
    assert manifest["tokenizer"]["symbols"][:3] == ["<pad>", "0", "1"]
    train = manifest["splits"]["train"]
    assert train["samples"] == 530 and [s["samples"] for s in train["shards"]] == [50] * 10 + [30]
    assert all(shard["sha256"] == sha256_of(dataset / shard["url"]) for shard in train["shards"])
    assert manifest["splits"]["validation"]["samples"] == 40


def test_shards_open_with_tarfile_and_a_plain_webdataset_pipeline(tmp_path):
    dataset = rule110_dataset(tmp_path / "d")
    with tarfile.open(dataset / "train-000000.tar") as archive:
        names = archive.getnames()
        assert names[:3] == ["train000000000.input_ids.npy", "train000000000.meta.json", "train000000000.targets.npy"]
        assert json.loads(archive.extractfile(names[1]).read())["task"] == "rule110"
    pipeline = wds.WebDataset([str(dataset / f"train-{i:06d}.tar") for i in range(11)], shardshuffle=False).decode()
    samples = list(pipeline)
    assert len(samples) == 530
    first = samples[0]
    assert first["input_ids.npy"].shape == (100,) and first["input_ids.npy"].dtype == np.int32
    assert first["meta.json"]["difficulty"]["t"] in (0, 1, 5)


def test_data_command_writes_every_task(tmp_path, capsys):
    commands = [
        ["rule110", "--t", "0", "8"],
        ["depo"],
        ["math", "--ops", "2", "--length", "400"],
    ]
    for task in commands:
        out = tmp_path / task[0]
        assert (
            main(
                [
                    "data",
                    *task,
                    "--out",
                    str(out),
                    "--train-samples",
                    "30",
                    "--validation-samples",
                    "5",
                    "--samples-per-shard",
                    "10",
                ]
            )
            == 0
        )
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["splits"]["train"]["samples"] == 30 and len(manifest["splits"]["train"]["shards"]) == 3
    (tmp_path / "corpus.txt").write_text("sleep consolidates memory. " * 200)
    assert (
        main(
            [
                "data",
                "text",
                "--input",
                str(tmp_path / "corpus.txt"),
                "--length",
                "64",
                "--out",
                str(tmp_path / "text"),
                "--validation-fraction",
                "0.2",
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "text" / "manifest.json").read_text())
    assert (
        manifest["splits"]["train"]["samples"] + manifest["splits"]["validation"]["samples"] == (27 * 200 + 1 - 1) // 64
    )
    assert manifest["splits"]["validation"]["samples"] > 0


def test_data_command_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "rule110", "--out", str(tmp_path), "--train-samples", "2"]) == 0
    assert main(["data", "rule110", "--out", str(tmp_path)]) == 2
    assert main(["data", "text", "--input", str(tmp_path / "none.txt"), "--out", str(tmp_path / "t")]) == 2
    assert main(["data", "math", "--ops", "8", "--length", "50", "--out", str(tmp_path / "m")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        f"sleepscale data: {tmp_path} already holds a dataset (train-000000.tar, ...); choose an empty --out directory",
        f"sleepscale data: {tmp_path / 'none.txt'}: no such file",
        "sleepscale data: a 8-operation problem does not fit in length 50; raise the length",
    ]
