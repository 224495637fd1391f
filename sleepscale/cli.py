"""The `sleepscale` command."""

from __future__ import annotations

import argparse
import sys

import yaml

from sleepscale.config import ConfigError, load_config


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
