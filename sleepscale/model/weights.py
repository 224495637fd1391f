"""Filling a model with stored weights: `load_weights(model, source)`.

A source is a directory of safetensors files (a sleepscale model directory, `sleepscale.convert.model_dir`,
or a Hugging Face checkpoint), read by name through `SafetensorsFiles`, or anything read like it
(`names`, `shape`, `get` with rows or columns; `SeededWeights` draws a model from its seed). Tensors
are read lazily, file by file and row range by row range (safetensors' memory-mapped slices), so a rank
can take its own shard of a weight without reading the rest. Where a tensor-parallel shard lies is the
caller's to say (`shard`): this module knows nothing of parallelism.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INDEX = "model.safetensors.index.json"  # which file holds which tensor (the Hugging Face index format)

# Where this rank's tensor-parallel shard of a parameter lies in the stored tensor: (dim, start, stop,
# stored rows), rows from `stored rows` to `stop` being vocabulary padding; None for a replicated one.
Shard = Callable[[torch.nn.Parameter], "tuple[int, int, int, int] | None"]


class ModelDirError(ValueError):
    """A model directory (or weights source) that cannot be used, described in one line."""


class SafetensorsFiles:
    """Lazy access by name to the tensors of a directory of safetensors files (ours or Hugging Face's:
    `model.safetensors` or an index with its shards). Files are opened on first use and memory-mapped."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                self.weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ModelDirError(
                    f"{index}: not a safetensors index ({_one_line(error)}); copy the checkpoint directory again"
                ) from None
        elif (self.directory / "model.safetensors").is_file():
            with self._open(self.directory / "model.safetensors") as file:
                self.weight_map = dict.fromkeys(file.keys(), "model.safetensors")
        else:
            raise ModelDirError(
                f"{self.directory}: no model.safetensors or {INDEX}; only safetensors checkpoints are "
                "read (save the model with save_pretrained(..., safe_serialization=True))"
            )

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
        return self._open(path)

    @staticmethod
    @contextlib.contextmanager
    def _open(path: Path) -> Iterator:
        """safe_open, with a damaged or truncated file's error as a one-line `ModelDirError`."""
        try:
            with safe_open(path, framework="pt") as file:
                yield file
        except SafetensorError as error:
            raise ModelDirError(
                f"{path}: not a readable safetensors file ({_one_line(error)}); it is damaged or "
                "truncated: copy or save the checkpoint again"
            ) from None

    def shape(self, name: str) -> list[int]:
        with self._file(name) as file:
            return file.get_slice(name).get_shape()

    def get(
        self, name: str, rows: tuple[int, int] | None = None, columns: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The tensor, or only its rows [start, stop) or columns (read without the rest)."""
        with self._file(name) as file:
            if rows is None and columns is None:
                return file.get_tensor(name)
            part = file.get_slice(name)
            return part[rows[0] : rows[1]] if columns is None else part[:, columns[0] : columns[1]]


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


@torch.no_grad()
def load_weights(
    model: torch.nn.Module, source, *, shard: Shard | None = None, device: torch.device | str = "cpu"
) -> None:
    """Copies the weights of `source` into `model`, casting to each parameter's dtype. `source`: a model
    directory's path, or any object read like its `SafetensorsFiles` (`SeededWeights`: a model drawn
    from its seed).

    `model` may be whole, or this rank's part of it: tensor-parallel shards (`parallelize_tensor`)
    and a pipeline stage's blocks (the others replaced by `nn.Identity`). For tensor-parallel shards
    `shard` says where each parameter's shard lies in the stored tensor (`Shard`; under tensor
    parallelism `sleepscale.parallel.tensor.shard_slice` bound to the group), and only that part is
    read. Parameters still on the meta device are materialised on `device` first, so no rank ever
    holds a whole model. Every parameter must be found: a partial load would train a silently
    half-random model."""
    files = source if hasattr(source, "get") else SafetensorsFiles(source)
    directory = files.directory  # what errors name
    parameters = dict(model.named_parameters())  # tied weights once, under their first name
    missing = [name for name in parameters if name not in files]
    if missing:
        raise ModelDirError(f"{directory}: no weights for {missing[:3]}; was model.init_from's model section edited?")
    materialised = {}  # id of a meta parameter -> its replacement
    for name, parameter in parameters.items():
        value = _read_part(files, name, parameter, shard)
        if tuple(value.shape) != tuple(parameter.shape):
            raise ModelDirError(
                f"{directory}: {name} has shape {tuple(value.shape)}, the model {tuple(parameter.shape)}"
            )
        if parameter.is_meta:
            real = torch.nn.Parameter(
                torch.empty(parameter.shape, dtype=parameter.dtype, device=device),
                requires_grad=parameter.requires_grad,
            )
            real.__dict__.update(parameter.__dict__)  # tensor-parallel marks
            real._backward_hooks = parameter._backward_hooks  # e.g. tensor parallelism's gradient sums
            materialised[id(parameter)] = parameter = real
        parameter.copy_(value)
    for module in model.modules():  # every reference, tied weights included
        for attribute, parameter in module._parameters.items():
            if parameter is not None and id(parameter) in materialised:
                module._parameters[attribute] = materialised[id(parameter)]


def _read_part(files: SafetensorsFiles, name: str, parameter: torch.nn.Parameter, shard: Shard | None) -> torch.Tensor:
    """The stored tensor, or only this rank's tensor-parallel shard of it."""
    part = shard(parameter) if shard is not None else None
    if part is None:
        return files.get(name)
    dim, start, stop, stored_rows = part
    shape = files.shape(name)
    if dim == 0:
        value = files.get(name, (start, min(stop, stored_rows))) if start < stored_rows else None
    else:
        value = files.get(name, columns=(start, stop))
    if dim == 0 and (value is None or value.shape[0] < stop - start):  # vocabulary padding beyond the stored rows
        padding = torch.zeros(
            stop - start - (0 if value is None else value.shape[0]), *shape[1:], dtype=parameter.dtype
        )
        value = padding if value is None else torch.cat([value.to(parameter.dtype), padding])
    return value
