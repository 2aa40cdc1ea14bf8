"""CLI: `controlnet generate` (one prompt, or a JSONL manifest of many). Thin: parse, build options, call, print."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from controlnet.generate.samplers import SAMPLERS

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

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
    p = subparsers.add_parser(
        "generate",
        help="generate images from a prompt and condition images (or a JSONL manifest of jobs)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", help="what to draw (omit with --manifest)")
    g = p.add_argument_group("models")
    add_base_arguments(g)
    g.add_argument(
        "--controlnet", action="append", default=[], metavar="PATH",
        help="a ControlNet (original or diffusers format, or a shipped one: builtin:fill, builtin:canny, "
        "builtin:seg, builtin:pose); repeat for several, in the order of --cond",
    )  # fmt: skip
    g = p.add_argument_group("conditions")
    g.add_argument(
        "--cond", action="append", default=[], metavar="IMAGE",
        help="condition image for the matching --controlnet; 'inpaint' builds the v1.1 inpaint condition from "
        "--image and --mask (masked pixels -1)",
    )  # fmt: skip
    g.add_argument(
        "--annotator", action="append", default=[], metavar="NAME",
        help="turn the matching --cond photo into a condition map first (e.g. canny; 'none' to skip); one for "
        "all or one per --cond",
    )  # fmt: skip
    g.add_argument(
        "--resize-mode", default="just_resize",
        help="how images meet the output size: just_resize | crop_and_resize | resize_and_pad (default: %(default)s)",
    )  # fmt: skip
    g = p.add_argument_group("prompt and sampling")
    g.add_argument("--negative-prompt", default=None, help="what to steer away from")
    g.add_argument(
        "--cfg", type=float, default=None,
        help="classifier-free guidance scale; 1 = off (default: the base's, e.g. builtin 4, SD folders and files 7.5)",
    )  # fmt: skip
    g.add_argument("--steps", type=int, default=None, help="sampler steps (default: the base's, 20)")
    g.add_argument(
        "--scheduler", default=None,
        help=f"sampler: {', '.join(f'{k} ({s.display_name})' for k, s in SAMPLERS.items())}; default: the base's",
    )  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="image k uses seed + k (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=1, help="images per prompt (default: %(default)s)")
    g.add_argument(
        "--width", type=int, default=None,
        help="output width, a multiple of the VAE factor (8 for SD, 4 for the built-in base); default: the first "
        "condition's aspect at the base's native size (its longer side 512 px for SD1.5, 1024 for SDXL), or the "
        "other side's aspect when only --height is given",
    )  # fmt: skip
    g.add_argument("--height", type=int, default=None, help="output height (as --width)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: %(default)s)")
    g.add_argument(
        "--clip-skip", type=int, default=0, help="use the text encoder's hidden states N layers earlier"
    )
    g = p.add_argument_group("control (one value for all nets, or repeat once per net)")
    g.add_argument(
        "--scale", action="append", type=float, metavar="W", help="control strength (default 1; 0 = off)"
    )
    g.add_argument(
        "--block-scales", action="append", metavar="S,S,...",
        help="per-output scales, comma-separated (13 for SD1.5, 10 for SDXL)",
    )  # fmt: skip
    g.add_argument("--control-start", action="append", type=float, metavar="F", help="window start in [0, 1)")
    g.add_argument("--control-end", action="append", type=float, metavar="F", help="window end in (0, 1]")
    g.add_argument(
        "--control-mode", action="append", metavar="MODE", help="balanced | prompt | controlnet | cfg_resolution"
    )
    g.add_argument(
        "--guess-mode-form", default="reference", choices=["reference", "diffusers"],
        help="soft scales of prompt/controlnet modes: 0.825 ** (12 - i) (reference) or logspace (diffusers)",
    )  # fmt: skip
    g = p.add_argument_group("img2img and inpainting")
    g.add_argument("--image", default=None, help="source image for img2img / inpainting")
    g.add_argument("--mask", default=None, help="inpainting mask (white = repaint)")
    g.add_argument("--strength", type=float, default=None, help="fraction of the schedule re-run (default 0.75)")
    g.add_argument(
        "--inpaint-paste", action="store_true",
        help="paste the source pixels back outside the mask after decoding (the VAE round trip alters them)",
    )  # fmt: skip
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
        "--no-packed-weights", dest="packed_weights", action="store_false",
        help="CPU: run layers on plain weights (default: pre-packed oneDNN weights in the denoising loop, same "
        "results up to float rounding, ~1.3x faster at SD1.5 size, one extra copy of the weights while it runs)",
    )  # fmt: skip
    g.add_argument(
        "--no-reuse-freed-memory", dest="reuse_freed_memory", action="store_false",
        help="CPU: glibc's default heap (default: freed activations stay in the heap for the next layer instead of "
        "being faulted back in, zero-filled; controlnet/allocator.py, as `controlnet train` does)",
    )  # fmt: skip
    g.add_argument(
        "--cpu-offload", action="store_true", help="keep models on the CPU, move each to the GPU to run"
    )
    p.set_defaults(func=run_generate)


# The base options every command that takes a base shares (generate, evaluate; train and demo spell the same
# fields as config fields: model.base, model.tokenizer, ...); their names as the loader's messages should say them.
BASE_FLAGS = {
    "base": "--base",
    "tokenizer": "--tokenizer",
    "tokenizer_2": "--tokenizer-2",
    "base_config": "--base-config",
    "ema": "--ema",
    "no_ema": "--no-ema",
}


def add_base_arguments(group, dtype: bool = True) -> None:
    """--base, --tokenizer, --tokenizer-2, --prediction-type, --base-config, --ema/--no-ema (and --dtype)."""
    group.add_argument(
        "--base", default="builtin",
        help="'builtin' (default), a diffusers model folder, a folder written by `controlnet world export-base`, or "
        "one SD1.x/SD2.x/SDXL checkpoint file (.safetensors/.ckpt; needs --tokenizer)",
    )  # fmt: skip
    group.add_argument(
        "--tokenizer", default=None, metavar="DIR",
        help="tokenizer folder: required for a checkpoint file (which holds none), e.g. the tokenizer/ folder of any "
        "diffusers SD model (CLIP's vocab.json + merges.txt); for a model folder it replaces the folder's own",
    )  # fmt: skip
    group.add_argument(
        "--tokenizer-2", default=None, metavar="DIR", help="SDXL's second tokenizer folder (default: --tokenizer)"
    )
    group.add_argument(
        "--prediction-type", default=None, choices=["epsilon", "v_prediction"],
        help="what the UNet predicts (default: the base's; a checkpoint file: epsilon; SD2.x 768 px: v_prediction)",
    )  # fmt: skip
    group.add_argument(
        "--base-config", default=None, metavar="FILE",
        help="a checkpoint file of a non-standard architecture: JSON with \"family\" (sd15, sd21, sdxl) and the "
        "diffusers configs of \"unet\", \"vae\", \"text_encoder\"",
    )  # fmt: skip
    group.add_argument(
        "--ema", default=None, action=argparse.BooleanOptionalAction,
        help="a checkpoint file with EMA weights too (model_ema.*, e.g. v1-5-pruned): sample with the EMA UNet "
        "(default, usually better) or, with --no-ema, the raw one",
    )  # fmt: skip
    if dtype:
        group.add_argument(
            "--dtype", default="fp32", choices=list(DTYPES), help="model dtype (default: %(default)s)"
        )


def base_options(args) -> dict:
    """`generate.base.check_base`/`load_base` keywords from arguments added by `add_base_arguments`."""
    return {
        "tokenizer": args.tokenizer,
        "tokenizer_2": args.tokenizer_2,
        "prediction_type": args.prediction_type,
        "configs": args.base_config,
        "flags": BASE_FLAGS,
    }


def loading_bar():
    """A `progress(name, k, n)` for `load_base`: one tqdm line on stderr over the base's components.

    Only on a terminal (tqdm's disable=None), and erased when done (leave=False): a log or an error line read by a
    program stays one line. `-v` logs each component instead.
    """
    from tqdm import tqdm

    bars = []

    def progress(name: str, done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="loading base", unit="part", file=sys.stderr, leave=False,
                             disable=None))  # fmt: skip
        bars[0].set_postfix_str(name, refresh=False)
        bars[0].update(done - bars[0].n)
        if done >= total:
            bars[0].close()

    return progress


def _per_net(values, name: str, n: int, convert=lambda v: v):
    """None -> None (default); one value -> shared; one per net -> list; else a ValueError."""
    if not values:
        return None
    if len(values) == 1:
        return convert(values[0])
    if len(values) != n:
        raise ValueError(f"--{name}: given {len(values)} times for {n} ControlNets; give it once or once per net")
    return [convert(v) for v in values]


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--block-scales {text!r}: expected comma-separated numbers") from None


def options_from_args(args, n_nets: int) -> dict:
    """GenerationOptions fields from the parsed command line (only the ones given)."""
    options = {
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "width": args.width,
        "height": args.height,
        "resize_mode": args.resize_mode,
        "guess_mode_form": args.guess_mode_form,
        "image": args.image,
        "mask": args.mask,
        "strength": args.strength,
        "scheduler": args.scheduler,
        "eta": args.eta,
        "clip_skip": args.clip_skip,
        "inpaint_paste": args.inpaint_paste,
    }
    per_net = {
        "control_scale": _per_net(args.scale, "scale", n_nets),
        "control_start": _per_net(args.control_start, "control-start", n_nets),
        "control_end": _per_net(args.control_end, "control-end", n_nets),
        "control_mode": _per_net(args.control_mode, "control-mode", n_nets),
        "block_scales": _per_net(args.block_scales, "block-scales", n_nets, _floats),
    }
    options.update({k: v for k, v in per_net.items() if v is not None})
    # None: the base's own default (SamplingDefaults, filled in once the base is known)
    options.update({k: v for k, v in (("guidance_scale", args.cfg), ("steps", args.steps)) if v is not None})
    from controlnet.io.images import open_image

    # decoded once, here: a missing, truncated or too-large image or mask stops us before any model loads
    for key in ("image", "mask"):
        if options[key] is not None:
            options[key] = open_image(options[key], f"--{key}")
    from controlnet.generate.options import GenerationOptions

    GenerationOptions(**options).per_net(n_nets)  # check everything before loading any model
    return options


def _annotators(args, n_nets: int) -> list[str | None]:
    names = _per_net(args.annotator, "annotator", n_nets) or [None] * n_nets
    names = [names] * n_nets if isinstance(names, str) else names
    names = [None if (n is None or n.lower() == "none") else n for n in names]
    if any(names):
        from controlnet.annotate.registry import annotator_class

        for name in filter(None, names):
            annotator_class(name)  # unknown names fail now, with the list of valid ones
    return names


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


def sampling_line(given: dict, effective: dict, pipe) -> str:
    """One line with the effective sampling settings and which of them are the base's defaults."""
    from controlnet.generate.samplers import SAMPLERS, canonical_sampler_name, sampler_display_name

    name = effective.get("scheduler")
    sampler = SAMPLERS[canonical_sampler_name(name)].display_name if name else sampler_display_name(pipe.scheduler)
    keys = ("scheduler", "steps", "guidance_scale")
    defaulted = [k for k in keys if given.get(k) is None]
    source = f"the defaults of base {pipe.base_name}: {', '.join(defaulted)}" if defaulted else "as given"
    return f"sampling: {sampler}, {effective['steps']} steps, guidance {effective['guidance_scale']:g} ({source})"


def with_base_defaults(options: dict, pipe) -> dict:
    """`options` with guidance, steps and sampler the user did not set taken from the base's SamplingDefaults."""
    from controlnet.generate.jobs import with_base_defaults as fill

    return fill(options, pipe.sampling)


def _load_pipeline(args, device, source):
    import torch

    from controlnet.generate.pipeline import ControlNetPipeline

    dtype = getattr(torch, DTYPES[args.dtype])
    if device is None:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from controlnet.precision import precision_warning

    warning = precision_warning(dtype, device, f"--dtype {args.dtype}")
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    pipe = ControlNetPipeline.from_pretrained(source, controlnets=args.controlnet, dtype=dtype, ema=args.ema,
                                              progress=loading_bar(), **base_options(args))  # fmt: skip
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device)
    else:
        pipe.to(device)
    pipe.optimize(channels_last=args.channels_last, compile=args.compile, pack_cpu_weights=args.packed_weights,
                  reuse_freed_memory=args.reuse_freed_memory)  # fmt: skip
    return pipe


def check_before_loading(args) -> None:
    """Checks that need no torch and read no weights, so that a typo is refused in a second, not after the load.

    The size rule needs the base's VAE factor, read from its config files (`sizes.vae_factor_on_disk`).
    """
    from controlnet.generate.sizes import check_size, vae_factor_on_disk

    n_nets = len(args.controlnet)
    if args.manifest is None:
        if args.prompt is None:
            raise ValueError('give a prompt ("" for none) or --manifest FILE.jsonl')
        if len(args.cond) != n_nets:
            raise ValueError(
                f"--cond given {len(args.cond)} times for {n_nets} --controlnet; expected one per net"
            )
    from controlnet.generate.base import controlnet_path

    for path in args.controlnet:
        controlnet_path(path)  # "builtin:NAME" or an existing file/folder
    for path in args.cond:
        if path != "inpaint" and not Path(path).is_file():
            raise FileNotFoundError(f"condition image not found: {path}")
    factor = vae_factor_on_disk(args.base)
    if factor is not None:
        check_size(args.width, args.height, factor)


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


def job_from_args(args, options: dict, conds: list, annotators: list):
    """The `GenerationJob` of a single-prompt command line (generate/jobs.py): the server builds the same one."""
    from controlnet.generate.jobs import ControlUnit, GenerationJob
    from controlnet.generate.options import GenerationOptions

    nets = GenerationOptions(**options).per_net(len(args.controlnet))
    units = [
        ControlUnit(model=str(path), image=cond, annotator=name, scale=o.scale, start=o.start, end=o.end,
                    mode=o.mode.name, resize_mode=options["resize_mode"], block_scales=o.block_scales)
        for path, cond, name, o in zip(args.controlnet, conds, annotators, nets, strict=True)
    ]  # fmt: skip
    return GenerationJob(
        prompt=args.prompt, negative_prompt=options["negative_prompt"], base=str(args.base), units=units,
        seed=options["seed"], steps=options.get("steps"), guidance_scale=options.get("guidance_scale"),
        scheduler=options["scheduler"], width=options["width"], height=options["height"],
        batch_size=options["batch_size"], init_image=options["image"], mask=options["mask"],
        strength=options["strength"], eta=options["eta"], clip_skip=options["clip_skip"],
        guess_mode_form=options["guess_mode_form"], resize_mode=options["resize_mode"],
        inpaint_paste=options["inpaint_paste"],
    )  # fmt: skip


def run_generate(args) -> int:
    check_before_loading(args)
    n_nets = len(args.controlnet)
    options = options_from_args(args, n_nets)
    annotators = _annotators(args, n_nets)
    names = [Path(p).name for p in args.controlnet]
    if args.manifest is not None:
        return _run_manifest(args, options, annotators, names)
    from controlnet.generate.outputs import save_generation

    source = check_base_arguments(args)
    # decoded now, before any model loads; annotated (if asked) by run_job, as every front door does
    from controlnet.generate.control_images import to_pil

    # decoded before any model loads: io/images turns an unreadable file into one ImageError line
    conds = [path if path == "inpaint" else to_pil(path, "condition image") for path in args.cond]
    job = job_from_args(args, options, conds, annotators)
    pipe = _load_pipeline(args, None, source)
    given = options
    bar = StepBar()

    def note_size(size) -> None:
        if size.note():
            print(size.note("set --width/--height to override"), file=sys.stderr)

    try:
        from controlnet.generate.jobs import run_job

        result = run_job(pipe, job, progress=bar, on_size=note_size)
    finally:
        bar.close()
    # after the run, so that an input error found by the pipeline stays the only line
    print(sampling_line(given, with_base_defaults(options, pipe), pipe), file=sys.stderr)
    stem = args.name or f"controlnet-{args.seed}"
    record = save_generation(result, args.out, stem, names, grid=not args.no_grid)
    for name in record["images"]:
        print(args.out / name)
    return 0


def _run_manifest(args, options: dict, annotators, names) -> int:
    from tqdm import tqdm

    from controlnet.generate.manifest import read_manifest, run_manifest, shard

    if args.prompt is not None or args.cond:
        raise ValueError(
            "with --manifest, prompts and condition images come from the manifest: drop the prompt/--cond"
        )
    jobs = read_manifest(args.manifest, len(args.controlnet))
    source = check_base_arguments(args)
    rank, world, device, state = _distributed()
    mine = shard(jobs, rank, world)
    pipe = _load_pipeline(args, device, source)
    given, options = options, with_base_defaults(options, pipe)
    if rank == 0:
        print(sampling_line(given, options, pipe), file=sys.stderr)
    bar = tqdm(total=len(mine), unit="line", desc=f"manifest [{rank + 1}/{world}]", file=sys.stderr, position=rank)
    done, skipped = run_manifest(
        pipe,
        mine,
        args.out,
        options,
        annotators,
        names,
        on_line=lambda job, generated: bar.update(1),
        grid=not args.no_grid,
        extra={"process": rank, "processes": world},
    )
    bar.close()
    print(f"process {rank + 1}/{world}: generated {done}, skipped {skipped} (already done) of {len(jobs)} lines")
    if state is not None:
        state.wait_for_everyone()
    return 0
