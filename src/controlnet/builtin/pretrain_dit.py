"""Pretraining recipe of the built-in transformer base `builtin-dit` (`controlnet world pretrain-base --family sd3`).

An SD3-layout base (diffusers `SD3Transformer2DModel`, the MMDiT of Esser et al. 2024) trained from scratch on the
same world data as the built-in UNet base (builtin/pretrain.py: the fill task and captioned scenes, one latent pool
encoded once), with SD3's rectified-flow objective (train/flow_matching.py: x_s = (1 - s) x_0 + s eps, the
transformer predicts eps - x_0, s drawn logit-normal) and its text side: two CLIP text encoders, penultimate hidden
states joined along channels as the context and pooled projections joined as the pooled vector, through diffusers'
own `StableDiffusion3Pipeline.encode_prompt`, so that training and every pipeline encode prompts alike. No T5: SD3
runs without one; `max_sequence_length` (0: no zero tokens in its place) travels in the base's sampling.json.

The VAE is the shipped built-in base's, frozen: it already maps 64 px <-> 16x16x4 latents (PSNR 31.2 dB on the fill
task, weights/MODEL_CARD.md), and a new one would only cost the recipe 15 minutes for the same job. Its latents are
scaled by its `scaling_factor` (shift 0), as the SD3 pipelines do.

Resumable as the UNet recipe: data is a pure function of (seed, step), a checkpoint (models, EMA, optimizer, step,
RNG) is written atomically to `last.pt` every few minutes, outside the repository.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from controlnet.allocator import reuse_freed_memory
from controlnet.atomic import atomic_path
from controlnet.builtin.config import PretrainConfig
from controlnet.builtin.pretrain import (
    CHECKPOINT_NAME,
    LOG_EVERY,
    METRICS_NAME,
    RUN_CONFIG_NAME,
    ema_update,
    latent_batch,
    load_latent_pool,
    load_scene_pool,
    lr_factor,
    world_vocabulary,
)
from controlnet.builtin.text import build_text_encoder, build_tokenizer
from controlnet.train.flow_matching import interpolate, sample_sigmas, sigma_grid, velocity_target

logger = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000  # SD3's scheduler: the transformer takes t = 1000 s
TEXT_TOKENS = 0  # zero tokens in place of T5 (diffusers' `max_sequence_length` when text_encoder_3 is None)
DEFAULT_GUIDANCE_SCALE = 4.0
DEFAULT_SAMPLE_STEPS = 20
SIGMA_SCHEME = "logit_normal"  # SD3 paper Eq. 19, mean 0, std 1 (its best setting, Table 1)
TRAINED = ("transformer", "text_encoder", "text_encoder_2")


def transformer_kwargs(config: PretrainConfig) -> dict:
    """diffusers `SD3Transformer2DModel` arguments: the context is both encoders' widths joined."""
    dit = config.dit
    width = dit.heads * dit.head_dim
    text_width = 2 * dit.text.hidden_size
    latent_size = config.model.latent_size
    return dict(
        sample_size=latent_size,
        patch_size=dit.patch_size,
        in_channels=config.model.latent_channels,
        out_channels=config.model.latent_channels,
        num_layers=dit.layers,
        attention_head_dim=dit.head_dim,
        num_attention_heads=dit.heads,
        joint_attention_dim=text_width,
        caption_projection_dim=width,
        pooled_projection_dim=text_width,
        pos_embed_max_size=dit.pos_embed_max_size,
    )


def shipped_vae():
    """The built-in base's VAE (float32, frozen), with shift_factor 0 as SD3's pipelines read one."""
    from diffusers import AutoencoderKL

    from controlnet.generate.builtin_format import builtin_folder

    vae = AutoencoderKL.from_pretrained(
        str(builtin_folder() / "vae"), local_files_only=True, torch_dtype=torch.float32
    )
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def scheduler(config: PretrainConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=config.dit.shift)


@dataclass
class DitState:
    config: PretrainConfig
    tokenizer: object
    vae: torch.nn.Module
    modules: dict  # TRAINED name -> module
    ema: dict  # TRAINED name -> EMA copy
    optimizer: torch.optim.Optimizer
    stage: str = "transformer"  # "transformer" | "done"
    step: int = 0
    wall_seconds: float = 0.0

    def pipeline(self, ema: bool = False):
        """diffusers' StableDiffusion3Pipeline over these modules (its encode_prompt is the one text path)."""
        from diffusers import StableDiffusion3Pipeline

        parts = self.ema if ema else self.modules
        return StableDiffusion3Pipeline(
            transformer=parts["transformer"],
            scheduler=scheduler(self.config),
            vae=self.vae,
            text_encoder=parts["text_encoder"],
            tokenizer=self.tokenizer,
            text_encoder_2=parts["text_encoder_2"],
            tokenizer_2=self.tokenizer,
            text_encoder_3=None,
            tokenizer_3=None,
        )


def build_dit_state(config: PretrainConfig, tokenizer) -> DitState:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(config.seed + 1)
    transformer = SD3Transformer2DModel(**transformer_kwargs(config))
    torch.manual_seed(config.seed + 2)
    text_encoder = build_text_encoder(config.dit.text, tokenizer, projection=True)
    torch.manual_seed(config.seed + 3)
    text_encoder_2 = build_text_encoder(config.dit.text, tokenizer, projection=True)
    modules = {"transformer": transformer, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    params = [p for m in modules.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ema = {name: copy.deepcopy(m).requires_grad_(False) for name, m in modules.items()}
    return DitState(config, tokenizer, shipped_vae(), modules, ema, optimizer)


def save_dit_checkpoint(state: DitState, run_dir: Path) -> Path:
    payload = {name: m.state_dict() for name, m in state.modules.items()}
    payload.update({f"ema_{name}": m.state_dict() for name, m in state.ema.items()})
    payload.update(
        optimizer=state.optimizer.state_dict(),
        stage=state.stage,
        step=state.step,
        wall_seconds=state.wall_seconds,
        torch_rng=torch.get_rng_state(),
        config=asdict(state.config),
    )
    final = run_dir / CHECKPOINT_NAME
    with atomic_path(final, fsync=True) as temporary:
        torch.save(payload, temporary)
    return final


def load_dit_checkpoint(state: DitState, run_dir: Path) -> None:
    payload = torch.load(run_dir / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    for name in TRAINED:
        state.modules[name].load_state_dict(payload[name])
        state.ema[name].load_state_dict(payload[f"ema_{name}"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.stage, state.step, state.wall_seconds = payload["stage"], payload["step"], payload["wall_seconds"]
    torch.set_rng_state(payload["torch_rng"])


def open_dit_run(config: PretrainConfig, resume: bool) -> DitState:
    """Create the run folder or, with `resume`, restore it from last.pt (the UNet recipe's rules)."""
    from controlnet.builtin.text import load_tokenizer

    run_dir = Path(config.out).expanduser()
    has_checkpoint = (run_dir / CHECKPOINT_NAME).is_file()
    if has_checkpoint and not resume:
        raise ValueError(
            f"out={run_dir}: holds a run already; pass --resume to continue it or pick another folder"
        )
    current = json.loads(json.dumps(asdict(config)))  # tuples as lists, as saved
    if resume and has_checkpoint:
        saved = json.loads((run_dir / RUN_CONFIG_NAME).read_text())
        family = saved.get("family", "unet")
        if family != config.family:  # e.g. a unet run resumed with --family sd3
            raise ValueError(f"out={run_dir}: holds a family={family!r} run; resume it with --family {family}")
        if (saved["dit"], saved["model"]) != (current["dit"], current["model"]):
            raise ValueError(f"out={run_dir}: its architecture (dit, model) differs from the requested one")
        state = build_dit_state(config, load_tokenizer(run_dir / "tokenizer"))
        load_dit_checkpoint(state, run_dir)
        logger.info("resumed %s at step %d", run_dir, state.step)
        if current != saved:
            changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
            logger.warning("resumed with changed settings %s", changed)
            with open(run_dir / "config_changes.jsonl", "a") as handle:
                handle.write(json.dumps({"step": state.step, "stage": state.stage, "changed": changed}) + "\n")
            (run_dir / RUN_CONFIG_NAME).write_text(json.dumps(current, indent=2) + "\n")
        return state
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(world_vocabulary(), config.dit.text.max_length)
    tokenizer.save_pretrained(run_dir / "tokenizer")
    (run_dir / RUN_CONFIG_NAME).write_text(json.dumps(current, indent=2) + "\n")
    return build_dit_state(config, tokenizer)


def flow_step(state: DitState, pipe, latents: torch.Tensor, prompts: list[str], grid: torch.Tensor) -> dict:
    """One optimisation step of the rectified-flow loss on unscaled latent means (B, C, h, w)."""
    config = state.config
    factor = lr_factor(state.step, config.steps, config.warmup_steps, config.min_lr_fraction)
    for group in state.optimizer.param_groups:
        group["lr"] = config.lr * factor
    x0 = (latents - state.vae.config.shift_factor) * state.vae.config.scaling_factor  # (B, C, h, w), unit variance
    noise = torch.randn_like(x0)
    sigmas = sample_sigmas(SIGMA_SCHEME, len(x0), grid, generator=None)  # (B,) from torch's RNG, as the noise
    context, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device="cpu",
        do_classifier_free_guidance=False,
        max_sequence_length=TEXT_TOKENS,
    )  # (B, L, 2 D), (B, 2 D)
    prediction = state.modules["transformer"](
        hidden_states=interpolate(x0, noise, sigmas),
        encoder_hidden_states=context,
        pooled_projections=pooled,
        timestep=sigmas * NUM_TRAIN_TIMESTEPS,
    ).sample  # (B, C, h, w)
    loss = torch.nn.functional.mse_loss(prediction, velocity_target(x0, noise))
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for m in state.modules.values() for p in m.parameters()]
    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    state.optimizer.step()
    decay = min(config.ema_decay, (1 + state.step) / (10 + state.step))
    for name in TRAINED:
        ema_update(state.ema[name], state.modules[name], decay)
    return {"loss": loss.item(), "lr": config.lr * factor}


def pretrain_dit(
    config: PretrainConfig,
    resume: bool = False,
    on_step: Callable[[str, int, int, dict[str, float]], None] | None = None,
    stop_after: int | None = None,
) -> DitState:
    """Run (or resume) the recipe to `config.steps`; the UNet recipe's callback and `stop_after` contract."""
    if config.threads:
        torch.set_num_threads(config.threads)
    reuse_freed_memory()
    state = open_dit_run(config, resume)
    run_dir = Path(config.out).expanduser()
    scenes = load_scene_pool(config, run_dir) if config.scene_fraction > 0 else None
    pool = load_latent_pool(state, scenes, run_dir)  # encoded once by the shipped VAE
    pipe = state.pipeline()
    grid = sigma_grid(NUM_TRAIN_TIMESTEPS, config.dit.shift)
    for module in state.modules.values():
        module.train()
    if state.stage == "done" and state.step < config.steps:
        state.stage = "transformer"
    last_save = segment_start = time.monotonic()
    wall_at_segment, steps_this_call = state.wall_seconds, 0
    with open(run_dir / METRICS_NAME, "a") as metrics_file:
        while state.step < config.steps and (stop_after is None or steps_this_call < stop_after):
            latents, prompts = latent_batch(config, state.step, pool)
            metrics = flow_step(state, pipe, latents, prompts, grid)
            state.step += 1
            steps_this_call += 1
            state.wall_seconds = wall_at_segment + time.monotonic() - segment_start
            if state.step % LOG_EVERY == 0:
                record = {"stage": state.stage, "step": state.step, "wall_s": round(state.wall_seconds, 1)}
                metrics_file.write(json.dumps({**record, **metrics}) + "\n")
                metrics_file.flush()
            if on_step is not None:
                on_step(state.stage, state.step, config.steps, metrics)
            if time.monotonic() - last_save > config.checkpoint_minutes * 60:
                save_dit_checkpoint(state, run_dir)
                last_save = time.monotonic()
        if state.step >= config.steps:
            state.stage = "done"
        save_dit_checkpoint(state, run_dir)
    return state


def export_dit(run_dir: str | Path, dest: str | Path) -> dict:
    """Write the run's EMA weights as a diffusers SD3 folder (float32: 5 MB) with its sampling.json."""
    from controlnet.builtin.text import load_tokenizer
    from controlnet.generate.builtin_format import SamplingDefaults

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / CHECKPOINT_NAME).is_file():
        raise FileNotFoundError(f"run folder {run_dir}: no {CHECKPOINT_NAME}")
    config = PretrainConfig(**json.loads((run_dir / RUN_CONFIG_NAME).read_text()))
    config.out = str(run_dir)
    state = build_dit_state(config, load_tokenizer(run_dir / "tokenizer"))
    load_dit_checkpoint(state, run_dir)
    dest = Path(dest)
    with atomic_path(dest) as temporary:
        state.pipeline(ema=True).save_pretrained(str(temporary), safe_serialization=True)
        SamplingDefaults(
            guidance_scale=DEFAULT_GUIDANCE_SCALE, steps=DEFAULT_SAMPLE_STEPS, max_sequence_length=TEXT_TOKENS
        ).write(Path(temporary))
    return {"stage": state.stage, "step": state.step, "wall_seconds": state.wall_seconds}
