"""`controlnet world pretrain-base | export-base | base-quality`: thin commands over builtin/pretrain.py, pretrain_dit.py
and quality.py.

`add_parsers(world_subparsers)` is called by the `controlnet world` command group.
"""

from __future__ import annotations

import argparse
import sys

from controlnet.builtin.config import PretrainConfig
from controlnet.settings_cli import add_arguments, given_values


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    defaults = PretrainConfig()
    pretrain = subparsers.add_parser(
        "pretrain-base",
        help="train the built-in base text-to-image model from scratch (resumable)",
        description="Train the built-in base model (VAE, then UNet + text encoder) on world images and captions. "
        "Checkpoints go to OUT/last.pt every few minutes (atomic); --resume continues from there.",
    )
    add_arguments(pretrain, PretrainConfig)  # --field-name per field (the nested model config has none)
    pretrain.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    pretrain.set_defaults(func=run_pretrain)

    export = subparsers.add_parser(
        "export-base", help="write a pretrain-base run's EMA weights as a base-model folder (e.g. the shipped one)"
    )
    export.add_argument("--run", default=defaults.out, help="run folder (default: %(default)s)")
    export.add_argument("--out", required=True, help="destination folder")
    export.set_defaults(func=run_export)

    quality = subparsers.add_parser(
        "base-quality",
        help="a built-in base model's colour and shape tests (the model card's numbers)",
        description="The colour and shape tests of builtin/quality.py on a base's own sampler: `builtin` (the UNet "
        "base, DPM-Solver++), `builtin-dit` or an exported SD3 folder (diffusers' StableDiffusion3Pipeline: flow-matching "
        "Euler, the base's sampling.json for steps, guidance and max_sequence_length).",
    )
    quality.add_argument(
        "--base",
        default=None,
        help="builtin (default), builtin-dit, or a folder written by `controlnet world export-base`",
    )
    quality.add_argument("--model", default=None, help="base-model folder (the same as --base FOLDER)")
    quality.add_argument("--n", type=int, default=200, help="colour-test prompts (default: %(default)s)")
    quality.add_argument(
        "--shape-pairs", type=int, default=40, help="shape-test colour pairs x 3 shapes (default: 40)"
    )
    quality.add_argument("--steps", type=int, default=None, help="sampler steps (default: the base's, 20)")
    quality.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the base's, 4)")
    quality.add_argument(
        "--batch", type=int, default=None, help="SD3-layout bases: images per pipeline call (default: 40)"
    )
    quality.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    quality.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch default")
    quality.set_defaults(func=run_quality)


def run_pretrain(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from controlnet.builtin.pretrain import pretrain
    from controlnet.builtin.pretrain_dit import pretrain_dit

    config = PretrainConfig(**given_values(args, PretrainConfig))
    bars: dict[str, tqdm] = {}

    def on_step(stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(total=total, initial=step - 1, desc=f"pretrain-base {stage}", unit="step")
        bars[stage].update(1)
        bars[stage].set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)

    recipe = pretrain if config.family == "unet" else pretrain_dit  # builtin-dit: its own recipe, same data
    state = recipe(config, resume=args.resume, on_step=on_step)
    for bar in bars.values():
        bar.close()
    print(
        f"pretrain-base: {state.stage} at step {state.step}, {state.wall_seconds / 3600:.2f} h; checkpoint in {config.out}"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    from controlnet.builtin.pretrain import export_builtin, run_family
    from controlnet.builtin.pretrain_dit import export_dit

    export = export_builtin if run_family(args.run) == "unet" else export_dit
    facts = export(args.run, args.out)
    print(f"export-base: wrote {args.out} from {args.run} ({facts})")
    return 0


def run_quality(args: argparse.Namespace) -> int:
    import torch

    from controlnet.generate.base import check_base
    from controlnet.generate.builtin_format import BUILTIN

    if args.model is not None and args.base is not None:
        raise ValueError(
            f"--model {args.model} and --base {args.base}: give one (--model FOLDER is --base FOLDER)"
        )
    checked = (
        ("--n", args.n),
        ("--shape-pairs", args.shape_pairs),
        ("--steps", args.steps),
        ("--batch", args.batch),
    )
    for flag, value in checked:
        if value is not None and value < 1:
            raise ValueError(f"{flag}={value}: expected a positive integer")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.model or args.base or BUILTIN
    flag = "--model" if args.model else "--base"
    source = check_base(spec, flags={"base": flag})  # no weights read
    if source.arch == "unet":
        if args.batch is not None:
            raise ValueError("--batch: only for an SD3-layout base (the UNet base samples the whole list at once)")
        return _unet_quality(args, None if spec == BUILTIN else spec)
    if source.arch != "sd3":
        raise ValueError(
            f"{flag} {spec}: a {source.arch} base; base-quality measures the built-in bases (UNet, SD3)"
        )
    return _dit_quality(args, source)


def _unet_quality(args: argparse.Namespace, model: str | None) -> int:
    """The built-in UNet base (or an export of a unet run): builtin/base.py's sampler."""
    from controlnet.builtin.base import DEFAULT_GUIDANCE_SCALE, DEFAULT_SAMPLE_STEPS, load_builtin_base, sample
    from controlnet.builtin.quality import measure_quality

    base = load_builtin_base(model)
    steps = DEFAULT_SAMPLE_STEPS if args.steps is None else args.steps
    guidance = DEFAULT_GUIDANCE_SCALE if args.guidance is None else args.guidance
    print(base.describe())

    def generate(prompts: list[str], seed: int) -> list:
        return sample(base, prompts, steps=steps, seed=seed, guidance_scale=guidance)

    report = measure_quality(
        generate, base.image_size, n_colour=args.n, n_shape_pairs=args.shape_pairs, seed=args.seed
    )
    print(f"steps {steps}, guidance {guidance}, seed {args.seed}")
    print(report.table())
    return 0


def _dit_quality(args: argparse.Namespace, source) -> int:
    """An SD3-layout base (builtin-dit, an export of an sd3 run): diffusers' StableDiffusion3Pipeline over it, with
    the base's sampling defaults (its sampling.json) unless --steps / --guidance say otherwise."""
    from tqdm import tqdm

    from controlnet.builtin.base_dit import DEFAULT_BATCH_SIZE, describe_dit, sample_dit
    from controlnet.builtin.quality import measure_quality
    from controlnet.generate.base import load_base
    from controlnet.world.fill import SHAPES

    base = load_base(source)
    sampling = base.sampling
    steps = sampling.steps if args.steps is None else args.steps
    guidance = sampling.guidance_scale if args.guidance is None else args.guidance
    batch = DEFAULT_BATCH_SIZE if args.batch is None else args.batch
    print(describe_dit(base))
    bar = tqdm(total=args.n + len(SHAPES) * args.shape_pairs, desc="base-quality", unit="image")

    def generate(prompts: list[str], seed: int) -> list:
        return sample_dit(
            base,
            prompts,
            steps=steps,
            seed=seed,
            guidance_scale=guidance,
            max_sequence_length=sampling.max_sequence_length,
            batch_size=batch,
            progress=bar.update,
        )

    try:
        report = measure_quality(
            generate, base.native_size, n_colour=args.n, n_shape_pairs=args.shape_pairs, seed=args.seed
        )
    finally:
        bar.close()
    print(
        f"steps {steps}, guidance {guidance}, max_sequence_length {sampling.max_sequence_length}, seed {args.seed} "
        f"({type(base.scheduler).__name__} through StableDiffusion3Pipeline, image k's noise from seed + k)"
    )
    print(report.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m controlnet.builtin.commands COMMAND ...`: the same commands outside `controlnet world`."""
    parser = argparse.ArgumentParser(prog="python -m controlnet.builtin.commands")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
