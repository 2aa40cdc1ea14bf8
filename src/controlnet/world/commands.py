"""`controlnet world ...`: the built-in world's commands (thin: parse, call the library, print).

`controlnet world make --task NAME --n N --size PX --out DIR [--seed S] [--workers W]` writes a dataset in
the original ControlNet layout (see controlnet.world.dataset).

Adding a `world` subcommand from another module: write `def add_parsers(subparsers)` there, which calls
`subparsers.add_parser(...)` and sets `func` on each parser, and append "package.module:add_parsers" to
WORLD_SUBCOMMANDS below (one line). Modules are imported only when the parser is built.
"""

from __future__ import annotations

import argparse
from importlib import import_module

# "module:function" entries, each adding parsers to the `world` command's subparsers, in --help order.
WORLD_SUBCOMMANDS: list[str] = [
    "controlnet.world.commands:add_make_parser",
    "controlnet.builtin.commands:add_parsers",
]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `world` command group to the program's subparsers."""
    world = subparsers.add_parser(
        "world",
        help="the built-in procedural world: datasets for every condition, the tiny base model",
        description="The built-in world: seeded procedural scenes with every condition of the paper "
        "and the fill50k-style task, written as ControlNet training datasets.",
    )
    world_subparsers = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND")
    for entry in WORLD_SUBCOMMANDS:
        module_name, function_name = entry.split(":")
        getattr(import_module(module_name), function_name)(world_subparsers)
    world.set_defaults(func=lambda args: _print_help(world))


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def add_make_parser(subparsers: argparse._SubParsersAction) -> None:
    from controlnet.world.dataset import TASKS  # light: numpy + cv2 only

    make = subparsers.add_parser(
        "make",
        help="write a dataset (prompt.json, source/, target/) for one task",
        description="Write N samples of a task in the original ControlNet training layout: DIR/prompt.json "
        "(one {source, target, prompt} object per line), DIR/source/*.png (conditions) and DIR/target/*.png "
        "(images). Written into a temporary folder beside DIR and renamed when complete.",
    )
    make.add_argument(
        "--task",
        required=True,
        help=f"one of: {', '.join(TASKS)} (fill: outline -> filled circle; shapes: any shape, rotated, 1-3 px lines, "
        "half hand-drawn), or union (several maps of each scene, for a union ControlNet: see --types)",
    )
    make.add_argument(
        "--types",
        default="",
        help="--task union: the scene conditions each sample holds, comma-separated (e.g. canny,seg,pose,depth; "
        "written as DIR/TYPE/i.png and named in prompt.json's 'sources'; pose only for scenes with a person)",
    )
    make.add_argument("--n", type=int, required=True, help="number of samples")
    make.add_argument("--size", type=int, default=64, help="image side in px (default: %(default)s)")
    make.add_argument("--out", required=True, help="new dataset folder (must not exist)")
    make.add_argument("--seed", type=int, default=0, help="dataset seed (default: %(default)s)")
    make.add_argument("--workers", type=int, default=None, help="processes (default: the CPUs available, <= 8)")
    make.set_defaults(func=run_make)


def run_make(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from controlnet.world.dataset import check_arguments, check_out, default_workers, write_dataset

    workers = default_workers() if args.workers is None else args.workers
    types = tuple(t.strip() for t in args.types.split(",") if t.strip())
    check_arguments(args.task, args.n, args.size, workers, types)  # before the progress bar: errors stay one line
    check_out(args.out)
    start = time.perf_counter()
    with tqdm(total=max(args.n, 0), unit="sample", desc=f"world {args.task}", leave=False) as bar:
        out = write_dataset(
            args.task,
            args.n,
            args.size,
            args.out,
            seed=args.seed,
            workers=workers,
            progress=bar.update,
            types=types,
        )
    print(f"wrote {args.n} {args.task} samples ({args.size} px) to {out} in {time.perf_counter() - start:.1f} s")
    return 0
