"""Controlled generation on a transformer base (SD3 / SD3.5, Flux) through diffusers' ControlNet pipelines.

`run_job` (generate/jobs.py) stays the one caller: for a transformer base the pipeline it holds is a
`TransformerControlNetPipeline`, which maps a `GenerationOptions` once onto diffusers'
`StableDiffusion3ControlNetPipeline` / `FluxControlNetPipeline` (docs/architecture.md#transformer-bases-are-the-same-idea)
and returns the same `GenerationResult` (images, seeds, settings) as the UNet pipeline, so PNG settings and sidecars
work unchanged. diffusers' pipelines are the well-kept sampler of these families (flow-matching Euler with the
resolution shift where the family uses it, SD3's CFG over three text encoders, Flux's embedded guidance, each
family's condition convention: VAE-encoded, shifted/scaled as the net's config says, packed for Flux, XLabs' pixel
hint); our `SD3ControlNet` / `FluxControlNet` subclass diffusers' nets, so the pipelines take them as they are.

The mapping (one place):
    prompt, negative_prompt        -> prompt, negative_prompt (Flux: only with true CFG)
    true_cfg_scale (Flux)          -> true_cfg_scale, the negative prompt "" when none (FluxPipeline's true CFG)
    steps, guidance_scale          -> num_inference_steps, guidance_scale (Flux: the embedded guidance)
    the base's max_sequence_length -> max_sequence_length (SamplingDefaults; None: the pipeline's default): T5
                                      tokens, or an SD3 base's zero tokens in T5's place (builtin-dit: 0)
    seed, batch_size               -> one torch.Generator per image, manual_seed(seed + k), as the UNet pipeline draws;
                                      torch's global generator seeded with `seed` for the call (SD3's condition latents)
    width, height                  -> width, height
    unit scale / start / end       -> controlnet_conditioning_scale, control_guidance_start / _end (same window rule)
    several units                  -> SD3MultiControlNetModel / FluxMultiControlNetModel (residuals added, Sec. 3.4)
    image, strength (Flux)         -> FluxControlNetImg2ImgPipeline's image (at the output size by resize_mode),
                                      strength; SD3 img2img is refused (diffusers has no SD3 ControlNet img2img)
What this path cannot do yet is refused in one line naming the setting (`unsupported`), never ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from controlnet.generate import control_images as ci
from controlnet.generate.options import GenerationOptions
from controlnet.generate.results import INPAINT, GenerationResult
from controlnet.generate.samplers import sampler_display_name
from controlnet.generate.sizes import OutputSize, choose_size
from controlnet.generate.transformer_base import ARCH_NAMES, TransformerBase
from controlnet.io.transformer_layouts import STABILITY_CONTROL_TYPE_CONFIG

logger = logging.getLogger(__name__)

# What each setting must be on this path (its default: no effect), with why, for `refusals`.
NOT_YET = "not supported on a transformer base yet"
# The samplers a transformer base runs: its own flow-matching Euler (None = the base's; "euler" names the same
# method, Euler steps on the flow ODE, as the web UI's "Euler" does for these models in Forge/ComfyUI).
OWN_SAMPLERS = (None, "euler")


def refusals(
    opt: GenerationOptions, arch: str, n_nets: int, guidance_embeds: bool = True
) -> list[tuple[str, str]]:
    """(field, message) for each setting of `opt` (as given, before the base's defaults; the units' settings in its
    per-net lists) this path cannot honour. `field` is the job's name for it (GenerationJob / GenerationOptions /
    units[k].*), so a server answers 422 naming it before queueing (serve/service.py `Service.check`);
    `guidance_embeds`: the Flux transformer's config (False for schnell)."""
    problems = []
    if opt.mask is not None:
        problems.append(("mask", f"mask (inpainting): {NOT_YET}"))
    elif opt.image is not None and arch != "flux":
        problems.append(
            (
                "image",
                "image (img2img): on an SD3 base not supported yet (diffusers has no SD3 ControlNet img2img pipeline "
                "to keep parity with); Flux bases take one",
            )
        )
    if arch == "flux" and opt.image is not None and opt.true_cfg_scale > 1:
        problems.append(
            (
                "true_cfg_scale",
                "true_cfg_scale with an image (img2img): diffusers' Flux ControlNet img2img has none",
            )
        )
    if opt.scheduler not in OWN_SAMPLERS:
        problems.append(
            (
                "scheduler",
                f"scheduler={opt.scheduler!r}: a transformer base samples with its flow-matching Euler only",
            )
        )
    if opt.eta:
        problems.append(("eta", f"eta={opt.eta}: DDIM's; the flow-matching sampler takes none"))
    if opt.clip_skip:
        problems.append(("clip_skip", f"clip_skip={opt.clip_skip}: {NOT_YET}"))
    if opt.output_type == "latent":
        problems.append(("output_type", f"output_type='latent': {NOT_YET}"))
    for k, o in enumerate(opt.per_net(n_nets)):
        if o.mode.name != "balanced":
            problems.append(
                (
                    f"units[{k}].mode",
                    f"control_mode[{k}]={o.mode.name!r}: only balanced on a transformer base ({NOT_YET})",
                )
            )
        if o.block_scales is not None:
            problems.append((f"units[{k}].block_scales", f"block_scales[{k}]: {NOT_YET}"))
    if arch == "flux" and opt.negative_prompt and opt.true_cfg_scale <= 1:
        problems.append(
            (
                "negative_prompt",
                "negative_prompt: on Flux it needs true_cfg_scale > 1 (true CFG; guidance_scale is Flux's embedded "
                "guidance, which takes no negative prompt)",
            )
        )
    if arch != "flux" and opt.true_cfg_scale != 1:
        problems.append(
            (
                "true_cfg_scale",
                f"true_cfg_scale={opt.true_cfg_scale}: Flux's true CFG; this base guides with guidance_scale (CFG)",
            )
        )
    if arch == "flux" and opt.guidance_scale and not guidance_embeds:
        problems.append(
            (
                "guidance_scale",
                f"guidance_scale={opt.guidance_scale}: this Flux base has no guidance embedding (schnell)",
            )
        )
    return problems


def unsupported(opt: GenerationOptions, arch: str, n_nets: int, guidance_embeds: bool = True) -> list[str]:
    """One message per setting of `opt` this path cannot honour (`refusals` without the fields)."""
    return [message for _, message in refusals(opt, arch, n_nets, guidance_embeds)]


class TransformerControlNetPipeline:
    """Text-to-image with any number of SD3 or Flux ControlNets on a transformer base, through diffusers' pipelines.

    The interface `run_job` and the CLI use is the UNet pipeline's: `controlnets`, `output_size`, `__call__(prompt,
    control, options=, progress=)`, `sampling`, `scheduler`, `base_name`, `to`, `optimize`.
    """

    def __init__(self, base: TransformerBase, controlnets: Sequence = ()):
        self.base = base
        self.controlnets = list(controlnets)
        self.scheduler = base.scheduler
        self.sampling = base.sampling
        self.base_name = base.name
        self.base_ema = None
        self._check_nets()

    @classmethod
    def from_components(cls, base: TransformerBase, controlnets: Sequence = ()) -> TransformerControlNetPipeline:
        return cls(base, controlnets)

    @classmethod
    def from_pretrained(
        cls, source, controlnets: Sequence = (), device="cpu", dtype: torch.dtype | None = None, **base_options
    ) -> TransformerControlNetPipeline:
        """`source`: a checked transformer `BaseSource` (generate/base.py); `controlnets`: nets or paths (any
        published layout). Families were checked from the headers by the caller; `load_controlnet` checks again."""
        from controlnet.generate.base import load_base
        from controlnet.io.api import load_controlnet
        from controlnet.progress import phase

        base = load_base(source, device=device, dtype=dtype, **base_options)
        nets = []
        for k, entry in enumerate(controlnets):
            if isinstance(entry, torch.nn.Module):
                nets.append(entry)
                continue
            with phase(f"loading ControlNet {entry.name} ({k + 1}/{len(controlnets)})"):
                nets.append(load_controlnet(entry, unet=base.transformer, dtype=base.transformer.dtype))
        return cls(base, nets).to(device)

    # ----------------------------------------------------------------------------------------------------
    def _check_nets(self) -> None:
        from diffusers import FluxControlNetModel, SD3ControlNetModel

        kind = SD3ControlNetModel if self.base.arch == "sd3" else FluxControlNetModel
        for k, net in enumerate(self.controlnets):
            if not isinstance(net, kind):
                raise ValueError(
                    f"ControlNet {k} ({type(net).__name__}) is no {kind.__name__}: {self.base_name} is "
                    f"{ARCH_NAMES[self.base.arch]}"
                )
        if (
            self.base.arch == "sd3"
            and len({n.config.force_zeros_for_pooled_projection for n in self.controlnets}) > 1
        ):
            raise ValueError(
                "ControlNets: SD3 nets of both pooled-projection conventions (force_zeros_for_pooled_projection) in "
                "one generation; diffusers' pipeline applies the first net's to all"
            )

    @property
    def device(self) -> torch.device:
        return self.base.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.base.vae_scale_factor

    @property
    def native_size(self) -> int:
        return self.base.native_size

    def to(self, device=None, dtype: torch.dtype | None = None) -> TransformerControlNetPipeline:
        for module in [*self.base.modules(), *self.controlnets]:
            module.to(device=device, dtype=dtype)
        return self

    def enable_model_cpu_offload(self, device="cuda") -> TransformerControlNetPipeline:
        raise ValueError(f"--cpu-offload: {NOT_YET}")

    def optimize(self, channels_last=False, compile=False, pack_cpu_weights=None, reuse_freed_memory=False):
        """Speed options: `compile` is refused for now; channels_last and pack_cpu_weights concern the UNet's
        convolutions (a transformer has none in its loop) and leave this pipeline as it is; reuse_freed_memory is the
        process-wide allocator setting (controlnet/allocator.py)."""
        if compile:
            raise ValueError(f"--compile: {NOT_YET}")
        if reuse_freed_memory and self.device.type == "cpu":
            from controlnet.allocator import reuse_freed_memory as keep_freed_memory

            keep_freed_memory()
        return self

    def output_size(self, width=None, height=None, control=(), image=None) -> OutputSize:
        """As the UNet pipeline's (generate/sizes.py), sides a multiple of the VAE factor times the patch/packing."""
        first = next((c for c in control if not isinstance(c, str) or c != INPAINT), None)
        source = first if first is not None else image
        if isinstance(source, (list, tuple)):
            source = source[0]
        size = None
        if source is not None and (width is None or height is None):
            size = ci.image_size(source, "condition image")
        return choose_size(width, height, size, self.native_size, self.base.size_multiple)

    # ----------------------------------------------------------------------------------------------------
    def diffusers_pipeline(self, img2img: bool = False):
        """diffusers' ControlNet pipeline over these very modules (a fresh scheduler: ours is never mutated);
        `img2img`: Flux's FluxControlNetImg2ImgPipeline (SD3 has none in diffusers)."""
        from diffusers import (
            FluxControlNetImg2ImgPipeline,
            FluxControlNetPipeline,
            FluxMultiControlNetModel,
            SD3MultiControlNetModel,
            StableDiffusion3ControlNetPipeline,
        )

        b = self.base
        scheduler = type(b.scheduler).from_config(b.scheduler.config)
        nets = self.controlnets
        if b.arch == "sd3":
            net = nets[0] if len(nets) == 1 else SD3MultiControlNetModel(nets)
            pipe = StableDiffusion3ControlNetPipeline(
                transformer=b.transformer,
                scheduler=scheduler,
                vae=b.vae,
                text_encoder=b.text_encoder,
                tokenizer=b.tokenizer,
                text_encoder_2=b.text_encoder_2,
                tokenizer_2=b.tokenizer_2,
                text_encoder_3=b.text_encoder_3,
                tokenizer_3=b.tokenizer_3,
                controlnet=net,
            )
        else:
            net = nets[0] if len(nets) == 1 else FluxMultiControlNetModel(nets)
            pipe = (FluxControlNetImg2ImgPipeline if img2img else FluxControlNetPipeline)(
                scheduler=scheduler,
                vae=b.vae,
                text_encoder=b.text_encoder,
                tokenizer=b.tokenizer,
                text_encoder_2=b.text_encoder_2,
                tokenizer_2=b.tokenizer_2,
                transformer=b.transformer,
                controlnet=net,
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        control: Sequence = (),
        options: GenerationOptions | None = None,
        progress: Callable[[int, int], None] | None = None,
        **kwargs,
    ) -> GenerationResult:
        """Generate `batch_size` images per prompt, one condition image per ControlNet (see the module docstring)."""
        # 1. check: what this path cannot do is refused by name, before any work
        given = options if options is not None else GenerationOptions(**kwargs)
        if not self.controlnets:
            raise ValueError(
                f"controlnets: none given; a ControlNet generation on a transformer base needs one ({NOT_YET})"
            )
        embeds = bool(self.base.transformer.config.get("guidance_embeds", True))
        problems = unsupported(given, self.base.arch, len(self.controlnets), embeds)
        if problems:
            raise ValueError("; ".join(problems))
        opt = given.with_defaults(self.sampling)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
        control = list(control)
        if len(control) != len(self.controlnets):
            raise ValueError(
                f"control: got {len(control)} condition images for {len(self.controlnets)} ControlNets; expected one "
                "per net"
            )
        for k, c in enumerate(control):  # one image for every prompt, or a list of one per prompt (as the UNet's)
            if isinstance(c, (list, tuple)) and len(c) != len(prompts):
                raise ValueError(
                    f"control[{k}]: {len(c)} condition images for {len(prompts)} prompts; expected one image, or one "
                    "per prompt"
                )
        per_net = opt.per_net(len(self.controlnets))
        modes = [
            union_mode(net, o.control_type, k)
            for k, (net, o) in enumerate(zip(self.controlnets, per_net, strict=True))
        ]
        size = self.output_size(opt.width, opt.height, control)
        width, height = size.width, size.height
        images = [
            _each(c, lambda x: ci.condition_image(x, width, height, opt.resize_mode)) for c in control
        ]  # RGB
        hints = [
            _each(image, lambda x, n=net: publisher_hint(n, x))
            for net, image in zip(self.controlnets, images, strict=True)
        ]
        # per-prompt images: diffusers' ControlNet pipelines take a batch of one image per prompt (each repeated for
        # that prompt's num_images_per_prompt, prompt-major as the latents); Stability's tensors join in one batch
        hints = [torch.cat(h) if isinstance(h, list) and torch.is_tensor(h[0]) else h for h in hints]
        num_images = len(prompts) * opt.batch_size
        seeds = [opt.seed + k for k in range(num_images)]
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]

        # 2. diffusers' pipeline, the settings mapped once
        pipe = self.diffusers_pipeline(img2img=opt.image is not None)
        single = len(self.controlnets) == 1
        call = dict(
            prompt=prompts,
            height=height,
            width=width,
            num_inference_steps=opt.steps,
            guidance_scale=opt.guidance_scale,
            control_image=hints[0] if single else hints,
            controlnet_conditioning_scale=per_net[0].scale if single else [o.scale for o in per_net],
            control_guidance_start=per_net[0].start if single else [o.start for o in per_net],
            control_guidance_end=per_net[0].end if single else [o.end for o in per_net],
            num_images_per_prompt=opt.batch_size,
            generator=generators,
            output_type="np",
        )
        if self.sampling.max_sequence_length is not None:  # the base's own (builtin-dit: 0 zero tokens for T5)
            call["max_sequence_length"] = self.sampling.max_sequence_length
        if any(m is not None for m in modes):  # Flux union nets: diffusers' control_mode (None: a plain net)
            call["control_mode"] = modes[0] if single else modes
        if (
            self.base.arch == "flux" and opt.true_cfg_scale > 1
        ):  # true CFG: none = "" (as CFG's unconditional branch)
            call["true_cfg_scale"] = opt.true_cfg_scale
            call["negative_prompt"] = _per_prompt(opt.negative_prompt or "", len(prompts))
        elif opt.negative_prompt is not None:
            call["negative_prompt"] = _per_prompt(opt.negative_prompt, len(prompts))
        if (
            opt.image is not None
        ):  # img2img (Flux): the init image at the output size, the last `strength` of the steps
            call["image"] = ci.condition_image(opt.image, width, height, opt.resize_mode)
            call["strength"] = opt.strength
        if progress is not None:

            def on_step(pipe_, i, t, tensors):
                progress(i + 1, pipe_.num_timesteps)
                return tensors

            call["callback_on_step_end"] = on_step
        # diffusers' SD3 ControlNet pipeline samples the condition's VAE posterior from torch's global generator
        # (`latent_dist.sample()`): seeded from the job's seed in a forked RNG, so that the same job gives the same
        # pixels and the caller's generator is left as it was
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(opt.seed)
            array = pipe(**call).images  # (N, H, W, 3) float in [0, 1]

        # 3. the result as the UNet pipeline gives it
        settings = {
            "base": self.base_name,
            "arch": self.base.arch,
            "prompt": prompts[0] if len(prompts) == 1 else prompts,
        }
        settings.update(opt.describe(len(self.controlnets)), width=width, height=height, seeds=seeds)
        settings.update(sampler=sampler_display_name(self.scheduler), inpaint_condition=[False] * len(control))
        unit = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)  # (N, 3, H, W)
        pils = ci.tensor_to_pil(unit) if opt.output_type == "pil" else []
        return GenerationResult(pils, array, seeds, settings, images)


# Stability's SD3.5 ControlNets were trained on conditions that are not plain [0, 1] pixels; the file says which
# (its `control_type` scalar: 0 blur, 1 canny, 2 depth; kept as `stability_control_type` in the net's config).
# The convention is ComfyUI's loader for these files (load_controlnet_sd35), the reference their users have: canny
# x -> x * 255 * 0.5 + 0.5 and depth x -> 1 - x on the [0, 1] image before its VAE encoding (2y - 1), blur as is.
STABILITY_HINTS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda x: x * 255 * 0.5 + 0.5,
    2: lambda x: 1.0 - x,
}


def union_mode(net, control_type: str | None, k: int) -> int | None:
    """Net k's mode id: a Flux union net (`num_mode`: InstantX's, Shakker's) must be given its condition's type, by
    the model cards' names (model/union_controlnet.py FLUX_UNION_MODES) or id; any other net none."""
    from controlnet.model.union_controlnet import FLUX_UNION_MODES, describe_types, type_id

    count = net.config.get("num_mode")
    if count is None:
        if control_type is not None:
            raise ValueError(f"control_type[{k}]={control_type!r}: ControlNet {k} is not a union ControlNet")
        return None
    if control_type is None:
        raise ValueError(
            f"control_type[{k}]: ControlNet {k} is a Flux union ControlNet; name the condition's type by name or id "
            f"({describe_types(count, FLUX_UNION_MODES)})"
        )
    try:
        return type_id(control_type, count, FLUX_UNION_MODES)
    except ValueError as err:
        raise ValueError(f"control_type[{k}]: {err}") from None


def publisher_hint(net, image):
    """The condition as `net`'s publisher fed it in training: `image` (RGB PIL) itself, or for a Stability SD3.5 canny /
    depth net a (1, 3, H, W) tensor of its convention, which diffusers' image processor maps by 2y - 1 as it maps
    an image (the values leave [0, 1] for canny, as in ComfyUI). XLabs' pixel hint needs nothing here: diffusers'
    Flux pipeline feeds an XLabs net (one with `input_hint_block`) the normalised pixels instead of VAE latents."""
    control_type = (net.config.get(STABILITY_CONTROL_TYPE_CONFIG) or {}).get("value")
    convention = STABILITY_HINTS.get(round(control_type)) if control_type is not None else None
    if convention is None:
        return image
    return convention(ci.pil_to_unit_tensor(image))  # (1, 3, H, W)


def _each(value, function):
    """`function` of one condition image, or of each image of a per-prompt list (a list back)."""
    return [function(v) for v in value] if isinstance(value, (list, tuple)) else function(value)


def _per_prompt(value, n: int) -> list[str]:
    values = [value] * n if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"negative_prompt: got {len(values)} for {n} prompts; expected one or one per prompt")
    return values
