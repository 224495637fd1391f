"""`sleepscale convert`: Hugging Face checkpoints into sleepscale model directories, and back.

    import:  a Hugging Face directory (config.json + safetensors) -> a model directory that
             `model.init_from` starts a run from (`model_dir.py`), optionally with GDN blocks inserted
    export:  a model directory, or a run / training checkpoint trained from one, -> a Hugging Face
             directory of the source's family (or of fla's GatedDeltaNet for models trained from scratch)

Which families and how their weights map: `families.py`. Nothing is downloaded; tensors are read
lazily (one output file's worth in memory at a time).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from sleepscale.config import FREE_OF_SOURCE, ConfigError, validate
from sleepscale.convert.families import FlaGatedDeltaNet, Piece, UnsupportedCheckpoint, family_of
from sleepscale.convert.model_dir import (
    DESCRIPTION,
    SHARD_BYTES,
    ModelDirError,
    is_model_dir,
    read_description,
    write_model_dir,
    write_safetensors_dir,
)
from sleepscale.model import build_model
from sleepscale.model.hybrid import HybridLM
from sleepscale.model.weights import SafetensorsFiles
from sleepscale.train.checkpoint import load_model_from_checkpoint, resolve_checkpoint

INSERTED_BLOCK = "g"  # GDN without MLP, as Ouro's inserted fast-weight layers


def read_hf_config(source: Path) -> dict[str, Any]:
    path = source / "config.json"
    if not path.is_file():
        raise ModelDirError(
            f"{source}: no config.json; give a Hugging Face checkpoint directory (save_pretrained's output)"
        )
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelDirError(
            f"{path}: not valid JSON ({error}); give the config.json that save_pretrained wrote beside the weights"
        ) from None
    if not isinstance(hf, dict):
        raise ModelDirError(
            f"{path}: holds a JSON {type(hf).__name__}, not an object of config fields; give the "
            "config.json that save_pretrained wrote beside the weights"
        )
    return hf


def _validated(section: dict[str, Any]):
    """The ModelConfig of a model section (with the config's one-line errors)."""
    try:
        return validate({"model": section, "sleep": {"window": 1}, "train": {"steps": 1}}).model
    except ConfigError as error:
        raise UnsupportedCheckpoint(f"the model section is not valid: {error}") from None


def with_inserted_gdn(section: dict[str, Any], every: int) -> tuple[dict[str, Any], list[int], list[int]]:
    """(model section with a GDN-only block after every `every`-th block, our block index of each
    source block, the inserted blocks' indices)."""
    if every < 1:
        raise ConfigError(
            f"--insert-gdn {every}: give K >= 1 (a GDN block after every K-th block), or leave out "
            "--insert-gdn to insert none"
        )
    letters, block_of, inserted = [], [], []
    for index, letter in enumerate(section["pattern"]):
        block_of.append(len(letters))
        letters.append(letter)
        if (index + 1) % every == 0:
            inserted.append(len(letters))
            letters.append(INSERTED_BLOCK)
    section = {**section, "pattern": "".join(letters)}
    if "gdn" not in section:  # a pure transformer: GDN heads shaped like its attention heads
        attention = section["attention"]
        section["gdn"] = {"num_heads": attention["num_heads"], "head_dim": attention["head_dim"], "expand_v": 1.0}
    return section, block_of, inserted


def convert_from_hf(
    source: str | Path, out: str | Path, insert_gdn: int | None = None, seed: int = 0, shard_bytes: int = SHARD_BYTES
) -> Path:
    source, out = Path(source), Path(out)
    hf = read_hf_config(source)
    family = family_of(hf)
    section = family.model_section(hf)
    _validated(section)
    block_of, inserted = list(range(len(section["pattern"]))), []
    model_section = section
    if insert_gdn is not None:
        model_section, block_of, inserted = with_inserted_gdn(section, insert_gdn)
    model_section = {**model_section, "seed": seed}
    model = _validated(model_section)
    files = SafetensorsFiles(source)
    pieces = family.pieces(hf, section, block_of)
    _check_coverage(pieces, files, family, model, inserted, source)
    skipped = [name for name in files.names() if name.startswith(family.ignored)]
    if skipped:
        print(
            f"not converted: {len(skipped)} tensors under "
            f"{', '.join(family.ignored)} (sleepscale's models are text-only "
            "and predict one token ahead)"
        )

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for piece in pieces:
            yield piece.ours, files.get(piece.theirs, piece.rows)
        yield from _inserted_weights(model, inserted)

    description = {
        "model": model_section,
        "source": {"family": hf["model_type"], "config": hf},
        "inserted_blocks": inserted,
    }
    extra = {INSERTION_CONFIG: insertion_config(out, inserted)} if inserted else {}
    # The source's tokenizer, for whoever evaluates or generates with the model (`sleepscale.harness`).
    extra.update({name: (source / name).read_text() for name in TOKENIZER_FILES if (source / name).is_file()})
    return write_model_dir(out, description, tensors(), shard_bytes, extra)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


INSERTION_CONFIG = "train.yaml"


def insertion_config(model_dir: Path, inserted: list[int]) -> str:
    """The two-stage config of the paper's insertion recipe (Ouro) for a model directory."""
    config = {
        "model": {"init_from": str(model_dir.resolve())},
        "sleep": {"window": 512, "passes": 2, "eviction": "hard"},
        "data": {"path": "SET-ME: a dataset directory written by `sleepscale data`"},
        "stages": [
            {"name": "inserted", "steps": 1000, "eviction": "hard", "train": [f"layers.{i}.*" for i in inserted]},
            {"name": "whole", "steps": 1000, "eviction": "sliding", "train": ["*"]},
        ],
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "schedule": {"kind": "cosine", "warmup_steps": 100},
        "train": {"run_dir": f"runs/{model_dir.name}", "micro_batch_size": 8},
    }
    header = (
        "# Written by `sleepscale convert --insert-gdn`: the paper's recipe for GDN blocks inserted into a pretrained\n"
        "# model (Ouro). Stage 'inserted' trains only the inserted blocks (their output projections start at zero, so\n"
        "# the model starts as the source) under hard eviction, where they alone carry what evicted windows held;\n"
        "# stage 'whole' then trains everything under sliding-window eviction. Set data.path, the window and the\n"
        "# stage lengths for your data, e.g.\n"
        f"#   sleepscale train {model_dir / INSERTION_CONFIG} data.path=runs/data/mine\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def _check_coverage(
    pieces: list[Piece], files: SafetensorsFiles, family, model, inserted: list[int], source: Path
) -> None:
    """Every weight of the model comes from a source tensor of its shape or is inserted, and every
    source tensor is used or knowingly ignored: a mismatch stops before anything is written."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in HybridLM(model).named_parameters()}
    covered = {piece.ours for piece in pieces} | {name for name in shapes if _block_index(name) in inserted}
    missing = sorted(set(shapes) - covered)
    if missing:
        raise ModelDirError(f"{source}: no source for {missing[:3]}; the checkpoint does not match its config.json")
    for piece in pieces:
        shape = list(files.shape(piece.theirs))
        if piece.rows is not None:
            shape[0] = piece.rows[1] - piece.rows[0]
        if tuple(shape) != shapes[piece.ours]:
            raise ModelDirError(
                f"{source}: {piece.theirs} gives {piece.ours} shape {tuple(shape)}, config.json implies "
                f"{shapes[piece.ours]}"
            )
    used = {piece.theirs for piece in pieces}
    unused = [name for name in files.names() if name not in used and not name.startswith(family.ignored)]
    if unused:
        raise ModelDirError(
            f"{source}: tensors {unused[:3]} have no place in sleepscale's model; the checkpoint uses "
            "a feature its config.json does not declare"
        )


def _block_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def _inserted_weights(model, inserted: list[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """The inserted blocks' weights: initialised as a fresh model's, except the output projection,
    which is zero so that the converted model computes exactly what the source did."""
    if not inserted:
        return
    fresh = build_model(model)  # deterministic in model.seed
    for index in inserted:
        block = fresh.layers[index]
        torch.nn.init.zeros_(block.attn.o_proj.weight)
        for name, tensor in block.named_parameters():
            yield f"layers.{index}.{name}", tensor.detach()


def export_to_hf(source: str | Path, out: str | Path, shard_bytes: int = SHARD_BYTES) -> Path:
    """A model directory or a run / training checkpoint -> a Hugging Face checkpoint directory."""
    source, out = Path(source), Path(out)
    if is_model_dir(source):
        description = read_description(source)
        section, weights = description["model"], SafetensorsFiles(source)
        get = weights.get
        model_dir = source
    else:
        model, config = load_model_from_checkpoint(_checkpoint_in(source))
        section = config.model.model_dump(mode="json")
        model_dir = Path(config.model.init_from) if config.model.init_from else None
        description = read_description(model_dir) if model_dir else {"source": None}
        state = dict(model.named_parameters())
        get = lambda name, rows=None: state[name].detach() if rows is None else state[name].detach()[rows[0] : rows[1]]  # noqa: E731
    if description.get("inserted_blocks"):
        raise UnsupportedCheckpoint(
            f"{source}: has GDN blocks inserted by --insert-gdn, which the source family "
            f"({description['source']['family']}) cannot hold; keep it as a sleepscale model directory"
        )
    hf_source = description.get("source")
    if hf_source is None:  # trained from scratch: fla's hybrid holds our blocks as they are
        family = FlaGatedDeltaNet()
        hf = family.hf_config(section)
    else:
        family = family_of(hf_source["config"])
        _check_same_architecture(family.model_section(hf_source["config"]), section, source)
        hf = family.export_config(hf_source["config"])
    pieces = family.pieces(hf, section, list(range(len(section["pattern"].replace("|", "")))))
    by_target: dict[str, list[Piece]] = defaultdict(list)
    for piece in pieces:
        by_target[piece.theirs].append(piece)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, parts in by_target.items():
            parts = sorted(parts, key=lambda piece: piece.rows or (0, 0))
            yield name, torch.cat([get(piece.ours) for piece in parts]) if len(parts) > 1 else get(parts[0].ours)

    files = {"config.json": json.dumps(hf, indent=2)}
    if model_dir is not None:  # the tokenizer the import copied, back beside the weights
        files.update({name: (model_dir / name).read_text() for name in TOKENIZER_FILES if (model_dir / name).is_file()})
    return write_safetensors_dir(out, tensors(), files, shard_bytes)


def _checkpoint_in(source: Path) -> Path:
    """The training checkpoint `source` names (itself, or a run directory's latest), or a one-line error
    saying what was looked for and what `source` holds."""
    try:
        return resolve_checkpoint(source)
    except FileNotFoundError:
        if (source / "checkpoints").exists() or (source / "latest").exists():
            raise  # a run or checkpoint directory whose latest checkpoint is incomplete: that error names it
    entries = sorted(entry.name for entry in source.iterdir())
    if not entries:
        found = "it is empty"
    else:
        found = "it holds " + ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise ModelDirError(
        f"{source}: nothing to convert: no config.json (a Hugging Face checkpoint to import), no "
        f"{DESCRIPTION} (a model directory to export) and no trainer.json (a run or training "
        f"checkpoint to export); {found}"
    )


def _check_same_architecture(source_section: dict[str, Any], section: dict[str, Any], where: Path) -> None:
    source_model, model = _validated(source_section), _validated({**section, "init_from": None})
    mine = model.model_dump(exclude=set(FREE_OF_SOURCE))
    theirs = source_model.model_dump(exclude=set(FREE_OF_SOURCE))
    mine["pattern"], theirs["pattern"] = model.blocks, source_model.blocks
    differing = [key for key in mine if mine[key] != theirs[key]]
    if differing:
        raise UnsupportedCheckpoint(
            f"{where}: model.{differing[0]} differs from the source checkpoint's; only an unchanged "
            "architecture exports to the source family"
        )
