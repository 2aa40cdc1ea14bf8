"""The `controlnet` program: a registry of subcommands.

Each command module exposes `register(subparsers)`, which adds its parsers and sets `func` to a thin
function that parses arguments, calls the library and prints. User errors (ValueError, FileNotFoundError,
and our ControlNetError subclasses) become one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import import_module

# One entry per command module; order is the order of `controlnet --help`.
COMMAND_MODULES: list[str] = [
    "controlnet.io.commands",
    "controlnet.generate.commands",
    "controlnet.annotate.commands",
    "controlnet.world.commands",
    "controlnet.train.commands",
    "controlnet.evaluate.commands",
    "controlnet.serve.commands",
]

EXIT_USER_ERROR = 2
QUIET_PHASES = {"serve"}  # commands whose library calls print no phase lines (controlnet/progress.py)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlnet",
        description="Add conditional control to text-to-image diffusion models: generate, train, annotate, "
        "convert and measure ControlNets (Zhang, Rao, Agrawala, ICCV 2023).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    # under accelerate/torchrun the first process speaks for all; a server's log keeps its one line per request
    if os.environ.get("RANK", "0") == "0" and args.command not in QUIET_PHASES:
        from controlnet.progress import show_phases

        show_phases(args.verbose)  # phase lines (ControlNet load, caching, saving...) on a terminal or with -v
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        result = args.func(args)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
    ) as err:
        print(f"controlnet {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"controlnet {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
