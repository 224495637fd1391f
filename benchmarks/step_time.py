"""Training step time against an older commit: the bare step and the trainer's step, old and new side
by side in one run; or, with `--old none`, the working tree alone, each checkpointing form's step as a
ratio to `none` and to `pass` measured in the same run (what each recomputation form costs).

    python benchmarks/step_time.py [--models narrow wide] [--passes 1 3 8] [--checkpoint none pass]
                                   [--repeats 3] [--old 278da2f | none] [--no-trainer] [--wide-batch 4] [--out FILE]

    python benchmarks/step_time.py --old none --passes 4 --no-trainer \
        --checkpoint none pass block nested selective window --out benchmarks/results/recompute_cost.md

Bare step: forward + backward + AdamW through `sleep_forward` (`return_logits=False`), on random
tokens in [0, vocab) with loss on the last 4 positions only, as Rule 110 has it. Trainer step: the
real `sleepscale train` (single process, DeepSpeed engine, gradient clipping, data loading from
shards) on a Rule 110 dataset (t = 0) generated once before any timing; its time is the trainer's
own `step_seconds`, averaged over every step after the first, with log_every 1 (so the per-log
work is in every step; only the writes of the metrics themselves fall outside). Both run the same
model and batch, sequences of T = 100 tokens in windows of 24 (4 evicted, the 4 query tokens in a
fifth), hard eviction:

    narrow   AGAG, width 64, MLP 128, 4 attention + 4 GDN heads, batch 128 (configs/quickstart.yaml)
    wide     AGAGAGAG, width 512, MLP 1408, 8 + 8 heads, batch --wide-batch (default 4)

Old is `git archive <--old>` unpacked into a temporary directory, new a copy of the working tree's
package taken at the start (edits made during the run do not leak in); both run the same Python,
each first on PYTHONPATH (the child reports the package it imported, and the parent checks it).
Every measurement is a fresh process on one thread (torch.set_num_threads(1), OMP_NUM_THREADS=
MKL_NUM_THREADS=1): one warm-up step, then k >= 2 timed steps, k chosen from the warm-up so that
they take about --seconds; the trainer runs 1 + k steps with the bare step's k. For each
configuration old and new processes alternate (old first, then new first, ...) for --repeats
rounds; the table gives the medians over the rounds, speed-up = old bare / new bare, and
trainer / bare for each version. With CUDA the children run on the GPU (model.backend auto: the
fla kernels) and synchronise before reading the clock.

On the 2-core CPU machine a full run (both models, N in 1 3 8, checkpoint none and pass, 3
rounds) takes about two hours; most of it is N = 8 and the trainer's start (DeepSpeed's import).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LENGTH, WINDOW, LOSS_POSITIONS, VOCAB = 100, 24, 4, 8
MODELS = {
    "narrow": {"hidden_size": 64, "pattern": "AGAG", "intermediate_size": 128, "heads": 4, "batch": 128},
    "wide": {"hidden_size": 512, "pattern": "AGAGAGAG", "intermediate_size": 1408, "heads": 8, "batch": 4},
}


def config_dict(model: str, passes: int, checkpoint: str, batch: int) -> dict:
    shape = MODELS[model]
    return {
        "model": {
            "vocab_size": VOCAB,
            "hidden_size": shape["hidden_size"],
            "pattern": shape["pattern"],
            "intermediate_size": shape["intermediate_size"],
            "attention": {"num_heads": shape["heads"]},
            "gdn": {"num_heads": shape["heads"], "expand_v": 1.0},
        },
        "sleep": {"window": WINDOW, "passes": passes, "eviction": "hard", "checkpoint": checkpoint},
        "train": {"steps": 1, "micro_batch_size": batch},
    }


# ---- children: one measurement each, printed as a JSON line ----


def bare_step(config: dict, seconds: float) -> dict:
    import torch

    from sleepscale.config import validate
    from sleepscale.model import build_model
    from sleepscale.sleep import sleep_forward

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = validate(config)
    model = build_model(config.model).to(device)
    batch = config.train.micro_batch_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, LENGTH), generator=generator)
    targets = torch.full((batch, LENGTH), -100)  # IGNORE_INDEX
    targets[:, -LOSS_POSITIONS:] = torch.randint(0, VOCAB, (batch, LOSS_POSITIONS), generator=generator)
    ids, targets = ids.to(device), targets.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def steps(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            out = sleep_forward(model, ids, config.sleep, targets=targets, return_logits=False)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    warm_up = steps(1)
    k = max(2, round(seconds / warm_up))
    return {"seconds": steps(k) / k, "steps": k}


def trainer_step(config: dict, steps: int, data: str, run_dir: str) -> dict:
    import yaml

    from sleepscale.cli import main as sleepscale

    config = {
        **config,
        "data": {"path": data},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"kind": "constant"},
        "train": {**config["train"], "run_dir": run_dir, "steps": 1 + steps, "log_every": 1},
        "checkpoint": {"every": 10**6, "keep": 1},
        "eval": {"every": 0, "passes": [1], "batch_size": 8, "max_batches": 1},
    }
    path = Path(run_dir) / "benchmark.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    code = sleepscale(["train", str(path)])
    if code:
        raise SystemExit(f"sleepscale train exited {code}")
    logged = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    times = [line["step_seconds"] for line in logged if "step_seconds" in line and line["step"] > 1]
    return {"seconds": statistics.mean(times), "steps": len(times)}


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    import sleepscale

    config = json.loads(args.config)
    if args.child == "bare":
        result = bare_step(config, args.seconds)
    else:
        result = trainer_step(config, args.steps, args.data, args.run_dir)
    print(json.dumps({**result, "package": sleepscale.__file__}))


# ---- the parent: data, alternating children, the table ----


def run_child(code: Path, *arguments: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(
            f"{' '.join(arguments[:2])} with {code} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["package"]).is_relative_to(code):
        raise SystemExit(f"the child imported {result['package']}, not the package in {code}")
    return result


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
        device = f"CPU {names[0] if names else platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    return f"{device}, torch {torch.__version__}, 1 thread per process"


def prepare(tmp: Path, old: str, trainer: bool) -> tuple[dict[str, Path], Path]:
    """The packages to compare (the working tree's alone under `--old none`), and the Rule 110 dataset
    (written by the old code: its format is the fixed point) when the trainer is timed."""
    versions = {"new": tmp / "new"} if old == "none" else {"old": tmp / "old", "new": tmp / "new"}
    if "old" in versions:
        versions["old"].mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", old], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(versions["old"])], input=archive, check=True)
    shutil.copytree(REPO / "sleepscale", versions["new"] / "sleepscale", ignore=shutil.ignore_patterns("__pycache__"))
    data = tmp / "rule110"
    writer = versions.get("old", versions["new"])
    if trainer:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sleepscale.cli",
                "data",
                "rule110",
                "--out",
                str(data),
                "--t",
                "0",
                "--train-samples",
                "4096",
                "--validation-samples",
                "64",
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(writer)},
            cwd=writer,
        )
    return versions, data


def measure(config: dict, name: str, versions: dict[str, Path], data: Path, args, started: float) -> dict:
    """Median seconds per step by (version, "bare" | "trainer") over --repeats rounds of alternating processes."""
    config = json.dumps(config)
    times = {(version, kind): [] for version in versions for kind in ("bare", "trainer")}
    for round_ in range(args.repeats):
        for version in list(versions)[:: 1 if round_ % 2 == 0 else -1]:  # old, new; new, old; ...: drift cancels
            code = versions[version]
            bare = run_child(code, "--child", "bare", "--config", config, "--seconds", str(args.seconds))
            times[version, "bare"].append(bare["seconds"])
            report = f"bare {bare['seconds']:.3f} s x {bare['steps']}"
            if not args.no_trainer:
                run_dir = data.parent / f"run-{version}-{name.replace(' ', '-')}-{round_}"
                trainer = run_child(
                    code,
                    "--child",
                    "trainer",
                    "--config",
                    config,
                    "--steps",
                    str(bare["steps"]),
                    "--data",
                    str(data),
                    "--run-dir",
                    str(run_dir),
                )
                times[version, "trainer"].append(trainer["seconds"])
                report += f", trainer {trainer['seconds']:.3f} s x {trainer['steps']}"
            print(
                f"[{time.perf_counter() - started:5.0f} s] {name} {version} round {round_ + 1}: {report}",
                file=sys.stderr,
                flush=True,
            )
    return {key: statistics.median(values) if values else None for key, values in times.items()}


def working_tree() -> str:
    def git(*arguments):
        return subprocess.run(["git", "-C", str(REPO), *arguments], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (
        " + uncommitted changes" if git("status", "--porcelain", "sleepscale") else ""
    )


def table(rows: list[tuple], args, batches: dict[str, int], head: str, seconds: float, planned: int) -> str:
    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    def ratio(a, b):
        return "-" if a is None or b is None else number(a / b, 2)

    command = shlex.join([Path(sys.executable).name, os.path.relpath(__file__), *sys.argv[1:]])
    lines = [
        f"`{command}`",
        "",
        f"{datetime.date.today()}; {machine()}; old = {args.old}, new = the working tree ({head}); medians of "
        f"{args.repeats} round(s) of alternating old/new processes; {LENGTH} tokens per sequence, windows of {WINDOW}, "
        "batch "
        + ", ".join(f"{model} {batches[model]}" for model in args.models)
        + f"; the run took {seconds / 60:.0f} min"
        + ("" if len(rows) == planned else f" ({len(rows)} of {planned} configurations measured)"),
        "",
        "| model | N | checkpoint | bare old s | bare new s | speed-up | trainer old s | trainer new s | "
        "trainer/bare old | trainer/bare new |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, passes, checkpoint, t in rows:
        lines.append(
            f"| {model} | {passes} | {checkpoint} | {number(t['old', 'bare'])} | {number(t['new', 'bare'])} | "
            f"{ratio(t['old', 'bare'], t['new', 'bare'])} | "
            f"{number(t['old', 'trainer'])} | {number(t['new', 'trainer'])} | "
            f"{ratio(t['old', 'trainer'], t['old', 'bare'])} | {ratio(t['new', 'trainer'], t['new', 'bare'])} |"
        )
    return "\n".join(lines) + "\n"


def forms_table(rows: list[tuple], args, batches: dict[str, int], head: str, seconds: float, planned: int) -> str:
    """`--old none`: each configuration's step, and its ratio to `none` and to `pass` at the same model and N."""
    command = shlex.join([Path(sys.executable).name, os.path.relpath(__file__), *sys.argv[1:]])
    steps = {(model, passes, checkpoint): t for model, passes, checkpoint, t in rows}

    def ratio(model, passes, t, kind, baseline):
        base = steps.get((model, passes, baseline), {}).get(("new", kind))
        return "-" if base is None or t["new", kind] is None else f"{t['new', kind] / base:.2f}"

    kinds = ["bare"] + ([] if args.no_trainer else ["trainer"])
    lines = [
        f"`{command}`",
        "",
        f"{datetime.date.today()}; {machine()}; the working tree ({head}); medians of {args.repeats} round(s) per "
        f"configuration, configurations one after another; {LENGTH} tokens per sequence, windows of {WINDOW}, batch "
        + ", ".join(f"{model} {batches[model]}" for model in args.models)
        + f"; the run took {seconds / 60:.0f} min"
        + ("" if len(rows) == planned else f" ({len(rows)} of {planned} configurations measured)"),
        "",
        "| model | N | checkpoint | " + " | ".join(f"{k} s | {k} / none | {k} / pass" for k in kinds) + " |",
        "|---|---|---|" + "---|---|---|" * len(kinds),
    ]
    for model, passes, checkpoint, t in rows:
        cells = [
            f"{t['new', k]:.3f} | {ratio(model, passes, t, k, 'none')} | {ratio(model, passes, t, k, 'pass')}"
            for k in kinds
        ]
        lines.append(f"| {model} | {passes} | {checkpoint} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--passes", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument(
        "--checkpoint",
        nargs="+",
        choices=["none", "pass", "window", "block", "nested", "selective"],
        default=["none", "pass"],
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--old", default="278da2f", help="the commit to compare with; none: the working tree alone, forms as ratios"
    )
    parser.add_argument("--no-trainer", action="store_true", help="bare steps only")
    parser.add_argument("--wide-batch", type=int, default=MODELS["wide"]["batch"])
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="about how long the timed steps of one measurement take"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/step_time.md")
    parser.add_argument("--child", choices=["bare", "trainer"], help=argparse.SUPPRESS)
    for name, kind in (("--config", str), ("--steps", int), ("--data", str), ("--run-dir", str)):
        parser.add_argument(name, type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    started, head = time.perf_counter(), working_tree()
    batches = {model: MODELS[model]["batch"] for model in MODELS} | {"wide": args.wide_batch}
    configurations = [(m, n, c) for m in args.models for n in args.passes for c in args.checkpoint]
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="step_time-") as tmp:
        versions, data = prepare(Path(tmp), args.old, not args.no_trainer)
        for model, passes, checkpoint in configurations:
            config = config_dict(model, passes, checkpoint, batches[model])
            rows.append(
                (
                    model,
                    passes,
                    checkpoint,
                    measure(config, f"{model} N={passes} {checkpoint}", versions, data, args, started),
                )
            )
            # Written after every configuration: a long run stopped early keeps what it measured.
            write = forms_table if args.old == "none" else table
            text = write(rows, args, batches, head, time.perf_counter() - started, len(configurations))
            args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
