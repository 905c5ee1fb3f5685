"""The ``slimopt`` command line: a thin layer that parses arguments and calls library functions.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; they are imported only when their subcommand is used, so that
``slimopt memory`` does not pay for the training harness and vice versa. A subcommand whose
optional dependencies are missing exits with one line naming the extra to install
(``pip install "slimopt[train]"``) instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from slimopt._extras import check_installed, missing_extra_error

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("slimopt.train.cli", "pretrain a model with one optimizer preset"),
    "compare": ("slimopt.bench.compare", "train every preset on one budget and compare them"),
    "memory": ("slimopt.bench.memory_cli", "parameter, gradient and optimizer-state bytes"),
    "profile": ("slimopt.bench.profile", "time optimizer.step() against fused AdamW"),
}

# subcommand -> the optional modules it cannot run without (their extras are in slimopt._extras);
# memory and profile build their models with the harness (slimopt.train), so they need its extra
_HARNESS = ("numpy", "transformers", "tokenizers", "tqdm")
NEEDS: dict[str, tuple[str, ...]] = {
    "train": _HARNESS,
    "compare": (*_HARNESS, "matplotlib"),
    "memory": _HARNESS,
    "profile": _HARNESS,
}


def _version() -> str:
    import torch

    from slimopt import __version__

    return f"slimopt {__version__} (torch {torch.__version__})"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when it is None)."""
    parser = argparse.ArgumentParser(
        prog="slimopt",
        description="Memory-lean optimizers for LLM pretraining, and the benchmark to prove them.",
    )
    parser.add_argument("--version", action="version", version=_version())
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
    """Run ``slimopt COMMAND ...``; returns the exit status.

    Example:
        >>> from slimopt.cli import main
        >>> main(["--version"])  # doctest: +SKIP
        slimopt 0.1.0 (torch 2.13.0+cpu)
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "-"
    try:
        if command in NEEDS:
            check_installed(NEEDS[command])
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if getattr(args, "_unavailable", None):
            parser.error(f"'{args.command}' is not available in this build ({args._unavailable})")
        return int(args._run(args) or 0)
    except ModuleNotFoundError as exc:
        error = missing_extra_error(exc)
        if error is None:
            raise
        prog = f"slimopt {command}" if command in SUBCOMMANDS else "slimopt"
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (``slimopt memory ... | head``): exit quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE


__all__ = ["NEEDS", "SUBCOMMANDS", "build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
