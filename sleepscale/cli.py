"""The `sleepscale` command."""

from __future__ import annotations

import argparse
import sys

import yaml

from sleepscale.config import ConfigError
from sleepscale.config_loading import load_config


def planner_reserve_gb() -> float:
    return 2 * 2**30 / 1e9  # sleepscale.planner.estimate.RESERVE_BYTES, without importing torch for --help


def _add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="write a task or text corpus as webdataset shards with a manifest")
    tasks = data.add_subparsers(dest="task", required=True)

    def task_parser(name: str, help_text: str, generated: bool = True):
        task = tasks.add_parser(name, help=help_text)
        task.add_argument("--out", required=True, help="empty directory for the shards and manifest.json")
        task.add_argument("--seed", type=int, default=0)
        task.add_argument("--samples-per-shard", type=int, default=1000)
        if generated:
            task.add_argument("--train-samples", type=int, default=10000)
            task.add_argument("--validation-samples", type=int, default=1000)
        return task

    rule110 = task_parser("rule110", "Rule 110: recall strings and compute t automaton steps")
    rule110.add_argument("--t", type=int, nargs="+", default=[32], help="steps; several values are mixed")
    rule110.add_argument("--bits", type=int, default=24, help="cells per string (= the window L)")
    rule110.add_argument("--strings", type=int, default=4)
    depo = task_parser("depo", "Depo: k-hop retrieval over a directed cycle")
    depo.add_argument("--k", type=int, nargs="+", default=list(range(1, 17)), help="hops drawn for training")
    depo.add_argument("--eval-k", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="hops for the validation split")
    depo.add_argument("--min-nodes", type=int, default=20)
    depo.add_argument("--max-nodes", type=int, default=75)
    depo.add_argument("--queries", type=int, default=10)
    math = task_parser("math", "GSM-Infinite-style word problems needing exactly `ops` operations")
    math.add_argument("--ops", type=int, nargs="+", default=[2, 4, 6, 8])
    math.add_argument("--length", type=int, default=2048, help="tokens per sample (distractors fill it)")
    text = task_parser("text", "pack .txt / .jsonl files into next-token samples", generated=False)
    text.add_argument("--input", nargs="+", required=True, help=".txt files (a document each) or .jsonl files")
    text.add_argument("--length", type=int, default=1024, help="tokens per sample")
    text.add_argument("--field", default="text", help="the text field of .jsonl records")
    text.add_argument("--validation-fraction", type=float, default=0.01)
    for parser in (math, text):
        parser.add_argument("--tokenizer", help="a local tokenizer.json (default: bytes)")
        parser.add_argument("--eos-token", help="end-of-text token of --tokenizer, if not a usual one")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sleepscale", description="Train sleeping hybrid language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "train (single process or under torchrun); resumes from the run directory's checkpoint"),
        ("config", "validate a config with overrides and print it resolved"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("config", help="YAML config file")
        command.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. sleep.passes=4")
    sweep = commands.add_parser("sweep", help="one training per value (or combination) of swept keys, then a comparison report")
    sweep.add_argument("config", help="YAML config file")
    sweep.add_argument("settings", nargs="+", metavar="KEY=V1,V2,...|key=value",
                       help="swept keys (values separated by commas) and fixed overrides, e.g. sleep.passes=1,3")
    sweep.add_argument("--out", help="sweep directory (default: runs/sweep-<config name>); the same command resumes it")
    sweep.add_argument("--parallel", type=int, default=1, help="runs at once; they share the cores (default: 1)")
    sweep.add_argument("--equal-flops", action="store_true",
                       help="give every cheaper setting the training FLOPs of the most expensive one: extended "
                       "in place under a constant learning rate (its evaluation at its own step count is the "
                       "equal-token point), else as an added <name>-equal-flops run")
    sweep_report = commands.add_parser("sweep-report", help="write (again) the comparison report of a sweep directory")
    sweep_report.add_argument("directory", help="a sweep directory (of `sleepscale sweep` or slurm/sweep.sbatch)")
    sweep_report.add_argument("--tracking-uri", help="MLflow URI to log the report to (default: the sweep's, or "
                              "sqlite in the directory)")
    convert = commands.add_parser(
        "convert", help="a Hugging Face checkpoint directory into a sleepscale model directory (model.init_from), or back")
    convert.add_argument("source", help="a Hugging Face directory (config.json + safetensors) to import; a model directory, "
                         "run directory or training checkpoint to export")
    convert.add_argument("out", help="new directory to write")
    convert.add_argument("--insert-gdn", type=int, metavar="K", help="import: insert a GDN-only block after every K-th "
                         "block (zero output projection: the outputs stay the source's) and write a two-stage train.yaml")
    convert.add_argument("--seed", type=int, default=0, help="import: model.seed (initialises inserted blocks)")
    generate = commands.add_parser("generate", help="read a prompt (sleeping on each window it evicts) and stream a continuation")
    generate.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint directory")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text (for symbol vocabularies: symbols separated by spaces)")
    prompt.add_argument("--prompt-file", help="a file holding the prompt")
    generate.add_argument("--passes", type=int, help="sleep passes N (default: the run's sleep.passes)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.add_argument("--data", help="dataset directory whose tokenizer to use (default: the run's data.path)")
    evaluate = commands.add_parser("eval", help="accuracy per difficulty and per N of a checkpoint")
    evaluate.add_argument("checkpoint", help="a run directory (its latest checkpoint) or a checkpoint directory")
    evaluate.add_argument("--data", help="dataset directory (default: the run's data.path)")
    evaluate.add_argument("--split", default="validation")
    evaluate.add_argument("--passes", default=None, help="comma-separated N values, e.g. 1,2,4 (default: the run's eval.passes)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--max-batches", type=int, default=None)
    evaluate.add_argument("--out", default=None, help="CSV file for the table (default: <checkpoint>/eval-<split>.csv)")
    evaluate.add_argument("--no-mlflow", action="store_true", help="do not log the table to the checkpoint's MLflow run")
    evaluate.add_argument("--generate", action="store_true", help="generate the answers (a streaming session per "
                          "sample) instead of reading them off teacher-forced logits; exact matches agree")
    plan = commands.add_parser("plan", help="predict memory, communication and time per GPU of a config's training layout "
                               "(or of every layout, --search) before asking for GPUs")
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. sleep.passes=8")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs of the run")
    plan.add_argument("--gpu-memory", type=float, required=True, metavar="GB", help="memory per GPU in GB (1e9 bytes), e.g. 80")
    plan.add_argument("--sequence-length", type=int, required=True, help="tokens per training sequence")
    plan.add_argument("--peak-tflops", type=float, help="dense peak per GPU (default: H100's 989 for bf16, 495 for fp32 as TF32)")
    plan.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    plan.add_argument("--tensor-bandwidth", type=float, default=450, metavar="GB/s",
                      help="per GPU between tensor-parallel ranks (default 450: NVLink in an H100 node)")
    plan.add_argument("--data-bandwidth", type=float, default=50, metavar="GB/s",
                      help="per GPU between data-parallel ranks (default 50: 400 Gb/s InfiniBand)")
    plan.add_argument("--reserve-gb", type=float, default=planner_reserve_gb(),
                      help="memory kept per GPU for what the model does not count: CUDA context, fragmentation, NCCL (default %(default).2f)")
    plan.add_argument("--search", action="store_true", help="every layout of --gpus GPUs, those that fit first, fastest first")
    plan.add_argument("--largest-n", action="store_true", help="also the largest N whose step fits the layout")
    plan.add_argument("--smallest-gpus", action="store_true", help="also the smallest GPU count (power of two) with a layout that fits")
    from sleepscale.launch import add_arguments

    add_arguments(commands.add_parser(
        "launch", help="start `sleepscale train` on every device of every node (torch's elastic agent, c10d rendezvous); "
        "run the same command on each node"))
    _add_data_commands(commands)
    return parser


def _evaluate_checkpoint(args) -> None:
    from pathlib import Path

    from sleepscale.data.loader import ShardLoader
    from sleepscale.eval import evaluate, format_table, write_csv
    from sleepscale.train.checkpoint import load_model_from_checkpoint, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    model, config = load_model_from_checkpoint(checkpoint)
    try:
        passes = [int(n) for n in args.passes.split(",")] if args.passes else config.eval.passes
    except ValueError:
        raise ConfigError(f"--passes {args.passes!r}: give comma-separated integers such as 1,2,4") from None
    if min(passes) < 1:
        raise ConfigError(f"--passes {args.passes!r}: every N must be >= 1")
    data = args.data or config.data.path
    loader = ShardLoader(data, args.split, batch_size=args.batch_size, shuffle=False)
    batches = [batch for index, batch in enumerate(loader) if args.max_batches is None or index < args.max_batches]
    rows = evaluate(model.eval(), batches, config.sleep, passes, by_generation=args.generate)
    out = Path(args.out) if args.out else checkpoint / f"eval-{args.split}.csv"
    write_csv(rows, out)
    print(format_table(rows))
    print(f"wrote {out}")
    if not args.no_mlflow:
        _log_evaluation(checkpoint, config, rows, out, args.split)


def _log_evaluation(checkpoint, config, rows, csv_path, split: str) -> None:
    """Adds the table to the MLflow run that wrote the checkpoint, at the checkpoint's step."""
    import json

    from sleepscale.tracking import Tracker

    progress = json.loads((checkpoint / "trainer.json").read_text())["progress"]
    if not progress.get("mlflow_run_id"):
        print("the checkpoint's run had no MLflow run; table not logged")
        return
    tracker = Tracker(config, checkpoint.parent.parent, enabled=True)
    if tracker.start(progress["mlflow_run_id"], tags={}) is None:
        return  # the tracker has said why
    from sleepscale.eval import metrics

    tracker.log_metrics(metrics(rows, prefix=split), progress["step"])
    tracker.log_artifact(csv_path)
    tracker.finish()
    print(f"logged to MLflow run {progress['mlflow_run_id']} ({tracker.uri})")


def _convert(args) -> int:
    from pathlib import Path

    from sleepscale.convert import convert_from_hf, export_to_hf, is_model_dir

    source = Path(args.source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such directory")
    importing = (source / "config.json").is_file() and not is_model_dir(source)
    if not importing and args.insert_gdn is not None:
        raise ConfigError("--insert-gdn applies when importing a Hugging Face checkpoint (a directory with config.json)")
    if importing:
        out = convert_from_hf(source, args.out, insert_gdn=args.insert_gdn, seed=args.seed)
        print(f"wrote {out} (start a run from it with model.init_from={out})")
        if args.insert_gdn:
            from sleepscale.convert import INSERTION_CONFIG

            print(f"wrote {out / INSERTION_CONFIG}: the two-stage training config of the insertion recipe")
    else:
        print(f"wrote {export_to_hf(source, args.out)}")
    return 0


def _generate(args) -> int:
    import json
    from pathlib import Path

    import torch

    from sleepscale.data.shards import read_manifest
    from sleepscale.data.tokenizer import tokenizer_from_description
    from sleepscale.session import SleepingSession
    from sleepscale.train.checkpoint import load_model_from_checkpoint, resolve_checkpoint

    if args.passes is not None and args.passes < 1:
        raise ConfigError(f"--passes {args.passes}: give N >= 1")
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    model, config = load_model_from_checkpoint(resolve_checkpoint(args.checkpoint))
    manifest, _ = read_manifest(args.data or config.data.path)
    tokenizer = tokenizer_from_description(manifest["tokenizer"])
    text = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    ids = tokenizer.encode(text)
    if not ids:
        raise ConfigError("the prompt is empty after tokenisation")
    sleep = config.sleep.model_copy(update={"passes": args.passes or config.sleep.passes, "random_passes": None})
    session = SleepingSession(model, sleep)
    session.feed(torch.tensor([ids]))
    eos = getattr(tokenizer, "eos_id", None)
    generated, shown = [], ""
    for token in session.generate(args.max_new_tokens, args.temperature, args.top_p, () if eos is None else (eos,),
                                  torch.Generator().manual_seed(args.seed), vocabulary=tokenizer.vocab_size):
        if token.item() == eos:
            break
        generated.append(token.item())
        decoded = tokenizer.decode(generated)  # the whole continuation, so that multi-byte characters print whole
        print(decoded[len(shown):] if decoded.startswith(shown) else " " + decoded, end="", flush=True)
        shown = decoded
    print()
    print(json.dumps({"prompt_tokens": len(ids), "generated_tokens": len(generated), "passes": sleep.passes}), file=sys.stderr)
    return 0


def _write_data(args) -> None:
    try:
        _build_data(args)
    except ValueError as error:  # a task option that cannot work (DataError, a ValueError too, passes through)
        from sleepscale.data.sample import DataError

        if isinstance(error, DataError):
            raise
        raise ConfigError(str(error)) from None


def _build_data(args) -> None:
    from pathlib import Path

    from sleepscale.data.build import build_task_dataset, build_text_dataset

    out = Path(args.out)
    if args.task == "text":
        from sleepscale.data.text import TextCorpus
        from sleepscale.data.tokenizer import load_tokenizer

        corpus = TextCorpus(args.input, args.length, load_tokenizer(args.tokenizer, args.eos_token), args.field)
        manifest = build_text_dataset(corpus, out, args.seed, args.validation_fraction, args.samples_per_shard)
    else:
        if args.task == "rule110":
            from sleepscale.data.rule110 import Rule110Task

            task = Rule110Task(args.t, args.bits, args.strings)
        elif args.task == "depo":
            from sleepscale.data.depo import DepoTask

            task = DepoTask(args.k, args.eval_k, args.min_nodes, args.max_nodes, args.queries)
        else:
            from sleepscale.data.math_problems import MathTask
            from sleepscale.data.tokenizer import load_tokenizer

            task = MathTask(args.ops, args.length, load_tokenizer(args.tokenizer, args.eos_token))
        manifest = build_task_dataset(
            task, out, args.seed, args.train_samples, args.validation_samples, args.samples_per_shard
        )
    print(f"wrote {manifest}")


def _print_config(args) -> int:
    config = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _train(args) -> int:
    from sleepscale.train.trainer import run_training

    return run_training(load_config(args.config, args.overrides))


def _launch(args) -> int:
    from sleepscale.launch import launch

    return launch(args)


def _plan(args) -> int:
    """Exit status 0 when the layout (or, with --search, some layout) fits, 1 when none does."""
    from sleepscale.planner import estimate as planner
    from sleepscale.planner.report import breakdown, table

    for flag in ("gpus", "sequence_length"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a positive integer")
    if min(args.gpu_memory, args.tensor_bandwidth, args.data_bandwidth) <= 0 or not 0 < args.mfu <= 1 or args.reserve_gb < 0:
        raise ConfigError(f"--gpu-memory {args.gpu_memory}, --mfu {args.mfu}, --reserve-gb {args.reserve_gb}, --tensor-bandwidth "
                          f"{args.tensor_bandwidth}, --data-bandwidth {args.data_bandwidth}: need memory and bandwidths > 0, "
                          "0 < mfu <= 1 and reserve >= 0")
    config = load_config(args.config, args.overrides)
    peak = (args.peak_tflops or (989 if config.train.precision == "bf16" else 495)) * 1e12
    assumed = planner.Assumptions(args.sequence_length, args.gpu_memory * planner.GB, peak, args.mfu, int(args.reserve_gb * planner.GB),
                                  args.tensor_bandwidth * planner.GB, args.data_bandwidth * planner.GB)
    if args.search:
        found = planner.search(config, args.gpus, assumed)
        if not found:
            raise ConfigError(f"--gpus {args.gpus}: no layout keeps the config's global batch and divides the heads; "
                              "change --gpus or train.grad_accumulation")
        print(table(found))
        best = found[0]
    else:
        try:
            layout = planner.config_layout(config, args.gpus)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        best = planner.estimate(config, layout, assumed)
    print(breakdown(best))
    if args.largest_n:
        largest = planner.largest_passes(config, best.layout, assumed)
        text = {0: "none (not even N=1)", planner.LARGEST_PASSES: f"{planner.LARGEST_PASSES} or more (looked up to it)"}
        print(f"largest N that fits this layout: {text.get(largest, largest)}")
    if args.smallest_gpus:
        smallest = planner.smallest_gpus(config, assumed)
        print(f"smallest GPU count that fits: {smallest.layout.gpus} ({smallest.layout.describe()}, {smallest.total / planner.GB:.1f} GB)"
              if smallest else "smallest GPU count that fits: none up to 4096")
    if not best.fits:
        print(f"sleepscale plan: {planner.advice(config, best, assumed)}")
        return 1
    return 0


def _sweep(args) -> int:
    from sleepscale.sweep import run_sweep

    if args.parallel < 1:
        raise ConfigError(f"--parallel {args.parallel}: give at least 1")
    return run_sweep(args.config, args.settings, args.out, args.parallel, args.equal_flops)


def _sweep_report(args) -> int:
    import json
    from pathlib import Path

    from sleepscale.report import write_report

    directory = Path(args.directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory; give a sweep directory")
    state = directory / "sweep.json"
    recorded = json.loads(state.read_text()) if state.exists() else {}
    parent = recorded.get("parent_run_id") if args.tracking_uri is None else None
    uri = args.tracking_uri or recorded.get("tracking_uri") or f"sqlite:///{directory.resolve()}/mlflow.db"
    print(write_report(directory, tracking=(uri, parent)).text)
    return 0


COMMANDS = {"plan": _plan, "generate": _generate, "convert": _convert, "sweep": _sweep, "sweep-report": _sweep_report, "launch": _launch, "data": _write_data, "eval": _evaluate_checkpoint, "config": _print_config, "train": _train}


def main(argv: list[str] | None = None) -> int:
    """Problems with what the user gave (config, data, paths, arguments) end as one line and exit 2;
    anything else is a bug and keeps its traceback."""
    from sleepscale.convert.families import UnsupportedCheckpoint
    from sleepscale.convert.model_dir import ModelDirError
    from sleepscale.data.sample import DataError

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "sweep" and all("=" in item and not item.startswith("-") for item in extra):
        args.settings += extra  # settings after an option: `sweep CONFIG sleep.passes=1,3 --parallel 2 train.steps=50`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args) or 0
    except (ConfigError, DataError, ModelDirError, UnsupportedCheckpoint, FileNotFoundError, FileExistsError) as error:
        print(f"sleepscale {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
