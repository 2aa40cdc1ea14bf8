"""Training a ControlNet on a transformer base (SD3 / SD3.5, Flux): its data, its model and its step.

The objective is the rectified flow of the base (train/flow_matching.py: x_s = (1 - s) x_0 + s eps, the velocity
eps - x_0 as target, SD3's timestep sampling and weighting); the rest is the UNet trainer's (trainer.py dispatches
here): the same data scan, buckets, held-out split, 50% empty prompts, caches, per-micro-step generator (exact resume),
checkpoints and EMA. What differs, each as the family's diffusers pipeline and trainer do it:

- text: the pipeline's `encode_prompt` (SD3: CLIP-L + CLIP-G + T5 joined, pooled CLIP-L + CLIP-G; Flux: T5 states,
  pooled CLIP-L), both cached on disk with every encoder's weights in the key;
- latents: (z - shift_factor) * scaling_factor of the VAE posterior; Flux packs 2x2 latent pixels per token
  (`FluxPipeline._pack_latents`) with their rotary ids (`_prepare_latent_image_ids`);
- the condition: VAE-encoded as the pipeline encodes it (a posterior sample; SD3 nets with
  force_zeros_for_pooled_projection, InstantX's convention, without the shift), its posterior cached like the
  target's; an XLabs-shaped Flux net (pixel-space `input_hint_block`) takes the image itself in [-1, 1];
- the call: diffusers' `train_controlnet_sd3.py` / `train_controlnet_flux.py`: the net on (x_s, t, text, pooled,
  condition), its block residuals into the locked transformer; SD3 t = s * 1000, Flux s (the pipeline's t / 1000) and
  for a guidance-distilled base (dev) the embedded guidance `flow.guidance`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from controlnet.data.cache import build_latent_cache
from controlnet.data.transforms import condition_to_unit
from controlnet.train import flow_matching as fm
from controlnet.train.batches import TrainingBatches
from controlnet.train.config import ModelConfig, TrainConfig

# Fresh nets' copied blocks when model.transformer_layers / transformer_single_layers are left at their defaults:
# diffusers' train_controlnet_sd3.py (SD3ControlNetModel.from_transformer's num_layers=12) and train_controlnet_flux.py
# (--num_double_layers 4, --num_single_layers 10), each capped at what the base has.
DEFAULT_SD3_LAYERS = 12
DEFAULT_FLUX_DOUBLE_LAYERS = 4
DEFAULT_FLUX_SINGLE_LAYERS = 10
XLABS_FORMAT = "xlabs-flux-controlnet"
DEFAULT_MAX_SEQUENCE_LENGTH = 77  # T5 tokens per training prompt: diffusers' SD3/Flux ControlNet trainers' default


@dataclass
class FlowMicroBatch:
    """One process's slice of one global micro-batch on a transformer base (b rows)."""

    x0: torch.Tensor  # target latents (b, C, h, w); Flux packed (b, h/2 * w/2, 4C)
    noisy: torch.Tensor  # x_s = (1 - s) x_0 + s eps, shaped as x0
    target: torch.Tensor  # eps - x_0, shaped as x0
    sigmas: torch.Tensor  # s (b,) float32
    timesteps: torch.Tensor  # what the transformer embeds: SD3 s * N (b,), Flux s (b,)
    context: torch.Tensor  # text states (b, L_txt, D) float32
    pooled: torch.Tensor  # pooled text vector (b, D_pooled) float32
    cond: torch.Tensor  # condition latents shaped as x0, or an XLabs net's image (b, 3, H, W) in [-1, 1]
    img_ids: torch.Tensor | None = None  # Flux: (h/2 * w/2, 3) rotary positions of the image tokens
    txt_ids: torch.Tensor | None = None  # Flux: (L_txt, 3) zeros
    cond_unit: torch.Tensor | None = None  # reward runs: the condition image (b, 3, H, W) in [0, 1], the target


def default_layers(model: ModelConfig, arch: str, transformer_config: dict) -> tuple[int, int]:
    """(copied joint/double blocks, copied single blocks) of a fresh net: the settings, or the family defaults."""
    n = int(transformer_config.get("num_layers", 0))
    if arch == "sd3":
        return model.transformer_layers or min(DEFAULT_SD3_LAYERS, n - 1), 0
    n_single = int(transformer_config.get("num_single_layers", 0))
    single = model.transformer_single_layers
    return (
        model.transformer_layers or min(DEFAULT_FLUX_DOUBLE_LAYERS, n),
        min(DEFAULT_FLUX_SINGLE_LAYERS, n_single) if single < 0 else single,
    )


def check_transformer_run(c: TrainConfig, transformer_config: dict | None, arch: str) -> None:
    """What a transformer base cannot train, one line each, from config files and headers only (no weights).

    `transformer_config`: the base transformer's config (`base_geometry`; None when the caller brought a loaded
    base, whose blocks are then not counted here)."""
    m = c.model
    refused = {
        "model.sd_locked=false": not m.sd_locked,
        f"model.architecture={m.architecture}": m.architecture != "controlnet",
        f"model.hint_channels={','.join(map(str, m.hint_channels))}": bool(m.hint_channels),
        "model.only_mid_control=true": m.only_mid_control,
        f"model.cond_channels={m.cond_channels}": m.cond_channels != 3,
    }
    for setting, bad in refused.items():
        if bad:
            raise ValueError(
                f"{setting}: a UNet-base setting; on {arch.upper()} transformer base {m.base} it is not supported "
                "(leave it at its default)"
            )
    if arch == "sd3" and m.transformer_single_layers > 0:
        raise ValueError(
            f"model.transformer_single_layers={m.transformer_single_layers}: SD3 has no single-stream blocks "
            "(expected -1 or 0)"
        )
    if transformer_config is not None and not m.controlnet:
        config = transformer_config
        n = int(config.get("num_layers", 0))
        layers, single = default_layers(m, arch, config)
        high = n - 1 if arch == "sd3" else n
        if not 1 <= layers <= high:
            raise ValueError(
                f"model.transformer_layers={m.transformer_layers}: expected 1..{high} (the base has {n} "
                f"{'joint blocks, its last context_pre_only' if arch == 'sd3' else 'double blocks'})"
            )
        n_single = int(config.get("num_single_layers", 0))
        if arch == "flux" and single > n_single:
            raise ValueError(
                f"model.transformer_single_layers={m.transformer_single_layers}: expected -1 or 0..{n_single} "
                f"(the base has {n_single} single blocks)"
            )
    if m.controlnet:
        from controlnet.generate.base import controlnet_path
        from controlnet.io.transformer_layouts import open_transformer_controlnet

        with open_transformer_controlnet(controlnet_path(m.controlnet)) as source:
            config = source.config
        if config.get("num_mode") is not None:
            raise ValueError(
                f"model.controlnet={m.controlnet}: a union net (num_mode); training its condition types is not "
                "supported (expected a single-condition ControlNet)"
            )
        if config.get("extra_conditioning_channels"):
            raise ValueError(
                f"model.controlnet={m.controlnet}: an SD3 net with extra conditioning channels (an inpainting mask); "
                "training it is not supported (expected extra_conditioning_channels=0)"
            )


def is_pixel_hint(c: TrainConfig) -> bool:
    """Whether the net to train takes the condition in pixels (an XLabs-layout Flux net given as model.controlnet)."""
    if not c.model.controlnet:
        return False
    from controlnet.generate.base import controlnet_path
    from controlnet.io.transformer_layouts import transformer_controlnet_format

    return transformer_controlnet_format(controlnet_path(c.model.controlnet)) == XLABS_FORMAT


def build_transformer_controlnet(c: TrainConfig, base) -> nn.Module:
    """The trainable net: `model.controlnet` loaded onto the base, or a fresh copy of its first blocks (float32)."""
    transformer = base.transformer.float()
    if c.model.controlnet:
        from controlnet.generate.base import controlnet_path
        from controlnet.io.api import load_controlnet

        return load_controlnet(controlnet_path(c.model.controlnet), unet=transformer)
    from controlnet.model.transformer_controlnet import FluxControlNet, SD3ControlNet

    layers, single = default_layers(c.model, base.arch, dict(transformer.config))
    if base.arch == "sd3":
        return SD3ControlNet.from_transformer(transformer, num_layers=layers)
    return FluxControlNet.from_transformer(transformer, num_layers=layers, num_single_layers=single)


def latent_space(vae, z: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """VAE latents -> the transformer's space, as SD3/Flux pipelines: (z - shift_factor) * scaling_factor."""
    shift_factor = (vae.config.get("shift_factor") or 0.0) if shift else 0.0
    return (z - shift_factor) * vae.config.scaling_factor


def vae_space(vae, x: torch.Tensor) -> torch.Tensor:
    """The transformer's latents -> VAE latents, the inverse of `latent_space`: x / scaling_factor + shift_factor."""
    return x / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)


class TransformerBatches(TrainingBatches):
    """`TrainingBatches` for a transformer base: micro-step s -> `FlowMicroBatch` (see the module docstring)."""

    def __init__(self, config: TrainConfig, base, acc, cache_dir: Path, weight_dtype: torch.dtype):
        self.pixel_hint = is_pixel_hint(config)
        self.cond_latents = None
        self._text_pipe = None
        # SD3 nets in InstantX's convention (force_zeros_for_pooled_projection) take the condition without the
        # shift (`use_net`)
        self.cond_shift = True
        super().__init__(config, base, acc, cache_dir, weight_dtype)

    def use_net(self, net: nn.Module) -> None:
        """Encode conditions for `net`: SD3's pipeline drops the VAE shift for force_zeros_for_pooled_projection."""
        self.cond_shift = not net.config.get("force_zeros_for_pooled_projection", False)

    def _cache_keys(self) -> tuple[str, str]:
        text_fp, vae_fp = super()._cache_keys()
        # the embeddings depend on the family's encode_prompt and the T5 length too
        return f"{text_fp}|{self.base.arch}|t5={self.max_sequence_length}", vae_fp

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per prompt (SD3 without T5: zero tokens): flow.max_sequence_length, else the base's own
        (SamplingDefaults from its sampling.json: what it was trained with), else diffusers' trainers' 77."""
        for value in (self.config.flow.max_sequence_length, self.base.sampling.max_sequence_length):
            if value is not None:
                return value
        return DEFAULT_MAX_SEQUENCE_LENGTH

    def _build_caches(self, cache_dir: Path, digests, buckets) -> None:
        super()._build_caches(cache_dir, digests, buckets)
        if self.latents is None or self.pixel_hint:
            return
        _, vae_fp = self._cache_keys()

        def load(position: int) -> tuple[torch.Tensor, torch.Tensor]:
            _, cond = self.pixels.load(position, 0)
            return condition_to_unit(cond[None])[0] * 2 - 1, cond  # the pipeline's preprocess: [-1, 1]

        desc = json.dumps(["condition", self.config.data.resolution, self.config.data.bucketing])
        self.cond_latents = build_latent_cache(
            cache_dir, digests, desc, vae_fp + "|condition", load, self.encode_pixels
        )

    def _text_pipeline(self):
        """diffusers' text-to-image pipeline of the family over the base's modules: its `encode_prompt` only."""
        if self._text_pipe is None:
            from diffusers import FluxPipeline, StableDiffusion3Pipeline

            b = self.base
            parts = dict(
                transformer=b.transformer,
                scheduler=b.scheduler,
                vae=b.vae,
                text_encoder=b.text_encoder,
                tokenizer=b.tokenizer,
                text_encoder_2=b.text_encoder_2,
                tokenizer_2=b.tokenizer_2,
            )
            if b.arch == "sd3":
                self._text_pipe = StableDiffusion3Pipeline(
                    **parts, text_encoder_3=b.text_encoder_3, tokenizer_3=b.tokenizer_3
                )
            else:
                self._text_pipe = FluxPipeline(**parts)
        return self._text_pipe

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"context": (B, L, D), "pooled": (B, D_pooled)} float32, as the family's pipeline encodes `prompts`."""
        pipe, length = self._text_pipeline(), self.max_sequence_length
        if self.base.arch == "sd3":
            context, _, pooled, _ = pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                device=self.device,
                do_classifier_free_guidance=False,
                max_sequence_length=length,
            )
        else:
            context, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=length
            )
        return {"context": context.float(), "pooled": pooled.float()}

    def micro_batch(self, micro_step: int) -> FlowMicroBatch:
        """This process's slice of global micro-batch `micro_step` (a pure function of seed and micro_step)."""
        c, base = self.config, self.base
        got = self.samples(micro_step)
        g, n, lo, hi = got.generator, got.n, got.lo, got.hi
        shape = (n, *got.mean.shape[1:])  # (N, C, h, w)
        _, _, h, w = shape
        # draws for the whole global micro-batch, in a fixed order; this process keeps rows lo:hi
        posterior_eps = torch.randn(shape, generator=g)[lo:hi].to(self.device)
        cond_eps = torch.randn(shape, generator=g)[lo:hi].to(self.device)  # the condition's posterior sample
        noise = torch.randn(shape, generator=g)[lo:hi].to(self.device)  # eps
        patch = fm.FLUX_PACKING if base.arch == "flux" else base.transformer.config.patch_size
        shift = fm.training_shift(base.scheduler.config, c.flow.shift, (h // patch) * (w // patch))
        grid = fm.sigma_grid(base.scheduler.config.num_train_timesteps, shift)  # (N_train,)
        f = c.flow
        sigmas = fm.sample_sigmas(f.weighting_scheme, n, grid, g, f.logit_mean, f.logit_std, f.mode_scale)[lo:hi]
        drop = (torch.rand(n, generator=g) < c.data.empty_prompt_prob)[lo:hi]
        vae = base.vae
        x0 = latent_space(vae, got.mean + got.std * posterior_eps)  # (b, C, h, w)
        cond = self._condition(got, cond_eps)
        text = self.prompt_rows(got, drop)
        sigmas = sigmas.to(self.device)
        timesteps = sigmas * base.scheduler.config.num_train_timesteps  # SD3's t in [0, N]
        img_ids = txt_ids = None
        if base.arch == "flux":
            x0, noise = fm.pack_latents(x0), fm.pack_latents(noise)  # (b, h/2 * w/2, 4C)
            if not self.pixel_hint:
                cond = fm.pack_latents(cond)
            img_ids = fm.latent_image_ids(h, w, self.device)  # (L_img, 3)
            txt_ids = torch.zeros(text["context"].shape[1], 3, device=self.device)  # (L_txt, 3)
            timesteps = timesteps / fm.FLUX_TIMESTEP_DIVISOR  # Flux embeds s
        noisy = fm.interpolate(x0, noise, sigmas)
        target = fm.velocity_target(x0, noise)
        # (b, 3, H, W): the condition image the reward's detector compares with; only a reward run needs it
        cond_unit = condition_to_unit(got.cond).to(self.device) if c.train.reward else None
        return FlowMicroBatch(
            x0,
            noisy,
            target,
            sigmas,
            timesteps,
            text["context"],
            text["pooled"],
            cond,
            img_ids,
            txt_ids,
            cond_unit,
        )

    def _condition(self, got, cond_eps: torch.Tensor) -> torch.Tensor:
        """The condition as the net takes it: VAE latents (b, C, h, w) sampled from the cached (or now computed)
        posterior, or for an XLabs net the image (b, 3, H, W) in [-1, 1]."""
        pixels = (condition_to_unit(got.cond) * 2 - 1).to(self.device)  # (b, 3, H, W)
        if self.pixel_hint:
            return pixels
        if self.cond_latents is not None:
            rows = [self.cond_latents.get(p) for p in got.positions]
            mean = torch.stack([m for m, _, _ in rows]).to(self.device)
            std = torch.stack([s for _, s, _ in rows]).to(self.device)
        else:
            mean, std = self.encode_pixels(pixels)
        return latent_space(self.base.vae, mean + std * cond_eps, shift=self.cond_shift)


class ControlledTransformer(nn.Module):
    """The trainable net and the locked transformer as one module (what accelerate wraps): velocity of x_s.

    forward(noisy, timesteps, context, pooled, cond[, img_ids, txt_ids]) -> v (shaped as noisy). The net's residuals
    enter the base as diffusers' pipelines add them (Eq. 2 of the paper, model/transformer_controlnet.py).
    """

    def __init__(self, controlnet: nn.Module, transformer: nn.Module, arch: str, guidance: float):
        super().__init__()
        self.controlnet, self.transformer, self.arch, self.guidance = controlnet, transformer, arch, guidance

    def forward(self, noisy, timesteps, context, pooled, cond, img_ids=None, txt_ids=None) -> torch.Tensor:
        dtype = self.transformer.dtype
        if self.arch == "sd3":
            net = self.controlnet.config
            samples = self.controlnet(
                hidden_states=noisy,  # (b, C, h, w)
                controlnet_cond=cond,  # (b, C, h, w)
                timestep=timesteps,  # (b,) s * N
                # SD3.5 Large's own nets read no text; InstantX's take zeros for the pooled vector (as the pipeline)
                encoder_hidden_states=context if net.joint_attention_dim is not None else None,
                pooled_projections=torch.zeros_like(pooled) if net.force_zeros_for_pooled_projection else pooled,
                return_dict=False,
            )[0]  # one (b, L_img, D) per copied block
            return self.transformer(
                hidden_states=noisy,
                timestep=timesteps,
                encoder_hidden_states=context,
                pooled_projections=pooled,
                block_controlnet_hidden_states=[s.to(dtype) for s in samples],
                return_dict=False,
            )[0]  # (b, C, h, w)

        def guidance(config) -> torch.Tensor | None:  # (b,) for a guidance-distilled (dev) model, else None
            return (
                torch.full((len(noisy),), self.guidance, device=noisy.device) if config.guidance_embeds else None
            )

        double, single = self.controlnet(
            hidden_states=noisy,  # (b, L_img, 4C)
            controlnet_cond=cond,  # (b, L_img, 4C), or the image (b, 3, H, W) for an XLabs net
            timestep=timesteps,  # (b,) s
            guidance=guidance(self.controlnet.config),
            pooled_projections=pooled,
            encoder_hidden_states=context,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )
        return self.transformer(
            hidden_states=noisy,
            timestep=timesteps,
            guidance=guidance(self.transformer.config),
            pooled_projections=pooled,
            encoder_hidden_states=context,
            controlnet_block_samples=None if double is None else [s.to(dtype) for s in double],
            controlnet_single_block_samples=None if single is None else [s.to(dtype) for s in single],
            txt_ids=txt_ids,
            img_ids=img_ids,
            controlnet_blocks_repeat=self.controlnet.input_hint_block is not None,  # XLabs' repeat rule
            return_dict=False,
        )[0]  # (b, L_img, 4C)


def micro_loss(
    model: nn.Module, batch: FlowMicroBatch, weight_dtype: torch.dtype, scheme: str, reward=None
) -> torch.Tensor:
    """w(s) || v(x_s) - (eps - x_0) ||^2 of one micro-batch (flow_matching.flow_loss), plus `reward`'s consistency
    term when given (train/reward.py `Reward.flow_term`)."""
    pred = model(
        batch.noisy.to(weight_dtype),
        batch.timesteps.to(weight_dtype),
        batch.context.to(weight_dtype),
        batch.pooled.to(weight_dtype),
        batch.cond.to(weight_dtype),
        batch.img_ids,
        batch.txt_ids,
    )
    loss = fm.flow_loss(pred, batch.target, batch.sigmas, scheme)
    if reward is not None:  # + lambda * ControlNet++'s consistency term on the one-step x0' = x_s - s v'
        loss = loss + reward.flow_term(pred, batch)
    return loss


def export_layout(net: nn.Module, fmt: str) -> str:
    """The layout `checkpoint.export_formats` entry `fmt` writes: diffusers (a folder), or "original": the publisher's
    one file, XLabs' for an XLabs-shaped net, else diffusers names in one .safetensors (as InstantX, Shakker)."""
    if fmt == "diffusers":
        return "diffusers"
    return "xlabs" if getattr(net, "input_hint_block", None) is not None else "diffusers-file"


def base_geometry(source) -> tuple[int | None, dict | None]:
    """(VAE factor, transformer config) of a checked transformer base (`generate.base.BaseSource`), no weights read:
    a diffusers folder's vae/ and transformer/ config.json; a single file's (`source.plan`) configs derived from its
    headers, or the config.json of a VAE folder given beside it. None where the files do not tell."""
    from controlnet.generate.sizes import vae_factor_on_disk

    def read(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    if source.plan is None:
        return vae_factor_on_disk(source.path), read(source.path / "transformer" / "config.json")
    vae = source.plan.parts["vae"]
    vae_config = read(vae.path / "config.json") if vae.source == "folder" else vae.config
    blocks = (vae_config or {}).get("block_out_channels")
    factor = 2 ** (len(blocks) - 1) if blocks else None
    return factor, dict(source.plan.parts["transformer"].config)


def size_multiple(arch: str, vae_factor: int | None, transformer_config: dict | None) -> int | None:
    """What a training side must be a multiple of on this base (VAE factor x patch, Flux x 2 for its packing)."""
    if vae_factor is None:
        return None
    if arch == "flux":
        return vae_factor * fm.FLUX_PACKING
    if transformer_config is None:
        return None
    return vae_factor * int(transformer_config.get("patch_size", 1))


__all__ = [
    "ControlledTransformer",
    "FlowMicroBatch",
    "TransformerBatches",
    "build_transformer_controlnet",
    "check_transformer_run",
    "export_layout",
    "micro_loss",
]
