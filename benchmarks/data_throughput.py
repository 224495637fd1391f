"""Data pipeline rates: generation per task, and the loader against plain tar iteration.

    python benchmarks/data_throughput.py [--samples 2000] [--workers 2]

Measured in one run on the same files, so the loader/raw ratio holds on any machine. "raw tar read"
iterates every member of every shard with Python's tarfile and reads its bytes (no decoding, one
process); the loader verifies checksums, decodes, shuffles and batches with `--workers` workers.
"""

from __future__ import annotations

import argparse
import platform
import tarfile
import tempfile
import time
from pathlib import Path

from sleepscale.data.build import build_task_dataset
from sleepscale.data.depo import DepoTask
from sleepscale.data.loader import ShardLoader
from sleepscale.data.math_problems import MathTask
from sleepscale.data.rule110 import Rule110Task
from sleepscale.data.shards import sample_rng


def generation_rate(task, samples: int) -> float:
    start = time.perf_counter()
    for index in range(samples):
        task.sample(sample_rng(0, "train", index))
    return samples / (time.perf_counter() - start)


def raw_tar_rate(dataset: Path, samples: int) -> float:
    start = time.perf_counter()
    for shard in sorted(dataset.glob("train-*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive:
                archive.extractfile(member).read()
    return samples / (time.perf_counter() - start)


def loader_rate(dataset: Path, samples: int, workers: int) -> float:
    loader = ShardLoader(str(dataset), batch_size=32, num_workers=workers)
    start = time.perf_counter()
    read = sum(batch["num_samples"] for batch in loader)
    assert read == samples
    return samples / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    tasks = {"rule110 (T=100)": Rule110Task([32]), "depo (T=360)": DepoTask(), "math (T=2048, bytes)": MathTask()}
    print(
        f"machine: {platform.machine()}, {args.samples} samples "
        f"per task, loader with {args.workers} workers, batch 32\n"
    )
    print("| task | generation (samples/s) | raw tar read (samples/s) | loader (samples/s) | loader / raw |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name, task in tasks.items():
            count = args.samples if "math" not in name else args.samples // 4
            dataset = Path(scratch) / name.split()[0]
            generated = generation_rate(task, count)
            build_task_dataset(task, dataset, 0, count, 0, 250)
            raw = raw_tar_rate(dataset, count)
            loaded = loader_rate(dataset, count, args.workers)
            print(f"| {name} | {generated:,.0f} | {raw:,.0f} | {loaded:,.0f} | {loaded / raw:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
