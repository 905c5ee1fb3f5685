"""The ``slimopt`` command line: a thin layer that parses arguments and calls library functions.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when their subcommand is used, so that
``slimopt memory`` does not pay for the training harness and vice versa.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("slimopt.train.cli", "pretrain a model with one optimizer preset"),
    "compare": ("slimopt.bench.compare", "train every preset on one budget and compare them"),
    "memory": ("slimopt.bench.memory_cli", "parameter, gradient and optimizer-state bytes"),
    "profile": ("slimopt.bench.profile", "time optimizer.step() against fused AdamW"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when it is None)."""
    parser = argparse.ArgumentParser(
        prog="slimopt",
        description="Memory-lean optimizers for LLM pretraining, and the benchmark to prove them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if command is not None and name != command:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            sp.set_defaults(_unavailable=module_name)
            continue
        module.add_arguments(sp)
        sp.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "-"
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        parser.error(f"'{args.command}' is not available in this build ({args._unavailable})")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
