"""The model directory: sleepscale weights that a run starts from (`model.init_from`).

`sleepscale convert` writes one from a Hugging Face checkpoint; the trainer reads it. Layout:

    sleepscale_model.json            {"format": 1, "model": <the config's model section>,
                                      "source": {"family": ..., "config": <the source config.json>} or null,
                                      "inserted_blocks": [block indices added by --insert-gdn]}
    model-00001-of-0000K.safetensors weights under our parameter names, in the source's dtype
    model.safetensors.index.json     which file holds which tensor (the Hugging Face index format)
    train.yaml                       with GDN blocks inserted: the two-stage config of the recipe

It is not a training checkpoint (`<run_dir>/checkpoints/step-*`, which also holds optimizer and data
state): it holds weights only and never changes once written. Tensors are read lazily, file by file
and row range by row range (safetensors' memory-mapped slices), so a rank can take its own shard
of a weight without reading the rest.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = 1
DESCRIPTION = "sleepscale_model.json"
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 2 * 1024**3


class ModelDirError(ValueError):
    """A model directory that cannot be used, described in one line."""


def is_model_dir(path: str | Path) -> bool:
    return (Path(path) / DESCRIPTION).is_file()


def read_description(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    described = path / DESCRIPTION
    if not described.is_file():
        raise ModelDirError(f"{path}: not a sleepscale model directory (no {DESCRIPTION}); write one with `sleepscale convert`")
    description = json.loads(described.read_text())
    if description.get("format") != FORMAT:
        raise ModelDirError(f"{described}: format {description.get('format')!r} is not {FORMAT}; convert the source again")
    return description


def write_model_dir(out: str | Path, description: dict[str, Any], tensors: Iterable[tuple[str, torch.Tensor]],
                    shard_bytes: int = SHARD_BYTES, files: dict[str, str] | None = None) -> Path:
    """`files`: further text files to write beside the weights (name -> text)."""
    described = {DESCRIPTION: json.dumps({"format": FORMAT, **description}, indent=2)}
    return write_safetensors_dir(out, tensors, {**described, **(files or {})}, shard_bytes)


def write_safetensors_dir(out: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], files: dict[str, str],
                          shard_bytes: int = SHARD_BYTES) -> Path:
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


class SafetensorsFiles:
    """Lazy access by name to the tensors of a directory of safetensors files (ours or Hugging Face's:
    `model.safetensors` or an index with its shards). Files are opened on first use and memory-mapped."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / "model.safetensors").is_file():
            with safe_open(self.directory / "model.safetensors", framework="pt") as file:
                self.weight_map = dict.fromkeys(file.keys(), "model.safetensors")
        else:
            raise ModelDirError(f"{self.directory}: no model.safetensors or {INDEX}; only safetensors checkpoints are read "
                                "(save the model with save_pretrained(..., safe_serialization=True))")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        """The open file holding `name`. Opened per read and closed after it (a context manager), so
        that a rank never keeps more than the tensor it reads mapped into memory."""
        if name not in self.weight_map:
            raise ModelDirError(f"{self.directory}: no tensor {name!r}; the checkpoint does not match its config")
        path = self.directory / self.weight_map[name]
        if not path.is_file():
            raise ModelDirError(f"{path}: missing (named by {INDEX}); copy the whole checkpoint directory")
        return safe_open(path, framework="pt")

    def shape(self, name: str) -> list[int]:
        with self._file(name) as file:
            return file.get_slice(name).get_shape()

    def get(self, name: str, rows: tuple[int, int] | None = None, columns: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only its rows [start, stop) or columns (read without the rest)."""
        with self._file(name) as file:
            if rows is None and columns is None:
                return file.get_tensor(name)
            part = file.get_slice(name)
            return part[rows[0] : rows[1]] if columns is None else part[:, columns[0] : columns[1]]


@torch.no_grad()
def load_weights(model: torch.nn.Module, source, tensor_group=None, device: torch.device | str = "cpu") -> None:
    """Copies the weights of `source` into `model`, casting to each parameter's dtype. `source`: a model
    directory's path, or any object read like its `SafetensorsFiles` (`SeededWeights`: a model drawn
    from its seed).

    `model` may be whole, or this rank's part of it: tensor-parallel shards (`parallelize_tensor`)
    and a pipeline stage's blocks (the others replaced by `nn.Identity`). Parameters still on the
    meta device are materialised on `device` first, and a tensor-parallel shard is read alone
    (its rows or columns of the stored tensor), so no rank ever holds a whole model. Every
    parameter must be found: a partial load would train a silently half-random model."""
    files = source if hasattr(source, "get") else SafetensorsFiles(source)
    directory = files.directory  # what errors name
    parameters = dict(model.named_parameters())  # tied weights once, under their first name
    missing = [name for name in parameters if name not in files]
    if missing:
        raise ModelDirError(f"{directory}: no weights for {missing[:3]}; was model.init_from's model section edited?")
    materialised = {}  # id of a meta parameter -> its replacement
    for name, parameter in parameters.items():
        value = _read_part(files, name, parameter, tensor_group)
        if tuple(value.shape) != tuple(parameter.shape):
            raise ModelDirError(f"{directory}: {name} has shape {tuple(value.shape)}, the model {tuple(parameter.shape)}")
        if parameter.is_meta:
            real = torch.nn.Parameter(torch.empty(parameter.shape, dtype=parameter.dtype, device=device),
                                      requires_grad=parameter.requires_grad)
            real.__dict__.update(parameter.__dict__)  # tensor-parallel marks
            real._backward_hooks = parameter._backward_hooks  # e.g. tensor parallelism's gradient sums
            materialised[id(parameter)] = parameter = real
        parameter.copy_(value)
    for module in model.modules():  # every reference, tied weights included
        for attribute, parameter in module._parameters.items():
            if parameter is not None and id(parameter) in materialised:
                module._parameters[attribute] = materialised[id(parameter)]


def _read_part(files: SafetensorsFiles, name: str, parameter: torch.nn.Parameter, tensor_group) -> torch.Tensor:
    """The stored tensor, or only this rank's tensor-parallel shard of it."""
    if tensor_group is None:
        return files.get(name)
    from sleepscale.parallel.tensor import shard_slice  # imports megatron-core (~10 s): only under tensor parallelism

    part = shard_slice(parameter, tensor_group)
    if part is None:
        return files.get(name)
    dim, start, stop, stored_rows = part
    shape = files.shape(name)
    if dim == 0:
        value = files.get(name, (start, min(stop, stored_rows))) if start < stored_rows else None
    else:
        value = files.get(name, columns=(start, stop))
    if dim == 0 and (value is None or value.shape[0] < stop - start):  # vocabulary padding beyond the stored rows
        padding = torch.zeros(stop - start - (0 if value is None else value.shape[0]), *shape[1:],
                              dtype=parameter.dtype)
        value = padding if value is None else torch.cat([value.to(parameter.dtype), padding])
    return value
