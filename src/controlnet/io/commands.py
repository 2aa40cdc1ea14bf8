"""CLI: `controlnet inspect | convert | init | transfer` (checkpoint tools). Thin: parse, call the library, print."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = {"keep": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="tell what a weights file or folder holds",
        description="Print the format (original / diffusers, ControlNet / UNet / combined), base family, "
        "parameter count, dtype and number of control outputs of a checkpoint.",
    )
    p.add_argument("path", type=Path, help="a .safetensors/.pth/.ckpt file or a diffusers folder")
    p.set_defaults(func=run_inspect)

    p = subparsers.add_parser(
        "convert",
        help="convert a ControlNet between the original and diffusers formats",
        description="Convert a ControlNet checkpoint. Original files (control_*.pth/.safetensors, with or without "
        "the control_model. prefix, or v1.0 combined files) become diffusers folders and back; the round trip "
        "is exact. Nothing is written if conversion fails.",
    )
    p.add_argument("src", type=Path, help="source ControlNet: file or diffusers folder")
    p.add_argument(
        "dst", type=Path, help="destination: a folder (diffusers) or a .safetensors/.pth file (original)"
    )
    p.add_argument("--to", required=True, choices=["original", "diffusers"], help="target format")
    _add_common(p)
    p.add_argument("--prefix", default="control_model.", help="key prefix of original files ('' for none)")
    p.set_defaults(func=run_convert)

    p = subparsers.add_parser(
        "init",
        help="create a ControlNet from a base model (the trainable copy of its encoder)",
        description="Make a new ControlNet whose encoder copy holds the base UNet's weights and whose zero "
        "convolutions start at zero (what the reference tool_add_control.py does).",
    )
    p.add_argument("base", type=Path, help="base model: diffusers folder or original SD checkpoint file")
    p.add_argument("dst", type=Path, help="output: folder (diffusers) or .safetensors file (original)")
    p.add_argument("--to", default="diffusers", choices=["original", "diffusers"], help="output format")
    p.add_argument("--cond-channels", type=int, default=3, help="channels of the condition image")
    _add_common(p)
    p.set_defaults(func=run_init)

    p = subparsers.add_parser(
        "transfer",
        help="move a ControlNet to a community model fine-tuned from the same base",
        description="control_new = control + (community - base) for every copied encoder weight.",
    )
    p.add_argument("control", type=Path, help="ControlNet trained on BASE")
    p.add_argument("base", type=Path, help="the base model the ControlNet was trained on")
    p.add_argument("community", type=Path, help="a model fine-tuned from BASE")
    p.add_argument("dst", type=Path, help="output: folder (diffusers) or .safetensors file (original)")
    p.add_argument("--to", default="diffusers", choices=["original", "diffusers"], help="output format")
    _add_common(p)
    p.set_defaults(func=run_transfer)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="diffusers UNet config.json, when the family cannot be recognised")
    p.add_argument("--dtype", default="keep", choices=list(DTYPES), help="dtype of the written weights")


def _dtype(name: str, fallback):
    import torch

    return getattr(torch, DTYPES[name]) if DTYPES[name] else fallback


def _source_dtype(path: Path):
    from controlnet.io.inspect import inspect_path

    dtypes = inspect_path(path).dtypes
    import torch

    return getattr(torch, dtypes[0]) if len(dtypes) == 1 else None


def _refuse_existing(dst: Path) -> None:
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new destination")


def run_inspect(args) -> int:
    from controlnet.io.inspect import inspect_path

    for key, value in inspect_path(args.path).describe().items():
        print(f"{key + ':':17s} {value}")
    return 0


def run_convert(args) -> int:
    from controlnet.io.api import load_controlnet, save_controlnet

    _refuse_existing(args.dst)
    net = load_controlnet(args.src, config=args.config)
    dtype = _dtype(args.dtype, _source_dtype(args.src))
    save_controlnet(net, args.dst, format=args.to, dtype=dtype, prefix=args.prefix)
    print(f"wrote {args.to} ControlNet ({net.num_control_outputs} control outputs) to {args.dst}")
    return 0


def run_init(args) -> int:
    from controlnet.io.api import load_unet, save_controlnet
    from controlnet.io.transfer import init_controlnet

    _refuse_existing(args.dst)
    unet = load_unet(args.base, config=args.config)
    net = init_controlnet(unet, cond_channels=args.cond_channels)
    save_controlnet(net, args.dst, format=args.to, dtype=_dtype(args.dtype, None))
    print(
        f"wrote a new {args.to} ControlNet ({sum(p.numel() for p in net.parameters()):,} parameters) to {args.dst}"
    )
    return 0


def run_transfer(args) -> int:
    from controlnet.io.api import load_controlnet, load_unet, save_controlnet
    from controlnet.io.transfer import transfer_controlnet

    _refuse_existing(args.dst)
    base = load_unet(args.base, config=args.config)
    community = load_unet(args.community, config=args.config)
    control = load_controlnet(args.control, unet=base)
    moved = transfer_controlnet(control, base, community)
    save_controlnet(moved, args.dst, format=args.to, dtype=_dtype(args.dtype, _source_dtype(args.control)))
    print(f"wrote the transferred ControlNet to {args.dst}")
    return 0
