"""Our ControlNetPipeline vs diffusers' StableDiffusionControlNetPipeline: wall time on the same components.

Both pipelines get the very same modules (our ControlNet's tensors are shared with a diffusers ControlNetModel,
the names are identical), the same seed, sampler, steps and settings; every timed pair is checked for output
parity (max |difference| <= 1e-4 on images in [0, 1], output not constant) before its time counts. Runs are
interleaved and the median of the per-pair ratios diffusers_time / our_time is reported (> 1 = we are faster), for
wall time and for this process's CPU time (steadier on a shared machine; use --threads 1 there).

Where the time goes (docs/architecture.md#sizes-and-costs, SD1.5 at 512 px): UNet 803 GFLOPs, ControlNet 283 GFLOPs per sample, i.e. the
ControlNet is ~26% of a step. We compute the hint embedding once per generation (diffusers: every step) and do
not run a ControlNet outside its start/end window (diffusers runs it with scale 0): with a window ending at 0.5
the ideal gain from that alone is 1 / (1 - 0.26 / 2) ~= 1.15x. Both pipelines run the same diffusers modules, so
at the defaults the rest can only come from the kernels: profiled at SD1.5 size (256 px, batch 2, torch 2.13 CPU)
a UNet step is 54% oneDNN convolutions, 30% linear layers, 5% attention. A plain conv reorders its weight into
oneDNN's blocked layout on every call, which at SD1.5's low resolutions costs more than the arithmetic (a
1280-channel 3x3 conv at 8x8: 96 ms plain, 46 ms pre-packed); ours runs the denoising loop on weights packed
once (generate/cpu_packing.py; same results up to float rounding, asserted below). Packing costs about two plain
steps once per process and is kept for later generations; the first, warm-up pair (not counted) pays it.

    python benchmarks/generation.py --model sd15 --resolution 256 --steps 8 --repeats 2 --threads 2
    python benchmarks/generation.py --model tiny --resolution 64 --steps 10   # the tiny test config

Measured on an idle 2-core AMD EPYC (AVX-512, torch.backends.cpu.get_cpu_capability() "AVX512"), torch 2.13.0
CPU, 2 threads, parity max |diff| <= 3.1e-5:
    sd15, 256 px, 8 steps, 2 pairs: defaults 1.484x wall (pairs 1.532, 1.437; CPU time 1.442x), ours 25.2 s vs
                                    37.4 s; window end 0.5: 1.767x (1.843, 1.691; CPU time 1.763x)
    again at 8bfff6d (a busier day: pairs spread 1.11-1.69): defaults 1.400x wall (CPU time 1.486x), ours 32.3 s
                                    vs 43.5 s; window end 0.5: 1.848x (1.838, 1.857; CPU time 1.840x); max |diff| 3.1e-5
    before packing (4 steps, 3 pairs): defaults 1.007x wall; window end 0.5: 1.171x
    tiny, 64 px, 10 steps, 5 pairs, 1 thread (its layers are too small to pack): defaults 1.262x; window 1.364x

The VAE and text encoder are small random stand-ins in both modes (the same for both pipelines, and not what
is compared); the UNet and ControlNet are full size with --model sd15.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

PROMPT = "a red cat on the blue circle"
PARITY_TOL = 1e-4


def fill_random(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Deterministic small random weights (fast for 860M parameters; norms at 1, biases at 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def build(model: str, tmp: Path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from controlnet.io.formats import builtin_unet_config
    from controlnet.model.controlnet import ControlNet
    from controlnet.testing.tiny_models import (
        TINY_UNET_CONFIGS,
        make_scheduler,
        make_text_encoder,
        make_tokenizer,
        make_vae,
        randomize,
    )

    tokenizer = make_tokenizer(tmp / "tok")
    if model == "sd15":
        config = {k: v for k, v in builtin_unet_config("sd15").items() if not k.startswith("_")}
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        unet = fill_random(unet.to_empty(device="cpu"), seed=0)
        net = ControlNet.from_unet(unet)
        fill_random(net.controlnet_cond_embedding, seed=1)
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:  # zero convs -> small random
            fill_random(conv, seed=2, std=0.01)
        context_dim = config["cross_attention_dim"]
    else:
        torch.manual_seed(0)
        unet = randomize(UNet2DConditionModel(**TINY_UNET_CONFIGS["sd15"]), seed=100)
        net = randomize(ControlNet.from_unet(unet), seed=11)
        context_dim = TINY_UNET_CONFIGS["sd15"]["cross_attention_dim"]
    text_encoder = make_text_encoder(tokenizer, context_dim, seed=4)
    dnet = ControlNetModel(**net.diffusers_config())
    dnet.load_state_dict(net.state_dict(), assign=True)  # shares our tensors: no second copy in memory
    parts = dict(unet=unet.eval(), vae=make_vae(), text_encoder=text_encoder, tokenizer=tokenizer)
    return parts, make_scheduler(), net.eval(), dnet.eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15", "tiny"], default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved pairs per setting")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import tempfile

    from diffusers import StableDiffusionControlNetPipeline

    from controlnet.generate.pipeline import ControlNetPipeline
    from controlnet.testing.tiny_models import condition_image

    with tempfile.TemporaryDirectory() as tmp:
        parts, scheduler, net, dnet = build(args.model, Path(tmp))
    ours = ControlNetPipeline(**parts, scheduler=scheduler, controlnets=[net])
    theirs = StableDiffusionControlNetPipeline(
        **parts,
        controlnet=dnet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs.set_progress_bar_config(disable=True)
    cond = condition_image(1, args.resolution)
    n_params = sum(p.numel() for p in parts["unet"].parameters()) / 1e6
    n_ctrl = sum(p.numel() for p in net.parameters()) / 1e6
    print(
        f"model={args.model} (UNet {n_params:.1f}M, ControlNet {n_ctrl:.1f}M params) resolution={args.resolution} "
        f"steps={args.steps} threads={torch.get_num_threads()} torch={torch.__version__}"
    )

    settings = {"defaults": (0.0, 1.0), "window end 0.5": (0.0, 0.5)}
    for label, (start, end) in settings.items():
        ratios, cpu_ratios, t_ours, t_theirs, diffs = [], [], [], [], []
        for rep in range(args.repeats + 1):  # the first pair warms up and is not counted
            c0, t0 = time.process_time(), time.perf_counter()
            a = ours(
                PROMPT,
                [cond],
                steps=args.steps,
                seed=rep,
                output_type="np",
                control_start=start,
                control_end=end,
                width=args.resolution,
                height=args.resolution,
            )
            c1, t1 = time.process_time(), time.perf_counter()
            b = theirs(
                PROMPT,
                image=cond,
                num_inference_steps=args.steps,
                output_type="np",
                generator=torch.Generator().manual_seed(rep),
                control_guidance_start=start,
                control_guidance_end=end,
            ).images
            c2, t2 = time.process_time(), time.perf_counter()
            diff = float(np.abs(a.array - b).max())
            assert diff <= PARITY_TOL, f"{label}: outputs differ by {diff:.2e} > {PARITY_TOL}"
            assert a.array.std() > 1e-3, "degenerate (constant) output: parity would prove nothing"
            if rep == 0:
                continue
            diffs.append(diff)
            t_ours.append(t1 - t0)
            t_theirs.append(t2 - t1)
            ratios.append((t2 - t1) / (t1 - t0))
            cpu_ratios.append((c2 - c1) / (c1 - c0))
        print(
            f"{label:>15}: ours {statistics.median(t_ours):7.2f} s, diffusers {statistics.median(t_theirs):7.2f} s, "
            f"ratio diffusers/ours median {statistics.median(ratios):.3f} (pairs: "
            f"{', '.join(f'{r:.3f}' for r in ratios)}); CPU-time ratio median {statistics.median(cpu_ratios):.3f}; "
            f"max |diff| {max(diffs):.1e}, output std {a.array.std():.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
