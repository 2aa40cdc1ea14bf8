"""CLI: `controlnet generate` (one prompt, or a JSONL manifest of many). Thin: parse, build options, call, print."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from controlnet.io.commands import EMA_FLAGS, add_ema_argument

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# generate's --dtype default: a transformer base (SD3 / Flux) in its own files' dtype (a bf16 transformer never passes
# through a float32 copy), a UNet base in float32 as before
AUTO_DTYPE = "auto"

DESCRIPTION = """\
Generate images from a text prompt plus one condition image per ControlNet (paper: "Adding Conditional Control
to Text-to-Image Diffusion Models", Zhang, Rao & Agrawala, ICCV 2023). Several ControlNets add their residuals
(paper Sec. 3.4); each has its own strength, start/end window and control mode.

Outputs (in --out): <name>.png (or <name>-<k>.png for several images) with the settings embedded as PNG text
("parameters" in the web UI's format, "controlnet" as JSON), <name>.json (a sidecar with every setting, written
last: its presence means done) and <name>-grid.png (condition images | outputs).

Control modes (--control-mode, per net):
  balanced        the residuals go to both classifier-free-guidance branches
  prompt          "My prompt is more important": output i of 13 scaled by 0.825 ** (12 - i) (0.825 ** 12 ~ 0.1)
  controlnet      "ControlNet is more important" (guess mode): the same scales on the conditional branch only;
                  works with an empty prompt
  cfg_resolution  the paper's CFG resolution weighting (Sec. 3.4): conditional branch only, w_i = 64 / h_i

Batch: --manifest FILE.jsonl runs one job per line ({"prompt": ..., "cond": [...]} plus optional "id", "seed",
"negative_prompt", "control_scale", ... any option below by its Python name), skips lines whose sidecar exists
(resume after a crash by re-running the same command) and splits lines across processes started with
`accelerate launch` (process r of w takes lines r, r + w, ...)."""

EPILOG = """\
examples:
  controlnet generate "a red circle on a blue background" --controlnet cn/ --cond edges.png
  controlnet generate "a house" --base ./sd15 --controlnet canny/ --cond photo.jpg --annotator canny \\
      --steps 20 --scheduler "DPM++ 2M Karras" --seed 1 --batch-size 4 --control-end 0.6
  controlnet generate "" --controlnet pose/ --cond pose.png --control-mode controlnet --cfg 4
  controlnet generate "a cat" --controlnet inpaint/ --cond inpaint --image photo.png --mask mask.png
  accelerate launch --multi_gpu --num_processes 2 -m controlnet.cli generate --manifest jobs.jsonl \\
      --controlnet cn/ --out out/          (2 GPUs; on a machine without CUDA: 2 CPU processes)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from controlnet.generate.options import ControlUnit, GenerationOptions
    from controlnet.settings_cli import add_arguments

    p = subparsers.add_parser(
        "generate",
        help="generate images from a prompt and condition images (or a JSONL manifest of jobs)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", help="what to draw (omit with --manifest)")
    add_base_arguments(p.add_argument_group("base model"), auto_dtype=True)
    # the generation's settings, named once in generate/options.py: flags and help come from its fields
    add_arguments(p.add_argument_group("generation"), GenerationOptions, dest_prefix=OPTION)
    add_arguments(
        p.add_argument_group("ControlNets (give once per net, in order; a setting given once is every net's)"),
        ControlUnit,
        dest_prefix=UNIT,
        repeat=True,
    )
    g = p.add_argument_group("output and batch")
    g.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: %(default)s)")
    g.add_argument("--name", default=None, help="output name stem (default: controlnet-<seed>)")
    g.add_argument("--no-grid", action="store_true", help="do not write the condition | outputs grid")
    g.add_argument("--manifest", type=Path, default=None, help="JSONL file of jobs (see above)")
    g = p.add_argument_group("device and speed")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet and ControlNets (GPU)")
    g.add_argument(
        "--no-packed-weights",
        dest="packed_weights",
        action="store_false",
        help="CPU: run layers on plain weights (default: pre-packed oneDNN weights in the denoising loop, same "
        "results up to float rounding, ~1.3x faster at SD1.5 size, one extra copy of the weights while it runs)",
    )
    g.add_argument(
        "--no-reuse-freed-memory",
        dest="reuse_freed_memory",
        action="store_false",
        help="CPU: glibc's default heap (default: freed activations stay in the heap for the next layer instead of "
        "being faulted back in, zero-filled; controlnet/allocator.py, as `controlnet train` does)",
    )
    g.add_argument(
        "--cpu-offload", action="store_true", help="keep models on the CPU, move each to the GPU to run"
    )
    p.set_defaults(func=run_generate)


OPTION, UNIT = "option.", "unit."  # argparse dests of GenerationOptions' and ControlUnit's fields


# The base options every command that takes a base shares (generate, evaluate; train and demo spell the same
# fields as config fields: model.base, model.tokenizer, ...); their names as the loader's messages should say them.
BASE_FLAGS = {
    "base": "--base",
    "tokenizer": "--tokenizer",
    "tokenizer_2": "--tokenizer-2",
    "base_config": "--base-config",
    **EMA_FLAGS,
    **{name: "--" + name.replace("_", "-") for name in ("vae", "clip_l", "clip_g", "t5")},  # options.BaseParts
}
PART = "part."  # argparse dests of BaseParts' fields


def add_base_arguments(group, dtype: bool = True, auto_dtype: bool = False) -> None:
    """--base, --tokenizer, --tokenizer-2, --prediction-type, --base-config, --ema/--no-ema (and --dtype; with
    auto_dtype its default is AUTO_DTYPE)."""
    group.add_argument(
        "--base",
        default="builtin",
        help="'builtin' (default), 'builtin-dit' (the shipped transformer base), a diffusers model folder, a folder "
        "written by `controlnet world export-base`, "
        "one SD1.x/SD2.x/SDXL checkpoint file (.safetensors/.ckpt; needs --tokenizer), or one SD3/SD3.5 checkpoint "
        "or Flux transformer file (with --vae, --clip-l, --clip-g, --t5 for the parts it lacks)",
    )
    group.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="tokenizer folder: required for a checkpoint file (which holds none), e.g. the tokenizer/ folder of any "
        "diffusers SD model (CLIP's vocab.json + merges.txt); for a model folder it replaces the folder's own",
    )
    group.add_argument(
        "--tokenizer-2", default=None, metavar="DIR", help="SDXL's second tokenizer folder (default: --tokenizer)"
    )
    group.add_argument(
        "--prediction-type",
        default=None,
        choices=["epsilon", "v_prediction"],
        help="what the UNet predicts (default: the base's; a checkpoint file: epsilon; SD2.x 768 px: v_prediction)",
    )
    add_base_config_argument(
        group,
        'a checkpoint file of a non-standard architecture: JSON with "family" (sd15, sd21, sdxl) and the '
        'diffusers configs of "unet", "vae", "text_encoder"',
    )
    add_ema_argument(group, "default: the EMA one, usually better for sampling; recorded in the outputs' settings")
    add_part_arguments(group)
    if dtype:
        if auto_dtype:
            group.add_argument(
                "--dtype",
                default=AUTO_DTYPE,
                choices=[AUTO_DTYPE, *DTYPES],
                help="model dtype (default: auto: an SD3/Flux base in the dtype of its files, a UNet base fp32)",
            )
        else:
            group.add_argument(
                "--dtype", default="fp32", choices=list(DTYPES), help="model dtype (default: %(default)s)"
            )


def base_options(args) -> dict:
    """`generate.base.check_base`/`load_base` keywords from arguments added by `add_base_arguments`."""
    from controlnet.generate.options import BaseParts
    from controlnet.settings_cli import given_values

    return {
        "tokenizer": args.tokenizer,
        "tokenizer_2": args.tokenizer_2,
        "prediction_type": args.prediction_type,
        "configs": args.base_config,
        "flags": BASE_FLAGS,
        **given_values(args, BaseParts, PART),
    }


def add_base_config_argument(group, help: str) -> None:
    """--base-config FILE (`check_base`'s `configs`); `help` says which files the command applies it to."""
    group.add_argument("--base-config", default=None, metavar="FILE", help=help)


def add_part_arguments(group) -> None:
    """--vae, --clip-l, --clip-g, --t5: an SD3 / Flux checkpoint file's other parts, named once in
    generate/options.py (BaseParts); `part_options` reads them back."""
    from controlnet.generate.options import BaseParts
    from controlnet.settings_cli import add_arguments

    add_arguments(group, BaseParts, dest_prefix=PART)


def part_options(args) -> dict:
    """{vae, clip_l, clip_g, t5: path} of the parts given on the command line (`check_base`'s keywords)."""
    from controlnet.generate.options import BaseParts
    from controlnet.settings_cli import given_values

    return {name: value for name, value in given_values(args, BaseParts, PART).items() if value is not None}


def loading_bar():
    """A `progress(name, k, n)` for `load_base`: one tqdm line on stderr over the base's components.

    Only on a terminal (tqdm's disable=None), and erased when done (leave=False): a log or an error line read by a
    program stays one line. `-v` logs each component instead.
    """
    from tqdm import tqdm

    bars = []

    def progress(name: str, done: int, total: int) -> None:
        if not bars:
            bars.append(
                tqdm(total=total, desc="loading base", unit="part", file=sys.stderr, leave=False, disable=None)
            )
        bars[0].set_postfix_str(name, refresh=False)
        bars[0].update(done - bars[0].n)
        if done >= total:
            bars[0].close()

    return progress


def _per_net(values, flag: str, n: int):
    """None -> None (not given); one value -> every net's; one per net -> the list; else a ValueError."""
    if not values:
        return None
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"{flag}: given {len(values)} times for {n} ControlNets; give it once or once per net")
    return list(values)


def controlnets(args) -> list[str]:
    return getattr(args, UNIT + "model") or []


def options_from_args(args):
    """The `GenerationOptions` of the command line; the init image and mask decoded (a missing, truncated or too
    large file stops us here, before any model loads)."""
    from controlnet.generate.options import GenerationOptions
    from controlnet.io.images import open_image
    from controlnet.settings_cli import given_values

    values = given_values(args, GenerationOptions, OPTION)
    for key in ("image", "mask"):
        if values.get(key) is not None:
            values[key] = open_image(values[key], f"--{key}")
    return GenerationOptions(**values)


def units_from_args(args, options) -> list:
    """One `ControlUnit` per --controlnet (its condition image set later); each per-net flag given once (every
    net's) or once per net. A unit's resize mode defaults to --resize-mode (so that one flag still resizes every
    image)."""
    import dataclasses

    from controlnet.generate.options import UNIT_LISTS, ControlUnit
    from controlnet.settings_cli import flag_names, given_values

    paths = controlnets(args)
    n = len(paths)
    given = given_values(args, ControlUnit, UNIT)
    per_field = {
        f.name: _per_net(given[f.name], flag_names(f)[0], n)
        for f in dataclasses.fields(ControlUnit)
        if f.name not in ("model", "image") and given.get(f.name) is not None
    }
    per_field.setdefault("resize_mode", [options.resize_mode] * n)
    # checked as the pipeline's per-net lists first, so that a message names the net: control_scale[1]=-1.0
    lists = {key: per_field[name] for key, name in UNIT_LISTS.items() if name in per_field}
    dataclasses.replace(options, **lists).per_net(n)
    return [
        ControlUnit(model=str(path), **{name: values[k] for name, values in per_field.items()})
        for k, path in enumerate(paths)
    ]


def _check_annotators(units) -> None:
    names = [u.annotator for u in units if u.annotator]
    if names:
        from controlnet.annotate.registry import annotator_class

        for name in names:
            annotator_class(name)  # unknown names fail now, with the list of valid ones


def _distributed():
    """(rank, world, device) under `accelerate launch`, else (0, 1, None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None, None
    import torch
    from accelerate import PartialState

    # `accelerate launch --multi_gpu --num_processes N` on a machine without CUDA gives N gloo CPU processes
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return state.process_index, state.num_processes, ("cpu" if cpu else state.device), state


def check_base_arguments(args):
    """The base's arguments and files, checked before anything is loaded (`generate.base.check_base`); the
    ControlNet paths were checked by `check_before_loading`."""
    from controlnet.generate.base import check_base

    return check_base(args.base, **base_options(args))


def sampling_line(given, pipe) -> str:
    """One line with the effective sampling settings and which of them are the base's defaults."""
    from controlnet.generate.samplers import SAMPLERS, sampler_display_name

    effective = given.with_defaults(pipe.sampling)
    name = effective.scheduler
    sampler = SAMPLERS[name].display_name if name else sampler_display_name(pipe.scheduler)
    keys = ("scheduler", "steps", "guidance_scale")
    defaulted = [k for k in keys if getattr(given, k) is None]
    source = f"the defaults of base {pipe.base_name}: {', '.join(defaulted)}" if defaulted else "as given"
    return f"sampling: {sampler}, {effective.steps} steps, guidance {effective.guidance_scale:g} ({source})"


def _load_pipeline(args, device, source):
    import torch

    from controlnet.generate.pipeline import ControlNetPipeline

    if args.dtype == AUTO_DTYPE:
        dtype = None if source.arch != "unet" else torch.float32
    else:
        dtype = getattr(torch, DTYPES[args.dtype])
    if device is None:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from controlnet.precision import precision_warning

    warning = precision_warning(dtype, device, f"--dtype {args.dtype}")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    pipe = ControlNetPipeline.from_pretrained(
        source,
        controlnets=controlnets(args),
        dtype=dtype,
        ema=args.ema,
        progress=loading_bar(),
        **base_options(args),
    )
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device)
    else:
        pipe.to(device)
    pipe.optimize(
        channels_last=args.channels_last,
        compile=args.compile,
        pack_cpu_weights=args.packed_weights,
        reuse_freed_memory=args.reuse_freed_memory,
    )
    return pipe


def conditions(args) -> list[str]:
    return getattr(args, UNIT + "image") or []


def check_before_loading(args) -> None:
    """Checks that need no torch and read no weights, so that a typo is refused in a second, not after the load.

    The size rule needs the base's VAE factor, read from its config files (`sizes.vae_factor_on_disk`).
    """
    from controlnet.generate.sizes import check_size, vae_factor_on_disk

    nets, conds = controlnets(args), conditions(args)
    if args.manifest is None:
        if args.prompt is None:
            raise ValueError('give a prompt ("" for none) or --manifest FILE.jsonl')
        if len(conds) != len(nets):
            raise ValueError(f"--cond given {len(conds)} times for {len(nets)} --controlnet; expected one per net")
    from controlnet.generate.base import controlnet_path

    for path in nets:
        controlnet_path(path)  # "builtin:NAME" or an existing file/folder
    for path in conds:
        if path != "inpaint" and not Path(path).is_file():
            raise FileNotFoundError(f"condition image not found: {path}")
    factor = vae_factor_on_disk(args.base)
    if factor is not None:
        check_size(getattr(args, OPTION + "width"), getattr(args, OPTION + "height"), factor)


class StepBar:
    """The sampler-step bar on stderr: made at the first step (so that an input error prints only its own line)
    and closed at the last one, so that the VAE decode and the saving after it do not re-render it."""

    def __init__(self, desc: str = "generate", file=None):
        self.desc, self.file, self.bar = desc, file, None

    def __call__(self, step: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit="step", desc=self.desc, file=self.file or sys.stderr)
        self.bar.update(step - self.bar.n)
        if step >= total:
            self.bar.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_generate(args) -> int:
    check_before_loading(args)
    options = options_from_args(args)
    units = units_from_args(args, options)  # every per-net setting checked before any model loads
    _check_annotators(units)
    names = [Path(p).name for p in controlnets(args)]
    if args.manifest is not None:
        return _run_manifest(args, options, units, names)
    from controlnet.generate.control_images import to_pil
    from controlnet.generate.jobs import run_job
    from controlnet.generate.options import GenerationJob
    from controlnet.generate.outputs import save_generation

    source = check_base_arguments(args)
    # decoded once, before any model loads: io/images turns an unreadable file into one ImageError line; annotated
    # (if asked) by run_job, as every front door does
    conds = [path if path == "inpaint" else to_pil(path, "condition image") for path in conditions(args)]
    for unit, cond in zip(units, conds, strict=True):
        unit.image = cond
    job = GenerationJob(prompt=args.prompt, base=str(args.base), units=units, options=options)
    pipe = _load_pipeline(args, None, source)
    bar = StepBar()

    def note_size(size) -> None:
        if size.note():
            print(size.note("set --width/--height to override"), file=sys.stderr)

    try:
        result = run_job(pipe, job, progress=bar, on_size=note_size)
    finally:
        bar.close()
    # after the run, so that an input error found by the pipeline stays the only line
    print(sampling_line(options, pipe), file=sys.stderr)
    stem = args.name or f"controlnet-{options.seed}"
    from controlnet.progress import phase

    with phase(f"saving {len(result.images)} image{'s' if len(result.images) > 1 else ''} to {args.out}"):
        record = save_generation(result, args.out, stem, names, grid=not args.no_grid)
    for name in record["images"]:
        print(args.out / name)
    return 0


def _run_manifest(args, options, units, names) -> int:
    from tqdm import tqdm

    from controlnet.generate.manifest import pending_lines, read_manifest, run_manifest, shard

    if args.prompt is not None or conditions(args):
        raise ValueError(
            "with --manifest, prompts and condition images come from the manifest: drop the prompt/--cond"
        )
    jobs = read_manifest(args.manifest, len(units))
    rank, world, device, state = _distributed()
    mine = shard(jobs, rank, world)
    if not pending_lines(mine, args.out):  # a rerun with nothing to do says so before loading anything
        print(f"process {rank + 1}/{world}: nothing to do: all {len(mine)} of its lines are done ({args.out})")
        if state is not None:
            state.wait_for_everyone()
        return 0
    source = check_base_arguments(args)
    pipe = _load_pipeline(args, device, source)
    if rank == 0:
        print(sampling_line(options, pipe), file=sys.stderr)
    bar = tqdm(total=len(mine), unit="line", desc=f"manifest [{rank + 1}/{world}]", file=sys.stderr, position=rank)
    done, skipped = run_manifest(
        pipe,
        mine,
        args.out,
        options,
        units,
        names,
        base=str(args.base),
        on_line=lambda job, generated: bar.update(1),
        grid=not args.no_grid,
        extra={"process": rank, "processes": world},
    )
    bar.close()
    print(f"process {rank + 1}/{world}: generated {done}, skipped {skipped} (already done) of {len(jobs)} lines")
    if state is not None:
        state.wait_for_everyone()
    return 0
