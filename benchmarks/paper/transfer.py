"""Claim (paper Sec. 4.4 and its discussion of community models): a ControlNet trained on a base keeps working on
models fine-tuned from that base, applied directly, and it can also be moved to them by weight difference
(control + (community - base), the paper's transfer for models such as "Comic Diffusion" and "Protogen").

1. A "community" model: the built-in base's UNet fine-tuned on a styled version of the world's fill data: every
   target image tinted warm (R x1.0, G x0.8, B x0.55, plus 20/10/0), the text encoder and VAE unchanged, 10% empty
   prompts as in the base's own recipe. Our fine-tune (`fine_tune` below): AdamW lr 2e-4, batch 32, 600 steps,
   epsilon loss on the VAE latents (the mean of each latent distribution), clip 1.0, seeded; kept outside the
   repo and reused.
2. builtin:fill (trained on the base) applied to the community model as it is, and after
   `io.transfer.transfer_controlnet` (what `controlnet transfer` writes).
3. On 50 held-out fill outlines (20 sampler steps, CFG 4): fidelity (filled-shape IoU) and style (warmth: mean R
   minus mean B over the image, 0..1; the tinted truth's warmth is printed beside it).

    python benchmarks/paper/transfer.py           # ~6 minutes on 2 cores
    python benchmarks/paper/transfer.py --n 2 --steps 2 --fine-tune-steps 2 --fine-tune-samples 64   # a quick check
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    WORK,
    generate,
    image_strip,
    mean_score,
    parse_args,
    positive_int,
    world_data,
    write_results,
)

from controlnet.evaluate.fill import fill_iou  # noqa: E402
from controlnet.evaluate.heldout import heldout_set  # noqa: E402

TINT_SCALE = np.array([1.0, 0.8, 0.55], dtype=np.float32)
TINT_OFFSET = np.array([20.0, 10.0, 0.0], dtype=np.float32)
STEPS, BATCH, LR, EMPTY_PROMPT_PROB = 600, 32, 2e-4, 0.1
SAMPLES = 4000  # the fine-tune's world data: builtin:fill's own 4000 samples


def tint(image: np.ndarray) -> np.ndarray:
    """The community model's style: (H, W, 3) uint8 -> the same, warm-tinted."""
    return np.clip(image.astype(np.float32) * TINT_SCALE + TINT_OFFSET, 0, 255).round().astype(np.uint8)


def warmth(image: np.ndarray) -> float:
    """Mean red minus mean blue, in 0..1 units (0 for a grey image; the tint raises it)."""
    pixels = image.reshape(-1, 3).astype(np.float32) / 255
    return float(pixels[:, 0].mean() - pixels[:, 2].mean())


def fine_tune(base, data: Path, out: Path, steps: int = STEPS) -> torch.nn.Module:
    """The base UNet fine-tuned on tinted targets of `data` (reused from `out` when it exists)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from controlnet.builtin.text import encode_prompts

    if (out / "config.json").exists():
        return UNet2DConditionModel.from_pretrained(out).eval().requires_grad_(False)
    records = [json.loads(line) for line in (data / "prompt.json").read_text().splitlines() if line.strip()]
    images = np.stack([tint(np.asarray(Image.open(data / r["target"]).convert("RGB"))) for r in records])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, 64, 64) in [-1, 1]
    with torch.no_grad():
        latents = torch.cat([base.vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
        latents = latents * base.vae.config.scaling_factor  # (N, 4, 16, 16)
        context = torch.cat(
            [
                encode_prompts(base.tokenizer, base.text_encoder, [r["prompt"] for r in records[i : i + 256]])
                for i in range(0, len(records), 256)
            ]
        )
        empty = encode_prompts(base.tokenizer, base.text_encoder, [""])  # (1, L, D)
    unet = copy.deepcopy(base.unet).train().requires_grad_(True)
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    started = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (BATCH,), generator=generator)
        noise = torch.randn(latents[idx].shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (BATCH,), generator=generator)
        drop = torch.rand(BATCH, generator=generator) < EMPTY_PROMPT_PROB
        ctx = torch.where(drop[:, None, None], empty.expand(BATCH, -1, -1), context[idx])
        pred = unet(noise_scheduler.add_noise(latents[idx], noise, t), t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(
                f"fine-tune step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - started:.0f} s)",
                flush=True,
            )
    unet.eval().requires_grad_(False)
    unet.save_pretrained(out)
    return unet


def main() -> int:
    def own_flags(p):
        p.add_argument(
            "--fine-tune-steps", type=positive_int, default=STEPS, help=f"community fine-tune steps ({STEPS})"
        )
        p.add_argument(
            "--fine-tune-samples",
            type=positive_int,
            default=SAMPLES,
            help=f"world samples the fine-tune encodes and draws from ({SAMPLES}; fewer for a quick check)",
        )

    args = parse_args(__doc__, n=50, extra=own_flags)
    started = time.time()
    from controlnet.generate.base import controlnet_path, load_base
    from controlnet.generate.pipeline import ControlNetPipeline
    from controlnet.io.api import load_controlnet
    from controlnet.io.transfer import transfer_controlnet

    base = load_base("builtin")
    samples = "" if args.fine_tune_samples == SAMPLES else f"-{args.fine_tune_samples}samples"
    out = WORK / "runs" / f"community-warm-unet-{args.fine_tune_steps}steps{samples}"
    community_unet = fine_tune(base, world_data("fill", args.fine_tune_samples), out, args.fine_tune_steps)
    community = dataclasses.replace(base, unet=community_unet)
    fill = load_controlnet(controlnet_path("builtin:fill"), unet=base.unet).eval()
    moved = transfer_controlnet(fill, base.unet, community_unet).eval()
    held = heldout_set("fill", args.n, size=64)
    settings = [
        ("base alone", base, []),
        ("base + fill", base, [fill]),
        ("community alone", community, []),
        ("community + fill, applied directly", community, [fill]),
        ("community + fill, transferred (control + community - base)", community, [moved]),
    ]
    rows, shown = [], []
    for name, components, nets in settings:
        images = generate(
            ControlNetPipeline.from_components(components, nets), held.prompts, [held.conditions] * len(nets), args
        )
        rows.append(
            {
                "setting": name,
                "filled-shape IoU": mean_score(fill_iou, images, held.conditions),
                "warmth (mean R - B)": float(np.mean([warmth(im) for im in images])),
            }
        )
        shown.append((name, images[:6]))
        print(rows[-1], flush=True)
    rows.append(
        {
            "setting": "ground truth, tinted (the style's target)",
            "filled-shape IoU": 1.0,
            "warmth (mean R - B)": float(np.mean([warmth(tint(t)) for t in held.ground_truth])),
        }
    )
    rows.append(
        {
            "setting": "ground truth, as the base learned it",
            "filled-shape IoU": 1.0,
            "warmth (mean R - B)": float(np.mean([warmth(t) for t in held.ground_truth])),
        }
    )
    columns = ["setting", "filled-shape IoU", "warmth (mean R - B)"]

    def figure(plt, rows):
        return image_strip(plt, shown, "builtin:fill on a warm-tinted fine-tune of the base (6 held-out outlines)")

    write_results("transfer", args, rows, columns, started, figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
