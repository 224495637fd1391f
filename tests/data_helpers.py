"""Small datasets and hand-made bad shards for the data tests."""

import json
from pathlib import Path

import webdataset as wds

from sleepscale.data.build import build_task_dataset
from sleepscale.data.rule110 import Rule110Task
from sleepscale.data.shards import sha256_of


def rule110_dataset(out: Path, train=530, validation=40, per_shard=50, seed=0) -> Path:
    build_task_dataset(Rule110Task([0, 1, 5]), out, seed, train, validation, per_shard)
    return out


def replace_shard(dataset: Path, name: str, records: list[dict], update_manifest=True) -> None:
    """Rewrites shard `name` with raw `records` and, unless told not to, makes the manifest agree."""
    with wds.TarWriter(str(dataset / name), encoder=False, mtime=0.0) as writer:
        for record in records:
            writer.write(record)
    if update_manifest:
        manifest = json.loads((dataset / "manifest.json").read_text())
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                if shard["url"] == name:
                    shard["sha256"], shard["samples"] = sha256_of(dataset / name), len(records)
        (dataset / "manifest.json").write_text(json.dumps(manifest))


def shard_records(dataset: Path, name: str) -> list[dict]:
    return list(wds.WebDataset(str(dataset / name), shardshuffle=False))
