"""CLI: `controlnet inspect | convert | init | transfer` (checkpoint tools). Thin: parse, call the library, print."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

DTYPES = {"keep": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Layouts a transformer ControlNet converts to besides a diffusers folder (io/transformer_layouts.py LAYOUTS): one
# .safetensors file each.
TRANSFORMER_FILE_LAYOUTS = ("diffusers-file", "xlabs", "stability")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="tell what a weights file or folder holds",
        description="Print the format (original / diffusers, ControlNet / UNet / combined; for SD3/SD3.5 and Flux "
        "ControlNets the publisher's layout: diffusers names, InstantX/Shakker file, XLabs, Stability), base family, "
        "parameter count, dtype and number of control outputs of a checkpoint, from its header alone.",
    )
    p.add_argument("path", type=Path, help="a .safetensors/.pth/.ckpt file or a diffusers folder")
    p.set_defaults(func=run_inspect)

    p = subparsers.add_parser(
        "convert",
        help="convert a ControlNet between the original and diffusers formats (or a transformer one's layouts)",
        description="Convert a ControlNet checkpoint. Original files (control_*.pth/.safetensors, with or without "
        "the control_model. prefix, or v1.0 combined files) become diffusers folders and back; the round trip "
        "is exact. SD3/SD3.5 and Flux ControlNets convert between their published layouts: a diffusers folder, one "
        "file in diffusers names (as InstantX and Shakker publish), XLabs' (Flux) and Stability's (SD3.5); the "
        "tensors are the source's bytes, renamed (a fused qkv split or joined). Nothing is written if conversion "
        "fails.",
    )
    p.add_argument("src", type=Path, help="source ControlNet: file or diffusers folder")
    p.add_argument(
        "dst", type=Path, help="destination: a folder (diffusers) or a .safetensors/.pth file (original)"
    )
    p.add_argument(
        "--to",
        required=True,
        choices=["original", "diffusers", *TRANSFORMER_FILE_LAYOUTS],
        help="target format: original or diffusers (a folder); for SD3/SD3.5 and Flux ControlNets also "
        "diffusers-file (one .safetensors in diffusers names), xlabs (Flux) or stability (SD3.5)",
    )
    _add_common(p)
    p.add_argument(
        "--prefix",
        default=None,
        help="with --to original: key prefix of the written file ('' for none; default "
        "control_model., as the official files)",
    )
    p.set_defaults(func=run_convert)

    p = subparsers.add_parser(
        "init",
        help="create a ControlNet from a base model (the trainable copy of its encoder)",
        description="Make a new ControlNet whose encoder copy holds the base UNet's weights and whose zero "
        "convolutions start at zero (what the reference tool_add_control.py does).",
    )
    p.add_argument(
        "base",
        type=Path,
        help="base model: diffusers folder (UNet, SD3/SD3.5 or Flux) or original SD checkpoint file",
    )
    p.add_argument("dst", type=Path, help="output: folder (diffusers) or .safetensors file (the other layouts)")
    p.add_argument(
        "--to",
        default="diffusers",
        choices=["original", "diffusers", *TRANSFORMER_FILE_LAYOUTS],
        help="output format (original: UNet ControlNets; diffusers-file, xlabs, stability: SD3/Flux ones)",
    )
    add_ema_argument(p, RAW_BY_DEFAULT)
    p.add_argument("--cond-channels", type=int, default=3, help="channels of the condition image (UNet bases)")
    dit = p.add_argument_group("SD3/SD3.5 and Flux bases (diffusers' from_transformer options)")
    dit.add_argument(
        "--num-layers",
        type=int,
        help="blocks copied: SD3 joint blocks (default 12, at most the base's minus one), Flux double blocks "
        "(default 4)",
    )
    dit.add_argument("--num-single-layers", type=int, help="Flux: single blocks copied too (default 0)")
    dit.add_argument(
        "--extra-conditioning-channels", type=int, help="SD3: channels beside the condition latents (1: a mask)"
    )
    dit.add_argument(
        "--pixel-hint",
        action="store_true",
        help="Flux: XLabs' layout, the condition entering as pixels through a hint encoder",
    )
    dit.add_argument("--num-mode", type=int, help="Flux: a union net's number of condition types")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the new hint encoder's random initial weights (the copy and the "
        "zero convolutions are not random): the same seed writes the same file",
    )
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
    add_ema_argument(p, RAW_BY_DEFAULT + "; one choice for BASE and COMMUNITY")
    _add_common(p)
    p.set_defaults(func=run_transfer)


# How --ema/--no-ema are spelled in the library's messages (io/ema.py), for every command that has them.
EMA_FLAGS = {"ema": "--ema", "no_ema": "--no-ema"}
RAW_BY_DEFAULT = (
    "default: the raw ones, which the reference tool_add_control.py copies and fine-tuning continues from"
)


def add_ema_argument(group, default_text: str) -> None:
    """--ema/--no-ema: which UNet of a checkpoint file holding EMA weights too (the one definition, for every command
    that reads such a file; `default_text` says the command's default)."""
    group.add_argument(
        "--ema",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="a checkpoint file with EMA weights too (model_ema.*, e.g. v1-5-pruned): use its EMA UNet or, with "
        f"--no-ema, the raw one ({default_text}); a line on stderr says which was used",
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        help="diffusers config.json when the file cannot tell its architecture: the UNet's for a UNet ControlNet, "
        "the ControlNet's own for an SD3/Flux one",
    )
    p.add_argument("--dtype", default="keep", choices=list(DTYPES), help="dtype of the written weights")


def _dtype(name: str, fallback):
    import torch

    return getattr(torch, DTYPES[name]) if DTYPES[name] else fallback


def _source_dtype(path: Path):
    """The source's one floating dtype (to keep it), or None when it mixes several (header only)."""
    import torch

    from controlnet.io.inspect import weights_dtypes

    floats = {d for d in (getattr(torch, name) for name in weights_dtypes(path)) if d.is_floating_point}
    return floats.pop() if len(floats) == 1 else None


# Names an original-format file may have (safe_load.write_state_dict writes these; .safetensors preferred).
ORIGINAL_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
DEFAULT_PREFIX = "control_model."


def _refuse_existing(dst: Path) -> None:
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; choose a new destination")


def _check_arguments(args, sources: dict[str, Path]) -> None:
    """Everything that needs no weights, checked before the first (10-50 s) read; one line per problem.

    `sources`: what each input path is, as named in the error ("ControlNet", "base model", ...).
    """
    _refuse_existing(args.dst)
    suffix = args.dst.suffix.lower()
    if args.to == "diffusers" and suffix in ORIGINAL_FILE_SUFFIXES + (".bin", ".xz"):
        raise ValueError(
            f"{args.dst}: --to diffusers writes a folder, but the name ends in {suffix}; drop the suffix or use "
            "--to original"
        )
    if args.to in TRANSFORMER_FILE_LAYOUTS and suffix != ".safetensors":
        raise ValueError(f"{args.dst}: --to {args.to} writes one file; expected a name ending in .safetensors")
    if args.to == "original" and suffix not in ORIGINAL_FILE_SUFFIXES:
        raise ValueError(
            f"{args.dst}: --to original writes one file; expected a name ending in .safetensors (or .pth), got "
            f"{suffix or 'no suffix'}"
        )
    if getattr(args, "prefix", None) is not None and args.to != "original":
        raise ValueError(f"--prefix {args.prefix!r} applies to --to original only (the key prefix of the file)")
    if getattr(args, "cond_channels", 1) < 1:
        raise ValueError(f"--cond-channels {args.cond_channels}: expected a positive number of channels")
    for what, path in sources.items():
        if not path.exists():
            raise FileNotFoundError(f"{what} not found: {path}")
    if args.config is not None and not args.config.is_file():
        raise FileNotFoundError(f"UNet config not found: {args.config} (expected a diffusers config.json)")


class _Phases:
    """A bar on stderr over a command's phases (reading and writing SD-sized weights takes 10-50 s).

    tqdm hides it when stderr is not a terminal (disable=None), so logs keep the one error line; on a failure the
    bar is cleared and only the error line remains.
    """

    def __init__(self, command: str, total: int):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            desc=command,
            file=sys.stderr,
            disable=None,
            mininterval=0,  # a handful of phases: draw each one (the default 0.1 s would skip quick ones)
            bar_format="{desc}: {n}/{total}{postfix} [{elapsed}]",
        )
        self.started = False

    def __call__(self, name: str) -> None:
        """Phase `name` starts (the previous one is done)."""
        self.bar.set_postfix_str(name, refresh=False)
        if self.started:
            self.bar.update(1)  # draws the new phase beside the new count
        else:
            self.bar.refresh()
        self.started = True

    @contextlib.contextmanager
    def running(self):
        try:
            yield self
        except BaseException:
            self.bar.leave = False
            raise
        else:
            self.bar.set_postfix_str("done", refresh=False)
            self.bar.update(self.bar.total - self.bar.n)
        finally:
            self.bar.close()


def _phases(command: str, total: int):
    return _Phases(command, total).running()


def run_inspect(args) -> int:
    from controlnet.io.inspect import inspect_path

    for key, value in inspect_path(args.path).describe().items():
        print(f"{key + ':':17s} {value}")
    return 0


def run_convert(args) -> int:
    _check_arguments(args, {"ControlNet": args.src})
    from controlnet.io.transformer_layouts import transformer_controlnet_format

    fmt = transformer_controlnet_format(args.src)  # the header only
    if fmt is not None:
        return _convert_transformer(args, fmt)
    if args.to in TRANSFORMER_FILE_LAYOUTS:
        raise ValueError(
            f"--to {args.to} is a layout of SD3/SD3.5 and Flux ControlNets; {args.src} is not one (a UNet ControlNet "
            "converts --to original or --to diffusers)"
        )
    from controlnet.io.streaming import convert_controlnet_file

    with _phases("convert", 2) as phase:
        dtype = _dtype(args.dtype, _source_dtype(args.src))
        prefix = DEFAULT_PREFIX if args.prefix is None else args.prefix
        net = convert_controlnet_file(args.src, args.dst, args.to, args.config, dtype, prefix, phase=phase)
    print(f"wrote {args.to} ControlNet ({net.num_control_outputs} control outputs) to {args.dst}")
    return 0


def _convert_transformer(args, fmt: str) -> int:
    """`convert` for an SD3/SD3.5 or Flux ControlNet: any published layout to any other it fits, tensors untouched."""
    from controlnet.io.formats import FORMAT_PHRASES
    from controlnet.io.transformer_layouts import convert_transformer_controlnet_file

    if args.to == "original":
        raise ValueError(
            f"{args.src} holds {FORMAT_PHRASES[fmt]}; the original (cldm) format is the UNet ControlNets': use --to "
            f"diffusers, {', '.join(TRANSFORMER_FILE_LAYOUTS)}"
        )
    with _phases("convert", 2) as phase:
        source = convert_transformer_controlnet_file(
            args.src, args.dst, args.to, args.config, _dtype(args.dtype, None), phase
        )
    outputs = sum(1 for name in source.meta if ".weight" in name and name.startswith(CONTROL_OUTPUT_PREFIXES))
    print(f"wrote {args.to} {source.family} ControlNet ({outputs} control outputs) to {args.dst}")
    return 0


# A transformer ControlNet's outputs: one zero-initialised linear per copied block.
CONTROL_OUTPUT_PREFIXES = ("controlnet_blocks.", "controlnet_single_blocks.")


# init's options for transformer bases (the keyword arguments of `from_transformer`)
TRANSFORMER_INIT_OPTIONS = (
    "num_layers",
    "num_single_layers",
    "extra_conditioning_channels",
    "pixel_hint",
    "num_mode",
)


def run_init(args) -> int:
    _check_arguments(args, {"base model": args.base})
    import torch

    from controlnet.io.transfer import init_controlnet_file
    from controlnet.io.transformer_init import transformer_base_folder

    torch.manual_seed(args.seed)
    found = transformer_base_folder(args.base)  # config files only
    given = [k for k in TRANSFORMER_INIT_OPTIONS if getattr(args, k) not in (None, False)]
    if found is not None:
        return _init_transformer(args, found[0])
    if given:
        raise ValueError(
            f"--{given[0].replace('_', '-')}: an option of SD3/SD3.5 and Flux bases; {args.base} is not one "
            "(a UNet base's ControlNet copies its whole encoder)"
        )
    if args.to in TRANSFORMER_FILE_LAYOUTS:
        raise ValueError(
            f"--to {args.to} is a layout of SD3/SD3.5 and Flux ControlNets; {args.base} is a UNet base"
        )
    with _phases("init", 3) as phase:
        net = init_controlnet_file(
            args.base,
            args.dst,
            args.to,
            args.config,
            _dtype(args.dtype, None),  # keep: the base UNet's own dtype
            phase,
            ema=bool(args.ema),
            flags=EMA_FLAGS,
            cond_channels=args.cond_channels,
        )
    print(
        f"wrote a new {args.to} ControlNet ({sum(p.numel() for p in net.parameters()):,} parameters) to {args.dst}"
    )
    return 0


def _init_transformer(args, family: str) -> int:
    """`init` from an SD3/SD3.5 or Flux base folder: the UNet-only options refused first, in one line each."""
    from controlnet.io.transformer_init import init_transformer_controlnet_file

    if args.to == "original":
        raise ValueError(
            f"--to original is the UNet ControlNets' format; {args.base} is a {family} base: use --to diffusers, "
            f"{', '.join(TRANSFORMER_FILE_LAYOUTS)}"
        )
    if args.ema is not None:
        raise ValueError(f"--ema/--no-ema: {args.base} is a {family} base folder, which holds no EMA weights")
    if args.cond_channels != 3:
        raise ValueError(
            f"--cond-channels: {family} ControlNets take the condition as VAE latents (see "
            "--extra-conditioning-channels for SD3's mask channel)"
        )
    with _phases("init", 3) as phase:
        net = init_transformer_controlnet_file(
            args.base,
            args.dst,
            args.to,
            _dtype(args.dtype, None),  # keep: the base transformer's own dtype
            phase,
            **{k: getattr(args, k) for k in TRANSFORMER_INIT_OPTIONS},
        )
    outputs = len(net.controlnet_blocks) + len(getattr(net, "controlnet_single_blocks", None) or ())
    print(
        f"wrote a new {args.to} {family} ControlNet ({sum(p.numel() for p in net.parameters()):,} parameters, "
        f"{outputs} control outputs) to {args.dst}"
    )
    return 0


def run_transfer(args) -> int:
    _check_arguments(
        args, {"ControlNet": args.control, "base model": args.base, "community model": args.community}
    )
    from controlnet.io.transfer import transfer_controlnet_file

    with _phases("transfer", 4) as phase:
        dtype = _dtype(args.dtype, _source_dtype(args.control))
        transfer_controlnet_file(
            args.control,
            args.base,
            args.community,
            args.dst,
            args.to,
            args.config,
            dtype,
            phase,
            ema=bool(args.ema),
            flags=EMA_FLAGS,
        )
    print(f"wrote the transferred ControlNet to {args.dst}")
    return 0
