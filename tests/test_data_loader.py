"""The shard loader: exactly-once epochs over ranks and workers, exact resume, and bad data."""

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_helpers import replace_shard, rule110_dataset, shard_records

from sleepscale.data.loader import ShardLoader
from sleepscale.data.sample import IGNORE_INDEX, DataError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return rule110_dataset(tmp_path_factory.mktemp("data") / "rule110")


def all_train_keys(dataset):
    return {f"train{i:09d}" for i in range(530)}


def read_epoch(loader):
    return [batch["keys"] for batch in loader]


def test_two_ranks_two_workers_read_every_sample_once(dataset):
    steps = [read_epoch(ShardLoader(str(dataset), batch_size=16, num_workers=2, rank=r, world_size=2)) for r in (0, 1)]
    keys = [key for rank in steps for batch in rank for key in batch]
    assert len(keys) == len(set(keys)) == 530 and set(keys) == all_train_keys(dataset)
    assert (
        len(steps[0])
        == len(steps[1])
        == ShardLoader(str(dataset), batch_size=16, num_workers=2, world_size=2).batches_per_epoch()
    )


def test_two_torchrun_ranks_read_every_sample_once(dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(Path(__file__).parent / "data_ranks.py"),
            str(dataset),
            str(tmp_path),
        ],
        check=True,
        timeout=180,
        env=env,
        capture_output=True,
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    assert len(results[0]["steps"]) == len(results[1]["steps"])
    keys = [key for r in results for batch in r["steps"] for key in batch]
    assert len(keys) == len(set(keys)) and set(keys) == all_train_keys(dataset)


def test_batches_have_fixed_shape_and_padding_rows_carry_no_loss(dataset):
    batches = list(ShardLoader(str(dataset), batch_size=16, num_workers=2, rank=1, world_size=2))
    assert all(b["input_ids"].shape == b["targets"].shape == (16, 100) for b in batches)
    for batch in batches:
        padding = batch["targets"][batch["num_samples"] :]
        assert (padding == IGNORE_INDEX).all() and (batch["input_ids"][batch["num_samples"] :] == 0).all()
        assert len(batch["keys"]) == len(batch["meta"]) == batch["num_samples"]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # 3 workers on 2 cores, on purpose
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_from_a_random_point_yields_exactly_the_rest(dataset, workers):
    def loader():
        return ShardLoader(str(dataset), batch_size=8, num_workers=workers, rank=0, world_size=2, seed=5)

    uninterrupted = read_epoch(loader())
    for stop in random.Random(workers).sample(range(1, len(uninterrupted)), 3):
        first = loader()
        head = []
        for batch in first:
            head.append(batch["keys"])
            if len(head) == stop:
                break
        resumed = loader()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # survives a round trip through JSON
        assert head + read_epoch(resumed) == uninterrupted
        assert resumed.state_dict()["epoch"] == 1


def test_each_epoch_is_shuffled_differently_and_reproducibly(dataset):
    loader = ShardLoader(str(dataset), batch_size=8, seed=1)
    epoch0, epoch1 = read_epoch(loader), read_epoch(loader)
    assert epoch0 != epoch1 and sorted(sum(epoch0, [])) == sorted(sum(epoch1, []))
    assert read_epoch(ShardLoader(str(dataset), batch_size=8, seed=1)) == epoch0
    assert read_epoch(ShardLoader(str(dataset), batch_size=8, seed=2)) != epoch0
    in_order = sum(read_epoch(ShardLoader(str(dataset), batch_size=8, shuffle=False)), [])
    assert in_order == sorted(all_train_keys(dataset))


def test_resume_needs_the_same_worker_count(dataset):
    state = ShardLoader(str(dataset), batch_size=8, num_workers=2).state_dict()
    with pytest.raises(ValueError, match="resume with the same num_workers"):
        ShardLoader(str(dataset), batch_size=8, num_workers=1).load_state_dict(state)


def test_shards_and_manifest_read_through_urls(dataset):
    loader = ShardLoader(str(dataset), batch_size=16, shard_url_prefix=f"pipe:cat {dataset}/", shuffle=False)
    assert sum(read_epoch(loader), []) == sorted(all_train_keys(dataset))
    loader = ShardLoader(f"pipe:cat {dataset}/manifest.json", batch_size=16, shuffle=False)
    assert loader.shards[0].url == f"pipe:cat {dataset}/train-000000.tar"
    assert sum(read_epoch(loader), []) == sorted(all_train_keys(dataset))


@pytest.fixture
def copy_of(dataset, tmp_path):
    def make():
        copy = tmp_path / "copy"
        copy.mkdir()
        for path in dataset.iterdir():
            (copy / path.name).write_bytes(path.read_bytes())
        return copy

    return make


def break_missing(copy):
    (copy / "train-000003.tar").unlink()


def break_truncated(copy):
    data = (copy / "train-000003.tar").read_bytes()
    (copy / "train-000003.tar").write_bytes(data[: len(data) // 2])


def break_changed(copy):
    data = bytearray((copy / "train-000003.tar").read_bytes())
    data[1000] ^= 0xFF
    (copy / "train-000003.tar").write_bytes(bytes(data))


def break_keys(copy):
    records = shard_records(copy, "train-000003.tar")
    del records[7]["targets.npy"]
    replace_shard(copy, "train-000003.tar", records)


def break_shapes(copy):
    records = shard_records(copy, "train-000003.tar")
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(99, dtype=np.int32))
    records[7]["input_ids.npy"] = buffer.getvalue()
    replace_shard(copy, "train-000003.tar", records)


@pytest.mark.parametrize(
    "damage,verify,message,skipped",
    [
        (break_missing, True, r"train-000003.tar: shard is missing$", 50),
        (break_truncated, True, r"train-000003.tar: sha256 does not match the manifest", 50),
        (break_truncated, False, r"train-000003.tar: truncated or not a tar file", 50),
        (break_changed, True, r"train-000003.tar: sha256 does not match the manifest", 50),
        (
            break_keys,
            True,
            r"train-000003.tar: sample train000000157 lacks targets.npy \(has input_ids.npy, meta.json\)$",
            1,
        ),
        (
            break_shapes,
            True,
            r"train-000003.tar: sample train000000157 has input_ids of "
            r"shape \(99,\) and dtype int32; the manifest says int \[100\]$",
            1,
        ),
    ],
    ids=["missing", "truncated", "truncated-unverified", "checksum", "keys", "shapes"],
)
def test_bad_data_gives_one_line_or_is_counted_when_skipping(copy_of, damage, verify, message, skipped, caplog):
    copy = copy_of()
    damage(copy)
    with pytest.raises(DataError, match=message) as error:
        read_epoch(ShardLoader(str(copy), batch_size=16, num_workers=2, verify_checksums=verify))
    assert "\n" not in str(error.value)

    loader = ShardLoader(
        str(copy),
        batch_size=16,
        num_workers=2,
        verify_checksums=verify,
        skip_bad_samples=True,
        max_skipped_fraction=1.0,
    )
    with caplog.at_level("WARNING", logger="sleepscale.data"):
        keys = sum(read_epoch(loader), [])
    assert loader.skipped == skipped == 530 - len(keys) and len(set(keys)) == len(keys)
    assert all("train-000003.tar" in reason for reason in loader.skip_reasons)
    assert [record.getMessage() for record in caplog.records] == [
        f"skipped {skipped} bad sample(s): {loader.skip_reasons[0]}"
    ]

    # The default allows 1% of an epoch's samples: 1 of 530 is skipped, 50 stop the epoch with one
    # line naming the shard.
    default = ShardLoader(str(copy), batch_size=16, num_workers=2, verify_checksums=verify, skip_bad_samples=True)
    if skipped < 0.01 * 530:
        assert len(sum(read_epoch(default), [])) == 530 - skipped
        return
    with pytest.raises(
        DataError,
        match=r"skipped \d+ of the 530 samples of epoch 0 on this rank, more than "
        r"data.max_skipped_fraction = 0.01 of them; bad shards: \S+train-000003.tar \(\d+ samples\)",
    ) as error:
        read_epoch(default)
    assert "\n" not in str(error.value)


def test_an_epoch_with_no_good_sample_stops_even_when_skipping_everything_is_allowed(copy_of):
    copy = copy_of()
    for shard in copy.glob("train-*.tar"):
        shard.write_bytes(b"broken")
    loader = ShardLoader(str(copy), batch_size=16, skip_bad_samples=True, max_skipped_fraction=1.0)
    with pytest.raises(
        DataError, match=r"no good sample left in epoch 0 on this rank: all 530 were skipped; bad shards: "
    ):
        read_epoch(loader)


def test_missing_or_broken_manifest_and_split(tmp_path, dataset):
    with pytest.raises(DataError, match="no manifest"):
        ShardLoader(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="manifest is not valid JSON"):
        ShardLoader(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="not a sleepscale-shards/1 manifest"):
        ShardLoader(str(tmp_path))
    with pytest.raises(DataError, match=r"no split 'test' \(has train, validation\)"):
        ShardLoader(str(dataset), split="test")
