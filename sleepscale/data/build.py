"""`sleepscale data <task>`: generate a task (or pack a text corpus) into train/validation shards."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tqdm import tqdm

from sleepscale.config import ConfigError
from sleepscale.data import depo, math_problems, rule110, text
from sleepscale.data.sample import DataError
from sleepscale.data.shards import SplitWriter, sample_rng, write_manifest
from sleepscale.data.tokenizer import load_tokenizer

VERSIONS = {"rule110": rule110.VERSION, "depo": depo.VERSION, "math": math_problems.VERSION, "text": text.VERSION}
TASKS = {"rule110": rule110.Rule110Task, "depo": depo.DepoTask, "math": math_problems.MathTask}


def make_task(name: str, args: dict):
    """A generated task from its name and constructor options (as `data.generate` gives them)."""
    try:
        return TASKS[name](**args)
    except (TypeError, ValueError) as error:  # an unknown, missing or impossible option
        raise ConfigError(f"data.generate.args for {name}: {error}") from None


def build_command(args) -> None:
    """`sleepscale data <task>`: the dataset its arguments describe. A task option that cannot work is
    a ConfigError (one line from the CLI); a DataError, a ValueError too, passes through."""
    try:
        out = Path(args.out)
        if args.task == "text":
            tokenizer = load_tokenizer(args.tokenizer, args.eos_token)
            corpus = text.TextCorpus(args.input, args.length, tokenizer, args.field)
            manifest = build_text_dataset(corpus, out, args.seed, args.validation_fraction, args.samples_per_shard)
        else:
            if args.task == "rule110":
                task = rule110.Rule110Task(args.t, args.bits, args.strings, args.t_in_query)
            elif args.task == "depo":
                task = depo.DepoTask(args.k, args.eval_k, args.min_nodes, args.max_nodes, args.queries)
            else:
                task = math_problems.MathTask(args.ops, args.length, load_tokenizer(args.tokenizer, args.eos_token))
            manifest = build_task_dataset(
                task, out, args.seed, args.train_samples, args.validation_samples, args.samples_per_shard
            )
        print(f"wrote {manifest}")
    except ValueError as error:
        if isinstance(error, DataError):
            raise
        raise ConfigError(str(error)) from None


def _prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("*.tar")) + sorted(out.glob("manifest.json"))
    if stale:
        raise FileExistsError(f"{out} already holds a dataset ({stale[0].name}, ...); choose an empty --out directory")


def build_task_dataset(task, out: Path, seed: int, train_samples: int, validation_samples: int, samples_per_shard: int) -> Path:
    """Generated tasks: sample i of a split comes from its own seeded generator."""
    _prepare(out)
    splits = {}
    for split, count, split_task in (("train", train_samples, task), ("validation", validation_samples, task.for_validation())):
        writer = SplitWriter(out, split, samples_per_shard)
        for index in tqdm(range(count), desc=split, unit="sample", disable=None):
            writer.write(split_task.sample(sample_rng(seed, split, index)))
        splits[split] = writer.finish()
    return write_manifest(out, {
        "task": task.name, "generator_version": VERSIONS[task.name], "seed": seed,
        "params": task.params(), "validation_params": task.for_validation().params(),
        "tokenizer": task.vocabulary.describe(), "vocab_size": task.vocabulary.vocab_size,
        "sequence_length": task.sequence_length, "splits": splits,
    })


def build_text_dataset(corpus: text.TextCorpus, out: Path, seed: int, validation_fraction: float, samples_per_shard: int) -> Path:
    """Text: each packed sample goes to validation with probability `validation_fraction`, drawn
    from its own seeded generator, so the split does not depend on file sizes or order."""
    _prepare(out)
    writers = {split: SplitWriter(out, split, samples_per_shard) for split in ("train", "validation")}
    for index, sample in enumerate(tqdm(corpus.samples(), desc="text", unit="sample", disable=None)):
        in_validation = sample_rng(seed, "validation", index).random() < validation_fraction
        writers["validation" if in_validation else "train"].write(sample)
    splits = {split: writer.finish() for split, writer in writers.items()}
    return write_manifest(out, {
        "task": corpus.name, "generator_version": VERSIONS["text"], "seed": seed,
        "params": corpus.params() | {"validation_fraction": validation_fraction},
        "dropped_tail_tokens": corpus.dropped_tail_tokens,
        "tokenizer": corpus.tokenizer.describe(), "vocab_size": corpus.tokenizer.vocab_size,
        "sequence_length": corpus.sequence_length, "splits": splits,
    })


def generate_missing(data) -> bool:
    """Writes the dataset a config's `data` section describes (`data.generate`) into `data.path` if
    it has none yet; True if it did. Safe when several processes start at once (a job array's
    elements): each writes into its own temporary directory and renames it into place; the first
    rename wins and the others discard theirs (the same seed writes the same bytes)."""
    if data is None or data.generate is None or (Path(data.path) / "manifest.json").exists():
        return False
    generate, path = data.generate, Path(data.path)
    temporary = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    build_task_dataset(make_task(generate.task, generate.args), temporary, generate.seed, generate.train_samples,
                       generate.validation_samples, generate.samples_per_shard)
    try:
        os.rename(temporary, path)  # replaces a missing or empty directory, atomically
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        if not (path / "manifest.json").exists():
            raise FileExistsError(f"data.path {path} exists but holds no dataset; empty it or give another path") from None
        return False
    return True
