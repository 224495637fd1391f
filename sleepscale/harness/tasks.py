"""Which lm-evaluation-harness tasks a name means, offline.

A name given to `sleepscale eval --lm-eval` is, in this order:
- a YAML file (`*.yaml`, `*.yml`): a harness task config whose data are local. Its `dataset_path` may
  be a local `.json`/`.jsonl`/`.csv`/`.parquet` file or a directory, and `dataset_kwargs.data_files`
  may name local files; relative paths are read from the YAML's directory (the harness itself reads
  them from the working directory), so the YAML and its data travel together;
- a local task shipped here (`LOCAL_TASKS`, the YAML files under `tasks/`), made from sleepscale's
  own task generators (`write_local_data` writes their data again):
  - `rule110_choice`: Rule 110 as multiple choice by log-likelihood: two 24-bit strings, then the
    queries up to one of them; is cell 0 of that string "0" or "1" after t=2 steps? (chance 0.5);
  - `math_generation`: a math word problem needing 2 operations, its answer generated (exact match);
- a task, group or tag of the harness's own registry (`hellaswag`, `mmlu`, ...), whose dataset the
  harness reads from the Hugging Face hub, or from its cache with `HF_DATASETS_OFFLINE=1`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sleepscale.config import ConfigError

LOCAL_TASKS = Path(__file__).parent / "tasks"
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}  # `datasets`' own
SPLITS = ("training_split", "validation_split", "test_split", "fewshot_split")


def local_task_names() -> list[str]:
    return sorted(path.stem for path in LOCAL_TASKS.glob("*.yaml"))


def resolve_tasks(names: list[str]):
    """(task specs for `lm_eval.simple_evaluate`, its TaskManager). The harness's registry is indexed
    (~10 s) only when a name needs it."""
    from lm_eval.tasks import TaskManager

    specs, registered = [], []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            specs.append(local_task(Path(name)))
        elif name in local_task_names():
            specs.append(local_task(LOCAL_TASKS / f"{name}.yaml"))
        else:
            specs.append(name)
            registered.append(name)
    manager = TaskManager(include_defaults=bool(registered))
    unknown = [name for name in registered if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"--lm-eval {','.join(unknown)}: not a task of lm-evaluation-harness, a local task "
            f"({', '.join(local_task_names())}) or a YAML file (*.yaml)"
        )
    return specs, manager


def local_task(path: Path) -> dict[str, Any]:
    """The task config of a YAML file (the harness's own reader: `include:` and `!function` work),
    its local data paths made absolute."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the harness's reader, so that its YAML means the same

    if not path.is_file():
        raise FileNotFoundError(f"--lm-eval {path}: no such task file")
    config = load_yaml(path)
    if "task" not in config:
        raise ConfigError(f"--lm-eval {path}: the YAML names no task (its `task:` key)")
    base = path.resolve().parent
    dataset_path = config.get("dataset_path")
    if isinstance(dataset_path, str) and (
        Path(dataset_path).is_absolute() or dataset_path.endswith(tuple(BUILDERS)) or (base / dataset_path).exists()
    ):
        local = _existing(base, dataset_path, path)
        builder = BUILDERS.get(local.suffix)
        if local.is_dir():
            config["dataset_path"] = str(local)
        elif builder is None:
            raise ConfigError(
                f"{path}: dataset_path {dataset_path} is a file `datasets` cannot read; give a "
                f"{'/'.join(BUILDERS)} file or a directory"
            )
        else:  # a single file holds every split the task reads
            splits = {config[key] for key in SPLITS if config.get(key)}
            config["dataset_path"] = builder
            config["dataset_kwargs"] = {
                **(config.get("dataset_kwargs") or {}),
                "data_files": {split: str(local) for split in splits},
            }
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        config["dataset_kwargs"]["data_files"] = _absolute(files, base, path)
    return config


def _absolute(files, base: Path, yaml_path: Path):
    """`data_files` (a path, a list of them or split -> either) with each local path absolute."""
    if isinstance(files, dict):
        return {split: _absolute(value, base, yaml_path) for split, value in files.items()}
    if isinstance(files, list):
        return [_absolute(value, base, yaml_path) for value in files]
    if "://" in str(files):  # a remote file: datasets' to fetch
        return files
    if any(mark in str(files) for mark in "*?["):  # a glob: datasets' to expand
        return str(base / files)
    return str(_existing(base, files, yaml_path))


def _existing(base: Path, name: str, yaml_path: Path) -> Path:
    local = (base / name).resolve()
    if not local.exists():
        raise FileNotFoundError(f"{yaml_path}: its dataset file {local} does not exist")
    return local


# ---------------------------------------------------------------------------- the shipped local tasks


def write_local_data(directory: Path = LOCAL_TASKS, docs: int = 100, seed: int = 0) -> list[Path]:
    """The local tasks' data (`<task>.jsonl`), generated by sleepscale's task generators with `seed`."""
    import numpy as np

    from sleepscale.data.math_problems import MathTask
    from sleepscale.data.rule110 import Rule110Task
    from sleepscale.data.sample import IGNORE_INDEX

    rng = np.random.default_rng(seed)
    rule110, choice = Rule110Task(t_values=[2], bits=24, strings=2), []
    while len(choice) < docs:
        sample = rule110.sample(rng)
        query = int(rng.integers(rule110.strings))
        context = sample.input_ids[: rule110.strings * rule110.bits + query + 1]
        choice.append(
            {"context": rule110.vocabulary.decode(context.tolist()), "answer": sample.meta["answer"][query], "t": 2}
        )
    math, generation = MathTask(ops_values=[2], length=256), []
    while len(generation) < docs:
        sample = math.sample(rng)
        first_answer = int(np.flatnonzero(sample.targets != IGNORE_INDEX)[0])
        context = math.tokenizer.decode(sample.input_ids[: first_answer + 1].tolist())
        generation.append({"context": context, "answer": str(sample.meta["answer"]), "ops": 2})
    written = []
    for name, rows in (("rule110_choice", choice), ("math_generation", generation)):
        path = Path(directory) / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        written.append(path)
    return written


if __name__ == "__main__":  # python -m sleepscale.harness.tasks: writes the shipped data again
    for written in write_local_data():
        print(f"wrote {written}")
