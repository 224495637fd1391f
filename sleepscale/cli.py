"""The `sleepscale` command: its arguments, and which function runs each subcommand (`COMMANDS`)."""

from __future__ import annotations

import argparse
import importlib
import sys

import yaml

from sleepscale import notices
from sleepscale.config import ConfigError
from sleepscale.config_loading import load_config
from sleepscale.launch import add_arguments as add_launch_arguments
from sleepscale.planner.assumptions import DATA_BANDWIDTH, GB, GPU, MFU, RESERVE_BYTES, TENSOR_BANDWIDTH

# The function that runs each command, as "module:function", called with the parsed arguments (`train`'s
# with the config they name). Commands are imported lazily, in `_run` alone: their modules pull in torch,
# DeepSpeed, megatron-core or MLflow (seconds each), which `sleepscale --help` and `sleepscale config`
# should not wait for.
COMMANDS = {
    "train": "sleepscale.train.trainer:run_training",
    "launch": "sleepscale.launch:launch",
    "sweep": "sleepscale.sweep:sweep_command",
    "sweep-report": "sleepscale.report:report_command",
    "convert": "sleepscale.convert.command:convert",
    "generate": "sleepscale.generate:generate",
    "eval": "sleepscale.eval_checkpoint:evaluate_checkpoint",
    "plan": "sleepscale.planner.command:plan",
    "data": "sleepscale.data.build:build_command",
}

# Problems with what the user gave (config, data, paths, arguments): one line and exit 2. Named by module
# so that catching them imports nothing (convert's modules load torch): an error class whose module was
# never imported cannot have been raised.
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError)
USER_ERRORS_ELSEWHERE = (
    "sleepscale.data.sample:DataError",
    "sleepscale.model.weights:ModelDirError",
    "sleepscale.convert.families:UnsupportedCheckpoint",
)


def _plain(number: float) -> float | int:
    """A default as one would type it (450, not 450.0)."""
    return int(number) if float(number).is_integer() else number


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
        _add_verbose(task)
        return task

    rule110 = task_parser("rule110", "Rule 110: recall strings and compute t automaton steps")
    rule110.add_argument("--t", type=int, nargs="+", default=[32], help="steps; several values are mixed")
    rule110.add_argument("--bits", type=int, default=24, help="cells per string (= the window L)")
    rule110.add_argument("--strings", type=int, default=4)
    rule110.add_argument(
        "--t-in-query", action="store_true", help="query tokens name t too (?1t4), for a mixture of t values"
    )
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
    sweep = commands.add_parser(
        "sweep", help="one training per value (or combination) of swept keys, then a comparison report"
    )
    sweep.add_argument("config", help="YAML config file")
    sweep.add_argument(
        "settings",
        nargs="+",
        metavar="KEY=V1,V2,...|key=value",
        help="swept keys (values separated by commas) and fixed overrides, e.g. sleep.passes=1,3",
    )
    sweep.add_argument("--out", help="sweep directory (default: runs/sweep-<config name>); the same command resumes it")
    sweep.add_argument("--parallel", type=int, default=1, help="runs at once; they share the cores (default: 1)")
    sweep.add_argument(
        "--equal-flops",
        action="store_true",
        help="give every cheaper setting the training FLOPs of the most expensive one: extended "
        "in place under a constant learning rate (its evaluation at its own step count is the "
        "equal-token point), else as an added <name>-equal-flops run",
    )
    sweep.add_argument(
        "--flops-factor",
        type=float,
        default=1.0,
        metavar="F",
        help="with --equal-flops: also give the cheaper settings F times the largest run's FLOPs (e.g. 2: "
        "the comparison the report calls 'at 2x training FLOPs'); extended in place as above, else added "
        "as <name>-flops-xF",
    )
    sweep_report = commands.add_parser("sweep-report", help="write (again) the comparison report of a sweep directory")
    sweep_report.add_argument("directory", help="a sweep directory (of `sleepscale sweep` or slurm/sweep.sbatch)")
    sweep_report.add_argument(
        "--tracking-uri", help="MLflow URI to log the report to (default: the sweep's, or sqlite in the directory)"
    )
    convert = commands.add_parser(
        "convert",
        help="a Hugging Face checkpoint directory into a sleepscale model directory (model.init_from), or back",
    )
    convert.add_argument(
        "source",
        help="a Hugging Face directory (config.json + safetensors) to import; a model directory, "
        "run directory or training checkpoint to export",
    )
    convert.add_argument("out", help="new directory to write")
    convert.add_argument(
        "--insert-gdn",
        type=int,
        metavar="K",
        help="import: insert a GDN-only block after every K-th "
        "block (zero output projection: the outputs stay the source's) and write a two-stage train.yaml",
    )
    convert.add_argument("--seed", type=int, default=0, help="import: model.seed (initialises inserted blocks)")
    generate = commands.add_parser(
        "generate", help="read a prompt (sleeping on each window it evicts) and stream a continuation"
    )
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
    evaluate = commands.add_parser(
        "eval", help="accuracy per difficulty and per N of a checkpoint, or lm-evaluation-harness tasks (--lm-eval)"
    )
    evaluate.add_argument(
        "checkpoint",
        help="a run directory (its latest checkpoint) or a checkpoint directory; with --lm-eval also a model directory",
    )
    evaluate.add_argument("--data", help="dataset directory (default: the run's data.path)")
    evaluate.add_argument("--split", default="validation")
    evaluate.add_argument(
        "--passes", default=None, help="comma-separated N values, e.g. 1,2,4 (default: the run's eval.passes)"
    )
    evaluate.add_argument("--batch-size", type=int, default=32, help="samples (with --lm-eval: requests) at once")
    evaluate.add_argument("--max-batches", type=int, default=None)
    evaluate.add_argument(
        "--out",
        default=None,
        help="CSV file for the table (default: <checkpoint>/eval-<split>.csv); with --lm-eval the harness's "
        "results as JSON (default: <checkpoint>/lm-eval.json, or ./lm-eval.json for a model directory)",
    )
    evaluate.add_argument(
        "--no-mlflow", action="store_true", help="do not log the table to the checkpoint's MLflow run"
    )
    evaluate.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="comma-separated lm-evaluation-harness tasks instead: harness task names, local tasks shipped "
        "with sleepscale (rule110_choice, math_generation) or task YAML files with local data",
    )
    evaluate.add_argument("--limit", type=int, help="--lm-eval: at most this many documents per task")
    evaluate.add_argument("--window", type=int, help="--lm-eval on a model directory: the sleep window L (tokens)")
    evaluate.add_argument(
        "--tokenizer", help="--lm-eval: a tokenizer.json (default: the run's dataset's, or the model directory's)"
    )
    evaluate.add_argument(
        "--max-length", type=int, help="--lm-eval: read at most the last this-many tokens of a request (default: all)"
    )
    evaluate.add_argument(
        "--generate",
        action="store_true",
        help="generate the answers (a streaming session per "
        "sample) instead of reading them off teacher-forced logits; exact matches agree",
    )
    plan = commands.add_parser(
        "plan",
        help="predict memory, communication and time per GPU of a config's training layout "
        "(or of every layout, --search) before asking for GPUs",
    )
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. sleep.passes=8")
    plan.add_argument("--gpus", type=int, required=True, help="GPUs of the run")
    plan.add_argument(
        "--gpu-memory", type=float, required=True, metavar="GB", help="memory per GPU in GB (1e9 bytes), e.g. 80"
    )
    plan.add_argument("--sequence-length", type=int, required=True, help="tokens per training sequence")
    plan.add_argument(
        "--peak-tflops",
        type=float,
        help=f"dense peak per GPU (default: the {GPU} peak at the config's precision: bf16, or TF32 for fp32)",
    )
    plan.add_argument("--mfu", type=float, default=MFU, help="assumed model FLOPs utilisation (default %(default)s)")
    plan.add_argument(
        "--tensor-bandwidth",
        type=float,
        default=_plain(TENSOR_BANDWIDTH / GB),
        metavar="GB/s",
        help=f"per GPU between tensor-parallel ranks (default %(default)s: NVLink in an {GPU} node)",
    )
    plan.add_argument(
        "--data-bandwidth",
        type=float,
        default=_plain(DATA_BANDWIDTH / GB),
        metavar="GB/s",
        help="per GPU between data-parallel ranks (default %(default)s: 400 Gb/s InfiniBand)",
    )
    plan.add_argument(
        "--reserve-gb",
        type=float,
        default=RESERVE_BYTES / GB,
        help="memory kept per GPU for what the model does not count: CUDA context, fragmentation, NCCL "
        "(default %(default).2f)",
    )
    plan.add_argument(
        "--search",
        action="store_true",
        help="every layout of --gpus GPUs (tensor, pipeline and data ranks, ZeRO stage, recomputation form, "
        "micro-batches in flight), those that fit first, fastest first",
    )
    plan.add_argument(
        "--largest-n",
        action="store_true",
        help="also the largest N (up to 128) whose step fits the layout (with --search: the best one)",
    )
    plan.add_argument(
        "--smallest-gpus",
        action="store_true",
        help="also the smallest GPU count (power of two) with a layout that fits",
    )
    add_launch_arguments(
        commands.add_parser(
            "launch",
            help="start `sleepscale train` on every device of every node (torch's elastic agent, c10d rendezvous); "
            "run the same command on each node",
        )
    )
    _add_data_commands(commands)
    _add_verbose(parser, default=False)
    for command in commands.choices.values():
        _add_verbose(command)
    return parser


def _add_verbose(parser: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """`--verbose`, before the command or after it: the command's own leaves the global one's value
    unless given (SUPPRESS)."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=default,
        help="show the notices libraries print as they load (once each, on stderr); without it "
        "they go to the DEBUG log",
    )


def _run(args) -> int | None:
    """Runs the command (importing its module: the one place commands are imported, see COMMANDS)."""
    if args.command == "config":  # prints what the parser's own modules give: the config, resolved
        print(yaml.safe_dump(load_config(args.config, args.overrides).model_dump(mode="json"), sort_keys=False), end="")
        return 0
    module, _, name = COMMANDS[args.command].partition(":")
    function = getattr(importlib.import_module(module), name)
    return function(load_config(args.config, args.overrides) if args.command == "train" else args)


def _user_error(error: Exception) -> bool:
    if isinstance(error, USER_ERRORS):
        return True
    for module, _, name in (error_class.partition(":") for error_class in USER_ERRORS_ELSEWHERE):
        if module in sys.modules and isinstance(error, getattr(sys.modules[module], name)):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    """Problems with what the user gave (USER_ERRORS) end as one line and exit 2; anything else is a bug
    and keeps its traceback. Libraries' start-up notices go to the DEBUG log (`sleepscale.notices`)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "sweep" and all("=" in item and not item.startswith("-") for item in extra):
        args.settings += extra  # settings after an option: `sweep CONFIG sleep.passes=1,3 --parallel 2 train.steps=50`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    with notices.routed(verbose=args.verbose):
        try:
            return _run(args) or 0
        except Exception as error:
            if not _user_error(error):
                raise
            print(f"sleepscale {args.command}: {error}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
