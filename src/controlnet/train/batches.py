"""The inputs of one training step (paper Eq. 5), from a dataset on disk.

    z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,   loss = || eps - eps_theta(z_t, t, c_t, c_f) ||^2

`TrainingBatches` scans the dataset once (bad files reported by path before training), holds out the last samples
for validation, assigns aspect-ratio buckets, caches VAE posteriors and text embeddings on disk (keyed by content
and model hash), and for micro-step s returns this process's slice of the global micro-batch: (z_t, t, c_t, c_f,
target).

Every random draw of micro-step s (VAE posterior sample, noise, timesteps, prompt dropout) comes from a generator
seeded by (seed, s) and is drawn for the whole global micro-batch, each process taking its rows: so a resumed run
repeats an uninterrupted one bit for bit on the CPU, and N processes match one process with the same global batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from controlnet.data.cache import build_latent_cache, build_text_cache, module_fingerprint, tokenizer_fingerprint
from controlnet.data.dataset import BatchPlan, PixelPairs, assign_buckets, scan
from controlnet.data.sources import decode_image, open_source
from controlnet.data.transforms import BUCKET_MULTIPLE, condition_to_unit
from controlnet.generate.base import BaseComponents, normalize_latents
from controlnet.generate.prompts import encode_dual, encode_single
from controlnet.progress import phase
from controlnet.train.config import TrainConfig
from controlnet.train.loop import step_generator

logger = logging.getLogger(__name__)

EMPTY_PROMPT = ""  # paper Sec. 3.3: 50% of training prompts are replaced by the empty string


@dataclass
class MicroBatch:
    """One process's slice of one global micro-batch."""

    noisy: torch.Tensor  # z_t (b, C, h, w)
    timesteps: torch.Tensor  # t (b,)
    context: torch.Tensor  # c_t, text embeddings (b, L, D) float32
    cond: torch.Tensor  # c_i, condition image (b, C_cond, H, W) in [0, 1]
    target: torch.Tensor  # eps (or v for v-prediction bases) (b, C, h, w)
    # SDXL: {"text_embeds": pooled (b, D_pooled), "time_ids": (b, 6) original size, crop top-left, target size}
    added_cond: dict[str, torch.Tensor] | None = None
    # a union net: cond is (b, K, C_cond, H, W), one per type (zeros where a sample has none), keep (b, K) bool the
    # conditions each row uses this step (train/union.py draw_subsets)
    keep: torch.Tensor | None = None


class Samples(NamedTuple):
    """This process's rows of one global micro-batch, before any random draw (`TrainingBatches.samples`)."""

    positions: list[int]  # this process's dataset positions
    n: int  # rows of the global micro-batch (every process draws for all of them, keeping rows lo:hi)
    lo: int
    hi: int
    generator: torch.Generator  # the micro-step's generator (loop.step_generator)
    mean: torch.Tensor  # VAE posterior mean (b, C, h, w) float32, or pixels in pixel space
    std: torch.Tensor | None  # VAE posterior std (b, C, h, w), None in pixel space
    cond: torch.Tensor  # condition (b, C_cond, H, W) uint8; a union net's (b, K, C_cond, H, W), zeros where absent
    available: torch.Tensor | None = None  # a union net: (b, K) bool, the types each sample holds


class TrainingBatches:
    """Dataset -> (z_t, t, c_t, c_i, target) per micro-step; see the module docstring. `acc` is an Accelerator."""

    def __init__(self, config: TrainConfig, base: BaseComponents, acc, cache_dir: Path, weight_dtype: torch.dtype):
        c = config
        self.config, self.base, self.acc = config, base, acc
        self.device, self.world, self.rank = acc.device, acc.num_processes, acc.process_index
        self.union_names: tuple[str, ...] = ()  # a union net's condition types, in its order (train/union.py)
        if c.model.architecture == "union":
            from controlnet.train.union import open_union_source, union_names

            self.source = open_union_source(c)
            self.union_names = union_names(c, self.source)
        else:
            self.source = open_source(
                c.data.path, c.data.format, c.data.image_column, c.data.conditioning_column, c.data.caption_column
            )
        with phase("checking the training data"):
            found = scan(self.source, c.data.skip_bad)  # every file decoded once: bad ones named before training
        n_val = c.validation.num_samples if c.validation.every and c.validation.metric != "none" else 0
        if n_val >= len(found.indices):
            raise ValueError(
                f"validation.num_samples={n_val} leaves no training data ({len(found.indices)} usable)"
            )
        cut = len(found.indices) - n_val
        self.train_indices, self.val_indices = found.indices[:cut], found.indices[cut:]
        self.vae_factor = base.vae_scale_factor
        if getattr(base, "arch", "unet") == "unet":  # a transformer base's flow objective: transformer_step.py
            from diffusers import DDPMScheduler

            self.noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
        multiple = BUCKET_MULTIPLE if base.vae is not None else 8
        buckets = assign_buckets(found.sizes[:cut], c.data.resolution, c.data.bucketing, multiple)
        self.plan = BatchPlan(buckets, c.train.batch_size * self.world, c.train.seed)
        self.pixels = PixelPairs(
            self.source, self.train_indices, buckets, c.data.center_crop, c.data.random_flip, c.train.seed
        )
        prompts = [self.source.prompt(i) for i in self.train_indices]
        self.unique_prompts = sorted(set(prompts) | {EMPTY_PROMPT})
        index = {p: k for k, p in enumerate(self.unique_prompts)}
        self.prompt_ids = torch.tensor([index[p] for p in prompts])  # (N_train,)
        self.empty_id = index[EMPTY_PROMPT]
        self.weight_dtype = weight_dtype
        self.latents = self.text = None
        self._fingerprints: tuple[str, str] | None = None
        if c.data.cache:
            if acc.is_main_process:
                self._build_caches(cache_dir, found.digests[:cut], buckets)
            acc.wait_for_everyone()
            self._build_caches(cache_dir, found.digests[:cut], buckets)  # now a cache hit on every process

    def encoders_done(self, validation: bool) -> bool:
        """Whether training needs the VAE and text encoders no more: every latent and text embedding is cached (and
        no validation will generate)."""
        return self.latents is not None and self.text is not None and not validation

    def _cache_keys(self) -> tuple[str, str]:
        """The fingerprints of the text encoders and the VAE (every weight hashed: seconds at SD size), once."""
        if self._fingerprints is None:
            base = self.base
            with phase("hashing the VAE and text encoder weights (cache keys)"):
                text_fp = "|".join(
                    module_fingerprint(m, extra=tokenizer_fingerprint(t))
                    for m, t in (
                        (base.text_encoder, base.tokenizer),
                        (base.text_encoder_2, base.tokenizer_2),
                        (getattr(base, "text_encoder_3", None), getattr(base, "tokenizer_3", None)),  # SD3's T5
                    )
                    if m is not None
                )
                augmented = self.config.data.random_augmentation  # no latent cache: no VAE key
                vae_fp = "" if augmented else module_fingerprint(base.vae, extra=f"vae|{self.weight_dtype}")
            self._fingerprints = text_fp, vae_fp
        return self._fingerprints

    def _build_caches(self, cache_dir: Path, digests, buckets) -> None:
        c = self.config
        text_fp, vae_fp = self._cache_keys()
        self.text = build_text_cache(cache_dir, self.unique_prompts, text_fp, self.encode_text)
        if c.data.random_augmentation:
            logger.info("random crop/flip is on: VAE latents are computed every step (no latent cache)")
            return
        desc = json.dumps(
            [
                c.data.resolution,
                c.data.bucketing,
                c.data.center_crop,
                sorted({(b.width, b.height) for b in buckets}),
            ]
        )
        self.latents = build_latent_cache(
            cache_dir,
            digests,
            desc,
            vae_fp,
            lambda p: self.pixels.load(p, 0),
            self.encode_pixels,
            types=self.union_names,
        )

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"context": c_t (B, L, D)} float32 of `prompts`, plus SDXL's "pooled" (B, D_pooled)."""
        b = self.base
        # as the pipeline encodes them (generate/prompts.py): SDXL's penultimate states of both encoders, pooled
        # from the second; otherwise the last hidden states of the one encoder
        if b.is_sdxl:
            pairs = [
                (t, e)
                for t, e in ((b.tokenizer, b.text_encoder), (b.tokenizer_2, b.text_encoder_2))
                if e is not None
            ]
            emb = encode_dual(*zip(*pairs, strict=True), prompts)
            return {"context": emb.context.float(), "pooled": emb.pooled.float()}
        return {"context": encode_single(b.tokenizer, b.text_encoder, prompts).context.float()}

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """VAE posterior (mean, std) of images (B, 3, H, W) in [-1, 1]; pixel space: (pixels, None)."""
        if self.base.vae is None:
            return pixels, None
        dist = self.base.vae.encode(pixels.to(self.device, self.base.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def samples(self, micro_step: int) -> Samples:
        """This process's samples of global micro-batch `micro_step`: posteriors, conditions, and the step's generator
        (nothing drawn from it yet)."""
        c = self.config
        epoch, positions = self.plan.batch(micro_step)
        g = step_generator(c.train.seed, micro_step)
        lo, hi = self.rank * c.train.batch_size, (self.rank + 1) * c.train.batch_size
        mine = positions[lo:hi]
        if self.latents is not None:
            got = [self.latents.get(p) for p in mine]
            mean = torch.stack([m for m, _, _ in got]).to(self.device)  # (b, C, h, w)
            std = None if got[0][1] is None else torch.stack([s for _, s, _ in got]).to(self.device)
            conds = [k for _, _, k in got]
        else:
            loaded = [self.pixels.load(p, epoch) for p in mine]
            conds = [k for _, k in loaded]
            mean, std = self.encode_pixels(torch.stack([t for t, _ in loaded]))
            mean = mean.to(self.device)
        if not self.union_names:
            return Samples(
                mine, len(positions), lo, hi, g, mean, std, torch.stack(conds)
            )  # (b, C_cond, H, W) uint8
        cond, available = self.stack_union(conds)
        return Samples(mine, len(positions), lo, hi, g, mean, std, cond, available)

    def stack_union(self, conds: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Union samples' {type: (C, H, W) uint8} -> (b, K, C, H, W) uint8 in the net's type order (zeros where a
        sample has none) and (b, K) bool, the types each holds."""
        shape = next(iter(conds[0].values())).shape
        zero = torch.zeros(shape, dtype=torch.uint8)
        cond = torch.stack([torch.stack([c.get(t, zero) for t in self.union_names]) for c in conds])
        available = torch.tensor([[t in c for t in self.union_names] for c in conds])
        return cond, available

    def prompt_rows(self, samples: Samples, drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """The text embeddings of `samples` (cached or encoded now), "" where `drop` (b,) is set (paper Sec. 3.3)."""
        ids = torch.where(drop, torch.tensor(self.empty_id), self.prompt_ids[torch.tensor(samples.positions)])
        if self.text is not None:
            return {k: v[ids].to(self.device) for k, v in self.text.items()}  # context (b, L, D)
        encoded = self.encode_text([self.unique_prompts[i] for i in ids.tolist()])
        return {k: v.to(self.device) for k, v in encoded.items()}

    def micro_batch(self, micro_step: int) -> MicroBatch:
        """This process's slice of global micro-batch `micro_step` (a pure function of seed and micro_step)."""
        c = self.config
        got = self.samples(micro_step)
        mine, n, lo, hi, g, mean, std, cond = got[:8]
        shape = (n, *mean.shape[1:])
        # draws for the whole global micro-batch, in a fixed order; this process keeps rows lo:hi
        posterior_eps = torch.randn(shape, generator=g)[lo:hi].to(self.device)
        noise = torch.randn(shape, generator=g)[lo:hi].to(self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=g)[lo:hi]
        drop = (torch.rand(n, generator=g) < c.data.empty_prompt_prob)[lo:hi]
        keep = None
        if got.available is not None:  # a union net's type dropout: the whole global batch's availability
            from controlnet.train.union import draw_subsets

            available = self.global_available(micro_step, n, lo, got.available)
            keep = draw_subsets(available, c.train.union_keep_prob, g, lo, hi)
        latents = mean if std is None else mean + std * posterior_eps
        # the UNet's latent space exactly as the pipeline decodes it (scaling_factor, latents_mean/std)
        latents = normalize_latents(self.base.vae, latents)
        text = self.prompt_rows(got, drop)
        added = None
        if self.base.is_sdxl:
            # micro-conditioning as diffusers' train_controlnet_sdxl.py: the training size as original and target
            # size, no crop offset (the pipeline generates with the same (H, W, 0, 0, H, W))
            h, w = cond.shape[-2:]
            time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=self.device)
            added = {"text_embeds": text["pooled"], "time_ids": time_ids.expand(len(mine), 6)}
        timesteps = timesteps.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return MicroBatch(
            noisy, timesteps, text["context"], condition_to_unit(cond).to(self.device), target, added, keep
        )

    def global_available(self, micro_step: int, n: int, lo: int, mine: torch.Tensor) -> torch.Tensor:
        """(n, K) bool: the types every sample of global micro-batch `micro_step` holds (from the index: the same on
        every process), checked against this process's rows `mine` (b, K)."""
        _, positions = self.plan.batch(micro_step)
        held = [set(self.source.types(self.train_indices[p])) for p in positions]
        available = torch.tensor([[t in h for t in self.union_names] for h in held])
        assert torch.equal(available[lo : lo + len(mine)], mine), "the cache's conditions differ from the index"
        return available

    def held_out(self) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
        """(prompts, conditions, targets) of the validation samples, conditions/targets (S, S, 3) uint8."""
        size = self.config.data.resolution
        prompts, conds, targets = [], [], []
        for i in self.val_indices:
            target_bytes, cond_bytes = self.source.read(i)
            conds.append(np.asarray(decode_image(cond_bytes).resize((size, size))))
            targets.append(np.asarray(decode_image(target_bytes).resize((size, size))))
            prompts.append(self.source.prompt(i))
        return prompts, conds, targets
