"""Local sweeps: one `sleepscale train` per value of the swept keys (or per combination of them), in
their own run directories under one sweep directory, then the comparison report
(`sleepscale.report`).

    sleepscale sweep CONFIG sleep.passes=1,3 [model.pattern=AG,AGAG] [key=value ...] [--parallel 2]
        [--equal-flops [--flops-factor 2]]

A `KEY=V1,V2,...` argument (commas outside brackets) is swept; a `key=value` with one value is a
fixed override for every run. Run directories are named `<tag>-<value>` (tag: the key's last part,
e.g. `passes-3`; several keys join with `_`), as `slurm/sweep.sbatch` names its elements, so the
same report reads both. `--equal-flops` gives every run whose training FLOPs are below the largest
that many FLOPs (more steps) too, and `--flops-factor F` also F times that many (the compute-matched
baseline given more than its match). Under a constant learning rate (`schedule.kind: constant`) the
run is extended in place and evaluated at its own step count and at each budget (`eval.at_steps`):
its model at the original step count is the model a run of that length would have (same data order,
same learning rate at every step), so its evaluation there is the equal-token point and the later
ones the equal-FLOPs (and F-times) points, for the cost of one run. Otherwise (a cosine would have
decayed differently) a separate run of the same settings on a schedule of each longer length is
added, named `<name>-equal-flops` (and `<name>-flops-xF`).

Runs go one after another, or `--parallel K` at a time, the cores split between them (threads
per process = cores // K). They log to one MLflow store (default `<sweep dir>/mlflow.db`, or the
config's `tracking.uri`), each run tagged with its values and nested under one parent run that also
receives the report. `sweep.json` records the runs and which finished: the same command again
skips finished runs and resumes the others from their checkpoints (another command for the same
directory is refused). SIGTERM / SIGINT are passed on to the runs (they checkpoint and stop), and
the sweep exits 75 like `sleepscale train`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

from sleepscale.config import Config, ConfigError
from sleepscale.config_loading import load_config

log = logging.getLogger("sleepscale.sweep")

EXIT_PREEMPTED = 75
STATE_FILE = "sweep.json"


@dataclasses.dataclass
class SweepRun:
    name: str  # its directory under the sweep directory
    values: dict[str, str]  # swept key -> value, as given
    overrides: list[str]  # for `sleepscale train`, after the fixed ones
    longer: bool = False  # given more steps by --equal-flops (started first when runs share the cores)


def split_values(text: str) -> list[str]:
    """`1,3` -> ['1', '3']; commas inside brackets or braces stay (`[0,2],[1,3]` -> two values)."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [*values, current]


def parse_arguments(arguments: list[str]) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(swept keys with their values, fixed overrides)."""
    axes, fixed = [], []
    for argument in arguments:
        key, equals, text = argument.partition("=")
        if not equals or not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", key):
            raise ConfigError(f"sweep argument {argument!r}: give KEY=V1,V2,... (swept) or key=value (fixed)")
        values = split_values(text)
        if len(values) == 1:
            fixed.append(argument)
        elif any(not value for value in values):
            raise ConfigError(f"sweep argument {argument!r}: an empty value between commas")
        elif key in (k for k, _ in axes):
            raise ConfigError(f"sweep argument {argument!r}: {key} is swept twice")
        else:
            axes.append((key, values))
    if not axes:
        raise ConfigError("nothing to sweep; give at least one KEY=V1,V2,... (e.g. sleep.passes=1,3)")
    return axes, fixed


def run_name(values: dict[str, str]) -> str:
    return "_".join(
        f"{key.rsplit('.', 1)[-1]}-{re.sub(r'[^A-Za-z0-9._-]', '_', value)}" for key, value in values.items()
    )


def plan_runs(config_path: str, axes, fixed: list[str], equal_flops: bool, flops_factor: float = 1.0) -> list[SweepRun]:
    runs = []
    for combination in product(*(values for _, values in axes)):
        values = {key: value for (key, _), value in zip(axes, combination)}
        runs.append(SweepRun(run_name(values), values, [f"{key}={value}" for key, value in values.items()]))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"values {names} give the same run directory twice; give keys whose last parts differ")
    configs = [load_config(config_path, fixed + run.overrides) for run in runs]  # every combination must be valid
    if equal_flops:
        runs = _with_equal_flops(runs, configs, flops_factor)
    return runs


def _with_equal_flops(runs: list[SweepRun], configs: list[Config], factor: float = 1.0) -> list[SweepRun]:
    """Each run below the largest training FLOPs given steps up to them (and up to `factor` times
    them): extended in place, evaluated where it meets each budget, when its learning rate is
    constant; else one added run per budget."""
    totals = [training_flops(config) for config in configs]
    target = max(totals)
    planned, extra = [], []
    for run, config, total in zip(runs, configs, totals):
        if total >= target * 0.99:
            planned.append(run)
            continue
        budgets = {name: round(config.train.steps * target * times / total) for name, times in _budgets(factor)}
        if extends_exactly(config):
            meets = sorted({config.train.steps, *budgets.values(), *config.eval.at_steps})
            longest = [f"train.steps={max(budgets.values())}", f"eval.at_steps=[{','.join(map(str, meets))}]"]
            planned.append(SweepRun(run.name, run.values, [*run.overrides, *longest], longer=True))
        else:
            planned.append(run)
            for name, steps in budgets.items():
                overrides = [*run.overrides, f"train.steps={steps}"]
                extra.append(SweepRun(f"{run.name}-{name}", run.values, overrides, longer=True))
    return planned + extra


def _budgets(factor: float) -> list[tuple[str, float]]:
    """(run-name suffix, multiple of the largest run's FLOPs) for `--equal-flops [--flops-factor F]`."""
    return [("equal-flops", 1.0)] + ([(f"flops-x{factor:g}", factor)] if factor != 1 else [])


def extends_exactly(config: Config) -> bool:
    """Whether a longer run of `config` passes through the model a run of `config` ends with: a
    constant learning rate after a warm-up no longer than the run (the sweep adds evaluations
    where it meets each budget, `eval.at_steps`)."""
    return config.schedule.kind == "constant" and config.schedule.warmup_steps <= config.train.steps


def training_flops(config: Config) -> float:
    """Training FLOPs of a whole single-process run of `config`, from the plan of its first training
    batch (`sleepscale.flops`), which needs its dataset (generated here if missing)."""
    import torch  # ~2.5 s, as the four below that load it: only for --equal-flops

    from sleepscale.data.loader import ShardLoader  # loads torch
    from sleepscale.flops import plan_flops  # loads torch
    from sleepscale.model.hybrid import HybridLM  # loads torch
    from sleepscale.sleep import plan_for  # loads torch

    if config.stages or config.train.steps is None or config.sleep.random_passes is not None:
        raise ConfigError("--equal-flops: give a single stage (train.steps, no stages) with a fixed sleep.passes")
    ensure_dataset(config)
    batch = next(
        iter(
            ShardLoader(
                config.data.path, "train", batch_size=config.train.micro_batch_size, shuffle=False, rank=0, world_size=1
            )
        )
    )
    with torch.device("meta"):
        model = HybridLM(config.model)
    plan = plan_for(model, batch["input_ids"], config.sleep, batch["targets"])
    return plan_flops(plan, model, config.sleep.window) * config.train.grad_accumulation * config.train.steps


def ensure_dataset(config: Config) -> None:
    """Generates the config's dataset if it is missing: once, here, rather than by parallel runs at once."""
    from sleepscale.data.build import generate_missing  # loads torch (webdataset), ~2.5 s: only when a sweep runs

    if config.data is not None and config.data.generate is not None:
        if not (Path(config.data.path) / "manifest.json").exists():
            print(f"sweep: generating {config.data.generate.task} data into {config.data.path}", flush=True)
            generate_missing(config.data)


class _State:
    """`sweep.json`: the command that made the sweep, its runs, the parent MLflow run, and per run
    whether it finished and the wall seconds spent on it (over restarts)."""

    def __init__(self, directory: Path, command: dict):
        self.path = directory / STATE_FILE
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if self.data["command"] != command:
                raise ConfigError(
                    f"sweep --out {directory}: it holds a sweep started with other arguments "
                    f"({' '.join(self.data['command']['arguments'])} on {self.data['command']['config']}); "
                    "repeat that command to resume it, or give another --out"
                )
        else:
            self.data = {"command": command, "parent_run_id": None, "runs": {}}
            self.save()

    def save(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=1))
        temporary.replace(self.path)

    def run(self, name: str) -> dict:
        return self.data["runs"].setdefault(name, {"finished": False, "exit_code": None, "seconds": 0.0})


def sweep_command(args) -> int:
    """`sleepscale sweep`: `run_sweep` with the command's arguments."""
    if args.parallel < 1:
        raise ConfigError(f"--parallel {args.parallel}: give at least 1")
    if args.flops_factor != 1 and not args.equal_flops:
        raise ConfigError(f"--flops-factor {args.flops_factor:g}: give it with --equal-flops")
    if args.flops_factor < 1:
        raise ConfigError(f"--flops-factor {args.flops_factor:g}: give a multiple >= 1 of the largest run's FLOPs")
    return run_sweep(args.config, args.settings, args.out, args.parallel, args.equal_flops, args.flops_factor)


def run_sweep(
    config_path: str, arguments: list[str], out: str | None, parallel: int, equal_flops: bool, flops_factor: float = 1.0
) -> int:
    from sleepscale.report import write_report  # loads torch (sleepscale.eval), ~2.5 s: only when a sweep runs

    axes, fixed = parse_arguments(arguments)
    base = load_config(config_path, fixed)
    runs = plan_runs(config_path, axes, fixed, equal_flops, flops_factor)  # every run's config is valid first
    for run in runs:
        ensure_dataset(load_config(config_path, fixed + run.overrides))
    directory = Path(out or f"runs/sweep-{Path(config_path).stem}")
    directory.mkdir(parents=True, exist_ok=True)
    command = {"config": str(config_path), "arguments": list(arguments), "equal_flops": equal_flops}
    if flops_factor != 1:  # (sweeps recorded before --flops-factor existed resume unchanged)
        command["flops_factor"] = flops_factor
    state = _State(directory, command)
    uri = base.tracking.uri or f"sqlite:///{directory.resolve()}/mlflow.db"
    parent = _parent_run(state, base, uri, directory, axes)

    pending = [run for run in runs if not state.run(run.name)["finished"]]  # (records every run, in plan order)
    state.save()
    if parallel > 1:  # the longest first, so that the last to finish is a short one
        pending.sort(key=lambda run: not run.longer)
    done = len(runs) - len(pending)
    print(
        f"sweep {directory}: {len(runs)} runs ({done} already "
        f"finished), {min(parallel, max(len(pending), 1))} at a time; "
        f"MLflow {uri}",
        flush=True,
    )
    threads = max(1, (os.cpu_count() or 1) // parallel)
    stopped = _Signals()
    running: dict[str, tuple[subprocess.Popen, float, SweepRun]] = {}
    (directory / "logs").mkdir(exist_ok=True)
    while pending or running:
        while pending and len(running) < parallel and stopped.number is None:
            run = pending.pop(0)
            command = [
                sys.executable,
                "-m",
                "sleepscale.cli",
                "train",
                str(config_path),
                *fixed,
                *run.overrides,
                f"train.run_dir={directory / run.name}",
                f"tracking.uri={uri}",
                f"tracking.run_name={run.name}",
                *(f"tracking.tags.{key.rsplit('.', 1)[-1]}={value}" for key, value in run.values.items()),
            ]
            if parent is not None:
                command.append(f"tracking.parent_run_id={parent}")
            logfile = (directory / "logs" / f"{run.name}.log").open("a")
            environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            # Its own session: Ctrl-C in the terminal reaches the sweep only, which passes SIGTERM on (checkpoint).
            process = subprocess.Popen(
                command, stdout=logfile, stderr=subprocess.STDOUT, env=environment, start_new_session=True
            )
            running[run.name] = (process, time.perf_counter(), run)
            logfile.close()
            print(
                f"  started {run.name} ({' '.join(run.overrides)}); log: {directory / 'logs' / (run.name + '.log')}",
                flush=True,
            )
        if stopped.number is not None and not running:
            break
        time.sleep(0.5)
        stopped.forward([process for process, _, _ in running.values()])
        for name, (process, start, _) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            record = state.run(name)
            record["seconds"] += time.perf_counter() - start
            record["exit_code"] = process.returncode
            record["finished"] = process.returncode == 0
            state.save()
            print(f"  {name}: exit {process.returncode} after {record['seconds']:.0f} s", flush=True)

    report = write_report(directory, tracking=(uri, parent))
    _end_parent(uri, parent, stopped.number is None)
    print(report.text)
    records = state.data["runs"]
    stopped_runs = [name for name, record in records.items() if record["exit_code"] == EXIT_PREEMPTED]
    failed = [name for name, record in records.items() if not record["finished"] and name not in stopped_runs]
    if failed:
        print(f"sweep: run(s) {', '.join(failed)} failed; see {directory / 'logs'}", file=sys.stderr)
        return 1
    if stopped.number is not None or stopped_runs:
        print(
            f"sweep stopped by signal with {len(pending) + len(stopped_runs)} "
            "run(s) unfinished; the same command resumes it",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    return 0


class _Signals:
    """SIGTERM / SIGINT to the sweep: passed once to every running training (which checkpoints and
    exits 75); no new run starts."""

    def __init__(self):
        self.number, self._forwarded = None, set()
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handle)

    def _handle(self, number, frame):
        self.number = number

    def forward(self, processes) -> None:
        if self.number is None:
            return
        for process in processes:
            if process.pid not in self._forwarded:
                process.send_signal(signal.SIGTERM)
                self._forwarded.add(process.pid)


def _parent_run(state: _State, config: Config, uri: str, directory: Path, axes) -> str | None:
    """The MLflow run the sweep's runs nest under, made once per sweep (kept in sweep.json)."""
    if state.data["parent_run_id"] is not None:
        return state.data["parent_run_id"]
    try:
        from mlflow.tracking import MlflowClient  # ~2 s: only when a sweep runs

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(config.tracking.experiment)
        if experiment is None:
            location = (directory / "mlartifacts").resolve().as_uri() if config.tracking.uri is None else None
            experiment_id = client.create_experiment(config.tracking.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        tags = {"sweep": ",".join(key for key, _ in axes), **{f"sweep.{key}": ",".join(values) for key, values in axes}}
        run = client.create_run(experiment_id, run_name=f"sweep {directory.name}", tags=tags)
    except Exception as error:  # tracking must not stop a sweep; the runs keep metrics.jsonl
        print(
            f"sweep: MLflow at {uri} failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "the runs go on without a parent run",
            file=sys.stderr,
        )
        return None
    state.data["parent_run_id"], state.data["tracking_uri"] = run.info.run_id, uri
    state.save()
    return run.info.run_id


def _end_parent(uri: str, parent: str | None, finished: bool) -> None:
    if parent is None:
        return
    try:
        from mlflow.tracking import MlflowClient  # ~2 s: only when a sweep runs

        MlflowClient(uri).set_terminated(parent, "FINISHED" if finished else "KILLED")
    except Exception as error:
        print(f"sweep: could not close MLflow run {parent} ({type(error).__name__})", file=sys.stderr)
