"""`sleepscale convert SOURCE OUT`: a Hugging Face directory is imported (optionally with GDN blocks
inserted), anything else (a model directory, run directory or training checkpoint) is exported."""

from __future__ import annotations

from pathlib import Path

from sleepscale.config import ConfigError
from sleepscale.convert import INSERTION_CONFIG, convert_from_hf, export_to_hf, is_model_dir


def convert(args) -> int:
    source = Path(args.source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no such directory")
    importing = (source / "config.json").is_file() and not is_model_dir(source)
    if not importing and args.insert_gdn is not None:
        raise ConfigError(
            "--insert-gdn applies when importing a Hugging Face checkpoint (a directory with config.json)"
        )
    if importing:
        out = convert_from_hf(source, args.out, insert_gdn=args.insert_gdn, seed=args.seed)
        print(f"wrote {out} (start a run from it with model.init_from={out})")
        if args.insert_gdn:
            print(f"wrote {out / INSERTION_CONFIG}: the two-stage training config of the insertion recipe")
    else:
        print(f"wrote {export_to_hf(source, args.out)}")
    return 0
