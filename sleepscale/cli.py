"""The `sleepscale` command."""

from __future__ import annotations

import argparse
import sys

import yaml

from sleepscale.config import ConfigError, load_config


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
        ("demo", "a short sleep training run on CPU with generated data (prints the loss falling)"),
        ("config", "validate a config with overrides and print it resolved"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("config", help="YAML config file")
        command.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. sleep.passes=4")
    _add_data_commands(commands)
    return parser


def _write_data(args) -> None:
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "data":
        from sleepscale.data.sample import DataError

        try:
            _write_data(args)
        except (DataError, ValueError, FileExistsError) as error:
            print(f"sleepscale: data error: {error}", file=sys.stderr)
            return 2
        return 0
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"sleepscale: config error: {error}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    elif args.command == "demo":
        from sleepscale.demo import run_demo

        run_demo(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
