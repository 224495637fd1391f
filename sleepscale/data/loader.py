"""A resumable, sharded, streaming loader of fixed-shape batches.

How an epoch is laid out (all of it computed from the manifest, identically on every rank):
- the split's shards are shuffled with a generator seeded by (seed, epoch); rank r takes shards
  r, r + world_size, ...; a rank's worker w takes every num_workers-th of those, from w;
- a worker reads one whole shard at a time (verifying its sha256), and yields its samples in an
  order shuffled by (seed, epoch, shard), in batches of `batch_size`;
- every worker of every rank yields the same number of batches, the most any of them needs: short
  streams end with rows of padding (input = pad id, target = ignore). So all ranks take the same
  number of steps and every sample is read exactly once per epoch. `num_samples` in a batch counts
  its real rows;
- a rank's batches alternate between its workers (batch i comes from worker i % num_workers).

`state_dict()` holds the epoch, the batches this rank has consumed and each worker's position in
its stream; `load_state_dict()` resumes exactly there, in the same order, re-reading only the
shards it stopped inside. With `skip_bad_samples` a bad sample or shard is counted and skipped
instead of stopping the run (see `skipped` and `skip_reasons`; one log line per bad shard or
sample), up to `max_skipped_fraction` of the rank's samples in an epoch: beyond it, or when an
epoch has no good sample left, iteration stops with a DataError naming the bad shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from sleepscale.data.sample import IGNORE_INDEX, DataError, decode
from sleepscale.data.shards import read_manifest

log = logging.getLogger("sleepscale.data")


@dataclasses.dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    sha256: str
    index: int  # position in the manifest; seeds the in-shard shuffle


def read_shard_records(shard: Shard, verify: bool) -> list[dict[str, Any]]:
    """All records of a shard (raw bytes per file), in tar order. Raises DataError naming the shard."""
    try:
        with gopen(shard.url, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        raise DataError(f"{shard.url}: shard is missing") from None
    except Exception as error:  # gopen's pipes and remote streams raise assorted types
        raise DataError(f"{shard.url}: cannot be read ({error})") from None
    if verify and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise DataError(
            f"{shard.url}: sha256 does not match the manifest (truncated or changed since it was written); "
            "restore or regenerate the shard"
        )
    try:
        records = list(group_by_keys(tar_file_expander([{"url": shard.url, "stream": io.BytesIO(data)}])))
    except Exception as error:  # tarfile.ReadError and webdataset's own ValueErrors, with context appended to args
        reason = str(error.args[0]).split(" @ ")[0] if error.args else type(error).__name__
        raise DataError(f"{shard.url}: truncated or not a tar file ({reason})") from None
    if len(records) != shard.samples:
        raise DataError(f"{shard.url}: holds {len(records)} samples, the manifest says {shard.samples}")
    return records


def epoch_plan(shards: list[Shard], seed: int, epoch: int, shuffle: bool, world_size: int, workers: int) -> list[list[list[Shard]]]:
    """plan[rank][worker] = that worker's shards for this epoch, in reading order."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards)) if shuffle else range(len(shards))
    ordered = [shards[i] for i in order]
    return [[ordered[rank::world_size][worker::workers] for worker in range(workers)] for rank in range(world_size)]


class _RankStream(IterableDataset):
    """This rank's batches for one epoch, from a given point. Runs inside DataLoader workers."""

    def __init__(self, loader: ShardLoader, plan: list[list[Shard]], batches_per_worker: int, consumed: int, positions: list[int]):
        self.loader, self.plan, self.batches_per_worker = loader, plan, batches_per_worker
        self.consumed, self.positions = consumed, positions

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info else (0, 1)
        # On resume the next batch belongs to worker `consumed % count`; torch asks worker 0 first.
        worker = (physical + self.consumed) % count
        already = len(range(worker, self.consumed, count))
        yield from self.loader._worker_batches(self.plan[worker], worker, self.positions[worker], self.batches_per_worker - already)


class ShardLoader:
    def __init__(
        self,
        source: str,
        split: str = "train",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        shard_url_prefix: str | None = None,
        skip_bad_samples: bool = False,
        verify_checksums: bool = True,
        max_skipped_fraction: float = 0.01,
    ):
        """`source`: a dataset directory or its manifest.json. Shards are read from the manifest's
        directory, or from `shard_url_prefix` + name (any URL webdataset's gopen understands, e.g.
        `pipe:curl -s https://host/data/`). Rank and world size default to torch.distributed's."""
        self.manifest, base = read_manifest(source)
        if split not in self.manifest["splits"]:
            raise DataError(f"{source}: no split {split!r} (has {', '.join(self.manifest['splits'])})")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        prefix = base if shard_url_prefix is None else shard_url_prefix
        self.shards = [
            Shard(prefix + entry["url"], entry["samples"], entry["sha256"], index)
            for index, entry in enumerate(self.manifest["splits"][split]["shards"])
        ]
        self.batch_size, self.num_workers, self.seed, self.shuffle = batch_size, num_workers, seed, shuffle
        self.skip_bad_samples, self.verify_checksums = skip_bad_samples, verify_checksums
        self.sequence_length = self.manifest["sequence_length"]
        self.pad_id = self.manifest["tokenizer"]["pad_id"]
        self.max_skipped_fraction = max_skipped_fraction
        self.skipped, self.skip_reasons = 0, []
        self._epoch_skipped, self._bad_shards = 0, {}
        self.epoch, self._consumed, self._positions = 0, 0, [0] * self._workers

    @property
    def _workers(self) -> int:
        return max(self.num_workers, 1)

    def _plan(self) -> list[list[list[Shard]]]:
        return epoch_plan(self.shards, self.seed, self.epoch, self.shuffle, self.world_size, self._workers)

    def batches_per_epoch(self) -> int:
        """Batches every rank yields per epoch (the same on all ranks)."""
        plan = self._plan()
        most = max(sum(s.samples for s in shards) for rank in plan for shards in rank)
        return math.ceil(most / self.batch_size) * self._workers

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self._consumed, "positions": list(self._positions), "skipped": self.skipped,
                "epoch_skipped": self._epoch_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["positions"]) != self._workers:
            raise ValueError(
                f"loader state has {len(state['positions'])} worker positions but this loader has {self._workers} "
                "workers; resume with the same num_workers"
            )
        self.epoch, self._consumed, self._positions = state["epoch"], state["batches"], list(state["positions"])
        self.skipped, self._epoch_skipped = state.get("skipped", 0), state.get("epoch_skipped", 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The rest of the current epoch; the next iteration starts the next epoch."""
        per_worker = self.batches_per_epoch() // self._workers
        stream = _RankStream(self, self._plan()[self.rank], per_worker, self._consumed, self._positions)
        batches = DataLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False)
        epoch_samples = sum(shard.samples for shards in self._plan()[self.rank] for shard in shards)
        for batch in batches:
            if "error" in batch:
                raise DataError(batch["error"])
            self._consumed += 1
            self._positions[batch.pop("worker")] = batch.pop("position")
            for url, reason, count in batch.pop("skip_reasons"):
                self.skipped += count
                self._epoch_skipped += count
                self._bad_shards[url] = self._bad_shards.get(url, 0) + count
                if len(self.skip_reasons) < 100:
                    self.skip_reasons.append(reason)
                log.warning("skipped %d bad sample(s): %s", count, reason)
            if self._epoch_skipped > self.max_skipped_fraction * epoch_samples:
                raise DataError(
                    f"skipped {self._epoch_skipped} of the {epoch_samples} samples of epoch {self.epoch} on this rank, more "
                    f"than data.max_skipped_fraction = {self.max_skipped_fraction:g} of them; bad shards: {self._bad_list()}; "
                    "repair or remove them (and their manifest entries), or raise data.max_skipped_fraction")
            yield batch
        if self._epoch_skipped and self._epoch_skipped >= epoch_samples:
            raise DataError(f"no good sample left in epoch {self.epoch} on this rank: all {epoch_samples} were skipped; "
                            f"bad shards: {self._bad_list()}")
        self.epoch, self._consumed, self._positions = self.epoch + 1, 0, [0] * self._workers
        self._epoch_skipped, self._bad_shards = 0, {}

    def _bad_list(self) -> str:
        return ", ".join(f"{url} ({count} samples)" for url, count in self._bad_shards.items())

    # Runs in a DataLoader worker (or in-process with num_workers=0).
    def _worker_batches(self, shards: list[Shard], worker: int, position: int, remaining: int) -> Iterator[dict[str, Any]]:
        rows, keys, metas, skips = [], [], [], []
        try:
            for sample_position, key, sample, reason in self._samples_from(shards, position):
                position = sample_position
                if reason is not None:
                    skips.append(reason)
                    continue
                rows.append(sample)
                keys.append(key)
                metas.append(sample.meta)
                if len(rows) == self.batch_size:
                    yield self._batch(rows, keys, metas, skips, worker, position)
                    rows, keys, metas, skips, remaining = [], [], [], [], remaining - 1
        except DataError as error:
            yield {"error": str(error)}
            return
        while remaining > 0:  # the last partial batch, then padding so that every worker yields as many
            yield self._batch(rows, keys, metas, skips, worker, position)
            rows, keys, metas, skips, remaining = [], [], [], [], remaining - 1

    def _samples_from(self, shards: list[Shard], position: int):
        """(position after it, key, sample or None, skip reason or None) from `position` of this stream on."""
        start = 0
        for shard in shards:
            if start + shard.samples <= position:  # consumed before a resume: not even read
                start += shard.samples
                continue
            try:
                records = read_shard_records(shard, self.verify_checksums)
            except DataError as error:
                if not self.skip_bad_samples:
                    raise
                count = shard.samples - max(position - start, 0)  # its samples not yet consumed, as one skip
                yield start + shard.samples, None, None, (shard.url, f"{error} (its {count} sample(s))", count)
                start += shard.samples
                continue
            order = np.random.default_rng([self.seed, self.epoch, shard.index]).permutation(len(records)) if self.shuffle else range(len(records))
            for offset, record_index in enumerate(order):
                if start + offset < position:
                    continue
                record = records[record_index]
                try:
                    sample = decode(record, self.sequence_length, shard.url)
                except DataError as error:
                    if not self.skip_bad_samples:
                        raise
                    yield start + offset + 1, None, None, (shard.url, str(error), 1)
                    continue
                yield start + offset + 1, record["__key__"], sample, None
            start += shard.samples

    def _batch(self, rows, keys, metas, skips, worker: int, position: int) -> dict[str, Any]:
        input_ids = np.full((self.batch_size, self.sequence_length), self.pad_id, dtype=np.int64)
        targets = np.full((self.batch_size, self.sequence_length), IGNORE_INDEX, dtype=np.int64)
        for row, sample in enumerate(rows):
            input_ids[row], targets[row] = sample.input_ids, sample.targets
        return {
            "input_ids": torch.from_numpy(input_ids), "targets": torch.from_numpy(targets),
            "num_samples": len(rows), "keys": keys, "meta": metas,
            "skip_reasons": skips, "worker": worker, "position": position,
        }
