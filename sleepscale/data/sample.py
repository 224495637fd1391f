"""The one sample format every task uses, and how a sample is stored in a shard.

A sample is three arrays' worth of information:
- `input_ids`: int32 [T], the tokens the model reads;
- `targets`: int32 [T], the token to predict at each position, or IGNORE_INDEX (-100) where no loss
  applies. Language modelling has targets = input_ids shifted left; query tasks set targets only
  at the positions where an answer is predicted;
- `meta`: a JSON object with at least `task`, `difficulty` (a mapping such as {"t": 32}, {"k": [..]}
  or {"ops": 6}; a list holds one value per supervised position, in order) and `answer`.

In a shard a sample is the files `<key>.input_ids.npy`, `<key>.targets.npy` and `<key>.meta.json`.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

import numpy as np

IGNORE_INDEX = -100
SAMPLE_FILES = ("input_ids.npy", "targets.npy", "meta.json")


class DataError(ValueError):
    """Bad data: a shard or sample that cannot be used, described in one line."""


@dataclasses.dataclass
class Sample:
    input_ids: np.ndarray
    targets: np.ndarray
    meta: dict[str, Any]

    def __post_init__(self):
        self.input_ids = np.asarray(self.input_ids, dtype=np.int32)
        self.targets = np.asarray(self.targets, dtype=np.int32)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode(sample: Sample, key: str) -> dict[str, Any]:
    """The webdataset record for a sample (deterministic bytes)."""
    return {
        "__key__": key,
        "input_ids.npy": _npy_bytes(sample.input_ids),
        "targets.npy": _npy_bytes(sample.targets),
        "meta.json": json.dumps(sample.meta, sort_keys=True, separators=(",", ":")).encode(),
    }


def decode(record: dict[str, Any], sequence_length: int, where: str) -> Sample:
    """A Sample from a record of raw bytes; `where` names the shard in errors."""
    key = record.get("__key__", "?")
    missing = [name for name in SAMPLE_FILES if name not in record]
    if missing:
        raise DataError(f"{where}: sample {key} lacks {', '.join(missing)} (has {', '.join(sorted(k for k in record if not k.startswith('__')))})")
    try:
        input_ids = np.load(io.BytesIO(record["input_ids.npy"]), allow_pickle=False)
        targets = np.load(io.BytesIO(record["targets.npy"]), allow_pickle=False)
        meta = json.loads(record["meta.json"])
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{where}: sample {key} cannot be decoded ({error})") from None
    for name, array in (("input_ids", input_ids), ("targets", targets)):
        if array.shape != (sequence_length,) or not np.issubdtype(array.dtype, np.integer):
            raise DataError(
                f"{where}: sample {key} has {name} of shape {array.shape} and dtype {array.dtype}; "
                f"the manifest says int [{sequence_length}]"
            )
    if not isinstance(meta, dict) or "task" not in meta:
        raise DataError(f"{where}: sample {key} has meta without a task")
    return Sample(input_ids, targets, meta)
