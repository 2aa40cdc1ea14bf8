"""ControlNet training (paper Sec. 3.3 and Sec. 4), as a script that reads top to bottom.

    L = E_{z_0, t, c_t, c_f, eps} || eps - eps_theta(z_t, t, c_t, c_f) ||^2                       (paper Eq. 5)

1. set up: accelerate (DDP, mixed precision), run folder, resolved config
2. base model (locked), data (scanned, held-out split, buckets), caches of latents and text embeddings
3. ControlNet (fresh copy of the UNet encoder, or an existing one), optimizer, LR schedule, EMA
4. resume from the newest checkpoint (weights, optimizer, schedule, EMA, RNG, data position)
5. loop: micro-batches -> noise -> loss -> backward; non-finite check; clip; step; log; validate; checkpoint
6. export (diffusers + original formats) and report

Every random draw of step s (noise, timesteps, prompt dropout, VAE posterior sample) comes from a generator
seeded by (seed, micro-step) and is drawn for the whole global micro-batch, each process taking its slice: so a
resumed run repeats an uninterrupted one bit for bit on the CPU, and N processes match one process with the
same global batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from controlnet.data.cache import build_latent_cache, build_text_cache, module_fingerprint, tokenizer_fingerprint
from controlnet.data.dataset import BatchPlan, PixelPairs, assign_buckets, scan
from controlnet.data.sources import decode_image, open_source
from controlnet.data.transforms import BUCKET_MULTIPLE, condition_to_unit
from controlnet.train import checkpoint as ckpt
from controlnet.train import validation as val
from controlnet.train.config import TrainConfig
from controlnet.train.loop import (
    StopOnSignal,
    any_process,
    append_jsonl,
    broadcast_history,
    lr_lambda,
    numpy_state,
    save_grid,
    step_generator,
    truncate_metrics,
)
from controlnet.train.model import ControlledUNet, decoder_parameters, decoder_state

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
EMPTY_PROMPT = ""
TEXT_ENCODE_BATCH = 64


class NonFiniteLossError(RuntimeError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class BaseParts:
    """The locked base text-to-image model: diffusers/transformers modules (vae None in pixel space)."""

    unet: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object


@dataclass
class StepInfo:
    """What the progress callback receives after every optimizer step."""

    step: int
    max_steps: int
    loss: float
    samples_per_s: float
    lr: float
    skipped: bool = False
    fidelity: float | None = None


@dataclass
class RunSummary:
    """The outcome of `train`."""

    run_dir: Path
    status: str  # "finished", "interrupted", "early_stop", "time_limit"
    step: int
    final_dir: Path | None = None
    validation: list[tuple[int, float]] = field(default_factory=list)
    convergence_step: int | None = None
    floor: float | None = None
    ceiling: float | None = None


def load_base(spec: str) -> BaseParts:
    """The base model named by `spec` ("builtin", a built-in-style folder or a diffusers folder), offline."""
    from controlnet.pipeline import ControlNetPipeline
    from controlnet.world.base import BASE_CONFIG_NAME

    if spec != "builtin" and (Path(spec) / BASE_CONFIG_NAME).is_file():  # saved by world.base.save_builtin_base
        from controlnet.world.base import load_builtin_base

        b = load_builtin_base(spec)
        return BaseParts(b.unet, b.vae, b.text_encoder, b.tokenizer, b.scheduler)

    pipe = ControlNetPipeline.from_pretrained(spec)
    return BaseParts(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)


class Trainer:
    """One training run. `Trainer(config, base).run()`; `base` defaults to loading `config.model.base`."""

    def __init__(self, config: TrainConfig, base: BaseParts | None = None,
                 callback: Callable[[StepInfo], None] | None = None):  # fmt: skip
        self.config, self.callback = config, callback
        self._base = base

    # ------------------------------------------------------------------------------------------------------
    # 1-2. set-up, base, data, caches
    def _setup(self) -> None:
        from accelerate import Accelerator

        c = self.config
        # without CUDA, `accelerate launch --multi_gpu --num_processes N` gives N gloo CPU processes only when the
        # Accelerator is told cpu=True (otherwise every process believes it is alone)
        if c.train.threads:
            torch.set_num_threads(c.train.threads)
        cpu = c.train.cpu or not torch.cuda.is_available()
        self.acc = Accelerator(mixed_precision=c.train.mixed_precision, cpu=cpu)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.run_dir = Path(c.train.output_dir)
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_FILE).write_text(json.dumps(c.to_dict(), indent=2) + "\n")
            ckpt.remove_partial(self.run_dir)
        self.acc.wait_for_everyone()
        # data: scan everything before training; the last samples are held out for validation
        self.source = open_source(c.data.path, c.data.format, c.data.image_column, c.data.conditioning_column,
                                  c.data.caption_column)  # fmt: skip
        found = scan(self.source, c.data.skip_bad)
        n_val = c.validation.num_samples if c.validation.every and c.validation.metric != "none" else 0
        if n_val >= len(found.indices):
            raise ValueError(
                f"validation.num_samples={n_val} leaves no training data ({len(found.indices)} usable)"
            )
        cut = len(found.indices) - n_val
        self.train_indices, self.val_indices = found.indices[:cut], found.indices[cut:]
        base = self._base or load_base(c.model.base)
        self.base = base
        self.device = self.acc.device
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            c.train.mixed_precision, torch.float32
        )
        for module in (base.unet, base.vae, base.text_encoder):
            if module is not None:
                module.requires_grad_(False).eval().to(self.device)
        if base.unet.config.get("addition_embed_type") is not None:
            raise ValueError(
                "model.base is SDXL-style (addition_embed_type set): training supports SD1.x/2.x bases"
            )
        self.vae_factor = 1 if base.vae is None else 2 ** (len(base.vae.config.block_out_channels) - 1)
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)

        multiple = BUCKET_MULTIPLE if base.vae is not None else 8
        buckets = assign_buckets(found.sizes[:cut], c.data.resolution, c.data.bucketing, multiple)
        self.plan = BatchPlan(buckets, c.train.batch_size * self.world, c.train.seed)
        self.pixels = PixelPairs(self.source, self.train_indices, buckets, c.data.center_crop, c.data.random_flip,
                                 c.train.seed)  # fmt: skip
        prompts = [self.source.prompt(i) for i in self.train_indices]
        self.unique_prompts = sorted(set(prompts) | {EMPTY_PROMPT})
        index = {p: k for k, p in enumerate(self.unique_prompts)}
        self.prompt_ids = torch.tensor([index[p] for p in prompts])  # (N_train,)
        self.empty_id = index[EMPTY_PROMPT]
        cache_dir = Path(c.data.cache_dir) if c.data.cache_dir else self.run_dir / "cache"
        self.latents = self.text = None
        if c.data.cache:
            if self.acc.is_main_process:
                self._build_caches(cache_dir, found.digests[:cut], buckets)
            self.acc.wait_for_everyone()
            self._build_caches(cache_dir, found.digests[:cut], buckets)  # now a cache hit on every process

    def _build_caches(self, cache_dir: Path, digests, buckets) -> None:
        c, base = self.config, self.base
        text_fp = module_fingerprint(base.text_encoder, extra=tokenizer_fingerprint(base.tokenizer))
        self.text = build_text_cache(cache_dir, self.unique_prompts, text_fp, self._encode_text)["context"]
        if c.data.random_augmentation:
            logger.info("random crop/flip is on: VAE latents are computed every step (no latent cache)")
            return
        vae_fp = module_fingerprint(base.vae, extra=f"vae|{self.weight_dtype}")
        desc = json.dumps([c.data.resolution, c.data.bucketing, c.data.center_crop, sorted({(b.width, b.height)
                           for b in buckets})])  # fmt: skip
        self.latents = build_latent_cache(cache_dir, digests, desc, vae_fp, lambda p: self.pixels.load(p, 0),
                                          self._encode_pixels)  # fmt: skip

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        from controlnet.world.text import encode_prompts

        return encode_prompts(self.base.tokenizer, self.base.text_encoder, prompts).float()  # (B, L, D)

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """VAE posterior (mean, std) of images (B, 3, H, W) in [-1, 1]; pixel space: (pixels, None)."""
        if self.base.vae is None:
            return pixels, None
        dist = self.base.vae.encode(pixels.to(self.device, self.base.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    # ------------------------------------------------------------------------------------------------------
    # 3. the trainable model
    def _build_model(self) -> None:
        c, base = self.config, self.base
        from controlnet.model.controlnet import ControlNet

        if c.model.controlnet:
            from controlnet.io.api import load_controlnet

            net = load_controlnet(c.model.controlnet, unet=base.unet.float())
        else:
            kwargs = {"hint_block_channels": c.model.hint_channels} if c.model.hint_channels else {}
            torch.manual_seed(c.train.seed)  # the new hint encoder's init: the same in every process and run
            net = ControlNet.from_unet(base.unet.float(), cond_channels=c.model.cond_channels,
                                       hint_downscale_factor=self.vae_factor, **kwargs)  # fmt: skip
        net = net.float().to(self.device).requires_grad_(True).train()
        self.controlnet = net
        params = [{"params": list(net.parameters()), "lr": c.optim.lr}]
        if not c.model.sd_locked:
            dec = decoder_parameters(base.unet)
            for p in dec:
                p.requires_grad_(True)
            params.append({"params": dec, "lr": c.optim.decoder_lr or c.optim.lr})
            base.unet.train()
        else:
            # locked weights need no fp32 master copy: keep them in the compute dtype (as diffusers does)
            base.unet.to(self.weight_dtype)
        if base.vae is not None:
            base.vae.to(self.weight_dtype)
        base.text_encoder.to(self.weight_dtype)
        if c.model.gradient_checkpointing:
            net.enable_gradient_checkpointing()
            base.unet.enable_gradient_checkpointing()
        self.trainable = [p for group in params for p in group["params"]]
        self.optimizer = self._optimizer(params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(c.optim.lr_schedule, c.optim.warmup_steps, c.train.max_steps)
        )
        model = ControlledUNet(net, base.unet, c.model.only_mid_control)
        # the LR scheduler is stepped by hand: accelerate's wrapper would step it once per process
        self.model, self.optimizer = self.acc.prepare(model, self.optimizer)
        self.ema = [p.detach().clone().float() for p in self.trainable] if c.optim.ema_decay else None

    def _optimizer(self, params) -> torch.optim.Optimizer:
        o = self.config.optim
        kwargs = dict(betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=o.weight_decay)
        if o.use_8bit_adam:
            if not torch.cuda.is_available():
                raise ValueError("optim.use_8bit_adam needs a CUDA GPU")
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ValueError("optim.use_8bit_adam needs `pip install bitsandbytes`") from None
            return bnb.optim.AdamW8bit(params, **kwargs)
        # the fused kernel (CPU and CUDA) does the whole update in one pass: ~2x faster than the per-op loop
        return torch.optim.AdamW(params, fused=True, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # 4. checkpoints
    def _weights(self) -> dict[str, dict[str, torch.Tensor]]:
        weights = {"controlnet": {k: v.float() for k, v in self.controlnet.state_dict().items()}}
        if not self.config.model.sd_locked:
            weights["decoder"] = decoder_state(self.base.unet)
        if self.ema is not None:
            weights["ema"] = {str(k): v for k, v in enumerate(self.ema)}
        return weights

    def _save(self, state: dict) -> None:
        if self.acc.is_main_process:
            data = ckpt.CheckpointData(self._weights(), self.optimizer.state_dict(), self.scheduler.state_dict(),
                                       state)  # fmt: skip
            ckpt.save_checkpoint(self.run_dir, state["step"], data, self.config.checkpoint.keep)
        self.acc.wait_for_everyone()

    def _resume(self) -> dict | None:
        folder = ckpt.find_resume(self.run_dir, self.config.checkpoint.resume)
        if folder is None:
            return None
        data = ckpt.load_checkpoint(folder)
        self.controlnet.load_state_dict(data.weights["controlnet"])
        if "decoder" in data.weights:
            self.base.unet.load_state_dict(data.weights["decoder"], strict=False)
        if self.ema is not None and "ema" in data.weights:
            self.ema = [data.weights["ema"][str(k)].to(self.device) for k in range(len(self.ema))]
        self.optimizer.load_state_dict(data.optimizer)
        self.scheduler.load_state_dict(data.scheduler)
        state = data.state
        if state.get("world_size", self.world) != self.world:
            logger.warning("checkpoint %s was written by %d processes, resuming with %d: the global batch and data "
                           "order change from here on", folder, state["world_size"], self.world)  # fmt: skip
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        np.random.set_state(tuple(state["numpy_rng"][:1]) + (np.array(state["numpy_rng"][1], np.uint32),)
                            + tuple(state["numpy_rng"][2:]))  # fmt: skip
        logger.info("resumed from %s at step %d", folder, state["step"])
        return state

    # ------------------------------------------------------------------------------------------------------
    # 5. one optimizer step
    def _micro_inputs(self, micro_step: int) -> tuple[torch.Tensor, ...]:
        """(noisy, timesteps, context, cond, target) of this process's slice of one global micro-batch."""
        c = self.config
        epoch, positions = self.plan.batch(micro_step)
        g = step_generator(c.train.seed, micro_step)
        lo, hi = self.rank * c.train.batch_size, (self.rank + 1) * c.train.batch_size
        mine = positions[lo:hi]
        if self.latents is not None:
            got = [self.latents.get(p) for p in mine]
            mean = torch.stack([m for m, _, _ in got]).to(self.device)  # (b, C, h, w)
            std = None if got[0][1] is None else torch.stack([s for _, s, _ in got]).to(self.device)
            cond = torch.stack([k for _, _, k in got])  # (b, C_cond, H, W) uint8
        else:
            loaded = [self.pixels.load(p, epoch) for p in mine]
            cond = torch.stack([k for _, k in loaded])
            mean, std = self._encode_pixels(torch.stack([t for t, _ in loaded]))
            mean = mean.to(self.device)
        n = len(positions)
        shape = (n, *mean.shape[1:])
        # draws for the whole global micro-batch, in a fixed order; this process keeps rows lo:hi
        posterior_eps = torch.randn(shape, generator=g)[lo:hi].to(self.device)
        noise = torch.randn(shape, generator=g)[lo:hi].to(self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=g)[lo:hi]
        drop = (torch.rand(n, generator=g) < c.data.empty_prompt_prob)[lo:hi]
        latents = mean if std is None else mean + std * posterior_eps
        if self.base.vae is not None:
            latents = latents * self.base.vae.config.scaling_factor
        ids = torch.where(drop, torch.tensor(self.empty_id), self.prompt_ids[torch.tensor(mine)])
        if self.text is not None:
            context = self.text[ids].to(self.device)  # (b, L, D)
        else:
            context = self._encode_text([self.unique_prompts[i] for i in ids.tolist()]).to(self.device)
        timesteps = timesteps.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return noisy, timesteps, context, condition_to_unit(cond).to(self.device), target

    def _optimizer_step(self, step: int) -> tuple[float, bool]:
        """Run grad_accum micro-batches and one update. Returns (mean loss over all processes, skipped)."""
        c = self.config
        accum = c.optim.grad_accum
        total = torch.zeros((), device=self.device)
        for k in range(accum):
            noisy, t, context, cond, target = self._micro_inputs(step * accum + k)
            sync = k == accum - 1
            with self.acc.no_sync(self.model) if not sync else contextlib.nullcontext(), self.acc.autocast():
                pred = self.model(noisy, t, context.to(self.weight_dtype), cond)
                loss = F.mse_loss(pred.float(), target.float(), reduction="mean")  # paper Eq. 5
                self.acc.backward(loss / accum)
            total += loss.detach() / accum
        mean_loss = self.acc.reduce(total, reduction="mean")
        grad_norm = torch.zeros((), device=self.device)
        if c.optim.max_grad_norm:
            grad_norm = self.acc.clip_grad_norm_(self.trainable, c.optim.max_grad_norm)
        else:
            grads = [p.grad for p in self.trainable if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        finite = bool(torch.isfinite(mean_loss)) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                with torch.no_grad():
                    for e, p in zip(self.ema, self.trainable, strict=True):
                        e.lerp_(p.detach().float(), 1 - c.optim.ema_decay)
        self.optimizer.zero_grad(set_to_none=True)
        return float(mean_loss), not finite

    # ------------------------------------------------------------------------------------------------------
    # validation
    def _pipeline(self, with_control: bool):
        from controlnet.pipeline import ControlNetPipeline

        b = self.base
        nets = [self.controlnet] if with_control else []
        return ControlNetPipeline(b.unet, b.vae, b.text_encoder, b.tokenizer, b.scheduler, controlnets=nets)

    def _val_data(self) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
        size = self.config.data.resolution
        prompts, conds, targets = [], [], []
        for i in self.val_indices:
            target_bytes, cond_bytes = self.source.read(i)
            conds.append(np.asarray(decode_image(cond_bytes).resize((size, size))))
            targets.append(np.asarray(decode_image(target_bytes).resize((size, size))))
            prompts.append(self.source.prompt(i))
        return prompts, conds, targets

    def _metric(self) -> str:
        metric = self.config.validation.metric
        if metric != "auto":
            return metric
        world = Path(self.config.data.path) / "world.json"
        if world.is_file():
            task = json.loads(world.read_text()).get("task")
            return "fill_iou" if task == "fill" else f"task:{task}"
        return "edge_f1"

    @torch.no_grad()
    def _validate(self, step: int, with_control: bool = True, images_only: bool = False) -> tuple[float, list]:
        v = self.config.validation
        prompts, conds, _ = self.val
        was_training = self.controlnet.training
        self.controlnet.eval()
        backup = None
        if self.ema is not None and with_control:  # validate the EMA weights, as they are exported
            backup = [p.detach().clone() for p in self.trainable]
            for p, e in zip(self.trainable, self.ema, strict=True):
                p.data.copy_(e)
        try:
            with self.acc.autocast():
                pipe = self._pipeline(with_control)
                images = val.generate(pipe, prompts, conds, v.steps, v.guidance_scale, seed=0)
        finally:
            if backup is not None:
                for p, b in zip(self.trainable, backup, strict=True):
                    p.data.copy_(b)
            self.controlnet.train(was_training)
        scores = val.score(self.metric, images, conds)
        return float(np.mean(scores)), images

    def _record_validation(self, step, history, metrics_path, samples_dir, started) -> float | None:
        """Validate on the main process: append to `history`, log to metrics.jsonl, save the sample grid."""
        if not self.acc.is_main_process:
            return None
        fidelity, images = self._validate(step)
        history.append((step, fidelity))
        append_jsonl(metrics_path, {"step": step, "event": "validation", "fidelity": fidelity,
                                    "metric": self.metric, "elapsed_s": time.time() - started})  # fmt: skip
        save_grid(samples_dir / f"step-{step:07d}.png", [images], self.config.validation.grid_samples)
        return fidelity

    # ------------------------------------------------------------------------------------------------------
    # the run
    def run(self) -> RunSummary:
        run_started = time.time()
        self._setup()
        self._build_model()
        c = self.config
        state = self._resume()
        start = state["step"] if state else 0
        history = [tuple(h) for h in state["validation"]] if state else []
        streak = state["nonfinite_streak"] if state else 0
        floor_ceiling = state.get("floor_ceiling") if state else None
        self.metric = self._metric()
        do_val = c.validation.every > 0 and c.validation.metric != "none"
        if do_val:
            self.val = self._val_data()
        samples_dir = self.run_dir / "samples"
        metrics_path = self.run_dir / METRICS_FILE
        if self.acc.is_main_process:
            truncate_metrics(metrics_path, start)
            if do_val and floor_ceiling is None:
                floor, floor_images = self._validate(0, with_control=False)
                ceiling = float(np.mean(val.score(self.metric, self.val[2], self.val[1])))
                floor_ceiling = {"floor": floor, "ceiling": ceiling, "metric": self.metric}
                append_jsonl(metrics_path, {"step": start, "event": "floor_ceiling", **floor_ceiling})
                save_grid(samples_dir / "reference.png", [self.val[1], self.val[2], floor_images],
                           c.validation.grid_samples)  # fmt: skip
        status, global_batch = "finished", c.train.batch_size * self.world * c.optim.grad_accum
        started = run_started - (state["elapsed_s"] if state else 0.0)  # max_minutes counts set-up too
        window_t, window_steps = time.time(), 0
        step = start
        with StopOnSignal() as stop:
            while step < c.train.max_steps:
                loss, skipped = self._optimizer_step(step)
                step += 1
                window_steps += 1
                streak = streak + 1 if skipped else 0
                if streak >= c.train.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{streak} optimizer steps in a row had a non-finite loss or gradient (last at step "
                        f"{step}); lower optim.lr, enable optim.max_grad_norm, or check the data; the last "
                        "checkpoint holds the last finite weights"
                    )
                fidelity = None
                if do_val and step % c.validation.every == 0:
                    fidelity = self._record_validation(step, history, metrics_path, samples_dir, started)
                    history = broadcast_history(self.acc, history)
                elapsed = time.time() - window_t
                rate = window_steps * global_batch / elapsed if elapsed > 0 else 0.0
                lr = self.scheduler.get_last_lr()[0]
                if self.acc.is_main_process and (
                    step % c.train.log_every == 0 or skipped or step == c.train.max_steps
                ):
                    append_jsonl(metrics_path, {"step": step, "loss": loss, "lr": lr, "samples_per_s": rate,
                                           "skipped": skipped, "elapsed_s": time.time() - started})  # fmt: skip
                if self.callback:
                    self.callback(StepInfo(step, c.train.max_steps, loss, rate, lr, skipped, fidelity))
                stop_now = any_process(self.acc, stop.requested)
                if c.validation.early_stop and val.should_stop_early(history, c.validation.threshold,
                                                                     c.validation.patience):  # fmt: skip
                    status = "early_stop"
                timed_out = c.train.max_minutes and (time.time() - started) / 60 >= c.train.max_minutes
                if timed_out and status == "finished":
                    status = "time_limit"
                state_now = {
                    "step": step,
                    "micro_step": step * c.optim.grad_accum,
                    "nonfinite_streak": streak,
                    "validation": history,
                    "floor_ceiling": floor_ceiling,
                    "elapsed_s": time.time() - started,
                    "torch_rng": torch.get_rng_state().tolist(),
                    "numpy_rng": numpy_state(),
                    "world_size": self.world,
                }
                periodic = c.checkpoint.every and step % c.checkpoint.every == 0
                due = stop_now or periodic or status != "finished" or step == c.train.max_steps
                if due and streak == 0:  # never checkpoint right after a skipped (non-finite) step
                    self._save(state_now)
                if stop_now:
                    status = "interrupted"
                if status != "finished":
                    break
        if do_val and status != "interrupted" and (not history or history[-1][0] != step):
            # the exported weights get a score of their own: the report's final number is theirs
            self._record_validation(step, history, metrics_path, samples_dir, started)
            history = broadcast_history(self.acc, history)
        digests = self._rank_digests()
        if self.acc.is_main_process and self.world > 1:
            append_jsonl(metrics_path, {"step": step, "event": "ranks", "weight_sha256": digests})
            if len(set(digests)) != 1:
                raise RuntimeError(f"processes hold different weights after step {step}: {digests}")
        summary = RunSummary(self.run_dir, status, step, validation=history)
        if floor_ceiling:
            summary.floor, summary.ceiling = floor_ceiling["floor"], floor_ceiling["ceiling"]
        summary.convergence_step = val.convergence_step(history, c.validation.threshold)
        if status != "interrupted":
            summary.final_dir = self._export()
        if self.acc.is_main_process:
            from controlnet.train.report import write_report

            write_report(self.run_dir, c, summary)
        self.acc.wait_for_everyone()
        return summary

    def _rank_digests(self) -> list[str]:
        """sha256 of the trained weights on every process (DDP keeps them identical; this checks it)."""
        import hashlib

        h = hashlib.sha256()
        for p in self.trainable:
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        if self.world == 1:
            return [h.hexdigest()]
        from accelerate.utils import gather_object

        return list(gather_object([h.hexdigest()]))

    # ------------------------------------------------------------------------------------------------------
    # 6. export
    def _export(self) -> Path | None:
        if not self.acc.is_main_process:
            return None
        from controlnet.io.api import save_controlnet

        final = self.run_dir / FINAL_DIR
        if self.ema is not None:
            for p, e in zip(self.trainable, self.ema, strict=True):
                p.data.copy_(e)
        net = self.controlnet
        for fmt in self.config.checkpoint.export_formats:
            path = final / "controlnet" if fmt == "diffusers" else final / "controlnet.safetensors"
            save_controlnet(net, path, format=fmt)
        if not self.config.model.sd_locked:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in decoder_state(self.base.unet).items()},
                      str(final / "unet_decoder.safetensors"))  # fmt: skip
        return final


def train(config: TrainConfig, base: BaseParts | None = None,
          callback: Callable[[StepInfo], None] | None = None) -> RunSummary:  # fmt: skip
    """Train a ControlNet as `config` says; see the module docstring for the steps."""
    return Trainer(config, base, callback).run()


__all__ = ["BaseParts", "NonFiniteLossError", "RunSummary", "StepInfo", "Trainer", "asdict", "train"]
