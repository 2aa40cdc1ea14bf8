"""Pretraining recipe for the built-in base model (`controlnet world pretrain-base`), resumable at any moment.

Two stages on world images + captions, with no condition (the base model the paper's ControlNet locks):
1. VAE: an `AutoencoderKL` learns 64 px <-> 16x16x4 latents (L1 reconstruction + a small KL term), then its
   latent std sets `scaling_factor` so the UNet sees unit-variance latents, as SD does.
2. UNet + text encoder: the epsilon-prediction loss of latent diffusion, `|| eps - eps_theta(z_t, t, c_t) ||^2`
   (paper Eq. 1 without c_f), min-SNR-gamma weighted (Hang et al. 2023), with `uncond_prob` of the captions
   replaced by "" so classifier-free guidance works; AdamW with warm-up + cosine decay; an EMA of the weights
   is what gets exported.

Data is generated on the fly and is a pure function of (seed, step), so resuming needs no data state. A
checkpoint (models, EMA, optimizers, step, RNG) is written every `checkpoint_minutes` to a temporary file and
renamed over `last.pt` (never a half-written checkpoint), outside the repository by default.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from controlnet.allocator import reuse_freed_memory
from controlnet.atomic import atomic_path
from controlnet.builtin.base import save_builtin_base, scheduler_config, unet_kwargs, vae_kwargs
from controlnet.builtin.config import PretrainConfig
from controlnet.builtin.text import COMMON_WORDS, build_text_encoder, build_tokenizer, tokenize
from controlnet.world.fill import SHAPES, fill_sample

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
METRICS_NAME = "metrics.jsonl"
RUN_CONFIG_NAME = "run_config.json"
LOG_EVERY = 50  # steps between metrics.jsonl lines
SCALING_BATCHES = 8  # batches whose latent std sets the VAE scaling_factor
LATENT_POOL_NAME = "latent_pool.pt"
POOL_ENCODE_BATCH = 256
FILL_POOL_SEED_BASE = 10_000_000  # fill-pool seeds: (seed + 1) * base + i, apart from the quality tests' seeds
STAGE_IDS = {"vae": 0, "unet": 1, "scaling": 2}  # separate data streams per stage
SCENE_SEED_STRIDE = 1_000_000
VAE_KL_WEIGHT = 1e-6  # KL(q(z|x) || N(0, I)) weight per latent element: keeps latents bounded, barely regularised


# ----------------------------------------------------------------------------------------------- data


def world_vocabulary() -> list[str]:
    """Every word the world's captions use (fill task and scenes) plus common function words."""
    from controlnet.world.scene import WORLD_VOCABULARY

    return sorted({*WORLD_VOCABULARY, *COMMON_WORDS})


@dataclass
class ScenePool:
    """Pre-rendered world scenes: images (N, H, W, 3) uint8 and their captions."""

    images: np.ndarray
    captions: list[str]


def render_scene_pool(count: int, size: int, seed: int) -> ScenePool:
    """Scenes of seeds seed * 10**6 + i, rendered image only (no condition maps)."""
    from controlnet.world.render import render_image
    from controlnet.world.scene import caption, sample_scene

    scenes = [sample_scene(seed * SCENE_SEED_STRIDE + i, size) for i in range(count)]
    images = (
        np.stack([render_image(scene) for scene in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)
    )
    return ScenePool(images, [caption(scene) for scene in scenes])


def load_scene_pool(config: PretrainConfig, run_dir: Path) -> ScenePool:
    """The run's scene pool, rendered once and cached in the run folder (deterministic, so a cache is optional)."""
    size = config.model.image_size
    cache = run_dir / f"scene_pool_{config.seed}_{config.scene_pool}_{size}.npz"
    if cache.is_file():
        with np.load(cache) as data:
            return ScenePool(data["images"], [str(c) for c in data["captions"]])
    pool = render_scene_pool(config.scene_pool, size, config.seed)
    with atomic_path(cache) as temporary:
        np.savez(temporary, images=pool.images, captions=np.array(pool.captions))
    return pool


def training_batch(
    config: PretrainConfig, step: int, stage: str, scenes: ScenePool | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Images (B, 3, H, W) in [-1, 1] and captions of one step: a pure function of (seed, stage, step, scenes)."""
    rng = np.random.default_rng([config.seed, STAGE_IDS[stage], step])
    size = config.model.image_size
    use_scenes = scenes is not None and len(scenes.captions) > 0
    images, prompts = [], []
    for _ in range(config.batch_size):
        sample_seed = int(rng.integers(2**62))
        if use_scenes and rng.random() < config.scene_fraction:
            index = sample_seed % len(scenes.captions)
            image, prompt = scenes.images[index], scenes.captions[index]
        else:
            item = fill_sample(sample_seed, size=size, shape=SHAPES[int(rng.integers(len(SHAPES)))])
            image, prompt = item.image, item.prompt
        images.append(image)
        prompts.append("" if rng.random() < config.uncond_prob else prompt)
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0  # (B, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous(), prompts  # (B, 3, H, W)


@dataclass
class LatentPool:
    """The UNet stage's data: unscaled VAE latent means (N, C, h, w) (pixels in pixel space) and captions.

    Rows [0, n_fill) are fill samples, the rest scenes.
    """

    latents: torch.Tensor
    prompts: list[str]
    n_fill: int


@torch.no_grad()
def encode_pool(vae: torch.nn.Module | None, images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, C, h, w) float32 VAE latent means (or [-1, 1] pixels without a VAE)."""
    chunks = []
    for start in range(0, len(images), POOL_ENCODE_BATCH):
        x = torch.from_numpy(images[start : start + POOL_ENCODE_BATCH]).float().permute(0, 3, 1, 2) / 127.5 - 1.0
        chunks.append(x if vae is None else vae.encode(x).latent_dist.mode())
    return torch.cat(chunks)


def load_latent_pool(state: RunState, scenes: ScenePool | None, run_dir: Path) -> LatentPool:
    """Fill samples of seeds FILL_POOL_SEED + i (shapes in turn) and the scene pool, encoded once and cached."""
    config = state.config
    cache = run_dir / LATENT_POOL_NAME
    if cache.is_file():
        data = torch.load(cache, map_location="cpu", weights_only=True)
        return LatentPool(data["latents"], list(data["prompts"]), int(data["n_fill"]))
    size = config.model.image_size
    seeds = [(config.seed + 1) * FILL_POOL_SEED_BASE + i for i in range(config.fill_pool)]
    fills = [fill_sample(s, size=size, shape=SHAPES[i % len(SHAPES)]) for i, s in enumerate(seeds)]
    images = np.stack([f.image for f in fills])  # (N, H, W, 3)
    prompts = [f.prompt for f in fills]
    if scenes is not None and len(scenes.captions):
        images = np.concatenate([images, scenes.images])
        prompts += scenes.captions
    if state.vae is not None:
        state.vae.eval()
    pool = LatentPool(encode_pool(state.vae, images), prompts, len(fills))
    with atomic_path(cache) as temporary:
        torch.save({"latents": pool.latents, "prompts": pool.prompts, "n_fill": pool.n_fill}, temporary)
    return pool


def latent_batch(config: PretrainConfig, step: int, pool: LatentPool) -> tuple[torch.Tensor, list[str]]:
    """Unscaled latents (B, C, h, w) and captions of one UNet step: a pure function of (seed, step, pool)."""
    rng = np.random.default_rng([config.seed, STAGE_IDS["unet"], step])
    n_scenes = len(pool.prompts) - pool.n_fill
    rows, prompts = [], []
    for _ in range(config.batch_size):
        if n_scenes and rng.random() < config.scene_fraction:
            row = pool.n_fill + int(rng.integers(n_scenes))
        else:
            row = int(rng.integers(pool.n_fill))
        rows.append(row)
        prompts.append("" if rng.random() < config.uncond_prob else pool.prompts[row])
    return pool.latents[rows], prompts


# ----------------------------------------------------------------------------------------------- schedule


def lr_factor(step: int, total: int, warmup: int, min_fraction: float, cosine: bool = True) -> float:
    # twin of train/loop.py lr_lambda: this one decays to a floor (min_fraction) and is recomputed on resume
    """Linear warm-up over `warmup` steps, then cosine decay to `min_fraction` at `total` (or flat)."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_fraction + (1.0 - min_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # twin of the trainer's EMA (train/trainer.py): here a whole module (UNet + text encoder), there a flat list
    for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
        ema_p.lerp_(p, 1.0 - decay)


# ----------------------------------------------------------------------------------------------- state


@dataclass
class RunState:
    """Everything a resumed run needs; `stage` is "vae", "unet" or "done"."""

    config: PretrainConfig
    tokenizer: object
    vae: torch.nn.Module | None
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    ema_unet: torch.nn.Module
    ema_text_encoder: torch.nn.Module
    vae_optimizer: torch.optim.Optimizer | None
    optimizer: torch.optim.Optimizer
    stage: str = "vae"
    step: int = 0
    wall_seconds: float = 0.0


def build_state(config: PretrainConfig, tokenizer) -> RunState:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(config.seed)
    vae = None if config.model.pixel_space else AutoencoderKL(**vae_kwargs(config.model))
    torch.manual_seed(config.seed + 1)
    unet = UNet2DConditionModel(**unet_kwargs(config.model))
    torch.manual_seed(config.seed + 2)
    text_encoder = build_text_encoder(config.model.text, tokenizer)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    vae_optimizer = None if vae is None else torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    stage = "vae" if (vae is not None and config.vae_steps > 0) else "unet"
    return RunState(
        config,
        tokenizer,
        vae,
        unet,
        text_encoder,
        copy.deepcopy(unet).requires_grad_(False),
        copy.deepcopy(text_encoder).requires_grad_(False),
        vae_optimizer,
        optimizer,
        stage=stage,
    )


def _modules(state: RunState) -> dict[str, object]:
    named = {
        "unet": state.unet,
        "text_encoder": state.text_encoder,
        "ema_unet": state.ema_unet,
        "ema_text_encoder": state.ema_text_encoder,
        "optimizer": state.optimizer,
    }
    if state.vae is not None:
        named["vae"] = state.vae
        named["vae_optimizer"] = state.vae_optimizer
    return named


def save_checkpoint(state: RunState, run_dir: Path) -> Path:
    """Write last.pt atomically (written beside it, flushed to disk, then renamed into place)."""
    # twin of train/checkpoint.py: one file (a torch.save of tensors, read back weights_only) instead of an
    # accelerate state folder, because this recipe runs in one process and keeps a single checkpoint
    payload = {name: obj.state_dict() for name, obj in _modules(state).items()}
    payload.update(
        stage=state.stage,
        step=state.step,
        wall_seconds=state.wall_seconds,
        torch_rng=torch.get_rng_state(),
        scaling_factor=float(state.vae.config.scaling_factor) if state.vae is not None else 1.0,
        config=asdict(state.config),
    )
    final = run_dir / CHECKPOINT_NAME
    with atomic_path(final, fsync=True) as temporary:
        torch.save(payload, temporary)
    return final


def load_checkpoint(state: RunState, run_dir: Path) -> None:
    payload = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    for name, obj in _modules(state).items():
        obj.load_state_dict(payload[name])
    state.stage, state.step, state.wall_seconds = payload["stage"], payload["step"], payload["wall_seconds"]
    torch.set_rng_state(payload["torch_rng"])
    if state.vae is not None:
        state.vae.register_to_config(scaling_factor=payload["scaling_factor"])


def open_run(config: PretrainConfig, resume: bool) -> RunState:
    """Create the run folder (tokenizer, run_config.json) or, with `resume`, restore it from last.pt."""
    run_dir = Path(config.out).expanduser()
    has_checkpoint = (run_dir / CHECKPOINT_NAME).is_file()
    if has_checkpoint and not resume:
        raise ValueError(
            f"out={run_dir}: holds a run already; pass --resume to continue it or pick another folder"
        )
    if resume and has_checkpoint:
        saved = json.loads((run_dir / RUN_CONFIG_NAME).read_text())
        if saved.get("family", "unet") != config.family:  # e.g. an sd3 run resumed without its --family
            raise ValueError(
                f"out={run_dir}: holds a family={saved['family']!r} run; resume it with --family {saved['family']}"
            )
        if saved["model"] != json.loads(json.dumps(asdict(config.model))):
            raise ValueError(f"out={run_dir}: its model architecture differs from the requested one")
        from controlnet.builtin.text import load_tokenizer

        tokenizer = load_tokenizer(run_dir / "tokenizer")
        state = build_state(config, tokenizer)
        load_checkpoint(state, run_dir)
        logger.info("resumed %s at stage %s step %d", run_dir, state.stage, state.step)
        current = json.loads(json.dumps(asdict(config)))  # tuples as lists, as saved
        if current != saved:  # e.g. more --steps: record what the run now follows, and what it followed before
            changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
            logger.warning("resumed with changed settings %s", changed)
            with open(run_dir / "config_changes.jsonl", "a") as handle:
                handle.write(json.dumps({"step": state.step, "stage": state.stage, "changed": changed}) + "\n")
            (run_dir / RUN_CONFIG_NAME).write_text(json.dumps(current, indent=2) + "\n")
        return state
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(world_vocabulary(), config.model.text.max_length)
    tokenizer.save_pretrained(run_dir / "tokenizer")
    (run_dir / RUN_CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2) + "\n")
    return build_state(config, tokenizer)


# ----------------------------------------------------------------------------------------------- training


def random_crop(images: torch.Tensor, side: int) -> torch.Tensor:
    """One random side x side crop (same window for the batch) of images (B, C, H, W), from torch's RNG."""
    height, width = images.shape[-2:]
    if side <= 0 or side >= min(height, width):
        return images
    top = int(torch.randint(0, height - side + 1, ()))
    left = int(torch.randint(0, width - side + 1, ()))
    return images[..., top : top + side, left : left + side]


def _vae_step(state: RunState, images: torch.Tensor) -> dict[str, float]:
    config = state.config
    images = random_crop(images, config.vae_crop)  # (B, 3, crop, crop)
    for group in state.vae_optimizer.param_groups:
        group["lr"] = config.vae_lr * lr_factor(
            state.step, config.vae_steps, config.warmup_steps, 0.0, cosine=False
        )
    posterior = state.vae.encode(images).latent_dist
    reconstruction = state.vae.decode(posterior.sample()).sample  # (B, 3, H, W)
    l1 = (reconstruction - images).abs().mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
    loss = l1 + VAE_KL_WEIGHT * kl
    state.vae_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.vae.parameters(), config.grad_clip)
    state.vae_optimizer.step()
    return {"vae_l1": l1.item(), "vae_kl": kl.item()}


@torch.no_grad()
def set_vae_scaling(state: RunState, scenes: ScenePool | None) -> float:
    """scaling_factor = 1 / std of the VAE's latent means over a few batches (SD's 0.18215 is the same idea)."""
    latents = []
    for index in range(SCALING_BATCHES):
        images, _ = training_batch(state.config, index, "scaling", scenes)
        latents.append(state.vae.encode(images).latent_dist.mode())
    factor = float(1.0 / torch.cat(latents).std())
    state.vae.register_to_config(scaling_factor=factor)
    return factor


def _unet_step(state: RunState, latents: torch.Tensor, prompts: list[str], noise_scheduler) -> dict[str, float]:
    config = state.config
    factor = lr_factor(state.step, config.steps, config.warmup_steps, config.min_lr_fraction)
    for group in state.optimizer.param_groups:
        group["lr"] = config.lr * factor
    if state.vae is not None:
        latents = latents * state.vae.config.scaling_factor  # (B, C, h, w), unit variance
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    context = state.text_encoder(input_ids=tokenize(state.tokenizer, prompts)).last_hidden_state  # (B, L, D)
    prediction = state.unet(noisy, timesteps, encoder_hidden_states=context).sample  # (B, C, h, w)
    per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if config.min_snr_gamma > 0:
        alpha_bar = noise_scheduler.alphas_cumprod[timesteps]
        snr = alpha_bar / (1 - alpha_bar)
        weight = torch.clamp(snr, max=config.min_snr_gamma) / snr  # epsilon-prediction form of min-SNR
        loss = (weight * per_sample).mean()
    else:
        loss = per_sample.mean()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [*state.unet.parameters(), *state.text_encoder.parameters()]
    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    state.optimizer.step()
    decay = min(config.ema_decay, (1 + state.step) / (10 + state.step))
    ema_update(state.ema_unet, state.unet, decay)
    ema_update(state.ema_text_encoder, state.text_encoder, decay)
    return {"loss": per_sample.mean().item(), "lr": config.lr * factor}


def pretrain(
    config: PretrainConfig,
    resume: bool = False,
    on_step: Callable[[str, int, int, dict[str, float]], None] | None = None,
    stop_after: int | None = None,
) -> RunState:
    """Run (or resume) the recipe to the end; `on_step(stage, step, total, metrics)` reports progress.

    `stop_after` ends this call (with a checkpoint) after that many optimisation steps, as a kill would.
    """
    from diffusers import DDPMScheduler

    if config.family != "unet":
        raise ValueError(f"family={config.family!r}: builtin/pretrain_dit.py trains it (pretrain_dit)")
    if config.threads:
        torch.set_num_threads(config.threads)
    reuse_freed_memory()  # a CPU recipe: hours of steps that would fault their activations back in each time
    state = open_run(config, resume)
    run_dir = Path(config.out).expanduser()
    noise_scheduler = DDPMScheduler.from_config(scheduler_config())
    scenes = load_scene_pool(config, run_dir) if config.scene_fraction > 0 else None
    last_save = time.monotonic()
    segment_start = time.monotonic()
    wall_at_segment = state.wall_seconds
    if state.stage == "done" and state.step < config.steps:
        state.stage = "unet"  # a finished run resumed with more steps continues
    steps_this_call = 0
    pool: LatentPool | None = None
    metrics_file = open(run_dir / METRICS_NAME, "a")  # noqa: SIM115 (kept open for the whole run)
    try:
        while state.stage != "done" and (stop_after is None or steps_this_call < stop_after):
            total = config.vae_steps if state.stage == "vae" else config.steps
            if state.step >= total:
                if state.stage == "vae":
                    factor = set_vae_scaling(state, scenes)
                    logger.info("VAE done; scaling_factor %.4f", factor)
                    state.stage, state.step = "unet", 0
                else:
                    state.stage = "done"
                continue
            if state.stage == "vae":
                images, _ = training_batch(config, state.step, state.stage, scenes)
                state.vae.train()
                metrics = _vae_step(state, images)
            else:
                if state.vae is not None:
                    state.vae.eval().requires_grad_(False)
                if pool is None:
                    pool = load_latent_pool(state, scenes, run_dir)
                latents, prompts = latent_batch(config, state.step, pool)
                metrics = _unet_step(state, latents, prompts, noise_scheduler)
            state.step += 1
            steps_this_call += 1
            state.wall_seconds = wall_at_segment + time.monotonic() - segment_start
            if state.step % LOG_EVERY == 0:
                record = {
                    "stage": state.stage,
                    "step": state.step,
                    "wall_s": round(state.wall_seconds, 1),
                    **metrics,
                }
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if on_step is not None:
                on_step(state.stage, state.step, total, metrics)
            if time.monotonic() - last_save > config.checkpoint_minutes * 60:
                save_checkpoint(state, run_dir)
                last_save = time.monotonic()
        save_checkpoint(state, run_dir)
    finally:
        metrics_file.close()
    return state


def run_family(run_dir: str | Path) -> str:
    """The family of the run in `run_dir` ("unet" for runs from before families existed)."""
    config_file = Path(run_dir).expanduser() / RUN_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"run folder {run_dir}: no {RUN_CONFIG_NAME}")
    return json.loads(config_file.read_text()).get("family", "unet")


def export_builtin(run_dir: str | Path, dest: str | Path) -> dict:
    """Write the EMA weights of the run's last checkpoint as a loadable base-model folder; returns run facts."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / CHECKPOINT_NAME).is_file():
        raise FileNotFoundError(f"run folder {run_dir}: no {CHECKPOINT_NAME}")
    config = PretrainConfig(**json.loads((run_dir / RUN_CONFIG_NAME).read_text()))
    config.out = str(run_dir)
    if config.family != "unet":
        raise ValueError(f"{run_dir}: a family={config.family!r} run; builtin/pretrain_dit.py exports it")
    from controlnet.builtin.text import load_tokenizer

    state = build_state(config, load_tokenizer(run_dir / "tokenizer"))
    load_checkpoint(state, run_dir)
    parts = {
        "unet": state.ema_unet,
        "vae": state.vae,
        "text_encoder": state.ema_text_encoder,
        "tokenizer": state.tokenizer,
    }
    save_builtin_base(parts, config.model, dest)
    return {
        "stage": state.stage,
        "unet_step": state.step if state.stage != "vae" else 0,
        "wall_seconds": state.wall_seconds,
    }
