"""`controlnet world pretrain-base | export-base | base-quality`: thin commands over builtin/pretrain.py and quality.py.

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
        "base-quality", help="the built-in base model's colour and shape tests (the model card's numbers)"
    )
    quality.add_argument("--model", default=None, help="base-model folder (default: the shipped one)")
    quality.add_argument("--n", type=int, default=200, help="colour-test prompts (default: %(default)s)")
    quality.add_argument(
        "--shape-pairs", type=int, default=40, help="shape-test colour pairs x 3 shapes (default: 40)"
    )
    quality.add_argument("--steps", type=int, default=20, help="sampler steps (default: %(default)s)")
    quality.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the sampler's)")
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

    from controlnet.builtin.base import DEFAULT_GUIDANCE_SCALE, load_builtin_base, sample
    from controlnet.builtin.quality import measure_quality

    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_builtin_base(args.model)
    guidance = DEFAULT_GUIDANCE_SCALE if args.guidance is None else args.guidance
    print(base.describe())

    def generate(prompts: list[str], seed: int) -> list:
        return sample(base, prompts, steps=args.steps, seed=seed, guidance_scale=guidance)

    report = measure_quality(
        generate, base.image_size, n_colour=args.n, n_shape_pairs=args.shape_pairs, seed=args.seed
    )
    print(f"steps {args.steps}, guidance {guidance}, seed {args.seed}")
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
