"""End-to-end controlled generation: prompt + condition images -> images (paper Sec. 3.4, Fig. 1).

`ControlNetPipeline(...)(prompt, control=[...])` runs a numbered script of steps:

1. check inputs (one clear ValueError per problem)        5. latents: per-image seeded noise (img2img: noised image)
2. encode the prompt (and the negative prompt for CFG)   6. denoising loop: ControlNets (inside their windows)
3. prepare control images; embed each once (c_f = E(c))     -> residuals summed -> UNet -> CFG -> sampler step
4. timesteps (sampler by name; img2img strength)         7. decode (VAE, or identity for a pixel-space base)

It works on any SD-family base (SD1.x, SD2.x, SDXL, the built-in tiny model, with or without a VAE) and any
number of ControlNets (paper Sec. 3.4 / Fig. 7: residuals are added). Speed without changing results: the hint
embedding is computed once per generation (it does not depend on t), CFG branches run as one batch, modes that
control the conditional branch only run the nets on that half, and a net outside its start/end window is not
evaluated at all (diffusers runs it with scale 0). Loading a base from disk lives in `base.py` (`load_base`).

Union ControlNets (model/union_controlnet.py): units that name the same union net object (a file named by several
units is loaded once) with the same control window (start/end) and control mode, no block scales and a strength
above 0 run as ONE fused call of the net per step with all their (condition, type) pairs (`fused_units`): xinsir's
multi-condition mode, as diffusers' `StableDiffusionXLControlNetUnionPipeline` runs one `ControlNetUnionModel` with
several images. Each unit's strength is its condition's scale (features and token, not the outputs; the outputs get
the mode's per-output profile only), so the result is not the sum of the units run apart. Any other union unit
runs alone, as diffusers' single-condition call (`forward_unit`). A fused call takes each type once and at most
the net's number of types (one-line ValueError naming the units and control_type); settings record `fused`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from controlnet.generate import control_images as ci
from controlnet.generate.base import BaseComponents, denormalize_latents, normalize_latents
from controlnet.generate.builtin_format import SamplingDefaults
from controlnet.generate.control_calls import FusedCall, NetCall, fused_units, union_type_of
from controlnet.generate.cpu_packing import (
    compiled,
    holds_packs,
    packed_bytes,
    packed_weights,
    packing_fits,
    release_packed,
)
from controlnet.generate.guidance import apply_cfg, block_profile, in_window
from controlnet.generate.guidance import pad_unconditional as pad_uncond
from controlnet.generate.options import GenerationOptions
from controlnet.generate.prompts import PromptEmbeddings, encode_dual, encode_single
from controlnet.generate.results import INPAINT, GenerationResult
from controlnet.generate.samplers import make_scheduler, sampler_display_name
from controlnet.generate.sizes import OutputSize, choose_size
from controlnet.model.compose import add_residuals, unet_residual_kwargs
from controlnet.model.controlnet import ControlBase, ControlNet, ControlNetOutput
from controlnet.progress import phase

logger = logging.getLogger(__name__)

MIN_PACKING_STEPS = 8  # denoising steps from which packing the weights for oneDNN pays on its own (CPU)


def output_heights(net: ControlNet, latent_height: int) -> list[int]:
    """Height of each ControlNet output for a latent of `latent_height` (shallowest skip first, middle last)."""
    heights, h = [], latent_height
    for stride in net.output_strides:
        h = h if stride == 1 else (h + 1) // 2  # stride-2 conv with padding 1
        heights.append(h)
    return heights


class ControlNetPipeline:
    """Text-to-image (and img2img / inpainting) with any number of ControlNets on an SD-family base.

    Components are diffusers/transformers modules: `unet` (UNet2DConditionModel), `vae` (AutoencoderKL, or None
    for a pixel-space base whose images are in [-1, 1]), `text_encoder` + `tokenizer` (CLIP), `scheduler`, and for
    SDXL `text_encoder_2` (with projection) + `tokenizer_2`. `controlnets` are our `ControlNet`s.
    """

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler,
        controlnets: Sequence[ControlNet] = (),
        text_encoder_2=None,
        tokenizer_2=None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.controlnets = list(controlnets)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.base_name = "custom"
        self.base_ema: bool | None = None  # BaseComponents.ema: which UNet of a file holding EMA weights too
        self.sampling = SamplingDefaults()  # the base's own guidance/steps/sampler (from_components sets them)
        self._offload_device: torch.device | None = None
        self.pack_cpu_weights = (
            True  # generate/cpu_packing.py: on a CPU, same results up to float rounding, faster
        )

    @classmethod
    def from_components(cls, base: BaseComponents, controlnets: Sequence[ControlNet] = ()) -> ControlNetPipeline:
        """The pipeline of a loaded base (`generate.base.load_base`) and ControlNet objects; modules are shared.

        A transformer base (SD3 / Flux) gives a `TransformerControlNetPipeline` (generate/transformer_pipeline.py),
        which runs the same jobs through diffusers' pipelines of that family."""
        from controlnet.generate.transformer_base import TransformerBase

        if isinstance(base, TransformerBase):
            from controlnet.generate.transformer_pipeline import TransformerControlNetPipeline

            return TransformerControlNetPipeline.from_components(base, controlnets)
        pipe = cls(
            base.unet,
            base.vae,
            base.text_encoder,
            base.tokenizer,
            base.scheduler,
            controlnets,
            base.text_encoder_2,
            base.tokenizer_2,
            base.force_zeros_for_empty_prompt,
        )
        pipe.base_name, pipe.sampling, pipe.base_ema = base.name, base.sampling, base.ema
        return pipe

    @classmethod
    def from_pretrained(
        cls,
        base: str,
        controlnets: Sequence = (),
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        **base_options,
    ) -> ControlNetPipeline:
        """`base`: "builtin", a diffusers model folder, an exported folder or one SD checkpoint file (offline).

        `controlnets`: ControlNet objects or paths (original or diffusers format). `base_options` go to
        `generate.base.load_base` (tokenizer=, tokenizer_2=, prediction_type=, ema=, configs=, family=, progress=).
        A transformer base (SD3 / Flux diffusers folder) gives a `TransformerControlNetPipeline`.
        """
        from controlnet.generate.base import (
            BaseSource,
            check_base,
            check_controlnet_families,
            controlnet_path,
            load_base,
        )

        known = (
            "tokenizer",
            "tokenizer_2",
            "prediction_type",
            "configs",
            "family",
            "flags",
            "vae",
            "clip_l",
            "clip_g",
            "t5",
        )
        source = (
            base
            if isinstance(base, BaseSource)
            else check_base(base, **{k: v for k, v in base_options.items() if k in known})
        )
        controlnets = [c if isinstance(c, ControlBase) else controlnet_path(c) for c in controlnets]
        # a ControlNet of another family is refused from the headers, before the base is loaded (or cast)
        check_controlnet_families(source, controlnets, base_options.get("configs"), base_options.get("flags"))
        if source.arch != "unet":  # SD3 / Flux: generate/transformer_pipeline.py
            from controlnet.generate.transformer_pipeline import TransformerControlNetPipeline

            return TransformerControlNetPipeline.from_pretrained(
                source, controlnets, device, dtype, **base_options
            )
        components = load_base(source, device=device, dtype=dtype, **base_options)
        # a file named by several units (a union net, one type each) is loaded once and shared
        loaded: dict[Path, ControlBase] = {}
        nets = []
        for k, entry in enumerate(controlnets):
            if isinstance(entry, ControlBase):
                nets.append(entry)
                continue
            key = Path(entry).resolve()
            if key not in loaded:
                loaded[key] = _load_controlnet(entry, components.unet, k, len(controlnets))
            nets.append(loaded[key])
        pipe = cls.from_components(components, nets)
        for module in pipe._modules():
            module.eval().requires_grad_(False)
        return pipe.to(device, dtype)

    # ----------------------------------------------------------------------------------------------------
    # properties and placement
    @property
    def is_sdxl(self) -> bool:
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD's VAE, 1 in pixel space)."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self._offload_device or self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def _modules(self) -> list[torch.nn.Module]:
        mods = [self.unet, self.vae, self.text_encoder, self.text_encoder_2, *self.controlnets]
        return [m for m in mods if m is not None]

    def to(self, device=None, dtype: torch.dtype | None = None) -> ControlNetPipeline:
        """Move every model (bf16/fp16: `dtype=torch.bfloat16`; the VAE stays in float32 for fp16 decoding)."""
        release_packed(self.unet, *self.controlnets)  # CPU packs of the weights being moved or cast
        for module in self._modules():
            module.to(device)
            target = torch.float32 if (module is self.vae and dtype == torch.float16) else dtype
            if target is not None and next(module.parameters()).dtype != target:
                module.to(target)
        return self

    def enable_model_cpu_offload(self, device="cuda") -> ControlNetPipeline:
        """Keep models on the CPU and move each to `device` only while it runs (for GPUs with little memory)."""
        self._offload_device = torch.device(device)
        release_packed(self.unet, *self.controlnets)
        for module in self._modules():
            module.to("cpu")
        return self

    def optimize(
        self,
        channels_last: bool = False,
        compile: bool = False,
        pack_cpu_weights: bool | None = None,
        reuse_freed_memory: bool = False,
    ) -> ControlNetPipeline:
        """Speed options that leave results unchanged up to float rounding: channels_last, torch.compile (GPU);
        pack_cpu_weights (CPU, on by default: pre-packed oneDNN weights in the denoising loop, see
        generate/cpu_packing.py; False runs each layer's plain forward and frees the packed copy of the weights);
        reuse_freed_memory (CPU, process-wide: glibc keeps freed activations in the heap instead of handing them
        back and faulting them in, zero-filled, at every layer of every step; controlnet/allocator.py. With SD1.5
        single files a 2-step 256 px generation took 1.7-1.9M minor page faults with glibc's defaults, diffusers'
        0.35-0.59M)."""
        if reuse_freed_memory and self.device.type == "cpu":
            from controlnet.allocator import reuse_freed_memory as keep_freed_memory

            keep_freed_memory()
        if pack_cpu_weights is not None:
            self.pack_cpu_weights = pack_cpu_weights
            if not pack_cpu_weights:
                release_packed(self.unet, *self.controlnets)
        for module in [self.unet, *self.controlnets]:
            if channels_last:
                module.to(memory_format=torch.channels_last)
        if compile:
            self.unet = torch.compile(self.unet)
            self.controlnets = [torch.compile(n) for n in self.controlnets]
        return self

    @contextlib.contextmanager
    def _placed(self, *modules):
        """With CPU offload: move `modules` to the execution device for the block, then back to the CPU."""
        if self._offload_device is None:
            yield
            return
        for m in modules:
            if m is not None:
                m.to(self._offload_device)
        try:
            yield
        finally:
            for m in modules:
                if m is not None:
                    m.to("cpu")
            if self._offload_device.type == "cuda":
                torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------------------
    # generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        control: Sequence = (),
        options: GenerationOptions | None = None,
        progress: Callable[[int, int], None] | None = None,
        **kwargs,
    ) -> GenerationResult:
        """Generate `batch_size` images per prompt; settings are `GenerationOptions` fields (or `options=`); steps,
        guidance scale and sampler left as None are the base's (`self.sampling`).

        control: one condition image per ControlNet (path, PIL, uint8 array or tensor in [0, 1]; or a list with one
        per prompt; or "inpaint" to build the inpainting condition from `image` + `mask`: masked pixels -1 for the v1.1
        inpaint net, 0 for a union net, whose type is then repaint). Per-net settings
        (control_scale, block_scales, control_start/end, control_mode) take a value or a list with one per net.
        `progress(step, total)` is called after every sampler step.
        """
        # 1. check inputs ---------------------------------------------------------------------------------
        opt = options if options is not None else GenerationOptions(**kwargs)
        opt = opt.with_defaults(self.sampling)  # steps, guidance, sampler the caller left to the base
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
        negatives = None if opt.negative_prompt is None else _per_prompt(opt.negative_prompt, len(prompts))
        control = list(control)
        if len(control) != len(self.controlnets):
            raise ValueError(
                f"control: got {len(control)} condition images for {len(self.controlnets)} ControlNets; expected "
                "one per net"
            )
        per_net = opt.per_net(len(self.controlnets))
        if opt.true_cfg_scale != 1.0:
            raise ValueError(
                f"true_cfg_scale={opt.true_cfg_scale}: true CFG is for guidance-distilled Flux bases; a UNet base's "
                "classifier-free guidance is guidance_scale"
            )
        inpaint = [isinstance(c, str) and c == INPAINT for c in control]
        if any(inpaint) and opt.mask is None:
            raise ValueError(
                'control "inpaint" needs `image` and `mask`: its condition is the image with the masked pixels set to '
                "-1 (v1.1 inpaint net) or 0 (a union net's repaint type)"
            )
        size = self.output_size(opt.width, opt.height, control, opt.image)
        if size.note():
            logger.info(size.note())
        width, height = size.width, size.height
        factor = self.vae_scale_factor
        union_types = [
            union_type_of(net, o.control_type, k, inpaint[k])
            for k, (net, o) in enumerate(zip(self.controlnets, per_net, strict=True))
        ]
        for k, (net, o) in enumerate(zip(self.controlnets, per_net, strict=True)):
            if net.hint_config.downscale_factor != factor:
                raise ValueError(
                    f"ControlNet {k} embeds conditions by {net.hint_config.downscale_factor}x but this base's latents "
                    f"are {factor}x smaller than images: the net was made for another base"
                )
            if o.block_scales is not None and len(o.block_scales) != net.num_control_outputs:
                raise ValueError(
                    f"block_scales[{k}] has {len(o.block_scales)} values; ControlNet {k} has "
                    f"{net.num_control_outputs} outputs (skips + the middle block)"
                )
        fusion = fused_units(self.controlnets, per_net, union_types)  # units of one union net: one call each step
        device, dtype = self.device, self.dtype
        batch_size, cfg, image, mask = opt.batch_size, opt.cfg, opt.image, opt.mask
        num_images = len(prompts) * batch_size
        seeds = [opt.seed + k for k in range(num_images)]

        # 2. encode the prompt: context (2N, L, D) ordered [unconditional, conditional] when CFG is on -------
        with self._placed(self.text_encoder, self.text_encoder_2):
            cond_emb, uncond_emb = self._encode(prompts, negatives, cfg, opt.clip_skip)
        context = _repeat(cond_emb.context, batch_size).to(device, dtype)  # (N, L, D)
        added, added_cond = None, None
        if self.is_sdxl:
            # SDXL micro-conditioning: original size, crop top-left, target size (Podell et al. 2023, Sec. 2.2)
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
            pooled = _repeat(cond_emb.pooled, batch_size).to(device, dtype)
            added_cond = {"text_embeds": pooled, "time_ids": time_ids.repeat(num_images, 1)}
            added = added_cond
        if cfg:
            uncond_context = _repeat(uncond_emb.context, batch_size).to(device, dtype)
            context = torch.cat([uncond_context, context])  # (2N, L, D)
            if self.is_sdxl:
                pooled_u = _repeat(uncond_emb.pooled, batch_size).to(device, dtype)
                added = {
                    "text_embeds": torch.cat([pooled_u, added_cond["text_embeds"]]),
                    "time_ids": time_ids.repeat(2 * num_images, 1),
                }

        # 3. control images: resize, stack (N, 3, H, W), embed once per net --------------------------------
        init_unit = mask_px = None
        if image is not None:
            init_pixels = ci.init_image_tensor(image, width, height, opt.resize_mode)  # (1, 3, H, W) in [-1, 1]
            init_unit = (init_pixels + 1) / 2
            if mask is not None:
                mask_px = ci.mask_tensor(mask, width, height, opt.resize_mode)  # (1, 1, H, W)
        conds, control_pils = [], []
        for k, entry in enumerate(control):
            # v1.1 inpaint net: masked pixels -1; a union net's unit is of type repaint here (union_type_of): 0, black
            if inpaint[k]:
                masked = ci.INPAINT_MASKED_VALUE if union_types[k] is None else ci.UNION_REPAINT_MASKED_VALUE
                cond = ci.inpaint_condition(init_unit, mask_px, masked)  # (1, 3, H, W), masked pixels -1 or 0
                control_pils.append(ci.tensor_to_pil(cond.clamp(min=0))[0])
            else:
                entries = _per_prompt_images(entry, len(prompts), k)
                # RGB at the output size; a job's conditions arrive so (run_job resized them) and pass unchanged
                images = [ci.condition_image(e, width, height, opt.resize_mode) for e in entries]
                cond = torch.cat([ci.pil_to_unit_tensor(im) for im in images])  # (1 or P, 3, H, W) in [0, 1]
                control_pils.append(images[0])
            conds.append(cond)
        latent_h, latent_w = height // factor, width // factor
        nets: list[NetCall] = []
        fused = {units[0]: units for units in fusion}  # the first unit of each group runs the group
        in_group = {k for units in fusion for k in units}
        with self._placed(*self.controlnets):
            for k, (net, o, union_type) in enumerate(zip(self.controlnets, per_net, union_types, strict=True)):
                if k in in_group and k not in fused:
                    continue  # runs in its group's call
                profile = block_profile(o.mode, output_heights(net, latent_h), opt.guess_mode_form)
                blocks = o.block_scales or [1.0] * net.num_control_outputs
                out_scales = [o.scale * p * b for p, b in zip(profile, blocks, strict=True)]
                if not any(out_scales):
                    continue  # strength 0: the net is never evaluated, the output is the base model's
                both = cfg and not o.mode.conditional_only
                members = fused.get(k, [k])
                hints = []
                for j in members:
                    hint = net.embed_condition(conds[j].to(device))  # (1 or P, C_0, h, w), once per generation
                    hint = (
                        hint.repeat_interleave(batch_size, 0)
                        if hint.shape[0] > 1
                        else hint.expand(num_images, -1, -1, -1)
                    )
                    hints.append(torch.cat([hint, hint]) if both else hint)
                if k in fused:
                    group = FusedCall(
                        members, hints, [union_types[j] for j in members], [per_net[j].scale for j in members]
                    )
                    nets.append(NetCall(net, None, list(profile), o.start, o.end, not both, fused=group))
                else:
                    nets.append(NetCall(net, hints[0], out_scales, o.start, o.end, not both, union_type))

        # 4. timesteps: a fresh sampler (the pipeline's own is never mutated); img2img skips the first steps -------
        base_config = self.scheduler.config
        sched = (
            make_scheduler(opt.scheduler, base_config)
            if opt.scheduler
            else type(self.scheduler).from_config(base_config)
        )
        steps, strength = opt.steps, opt.strength
        sched.set_timesteps(steps, device=device)
        timesteps = sched.timesteps
        if image is not None and strength < 1.0:
            skip = steps - min(int(steps * strength), steps)
            if skip >= steps:
                raise ValueError(f"strength={strength} with steps={steps} leaves no denoising step; raise either")
            timesteps = timesteps[skip * sched.order :]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(skip * sched.order)

        # 5. latents: per-image seeded noise (reproducible on any device), or the noised init image ---------
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        channels = self.unet.config.in_channels
        noise = torch.cat([torch.randn((1, channels, latent_h, latent_w), generator=g) for g in generators])
        noise = noise.to(device, dtype)  # (N, C, h, w)
        init_latents = latent_mask = None
        if init_unit is not None:
            with self._placed(self.vae):
                init_latents = self._encode_image(init_pixels).expand(num_images, -1, -1, -1)  # (N, C, h, w)
        if init_latents is None or strength >= 1.0:
            latents = noise * sched.init_noise_sigma
        else:
            latents = sched.add_noise(init_latents, noise, timesteps[:1].repeat(num_images))
        if mask_px is not None:
            latent_mask = torch.nn.functional.interpolate(mask_px, size=(latent_h, latent_w)).to(device, dtype)
        step_kwargs = self._step_kwargs(sched, generators, opt.eta)

        # 6. denoising loop ----------------------------------------------------------------------------------
        n_steps = len(timesteps)
        # packing costs about two plain SD1.5 steps at 256 px once (generate/cpu_packing.py) and saves ~25% of every
        # step after it: it pays from ~8 steps on, and at once where the packs are kept from an earlier generation
        packing = self.pack_cpu_weights and device.type == "cpu" and not compiled(self.unet)
        packing = packing and (n_steps >= MIN_PACKING_STEPS or holds_packs(self.unet))
        if packing and not packing_fits(self.unet, *[n.net for n in nets]):
            logger.info("not packing the weights for oneDNN: their copy would not fit in free memory")
            packing = False
        # the packs are made as the first step meets each layer: that step takes 2-3 plain steps' time at SD size
        first_step = contextlib.ExitStack()
        models = [self.unet, *[n.net for n in nets]]
        if packing and any(packed_bytes(m) and not holds_packs(m) for m in models):  # a model still to pack
            first_step.enter_context(phase("packing the weights for the CPU (during step 1)"))
        with (
            self._placed(self.unet, *[n.net for n in nets]),
            packed_weights(self.unet, *[n.net for n in nets], enabled=packing),
            first_step,
        ):
            for i, t in enumerate(timesteps):
                model_in = sched.scale_model_input(torch.cat([latents, latents]) if cfg else latents, t)
                residuals = None
                for item in nets:
                    if not in_window(i, n_steps, item.start, item.end):
                        continue  # outside its window the net is not run (diffusers runs it with scale 0)
                    half = item.conditional_only and cfg
                    out = item(
                        model_in[num_images:] if half else model_in,
                        t,
                        context[num_images:] if half else context,
                        added_cond if half else added,
                    )
                    if half:
                        out = ControlNetOutput([pad_uncond(d) for d in out.down], pad_uncond(out.mid))
                    residuals = add_residuals(residuals, out)
                eps = self.unet(
                    model_in,
                    t,
                    encoder_hidden_states=context,
                    added_cond_kwargs=added,
                    **unet_residual_kwargs(residuals),
                ).sample  # (2N or N, C, h, w)
                if cfg:
                    eps = apply_cfg(eps, opt.guidance_scale)
                latents = sched.step(eps, t, latents, **step_kwargs).prev_sample
                if latent_mask is not None:  # inpainting: keep the known region on the schedule's noise level
                    known = init_latents
                    if i < n_steps - 1:
                        known = sched.add_noise(init_latents, noise, timesteps[i + 1 : i + 2].repeat(num_images))
                    latents = latent_mask * latents + (1 - latent_mask) * known
                if i == 0:
                    first_step.close()
                if progress is not None:
                    progress(i + 1, n_steps)

        # 7. decode ----------------------------------------------------------------------------------------
        settings = {"base": self.base_name, "prompt": prompts[0] if len(prompts) == 1 else prompts}
        if self.base_ema is not None:  # a base file holding two UNets: which one drew these images
            settings["ema"] = self.base_ema
        settings.update(opt.describe(len(self.controlnets)), width=width, height=height, seeds=seeds)
        settings.update(sampler=sampler_display_name(sched), inpaint_condition=inpaint)
        for k, entry in enumerate(settings["controlnets"]):
            # a union net's unit: its type id, and whether it ran in a fused call of its net or alone
            if union_types[k] is not None:
                entry.update(union_type=union_types[k], fused=k in in_group)
        if opt.output_type == "latent":
            return GenerationResult([], latents, seeds, settings, control_pils)
        with self._placed(self.vae), phase(f"decoding {len(latents)} image{'s' if len(latents) > 1 else ''}"):
            pixels = self._decode(latents)  # (N, 3, H, W) in [-1, 1]
        unit = (pixels.float() / 2 + 0.5).clamp(0, 1)  # (N, 3, H, W)
        if opt.inpaint_paste:  # keep the source pixels exactly where nothing was to be repainted
            keep = mask_px.to(unit.device)
            unit = keep * unit + (1 - keep) * init_unit.to(unit.device)
        array = unit.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3)
        images = ci.tensor_to_pil(unit) if opt.output_type == "pil" else []
        return GenerationResult(images, array, seeds, settings, control_pils)

    # ----------------------------------------------------------------------------------------------------
    # helpers of the steps above
    @property
    def native_size(self) -> int | None:
        """The side in pixels the base was trained at (UNet sample_size x VAE factor: 512 for SD1.5)."""
        sample = self.unet.config.get("sample_size")
        if isinstance(sample, (list, tuple)):
            sample = max(sample)
        return int(sample) * self.vae_scale_factor if sample else None

    def output_size(self, width=None, height=None, control=(), image=None) -> OutputSize:
        """The size a call with these arguments generates (see `generate/sizes.py` for the rules).

        Given sizes must be positive multiples of the VAE factor; a size taken from the first condition (or the
        init image) is scaled to the base's native resolution, aspect kept; without either, the native size.
        """
        first = next((c for c in control if not isinstance(c, str) or c != INPAINT), None)
        source = first if first is not None else image
        if isinstance(source, (list, tuple)):
            source = source[0]
        size = None
        if source is not None and (width is None or height is None):
            size = ci.image_size(source, "condition image")
        return choose_size(width, height, size, self.native_size, self.vae_scale_factor)

    def _encode(self, prompts, negatives, cfg: bool, clip_skip: int) -> tuple[PromptEmbeddings, PromptEmbeddings]:
        if self.is_sdxl:
            pairs = [
                (t, e) for t, e in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
            ]
            pairs = [(t, e) for t, e in pairs if e is not None]
            cond = encode_dual(*zip(*pairs, strict=True), prompts)
            if not cfg:
                return cond, None
            if negatives is None and self.force_zeros_for_empty_prompt:
                zeros = PromptEmbeddings(torch.zeros_like(cond.context), torch.zeros_like(cond.pooled))
                return cond, zeros
            return cond, encode_dual(*zip(*pairs, strict=True), negatives or [""] * len(prompts))
        cond = encode_single(self.tokenizer, self.text_encoder, prompts, clip_skip)
        uncond = (
            encode_single(self.tokenizer, self.text_encoder, negatives or [""] * len(prompts), clip_skip)
            if cfg
            else None
        )
        return cond, uncond

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> the UNet's latents (1, C, h, w): the VAE posterior's mean (deterministic)."""
        pixels = pixels.to(self.device)
        if self.vae is None:
            return pixels.to(self.dtype)
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        return normalize_latents(self.vae, latents).to(self.dtype)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        return self.vae.decode(denormalize_latents(self.vae, latents).to(self.vae.dtype)).sample

    @staticmethod
    def _step_kwargs(sched, generators, eta: float) -> dict:
        params = inspect.signature(sched.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generators if len(generators) > 1 else generators[0]
        return kwargs


def _per_prompt(value, n: int) -> list[str]:
    values = [value] * n if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"negative_prompt: got {len(values)} for {n} prompts; expected one or one per prompt")
    return values


def _per_prompt_images(entry, n_prompts: int, k: int) -> list:
    if isinstance(entry, (list, tuple)):
        if len(entry) not in (1, n_prompts):
            raise ValueError(
                f"control[{k}]: got {len(entry)} condition images for {n_prompts} prompts; expected 1 or one per prompt"
            )
        return list(entry)
    return [entry]


def _repeat(x: torch.Tensor, times: int) -> torch.Tensor:
    """(P, ...) -> (P * times, ...), each prompt's rows kept together (prompt-major, as image k = p * times + j)."""
    return x.repeat_interleave(times, dim=0)


def _load_controlnet(entry, unet, k: int = 0, n: int = 1) -> ControlNet:
    if isinstance(entry, ControlBase):  # a ControlNet, or the ablation's ControlNetLite
        return entry
    from controlnet.io.api import load_controlnet

    with phase(f"loading ControlNet {Path(entry).name} ({k + 1}/{n})"):  # 5-15 s at SD size
        return load_controlnet(entry, unet=unet)
