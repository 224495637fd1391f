"""Writing datasets as webdataset shards with a manifest, and reading manifests back.

`<out>/manifest.json` records what made the data (task, generator version, seed, parameters,
tokenizer), the sequence length and vocabulary size, and for each split its shards with their sample
counts and sha256. Shards are `<split>-000000.tar`, ... written by webdataset's `ShardWriter` with a
fixed mtime and owner, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from webdataset.gopen import gopen

from sleepscale.data.sample import DataError, Sample, encode

MANIFEST = "manifest.json"
FORMAT = "sleepscale-shards/1"
SPLITS = ("train", "validation")


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Each sample has its own generator, so a sample does not depend on how many come before it."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SplitWriter:
    """Writes one split's samples as `<out>/<split>-NNNNNN.tar`; `finish()` gives its manifest entry."""

    def __init__(self, out: Path, split: str, samples_per_shard: int):
        self.out, self.split, self.samples_per_shard = out, split, samples_per_shard
        self.counts: dict[str, int] = {}
        self._writer = None  # created lazily: ShardWriter opens a first shard even for no samples

    def write(self, sample: Sample) -> None:
        if self._writer is None:
            self._writer = wds.ShardWriter(
                str(self.out / f"{self.split}-%06d.tar"), maxcount=self.samples_per_shard, maxsize=float("inf"),
                verbose=0, encoder=False, mtime=0.0, user="sleepscale", group="sleepscale",
            )
        index = sum(self.counts.values())
        self._writer.write(encode(sample, f"{self.split}{index:09d}"))
        name = os.path.basename(self._writer.fname)
        self.counts[name] = self.counts.get(name, 0) + 1

    def finish(self) -> dict[str, Any]:
        if self._writer is not None:
            self._writer.close()
        shards = [{"url": name, "samples": n, "sha256": sha256_of(self.out / name)} for name, n in self.counts.items()]
        return {"samples": sum(self.counts.values()), "shards": shards}


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    """Written last and atomically: a manifest present means every shard it names is complete."""
    path = out / MANIFEST
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"format": FORMAT, **manifest}, indent=2) + "\n")
    os.replace(temporary, path)
    return path


def read_manifest(source: str | Path) -> tuple[dict[str, Any], str]:
    """(manifest, base) for a dataset directory, a manifest.json path, or a manifest URL that
    webdataset's gopen understands (`pipe:...`, `http(s)://...`); shard urls are base + url."""
    source = str(source)
    if "://" in source or source.startswith("pipe:"):
        where, base = source, source.rsplit("/", 1)[0] + "/"
        try:
            with gopen(source, "rb") as stream:
                text = stream.read().decode()
        except Exception as error:  # gopen's pipes and remote streams raise assorted types
            raise DataError(f"{source}: cannot read the manifest ({error})") from None
    else:
        path = Path(source)
        if path.is_dir():
            path = path / MANIFEST
        where, base = str(path), str(path.parent) + "/"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise DataError(f"{path}: no manifest (write the dataset with `sleepscale data ... --out DIR`)") from None
        except OSError as error:
            raise DataError(f"{path}: unreadable manifest ({error.strerror})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{where}: manifest is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where}: not a {FORMAT} manifest")
    return manifest, base
