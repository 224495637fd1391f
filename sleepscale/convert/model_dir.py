"""The model directory: sleepscale weights that a run starts from (`model.init_from`).

`sleepscale convert` writes one from a Hugging Face checkpoint; the trainer reads it. Layout:

    sleepscale_model.json            {"format": 1, "model": <the config's model section>,
                                      "source": {"family": ..., "config": <the source config.json>} or null,
                                      "inserted_blocks": [block indices added by --insert-gdn]}
    model-00001-of-0000K.safetensors weights under our parameter names, in the source's dtype
    model.safetensors.index.json     which file holds which tensor (the Hugging Face index format)
    train.yaml                       with GDN blocks inserted: the two-stage config of the recipe

It is not a training checkpoint (`<run_dir>/checkpoints/step-*`, which also holds optimizer and data
state): it holds weights only and never changes once written. Its tensors are read lazily, by
`sleepscale.model.weights` (`SafetensorsFiles`, `load_weights`), so a rank can take its own shard of
a weight without reading the rest.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sleepscale.model.weights import INDEX, ModelDirError

FORMAT = 1
DESCRIPTION = "sleepscale_model.json"
SHARD_BYTES = 2 * 1024**3


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / DESCRIPTION).is_file()


def read_description(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    described = path / DESCRIPTION
    if not described.is_file():
        raise ModelDirError(
            f"{path}: not a sleepscale model directory (no {DESCRIPTION}); write one with `sleepscale convert`"
        )
    try:
        description = json.loads(described.read_text())
    except json.JSONDecodeError as error:
        raise ModelDirError(f"{described}: not valid JSON ({error}); convert the source again") from None
    if description.get("format") != FORMAT:
        raise ModelDirError(
            f"{described}: format {description.get('format')!r} is not {FORMAT}; convert the source again"
        )
    return description


def write_model_dir(
    out: str | Path,
    description: dict[str, Any],
    tensors: Iterable[tuple[str, torch.Tensor]],
    shard_bytes: int = SHARD_BYTES,
    files: dict[str, str] | None = None,
) -> Path:
    """`files`: further text files to write beside the weights (name -> text)."""
    described = {DESCRIPTION: json.dumps({"format": FORMAT, **description}, indent=2)}
    return write_safetensors_dir(out, tensors, {**described, **(files or {})}, shard_bytes)


def write_safetensors_dir(
    out: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], files: dict[str, str], shard_bytes: int = SHARD_BYTES
) -> Path:
    """Writes `tensors` (name, tensor), produced one at a time, into safetensors files of about
    `shard_bytes` with a Hugging Face index, so that at most one file's worth is held in memory, and
    the text `files` beside them. Written into a temporary directory renamed into place at the end:
    `out` is either complete or absent."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new one")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    written, pending, pending_bytes = [], {}, 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = f"model-{len(written) + 1:05d}.safetensors"
            save_file(pending, str(partial / name), metadata={"format": "pt"})
            written.append((name, list(pending)))
            pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > shard_bytes:
            flush()
        pending[name] = tensor.contiguous()
        pending_bytes += size
    flush()

    weight_map = {}
    for number, (name, names) in enumerate(written, start=1):
        final = f"model-{number:05d}-of-{len(written):05d}.safetensors"
        os.replace(partial / name, partial / final)
        weight_map.update(dict.fromkeys(names, final))
    (partial / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    for name, text in files.items():
        (partial / name).write_text(text)
    if out.exists():
        out.rmdir()
    os.replace(partial, out)
    return out
